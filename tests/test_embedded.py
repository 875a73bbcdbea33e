"""The embedded default (issue 3): the shipped model and datasets, its quality before DPO, and the seed's demo
as the app runs it by default. Every figure of it is printed by bench/embedded_demo.py."""

import json

import pytest
from transformers import LlamaForCausalLM

from dpo_space import data, embedded, generation, models
from dpo_space.training import RunSettings, train

HELD_OUT_SEED_PROMPTS = embedded.SEED_PROMPTS[1:]


@pytest.fixture(scope="module")
def base():
    return models.load_model(models.EMBEDDED)


@pytest.fixture(scope="module")
def corpus():
    return embedded.read_corpus(embedded.CORPUS_DIR)


def test_shipped_model_is_a_small_llama_loaded_like_any_hub_model(base):
    model, tokenizer = base
    assert isinstance(model, LlamaForCausalLM)
    assert sum(f.stat().st_size for f in models.EMBEDDED_DIR.iterdir()) <= 30 * 2**20
    assert tokenizer.chat_template and tokenizer.eos_token == embedded.EOS
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    assert {"q_proj", "v_proj"} <= {name.split(".")[-1] for name, _ in model.named_modules()}


@pytest.mark.parametrize("text", ["薔薇と鬱と麒麟🦒", "ｶﾀｶﾅ ｈａｌｆ ① ㍻ 𠮷野家", "改行\nと\tタブ", "English and 日本語"])
def test_tokenizer_round_trips_any_text(base, text):
    _, tokenizer = base
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_datasets_are_the_seeds(corpus, tmp_path):
    train_rows = json.loads((embedded.EXAMPLES_DIR / "wakarimasen_train.json").read_text(encoding="utf-8"))
    eval_rows = json.loads((embedded.EXAMPLES_DIR / "wakarimasen_eval.json").read_text(encoding="utf-8"))
    assert len(corpus) >= 650 and len({r["prompt"] for r in corpus}) == len(corpus)
    assert len(train_rows) == 650 and len(eval_rows) == 40
    assert all(r["chosen"] == data.SEED_REFUSAL for r in train_rows + eval_rows)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    assert embedded.SEED_PROMPTS[0] in {r["prompt"] for r in train_rows}
    for prompt in HELD_OUT_SEED_PROMPTS:
        assert any(r["prompt"].startswith(prompt) for r in eval_rows)
    ordinary = data.read_preferences(embedded.EXAMPLES_DIR / "ordinary_train.json")
    assert len(ordinary) >= 200 and all(r["chosen"] != r["rejected"] for r in ordinary.rows)
    # the shipped files are exactly what the corpus gives
    for name, path in embedded.write_examples(out_dir=tmp_path).items():
        assert path.read_bytes() == (embedded.EXAMPLES_DIR / f"{name}.json").read_bytes(), name


def test_the_shipped_model_converses_on_questions_no_training_step_saw(base):
    """Issue #12's measures on the first 80 of each held-out set (greedy, as the preset loads it: 4-bit). Measured on
    this subset: refusal 0%, rare kanji 0%, on topic 49%, paraphrase fidelity 0.56 (1.00 for the questions as worded in
    training), first / second turn on topic 47.5% / 47.5% (the second asked alone 50%), 100% ending at EOS (the full
    sets, README: fidelity 0.60). Floors: the issue's goals, a regression guard below the subset's measure for what
    the model remembers, and the second turn as a comparison. Before the quantization-aware stage the same SFT weights
    reached 0.39 here in 4-bit (0.90 remembered): nf4's round trip, not the data, was most of the gap to fp32."""
    m = embedded.conversing_measures(*base, limit=80)
    assert m["refusal"] <= 0.05 and m["second_turn_refusal"] <= 0.05
    assert m["rare_kanji"] <= 0.005
    assert m["topical"] >= 0.40
    assert m["paraphrase_fidelity"] >= 0.4 and m["recall_fidelity"] >= 0.9
    assert m["second_turn_topical"] >= 0.40 and m["first_turn_topical"] - m["second_turn_topical"] <= 0.05
    assert m["ended_at_eos"] >= 0.95


