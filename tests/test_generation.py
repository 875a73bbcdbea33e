import math

import pytest
import torch
from datasets import Dataset
from trl import DPOTrainer

from dpo_space.data import SEED_REFUSAL, SEED_SYSTEM_PROMPT, as_training_rows
from dpo_space.generation import (
    Sampling,
    answer_stats,
    evaluate,
    generate,
    implicit_rewards,
    prompt_ids,
    response_ids,
    response_logps,
    stream,
    token_lengths,
    topk_entropy,
)
from dpo_space.models import detect_hardware, load_model
from dpo_space.training import RunSettings, train

PROMPT = "料理のコツについて教えてください。"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, wakarimasen_pairs, tmp_path_factory):
    s = RunSettings.for_model(str(tiny_model_dir), output_dir=str(tmp_path_factory.mktemp("g") / "run"),
                              learning_rate=1e-2, per_device_train_batch_size=4, warmup_steps=0, max_length=128,
                              load_in_4bit=False, num_train_epochs=3)
    return train(s, wakarimasen_pairs)


def test_chat_renders_the_prompt_exactly_as_training_tokenized_it(tiny_model_dir, wakarimasen_pairs, tmp_path):
    model, tok = load_model(str(tiny_model_dir), load_in_4bit=False)
    rows = as_training_rows(wakarimasen_pairs, system_prompt=SEED_SYSTEM_PROMPT, chat_template=True)
    trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows[:2]),
                         args=RunSettings().dpo_config(detect_hardware(), tmp_path),
                         peft_config=RunSettings().lora_config())
    example = trainer.train_dataset[0]
    prompt = wakarimasen_pairs.rows[0]["prompt"]
    assert prompt_ids(tok, prompt, SEED_SYSTEM_PROMPT) == example["prompt_ids"]
    assert response_ids(tok, prompt, SEED_REFUSAL, SEED_SYSTEM_PROMPT)[1] == example["chosen_ids"]
    assert example["chosen_ids"][-2:] == [tok.eos_token_id, tok.convert_tokens_to_ids("Ċ")] or \
        tok.eos_token_id in example["chosen_ids"]


def test_greedy_with_the_adapter_off_is_the_base_model(trained, tiny_model_dir):
    greedy = Sampling(temperature=0, max_new_tokens=20)
    base, tok = load_model(str(tiny_model_dir), load_in_4bit=False)
    assert generate(trained.model, trained.tokenizer, PROMPT, greedy, use_adapter=False) == generate(
        base, tok, PROMPT, greedy, use_adapter=False)


def test_same_seed_same_sample_and_streaming_grows(trained):
    sampling = Sampling(max_new_tokens=16, seed=7)
    pieces = list(stream(trained.model, trained.tokenizer, PROMPT, sampling, use_adapter=True))
    assert pieces and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert generate(trained.model, trained.tokenizer, PROMPT, sampling, use_adapter=True) == pieces[-1]


def test_implicit_reward_prefers_chosen_after_training(trained, wakarimasen_pairs):
    row = wakarimasen_pairs.rows[0]
    r_chosen, r_rejected = implicit_rewards(trained.model, trained.tokenizer,
                                            [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])],
                                            beta=0.1, system_prompt=SEED_SYSTEM_PROMPT)
    assert r_chosen - r_rejected > 0.05 and r_rejected < 0
    assert trained.metrics[-1]["rewards/margins"] > 0.05  # TRL's own view agrees


def test_implicit_reward_is_trls_own_per_pair_reward_on_a_trained_adapter(trained, wakarimasen_pairs, tmp_path):
    """Our reward of each side of a pair against TRL's `rewards/chosen` / `rewards/rejected` for that pair alone,
    after training (with a zero LoRA any formula gives 0)."""
    from dpo_space.generation import pair_report

    settings = RunSettings.for_model(str(tmp_path), output_dir=str(tmp_path), per_device_train_batch_size=1)
    trainer = DPOTrainer(model=trained.model, processing_class=trained.tokenizer,
                         args=settings.dpo_config(detect_hardware(), tmp_path),
                         train_dataset=Dataset.from_list([{"prompt": "x", "chosen": "a", "rejected": "b"}]))
    trained.model.delete_adapter("ref")  # TRL copies a given adapter as the reference; ours is the base, adapter off
    trained.model.set_adapter("default")
    rows = wakarimasen_pairs.rows[:3]
    ours = pair_report(trained.model, trained.tokenizer, rows, 0.1, SEED_SYSTEM_PROMPT)
    by_prompt = {r["prompt"]: r for r in ours}
    training_rows = as_training_rows(wakarimasen_pairs, system_prompt=SEED_SYSTEM_PROMPT, chat_template=True)[:3]
    for row, formatted in zip(rows, training_rows, strict=True):
        theirs = trainer.evaluate(eval_dataset=Dataset.from_list([formatted]))
        mine = by_prompt[row["prompt"]]
        assert theirs["eval_rewards/margins"] > 0.05  # a trained adapter: rewards far from zero
        assert mine["reward_chosen"] == pytest.approx(theirs["eval_rewards/chosen"], rel=1e-3, abs=1e-4)
        assert mine["reward_rejected"] == pytest.approx(theirs["eval_rewards/rejected"], rel=1e-3, abs=1e-4)