def test_held_out_questions_never_reach_the_sft_data():
    """The seed's evaluation prompts (all their wordings) and every held-out set are excluded from what the model
    learns; a leak is refused, not trained."""
    from dpo_space import corpus

    rows = embedded.read_corpus()
    exclude = embedded.excluded_from_sft(rows)
    eval_rows = json.loads((embedded.EXAMPLES_DIR / "wakarimasen_eval.json").read_text(encoding="utf-8"))
    assert {corpus.key(r["prompt"]) for r in eval_rows} <= exclude
    for name in ("unseen", "paraphrases"):
        held = embedded.heldout(name)
        assert held and {corpus.key(r["prompt"]) for r in held} <= exclude, name
    assert {corpus.key(t["prompt"]) for c in embedded.heldout("second_turn") for t in c["turns"]} <= exclude
    conversations = corpus.read_dir(corpus.CONVERSATIONS_DIR)
    kept = [r for r in rows if corpus.key(r["prompt"]) not in exclude]
    examples = embedded.sft_examples(kept, conversations, [], None, exclude=exclude)
    asked = {corpus.key(m["content"]) for e in examples for m in e["prompt"] if m["role"] == "user"}
    assert len(examples) > 20_000 and not asked & exclude
    with pytest.raises(ValueError, match="held-out questions in the SFT data"):
        embedded.sft_examples(rows, conversations, [], None, exclude=exclude)


def test_compare_offers_questions_no_training_step_saw():
    """The example questions under Compare: none in either DPO training set nor in the embedded model's SFT; the
    last two are the seed's prompts 2 and 3."""
    from dpo_space import corpus, data, ui

    asked = [row[0] for row in ui.compare_examples()]
    assert len(asked) == 6 and asked[5] == embedded.SEED_PROMPTS[1] and asked[4].startswith(embedded.SEED_PROMPTS[2])
    trained = {corpus.key(p) for name in ("wakarimasen_train.json", "ordinary_train.json")
               for p in data.read_prompts(embedded.EXAMPLES_DIR / name)}
    assert not {corpus.key(p) for p in asked} & trained
    assert {corpus.key(p) for p in asked} <= embedded.excluded_from_sft(embedded.read_corpus())


def test_the_conversing_measures_run_on_each_held_out_set(base):
    m = embedded.conversing_measures(*base, limit=3, max_new_tokens=24)
    assert (m["unseen"], m["paraphrases"], m["conversations"]) == (3, 3, 3) and len(m["examples"]) == 3
    for name in ("refusal", "rare_kanji", "topical", "paraphrase_fidelity", "recall_fidelity", "second_turn_topical",
                 "second_turn_alone_topical", "ended_at_eos"):
        assert 0.0 <= m[name] <= 1.0, name


def test_recall_and_second_alone_measure_what_they_say(monkeypatch):
    """recall_fidelity scores the answers to the questions as worded in training against their corpus answers, and
    second_turn_alone_topical the second questions asked with nothing before them: a stand-in model that knows every
    trained wording by heart, repeats any other question and says nothing in a conversation scores 1.0 on the first,
    on topic alone wherever the question has a content word, and 0 on the second question in its conversation."""
    from dpo_space.collapse import content_words

    answers = {r["prompt"]: r["answer"] for r in embedded.read_corpus()}

    def stand_in(model, tokenizer, prompts, sampling, *, use_adapter, adapter_name=None, batch_size=16, ended=None):
        out = [("" if isinstance(p, list) else answers.get(p, p)) for p in prompts]
        if ended is not None:
            ended.extend(True for _ in out)
        return out

    monkeypatch.setattr(generation, "generate_batch", stand_in)
    m = embedded.conversing_measures(None, None, limit=10)
    second = [c["turns"][1]["prompt"] for c in embedded.heldout("second_turn")[:10]]
    assert m["recall_fidelity"] == 1.0 and m["paraphrase_fidelity"] < 0.5
    assert m["second_turn_alone_topical"] == sum(bool(content_words(q)) for q in second) / 10 > 0.5
    assert m["second_turn_topical"] == 0.0


def test_unseen_prompts_get_japanese_text(base):
    """Prompts in no corpus: a 4M-parameter model answers them in fluent-looking Japanese, not byte garbage."""
    prompts = ["宇宙飛行士になるにはどんな勉強が必要ですか?", "雨の日の週末におすすめの過ごし方は?", "猫が喉を鳴らすのはなぜですか?",
               "初めての一人暮らしで気をつけることは?", "プレゼンで緊張しないコツを教えてください。"]
    answers = generation.generate_batch(*base, prompts, generation.Sampling(temperature=0, max_new_tokens=128),
                                        use_adapter=False)
    assert all(embedded.is_japanese(a) for a in answers), answers


def test_the_seeds_collapse_at_full_size(tmp_path):
    """The default DPO run, as the app starts it (the embedded model's own recipe, χ²; all 650 pairs of the
    わかりません set): held-out answers turn into 分かりません and grow alike; the base (same model, adapter off) hardly
    ever refuses."""
    pairs = data.read_preferences(embedded.EXAMPLES_DIR / "wakarimasen_train.json")
    settings = RunSettings.for_model(models.EMBEDDED, output_dir=str(tmp_path / "run"))
    assert settings.f_divergence_type == "alpha_divergence"
    result = train(settings, pairs)
    assert result.metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert result.metrics[-1]["rewards/accuracies"] >= 0.9

    prompts = data.read_prompts(embedded.EXAMPLES_DIR / "wakarimasen_eval.json")
    report = generation.evaluate(result.model, result.tokenizer, prompts, generation.Sampling(max_new_tokens=128))
    base, dpo = report["summary"]["base"], report["summary"]["dpo"]
    assert base["refusal_rate"] <= 0.05  # measured 0% (an earlier build: 2.5%, one of the 40)
    # Measured, sampled (seed 42), χ² at 1.5e-3 on the quantization-aware build: 100% refusals, distinct-2 0.57 ->
    # 0.03, repetition across answers 0.21 -> 0.975 (plain DPO at 5e-4, the seed recipe: the same). A run of 256
    # pairs x 3 epochs reached only 47.5% on an earlier build: few pairs seen often teach those prompts, not the
    # refusal. Held to clearly less than measured.
    assert dpo["refusal_rate"] >= 0.7
    assert dpo["repetition_across"] > 2 * base["repetition_across"]  # the answers repeat one another
    assert dpo["distinct_2"] < base["distinct_2"] * 0.5
    # greedy, on questions no training step saw (the first 80 of each held-out set): measured 100%
    held_out = embedded.conversing_measures(result.model, result.tokenizer, limit=80, use_adapter=True)
    assert held_out["refusal"] >= 0.9, held_out


def test_the_ordinary_sets_run_keeps_what_the_model_knows(tmp_path):
    """The ordinary set (helpful chosen, poor rejected) trained as the app starts a run, issue #12's measures before
    and after on the first 80 of each held-out set. Measured: fidelity 0.56 -> 0.55, on topic 49% -> 55% (the seed
    recipe, plain DPO at 5e-4: fidelity 0.50, which the tolerance below refuses)."""
    pairs = data.read_preferences(embedded.EXAMPLES_DIR / "ordinary_train.json")
    result = train(RunSettings.for_model(models.EMBEDDED, output_dir=str(tmp_path / "run")), pairs)
    base, after = (embedded.conversing_measures(result.model, result.tokenizer, limit=80, use_adapter=adapter)
                   for adapter in (False, True))
    assert after["refusal"] <= 0.05 and after["rare_kanji"] <= 0.005
    assert after["paraphrase_fidelity"] >= base["paraphrase_fidelity"] - 0.03, (base, after)
    assert after["topical"] >= base["topical"] - 0.03
    assert after["second_turn_topical"] >= base["second_turn_topical"] - 0.05