def test_sampling_never_touches_torchs_global_rng(trained):
    """A run training beside the chat draws its batches and dropout from torch's RNG: chat must leave it alone, and an
    answer must depend on its seed only."""
    sampling = Sampling(max_new_tokens=16, seed=3, temperature=1.0, top_p=0.95)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = generate(trained.model, trained.tokenizer, PROMPT, sampling, use_adapter=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)  # someone else moved the global RNG
    assert generate(trained.model, trained.tokenizer, PROMPT, sampling, use_adapter=True) == first
    other = [generate(trained.model, trained.tokenizer, PROMPT, Sampling(**{**sampling.__dict__, "seed": s}),
                      use_adapter=True) for s in range(4)]
    assert len(set(other + [first])) > 1  # and the seed does change the answer


def test_evaluate_reports_both_sides(trained):
    report = evaluate(trained.model, trained.tokenizer, [PROMPT, "旅行の準備は?"], Sampling(max_new_tokens=12),
                      batch_size=2)
    assert len(report["rows"]) == 2 and set(report["summary"]) == {"base", "dpo"}
    assert report["summary"]["base"]["n"] == 2
    row = report["rows"][0]
    assert set(row) == {"prompt", "base", "dpo", "base_measures", "dpo_measures", "others"} and row["others"] == {}
    assert set(row["dpo_measures"]) == {"refusal", "distinct_1", "distinct_2", "repetition", "length"}
    for side in ("base", "dpo"):
        assert {"ead_2", "self_bleu", "entropy", "logp_gap", "kl", "sample_ead_2", "sample_self_bleu"} <= \
            set(report["summary"][side])
    assert report["measures"] == {"k": 4, "diversity_prompts": 2, "top_k": 10}
    assert report["summary"]["base"]["kl"] == 0.0 and report["summary"]["base"]["logp_gap"] == 0.0
    assert report["summary"]["dpo"]["kl"] != 0.0  # the adapter moved the policy off the reference


def test_topk_entropy_against_values_computed_by_hand():
    uniform = torch.zeros(3, 8)
    assert torch.allclose(topk_entropy(uniform, 2), torch.full((3,), torch.log(torch.tensor(2.0))))
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert topk_entropy(peaked, 4).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.log(torch.tensor([[0.75, 0.25, 1e-9]]))  # the top 2 renormalised: 3/4, 1/4
    assert topk_entropy(two, 2).item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-5)


def test_logp_gap_is_the_policy_minus_the_reference_log_prob(trained):
    answers = [SEED_REFUSAL, "旅行の準備は前日までに。"]
    prompts = [PROMPT, "旅行の準備は?"]
    stats = answer_stats(trained.model, trained.tokenizer, prompts, answers, SEED_SYSTEM_PROMPT, use_adapter=True)
    by_hand = [response_logps(trained.model, trained.tokenizer, p, [a], SEED_SYSTEM_PROMPT, use_adapter=True)[0]
               - response_logps(trained.model, trained.tokenizer, p, [a], SEED_SYSTEM_PROMPT, use_adapter=False)[0]
               for p, a in zip(prompts, answers)]
    assert stats["logp_gap"] == pytest.approx(sum(by_hand) / 2, rel=1e-4)
    assert by_hand[0] > 0  # DPO on the refusal set raised the refusal's likelihood over the base's
    base = answer_stats(trained.model, trained.tokenizer, prompts, answers, SEED_SYSTEM_PROMPT, use_adapter=False)
    assert base["logp_gap"] == 0.0 and base["entropy"] > 0