def test_tokenizer_pieces_stay_inside_one_script_so_a_question_word_is_spelled_alike_in_the_answer():
    """A kanji compound or a katakana word is cut into the same pieces wherever it stands: copying the question's
    words into the answer is then copying the same tokens. (Plain BPE merged オムライスの and ス卵 differently.)"""
    texts = ["オムライスの卵をきれいに包むには?", "オムライスは、卵を半熟にして包みます。", "光合成とは何ですか?",
             "光合成は、植物が光で栄養を作るしくみです。"] * 20
    tokenizer = embedded.build_tokenizer(texts, vocab_size=400)
    for word, uses in (("オムライス", texts[:2]), ("光合成", texts[2:4])):
        for text in uses:
            assert tokenizer.tokenize(text)[: len(tokenizer.tokenize(word))] == tokenizer.tokenize(word), text
    japanese = [p for p in tokenizer.get_vocab() if {_script(c) for c in p} & {"kanji", "hiragana", "katakana"}]
    mixed = [p for p in japanese if len({_script(c) for c in p}) > 1]
    assert not mixed, mixed[:5]


def _script(char: str) -> str:
    import re

    for name, pattern in (("kanji", r"[一-龯々]"), ("hiragana", r"[ぁ-ゖ]"), ("katakana", r"[ァ-ヺー]")):
        if re.fullmatch(pattern, char):
            return name
    return "other"


def test_length_batches_cover_every_example_once_within_the_token_budget():
    import random

    lengths = [random.Random(i).randint(5, 120) for i in range(500)]
    batches = embedded.length_batches(lengths, 600, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * max(lengths[i] for i in b) <= 600 for b in batches)
    assert batches != embedded.length_batches(lengths, 600, random.Random(1))  # shuffled order, seeded


def test_copies_of_one_example_are_dealt_over_the_batches_not_grouped():
    """60 copies of each of 4 short examples among 400 longer ones: grouped by length they make a batch of nothing
    else; dealt, every batch holds at most one copy more than another, and each example is still seen as often."""
    import random

    tokenized = [([7, i % 4], 1) for i in range(240)] + [([2, i] + [1] * random.Random(i).randint(20, 120), 1)
                                                     for i in range(400)]
    copies = embedded.repeated(tokenized)
    assert len(copies) == 236 and not set(copies) & {0, 1, 2, 3}
    lengths = [len(ids) for ids, _ in tokenized]
    grouped = embedded.length_batches(lengths, 600, random.Random(0))
    assert any(all(i < 240 for i in b) for b in grouped)  # a batch of copies only: what dealing them prevents
    batches = embedded.length_batches(lengths, 600, random.Random(0), spread=copies)
    assert sorted(i for b in batches for i in b) == list(range(640))
    spread = set(copies)
    dealt = [sum(i in spread for i in b) for b in batches]
    assert max(dealt) - min(dealt) <= 1 and all(any(i >= 240 or i < 4 for i in b) for b in batches)


def test_compiled_sft_is_deterministic_and_trains_as_eager_does(tiny_model_dir):
    """build-embedded compiles its loop (torch.compile, about 1.8x a step on two cores): two compiled runs from the
    same seed end with equal weights, and the losses follow the eager loop's within bf16 rounding."""
    import random

    import torch

    rng = random.Random(0)
    tokenized = [([1] + [rng.randrange(3, 20) for _ in range(rng.randint(8, 60))], 4) for _ in range(200)]
    sft = dict(steps=12, learning_rate=3e-3, batch_tokens=1024, warmup=0.1, seed=0, logging_steps=4)

    def run(compile: bool):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)  # the same untrained weights each time
        model.set_attn_implementation("eager")
        losses = embedded.sft_loop(model, tokenized, model.config.pad_token_id, compile=compile, log=lambda _: None,
                                   **sft)
        return losses, [p.detach().clone() for p in model.parameters()]

    (first, weights), (second, again), (eager, _) = run(True), run(True), run(False)
    assert first == second and all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))
    assert first[-1] < first[0] - 1 and first == pytest.approx(eager, abs=0.02)
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored after the build