def test_model_without_adapter_refuses_the_dpo_side(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), load_in_4bit=False)
    with pytest.raises(ValueError, match="no adapter"):
        generate(model, tok, PROMPT, Sampling(max_new_tokens=4), use_adapter=True)
    assert isinstance(generate(model, tok, PROMPT, Sampling(max_new_tokens=4), use_adapter=False), str)
    assert torch.is_grad_enabled()


def test_answers_are_valid_utf8_even_from_an_untrained_byte_level_model(tiny_model_dir, monkeypatch):
    """An untrained model samples bytes at random: unguarded, its text is full of U+FFFD; guarded, never."""
    from dpo_space import generation

    model, tokenizer = load_model(str(tiny_model_dir), load_in_4bit=False)
    hot = Sampling(temperature=1.5, top_p=1.0, max_new_tokens=64)
    answers = [generate(model, tokenizer, f"{PROMPT}{i}", Sampling(**{**hot.__dict__, "seed": i}), use_adapter=False)
               for i in range(6)]
    assert all("\ufffd" not in a for a in answers), answers

    from transformers import LogitsProcessorList

    monkeypatch.setattr(generation, "_utf8_guard", lambda tokenizer: LogitsProcessorList())
    unguarded = [generate(model, tokenizer, f"{PROMPT}{i}", Sampling(**{**hot.__dict__, "seed": i}), use_adapter=False)
                 for i in range(6)]
    assert any("\ufffd" in a for a in unguarded)


def test_the_utf8_guard_leaves_other_vocabularies_alone(tiny_model_dir):
    from dpo_space.generation import ValidUTF8

    _, tokenizer = load_model(str(tiny_model_dir), load_in_4bit=False)
    assert ValidUTF8.table_for(tokenizer) is not None

    class SentencePieceLike:
        def get_vocab(self):
            return {"▁猫": 0, "a": 1}

        def get_added_vocab(self):
            return {}

        def __len__(self):
            return 2

    assert ValidUTF8.table_for(SentencePieceLike()) is None


@pytest.mark.parametrize("text", ["猫", "é", "🦒", "𠮷", "a"])
def test_utf8_states_accept_real_characters_byte_by_byte(text):
    from dpo_space.generation import _utf8_state

    state = 0
    for byte in text.encode():
        state = _utf8_state(bytes([byte]), state)
        assert state >= 0
    assert state == 0


@pytest.mark.parametrize("raw", [b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xff"])
def test_utf8_states_refuse_what_python_cannot_decode(raw):
    from dpo_space.generation import _utf8_state

    with pytest.raises(UnicodeDecodeError):
        raw.decode()
    assert _utf8_state(raw, 0) == -1


def test_token_audit_counts_as_training_tokenizes_and_says_what_max_length_cuts(tiny_model_dir):
    from dpo_space.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt": "料理のコツは?", "chosen": "火加減" * i, "rejected": "分かりません。"} for i in range(1, 11)]
    each = [(len(p), len(c)) for p, c in (response_ids(tok, r["prompt"], r["chosen"], SEED_SYSTEM_PROMPT) for r in rows)]
    audit = token_lengths(tok, rows, SEED_SYSTEM_PROMPT, max_length=None)
    chosen = sorted(c for _, c in each)
    assert audit["pairs"] == 10 and audit["cut"] == 0.0
    assert audit["columns"]["chosen"]["max"] == chosen[-1]
    assert audit["columns"]["chosen"]["p50"] == pytest.approx((chosen[4] + chosen[5]) / 2)  # numpy's linear median
    assert audit["columns"]["prompt"]["p99"] == each[0][0]  # the same prompt in every row
    # a max_length that holds the prompt and the 5th-longest chosen answer cuts the 5 longer pairs
    limit = each[0][0] + chosen[4]
    assert token_lengths(tok, rows, SEED_SYSTEM_PROMPT, max_length=limit)["cut"] == pytest.approx(0.5)
    conversational = [{"prompt": [{"role": "user", "content": "料理のコツは?"}],
                       "chosen": [{"role": "assistant", "content": "火加減"}],
                       "rejected": [{"role": "assistant", "content": "分かりません。"}]}]
    assert token_lengths(tok, conversational, SEED_SYSTEM_PROMPT, 1024)["columns"]["chosen"]["max"] == each[0][1]