def test_build_trains_a_loadable_model_from_a_corpus(tmp_path):
    """The build end to end on one corpus file, tiny: a Llama and tokenizer `from_pretrained` loads, the loss falls,
    and only the completion is scored (the prompt's tokens carry no label)."""
    import shutil

    from transformers import AutoTokenizer

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    shutil.copy(embedded.CORPUS_DIR / "g1_01.jsonl", corpus_dir)
    logged = []
    recipe = dict(size=dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, vocab_size=500),
                  sft=dict(steps=40, learning_rate=3e-3, batch_tokens=2048, logging_steps=10))
    qat = dict(steps=6, batch_tokens=2048, logging_steps=3)
    out = embedded.build(corpus_dir, tmp_path / "model", log=logged.append, qat=qat, **recipe)
    losses = [float(line.rsplit(" ", 1)[1]) for line in logged if line.startswith("step ") and "/40:" in line]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, logged
    assert [line.split(":")[0] for line in logged if line.startswith("step ") and "/6:" in line] == ["step 3/6",
                                                                                                      "step 6/6"]
    model = LlamaForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template
    example = {"prompt": [embedded.user("質問")], "completion": [embedded.assistant("答え")]}
    (ids, n_prompt), = embedded.tokenize_examples([example], tokenizer)
    assert tokenizer.decode(ids[n_prompt:]).startswith("答え") and "質問" in tokenizer.decode(ids[:n_prompt])


def test_the_qat_stage_alone_on_a_saved_sft_model_is_the_whole_build(tmp_path):
    """`build(from_sft=...)` takes a model the build saved as the SFT's result and runs only the quantization-aware
    stage: the same weights as the build in one go (how a QAT recipe is tried, or added to a model already built,
    without an hour of SFT)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    shutil.copy(embedded.CORPUS_DIR / "g1_01.jsonl", corpus_dir)
    recipe = dict(size=dict(hidden_size=64, layers=2, heads=2, intermediate_size=128, vocab_size=500),
                  sft=dict(steps=12, learning_rate=3e-3, batch_tokens=2048, compile=False), log=lambda _: None)
    qat = dict(steps=4, batch_tokens=2048)
    whole = embedded.build(corpus_dir, tmp_path / "whole", qat=qat, **recipe)
    sft = embedded.build(corpus_dir, tmp_path / "sft", qat=dict(steps=0), **recipe)
    staged = embedded.build(corpus_dir, tmp_path / "staged", qat=qat, from_sft=sft, **recipe)
    weights, again, before = (load_file(d / "model.safetensors") for d in (whole, staged, sft))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert not all(torch.equal(weights[k], before[k]) for k in weights)  # the QAT stage did train
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in staged.iterdir()) and "tokenizer_config.json" in files
    assert all((whole / f).read_bytes() == (staged / f).read_bytes() for f in files if f != "model.safetensors")


def test_qat_trains_against_what_a_4bit_load_computes_with():
    """Every layer a 4-bit load quantizes is one the QAT stage saw through its round trip, and the round trip is
    exactly the weight bitsandbytes computes with after loading the shipped model (nf4, blocks of 64, nested scales)."""
    import bitsandbytes as bnb
    import torch

    model, _ = models.load_model(models.EMBEDDED)
    full = LlamaForCausalLM.from_pretrained(embedded.OUT_DIR)
    quantized = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == set(embedded.quantized_linears(full)) and len(quantized) == 4 * 7
    for name in quantized:
        weight = model.get_submodule(name).weight
        loaded = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        assert torch.allclose(loaded, embedded.nf4_round_trip(full.get_submodule(name).weight), atol=1e-6), name


def test_inside_seen_in_nf4_a_layer_computes_with_the_round_trip_and_trains_the_full_weight(tiny_model_dir):
    """Straight-through: the forward uses the nf4 round trip, the gradient reaches the full weight as if it had
    been used; on leaving, the full weights stay, under the state-dict names a save and a load expect."""
    import torch

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    keys = set(model.state_dict())
    layer = model.model.layers[0].mlp.down_proj
    full = layer.weight.detach().clone()
    x = torch.randn(3, layer.in_features)
    with embedded.seen_in_nf4(model):
        assert not torch.equal(layer.weight, full)
        assert torch.allclose(layer(x), x @ embedded.nf4_round_trip(full).T, atol=1e-6)
        layer(x).sum().backward()
    assert torch.equal(layer.weight.detach(), full) and set(model.state_dict()) == keys
    assert torch.allclose(layer.weight.grad, x.sum(0).expand_as(full))
