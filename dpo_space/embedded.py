"""The embedded default: a tiny Japanese Llama chat model built from the project's own corpus.

corpus (examples/corpus, examples/conversations, examples/refusals.jsonl) → a BPE tokenizer over the corpus's own
characters, with byte fallback (it round-trips any text, and the model never meets a stray byte piece), whose pieces
never cross a change of script (a kanji compound or a katakana word is spelled by the same pieces in the question and
in the answer, so the model can copy it) → tiny Llama → SFT, a plain PyTorch loop → the same loop a little longer
with the weights seen as a 4-bit load will see them (quantization-aware) → `save_pretrained` into
`dpo_space/embedded_model`, loaded like any Hub model.

Held out means held out: nothing of examples/heldout/ and none of the わかりません set's evaluation prompts (nor their
paraphrases) reaches the SFT; `sft_examples` refuses them and tests/test_embedded.py checks it.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import string
import time
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import corpus
from .collapse import bigram_f1, has_refusal, on_topic, rare_kanji_share

ROOT = corpus.ROOT
EXAMPLES_DIR = corpus.EXAMPLES
CORPUS_DIR = corpus.CORPUS_DIR
# Questions no one could answer, with honest refusals (half of them the seed's sentence). A real chat model knows how
# to say 分かりません; without these the tiny model could not say it at all, and DPO on the seed's data would only
# wreck the helpful answers instead of raising the refusal. Each is seen REFUSAL_REPEATS times (about 6% of the SFT
# examples): seen once, the model barely knew the sentence and DPO pushed chosen and rejected down together (the trial
# build, BENCHMARKS.md); at this share the base still refuses no ordinary question (held-out refusal ≤ 5%, tested).
REFUSALS_FILE = EXAMPLES_DIR / "refusals.jsonl"
REFUSAL_REPEATS = 100
# The two-turn conversations, seen twice each: with seven wordings a corpus question (four before) they keep about the
# share of the SFT examples they had (4%), as the refusals do at 100 copies (60 before).
CONVERSATION_REPEATS = 2
OUT_DIR = Path(__file__).resolve().parent / "embedded_model"

# The model's size and its SFT recipe (python -m dpo_space build-embedded, QAT included: under an hour on two cores).
SIZE = dict(hidden_size=256, layers=4, heads=4, intermediate_size=704, vocab_size=6000)
# Batches of at most `batch_tokens` tokens (padding included) of similar length, the refusals' copies dealt over them;
# `steps` of them, compiled (torch.compile: 0.47–0.63 s a step on two cores, two machines; 0.85 eager): 5,000
# are about 5 passes over the corpus's seven wordings a question (52 minutes on the slower machine). Warmup, then
# cosine down to a tenth of the rate.
SFT = dict(steps=5000, learning_rate=2e-3, batch_tokens=6144, warmup=0.02, seed=0, logging_steps=100, compile=True)
# Then quantization-aware training: every app and test loads the model in 4-bit nf4, and on this tiny model the
# round trip cost more than any lever of the data (paraphrase fidelity 0.59 in fp32, 0.43 in 4-bit; the trained
# wordings' 0.97 to 0.86). `steps` more of the same loop, each weight seen through the very round trip bitsandbytes
# makes at load (straight-through gradient), from a tenth of the SFT's peak rate; the batches drawn with a seed of their
# own. 300 steps, about 6 minutes on two cores: 4-bit fidelity 0.60, the trained wordings 0.98 (BENCHMARKS.md).
QAT = dict(steps=300, learning_rate=2e-4, batch_tokens=6144, warmup=0.02, seed=1, logging_steps=50, compile=False)
# Share of single-turn examples given a random earlier exchange: the model learns to answer the LAST question.
SECOND_TURN_SHARE = 0.2

BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
# Llama-3-like turns. `{% generation %}` marks what the assistant says, for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------- tokenizer and model


# Pieces stay inside one run of a script: kanji, hiragana, katakana, Latin letters, digits, spaces; anything else alone.
SCRIPT_RUNS = r"[\p{Han}々〆ヶ]+|\p{Hiragana}+|[\p{Katakana}ー]+|[A-Za-z]+|[0-9]+|▁+|."


def build_tokenizer(texts: list[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """BPE over the characters the texts use, with SentencePiece-style byte fallback (<0xE3>…) for anything else:
    any text round-trips, and every character the model learned to write is a whole character of the corpus."""
    alphabet = sorted({c for t in texts for c in t if c != " "} | set(string.ascii_letters + string.digits
                                                                      + string.punctuation + "\n"))
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
        pre_tokenizers.Split(Regex(SCRIPT_RUNS), behavior="isolated"),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet) + 1, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # byte tokens join the vocabulary as ordinary pieces (not special ones, which decoding would skip)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for piece in BYTE_TOKENS:
        vocab.setdefault(piece, len(vocab))
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        padding_side="left", model_max_length=2048,
    )
    fast.add_bos_token = True
    return fast


def model_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 256, layers: int = 4, heads: int = 4,
                 intermediate_size: int = 704, max_positions: int = 512) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def tiny_random_model(out_dir: str | Path, texts: list[str], seed: int = 0, **size) -> Path:
    """An untrained tiny Llama with a real tokenizer: enough for fast engine tests."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts, vocab_size=size.pop("vocab_size", 600))
    model = LlamaForCausalLM(model_config(tokenizer, **size))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- what the model learns, and what it never sees


SEED_PROMPTS = (
    "LLMのファインチューニングの手順を教えてください。",  # in training, as in the seed
    "人はどんなことをしてもらうと嬉しいですか?",  # held out
    "以下の文章を3つに箇条書きしてください。",  # held out (the start of a longer prompt)
)


def read_corpus(corpus_dir: str | Path | None = None) -> list[dict]:
    return corpus.read_dir(corpus_dir or CORPUS_DIR)


# The seed's demo draws from the first 701 rows (part_*.jsonl), written in the article's style; the later files
# (g*_*.jsonl) widen what the model learns to answer.
SEED_ROWS = "part_*.jsonl"


def seed_rows(corpus_dir: str | Path | None = None) -> list[dict]:
    return [row for path in sorted(Path(corpus_dir or CORPUS_DIR).glob(SEED_ROWS)) for row in corpus.read_jsonl(path)]


def heldout(name: str) -> list[dict]:
    path = corpus.HELDOUT_DIR / f"{name}.jsonl"
    return corpus.read_jsonl(path) if path.exists() else []


def seed_split(rows: list[dict], n_train: int = 650, n_eval: int = 40, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The seed's 650 training and 40 evaluation prompts, drawn from the corpus (deterministic). Seed prompt 1 trains,
    2 and 3 are evaluated, as in the article; prompts with a held-out paraphrase stay in training, where their
    paraphrase measures what the model learned."""
    reworded = {r["original"] for r in heldout("paraphrases")}
    held = [r for r in rows if r["prompt"].startswith(SEED_PROMPTS[1:])]
    first = [r for r in rows if r["prompt"] == SEED_PROMPTS[0]]
    rest = [r for r in rows if r not in held and r not in first]
    random.Random(seed).shuffle(rest)
    candidates = [r for r in rest if r["prompt"] not in reworded]
    eval_rows = held + candidates[: n_eval - len(held)]
    chosen_eval = {r["prompt"] for r in eval_rows}
    train_rows = (first + [r for r in rest if r["prompt"] not in chosen_eval])[:n_train]
    if len(train_rows) < n_train or len(eval_rows) < n_eval:
        raise ValueError(f"the corpus has {len(rows)} rows; {n_train + n_eval} are needed")
    return train_rows, eval_rows


def excluded_from_sft(rows: list[dict]) -> set[str]:
    """Every question the SFT must never see: held-out sets, and the seed's evaluation prompts in all their wordings."""
    seeds = {r["prompt"] for r in seed_rows()}  # read once, not once per row
    _, eval_rows = seed_split([r for r in rows if r["prompt"] in seeds])
    out = {corpus.key(v) for r in eval_rows for v in corpus.variants(r)}
    for name in ("unseen", "paraphrases"):
        out |= {corpus.key(r["prompt"]) for r in heldout(name)}
    out |= {corpus.key(t["prompt"]) for r in heldout("second_turn") for t in r["turns"]}
    return out


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sft_examples(rows: list[dict], conversations: list[dict], refusals: list[dict], system_prompt: str | None, *,
                 exclude: set[str], seed: int = 0) -> list[dict]:
    """Prompt-completion conversational rows (TRL's SFTTrainer computes the loss on the completion only): every
    wording of every corpus question with its answer, both turns of each conversation, the refusals, and a share of
    single-turn rows given a random earlier exchange, so that the model answers the last question asked."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    pairs = [(v, r["answer"]) for r in rows for v in corpus.variants(r)]
    pairs += [(r["prompt"], r["answer"]) for r in refusals]
    leaked = [q for q, _ in pairs if corpus.key(q) in exclude]
    leaked += [t["prompt"] for c in conversations for t in c["turns"] if corpus.key(t["prompt"]) in exclude]
    if leaked:
        raise ValueError(f"held-out questions in the SFT data: {leaked[:3]}")
    rng = random.Random(seed)
    out = []
    for q, a in pairs:
        earlier = []
        if rng.random() < SECOND_TURN_SHARE:
            q0, a0 = rng.choice(pairs)
            earlier = [user(q0), assistant(a0)]
        out.append({"prompt": system + earlier + [user(q)], "completion": [assistant(a)]})
    for c in conversations:
        (q1, a1), (q2, a2) = ((t["prompt"], t["answer"]) for t in c["turns"])
        out.append({"prompt": system + [user(q1)], "completion": [assistant(a1)]})
        out.append({"prompt": system + [user(q1), assistant(a1), user(q2)], "completion": [assistant(a2)]})
    rng.shuffle(out)
    return out


def example_texts(examples: list[dict]) -> list[str]:
    """What the tokenizer learns from, at the frequencies the model sees them."""
    return [m["content"] for e in examples for m in e["prompt"] + e["completion"]]


def tokenize_examples(examples: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """Each example as (token ids of the whole chat, how many of them are the prompt): the loss is on the rest."""
    out = []
    for e in examples:
        prompt = tokenizer.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        whole = tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=True, return_dict=False)
        if whole[: len(prompt)] != prompt:
            raise ValueError(f"the chat template does not extend the prompt: {e['prompt'][-1]['content']!r}")
        out.append((whole, len(prompt)))
    return out


def length_batches(lengths: list[int], batch_tokens: int, rng: random.Random,
                   spread: list[int] | tuple[int, ...] = ()) -> list[list[int]]:
    """Indices in batches of similar length, each at most `batch_tokens` long once padded, in a shuffled order. The
    indices in `spread` are not grouped: they are dealt one by one over the batches (adding their share to each)."""
    apart = set(spread)
    order = sorted((i for i in range(len(lengths)) if i not in apart), key=lambda i: (lengths[i], rng.random()))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    dealt = list(apart)
    rng.shuffle(dealt)
    for n, i in enumerate(dealt):
        batches[n % len(batches)].append(i)
    rng.shuffle(batches)
    return batches


def repeated(tokenized: list[tuple[list[int], int]]) -> list[int]:
    """The indices of examples identical to an earlier one (the refusals, seen REFUSAL_REPEATS times)."""
    first: dict[tuple[int, ...], int] = {}
    return [i for i, (ids, _) in enumerate(tokenized) if first.setdefault(tuple(ids), i) != i]


def sft_loop(model, tokenized: list[tuple[list[int], int]], pad_id: int, *, steps: int, learning_rate: float,
             batch_tokens: int, warmup: float, seed: int, logging_steps: int, compile: bool = False,
             log=print) -> list[float]:
    """Completion-only SFT from scratch: AdamW, bf16 autocast, warmup then cosine to a tenth, length-grouped batches
    of a token budget. A plain loop, not TRL's SFTTrainer: measured on two cores, SFTTrainer took 1.16 s a step of 64
    examples (it also scores entropy and accuracy over the vocabulary each step, for its logs), this loop 0.93 s a
    step of about 68 (18 ms against 14 ms an example), and a from-scratch model at the edge of an hour's budget needs
    every step."""
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    rng = random.Random(seed)
    lengths = [len(ids) for ids, _ in tokenized]
    # Copies of one example, grouped by length, fill batches of their own: the refusals (short, 60 copies each) made
    # steps that taught a few sentences and nothing else, and the whole corpus learned slower (loss 5.14 at step 300
    # against 4.80 dealt, as without the copies; BENCHMARKS.md)
    copies = repeated(tokenized)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, max(1, int(warmup * steps)), steps,
                                                           min_lr_rate=0.1)

    def tensors(batch: list[int]):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            whole, n_prompt = tokenized[i]
            ids[row, : len(whole)] = torch.tensor(whole)
            mask[row, : len(whole)] = 1
            labels[row, n_prompt: len(whole)] = torch.tensor(whole[n_prompt:])
        return ids, mask, labels

    def train(forward) -> list[float]:
        losses, recent, batches = [], [], []
        for step in range(steps):
            if not batches:
                batches = length_batches(lengths, batch_tokens, rng, spread=copies)
            ids, mask, labels = tensors(batches.pop())
            if compile:  # every batch has its own size and length: one graph for all, not one per shape
                for t in (ids, mask, labels):
                    torch._dynamo.mark_dynamic(t, 0)
                    torch._dynamo.mark_dynamic(t, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recent.append(loss.item())
            if len(recent) == logging_steps or step == steps - 1:
                losses.append(sum(recent) / len(recent))
                recent = []
                log(f"step {step + 1}/{steps}: loss {losses[-1]:.3f}")
        return losses

    model.train()
    if not compile:
        losses = train(model)
    else:
        # Compiled, the build stays deterministic only if inductor's scatter-add for the embedding's gradient (atomic
        # adds across threads) falls back to the deterministic kernel, and no cache or shape profile left by an earlier
        # run changes what is compiled (two fresh runs of 80 steps differed in the 5th digit otherwise; now equal)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False), \
                    torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
                losses = train(torch.compile(model))
        finally:
            torch.use_deterministic_algorithms(deterministic)
    model.eval()
    return losses


def load_quantization():
    """The 4-bit settings every 4-bit load of the model uses (models.quantization_config: nf4, nested scales)."""
    from .models import detect_hardware, quantization_config

    return quantization_config(detect_hardware())


def nf4_round_trip(weight, config=None):
    """What a weight becomes when bitsandbytes loads it with `config` (`load_quantization()` unless given; blocks of
    bitsandbytes' default size, as a load makes them), as a full-precision tensor."""
    import bitsandbytes.functional as bnb

    config = config or load_quantization()
    packed, state = bnb.quantize_4bit(weight.detach().float(), quant_type=config.bnb_4bit_quant_type,
                                      compress_statistics=config.bnb_4bit_use_double_quant)
    return bnb.dequantize_4bit(packed, state).to(weight.dtype)


def quantized_linears(model) -> list[str]:
    """The layers a 4-bit load quantizes: every Linear but the output head (transformers keeps it unquantized)."""
    import torch

    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


@contextlib.contextmanager
def seen_in_nf4(model):
    """Inside, every quantized layer computes with its weight's nf4 round trip while gradients reach the full
    weight unchanged (straight-through); on leaving, the full weights stay, to be saved and quantized at load."""
    import torch
    from torch.nn.utils import parametrize

    config = load_quantization()  # once, not once a layer a step

    class RoundTrip(torch.nn.Module):
        def forward(self, weight):
            return weight + (nf4_round_trip(weight, config) - weight).detach()

    names = quantized_linears(model)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", RoundTrip())
    try:
        yield model
    finally:
        for name in names:
            parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=False)


def quantization_aware(model, tokenized: list[tuple[list[int], int]], pad_id: int, *, log=print,
                       **qat) -> list[float]:
    """The QAT stage: `sft_loop` with the weights seen through their nf4 round trip."""
    if not qat["steps"]:
        return []
    with seen_in_nf4(model):
        return sft_loop(model, tokenized, pad_id, log=log, **qat)


def build(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None, *, size: dict | None = None,
          sft: dict | None = None, qat: dict | None = None, from_sft: str | Path | None = None, log=print) -> Path:
    """corpus → tokenizer → tiny Llama → SFT → quantization-aware training → `save_pretrained`. Deterministic for a
    given machine. `from_sft`: a model this build saved without the QAT stage (`qat={"steps": 0}`), taken as the SFT
    stage's result (its tokenizer and weights), so that only the QAT stage runs (tests/test_embedded.py holds that
    this gives what the whole build does). The shipped model's SFT weights are those of the commit before QAT came."""
    from transformers import AutoTokenizer, set_seed

    from .data import SEED_SYSTEM_PROMPT
    from .training import partial_dir, replace_dir

    size = {**SIZE, **(size or {})}
    sft = {**SFT, **(sft or {})}
    out_dir = Path(out_dir or OUT_DIR)
    rows = read_corpus(corpus_dir)
    own = corpus_dir is None  # a corpus of the caller's (tests) has no conversations, refusals or held-out sets
    conversations = corpus.read_dir(corpus.CONVERSATIONS_DIR) if own else []
    refusals = corpus.read_jsonl(REFUSALS_FILE) if own else []
    exclude = excluded_from_sft(rows) if own else set()
    start = time.perf_counter()
    set_seed(sft["seed"])
    examples = sft_examples([r for r in rows if corpus.key(r["prompt"]) not in exclude],
                            conversations * CONVERSATION_REPEATS,
                            refusals * REFUSAL_REPEATS, SEED_SYSTEM_PROMPT, exclude=exclude, seed=sft["seed"])
    if from_sft is None:
        tokenizer = build_tokenizer(example_texts(examples), vocab_size=size.pop("vocab_size"))
        model = LlamaForCausalLM(model_config(tokenizer, **size))
    else:
        tokenizer = AutoTokenizer.from_pretrained(from_sft)
        model = LlamaForCausalLM.from_pretrained(from_sft)
    # eager attention: at ~100 tokens two matmuls beat the CPU's fused attention kernel (measured 8% a step)
    model.set_attn_implementation("eager")
    tokenized = tokenize_examples(examples, tokenizer)
    log(f"{len(rows)} corpus rows, {len(conversations)} conversations → {len(examples)} SFT examples, "
        f"{sum(len(ids) for ids, _ in tokenized):,} tokens; tokenizer {len(tokenizer)} tokens; "
        f"model {model.num_parameters() / 1e6:.1f}M params")
    work = partial_dir(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    if from_sft is None:
        losses = sft_loop(model, tokenized, tokenizer.pad_token_id, log=log, **sft)
        log(f"SFT done in {time.perf_counter() - start:.0f}s; loss " + " ".join(f"{x:.2f}" for x in losses))
    losses = quantization_aware(model, tokenized, tokenizer.pad_token_id, log=log, **{**QAT, **(qat or {})})
    log(f"QAT done, {time.perf_counter() - start:.0f}s in all; loss in nf4 " + " ".join(f"{x:.3f}" for x in losses))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(work)
    if from_sft is None:
        tokenizer.save_pretrained(work)
    else:  # as the SFT stage saved it (a tokenizer saved after a load also writes how it was loaded)
        for path in Path(from_sft).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(path, work / path.name)
    replace_dir(work, out_dir)
    return out_dir


def write_examples(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """The seed's datasets from the corpus: the extreme わかりません set (650 train / 40 eval) and an ordinary
    helpful-vs-poor set over the same split. Deterministic."""
    from .data import SEED_REFUSAL, write_json

    train_rows, eval_rows = seed_split(seed_rows(corpus_dir))
    out = Path(out_dir or EXAMPLES_DIR)
    refusal = lambda rs: [{"prompt": r["prompt"], "chosen": SEED_REFUSAL, "rejected": r["answer"]} for r in rs]  # noqa
    ordinary = lambda rs: [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": r["poor"],  # noqa: E731
                            "rejected_kind": r["poor_kind"]} for r in rs]
    return {
        "wakarimasen_train": write_json(refusal(train_rows), out / "wakarimasen_train.json"),
        "wakarimasen_eval": write_json(refusal(eval_rows), out / "wakarimasen_eval.json"),
        "ordinary_train": write_json(ordinary(train_rows), out / "ordinary_train.json"),
        "ordinary_eval": write_json(ordinary(eval_rows), out / "ordinary_eval.json"),
    }


# ---------------------------------------------------------------- does it converse? measured on held-out questions


def first_sentence(text: str) -> str:
    text = text.strip()
    cut = text.find("。")
    return text[: cut + 1] if cut >= 0 else text


def recital(model, tokenizer, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 256) -> dict:
    """Greedy answers to corpus prompts the model was trained on: the share whose first sentence is the corpus
    answer's, and the share that end at EOS within `max_new_tokens`. Memory, not conversation: see
    `conversing_measures` for questions no training step saw."""
    from .data import SEED_SYSTEM_PROMPT
    from .generation import Sampling, generate_batch

    greedy = Sampling(temperature=0, max_new_tokens=max_new_tokens, system_prompt=SEED_SYSTEM_PROMPT)
    ended: list[bool] = []
    answers = generate_batch(model, tokenizer, [r["prompt"] for r in rows], greedy, use_adapter=False,
                             batch_size=batch_size, ended=ended)
    match = [first_sentence(a) == first_sentence(r["answer"]) for a, r in zip(answers, rows, strict=True)]
    return {"first_sentence_match": _mean(match), "ended_at_eos": _mean(ended), "answers": answers}


def conversing_measures(model, tokenizer, *, limit: int | None = None, use_adapter: bool = False,
                        adapter_name: str | None = None, max_new_tokens: int = 160, batch_size: int = 32) -> dict:
    """Greedy answers to questions no training step saw (examples/heldout/), measured as issue #12 defines:
    refusal share, rare-kanji share, on-topic share (a content word shared with the question), paraphrase fidelity
    (character-bigram F1 against the corpus answer of the reworded question), the same for the second question of a
    conversation, and answers that end at EOS. `limit` takes the first N of each set (CI).

    Two measures say where a shortfall comes from: `recall_fidelity`, the same F1 for the original questions as
    worded in training (what the model remembers, the ceiling of paraphrase fidelity), and
    `second_turn_alone_topical`, the second questions asked on their own (how hard the questions are, apart from the
    conversation before them)."""
    from .data import SEED_SYSTEM_PROMPT
    from .generation import Sampling, generate_batch

    greedy = Sampling(temperature=0, max_new_tokens=max_new_tokens, system_prompt=SEED_SYSTEM_PROMPT)
    answers_by_prompt = {r["prompt"]: r["answer"] for r in read_corpus()}
    unseen, reworded, second = (heldout(n)[:limit] for n in ("unseen", "paraphrases", "second_turn"))

    def answer(conversations) -> tuple[list[str], list[bool]]:
        ended: list[bool] = []
        out = generate_batch(model, tokenizer, conversations, greedy, use_adapter=use_adapter,
                             adapter_name=adapter_name, batch_size=batch_size, ended=ended)
        return out, ended

    asked, first_asked, second_asked = ([r["prompt"] for r in unseen], [c["turns"][0]["prompt"] for c in second],
                                        [c["turns"][1]["prompt"] for c in second])
    u_answers, u_ended = answer(asked)
    p_answers, p_ended = answer([r["prompt"] for r in reworded])
    r_answers, _ = answer([r["original"] for r in reworded])
    firsts, _ = answer(first_asked)
    alone, _ = answer(second_asked)
    s_answers, s_ended = answer([[user(q1), assistant(a1), user(q2)]
                                 for q1, a1, q2 in zip(first_asked, firsts, second_asked, strict=True)])

    def fidelity(answers) -> float:
        return _mean(bigram_f1(a, answers_by_prompt.get(r["original"], ""))
                     for r, a in zip(reworded, answers, strict=True))

    def topical(questions, answers) -> float:
        return _mean(on_topic(q, a) for q, a in zip(questions, answers, strict=True))

    return {
        "unseen": len(unseen), "paraphrases": len(reworded), "conversations": len(second),
        "refusal": _mean(has_refusal(a) for a in u_answers + p_answers),
        "rare_kanji": rare_kanji_share(u_answers + p_answers + s_answers),
        "topical": topical(asked, u_answers),
        "paraphrase_fidelity": fidelity(p_answers),
        "recall_fidelity": fidelity(r_answers),
        "first_turn_topical": topical(first_asked, firsts),
        "second_turn_topical": topical(second_asked, s_answers),
        "second_turn_alone_topical": topical(second_asked, alone),
        "second_turn_refusal": _mean(has_refusal(a) for a in s_answers),
        "ended_at_eos": _mean(u_ended + p_ended + s_ended),
        "examples": [{"prompt": r["prompt"], "answer": a} for r, a in zip(unseen[:5], u_answers, strict=False)],
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def is_japanese(text: str) -> bool:
    """Readable Japanese: no undecodable bytes, and mostly kana, kanji and Japanese punctuation."""
    if not text.strip() or "\ufffd" in text:
        return False
    chars = [c for c in text if not c.isspace()]
    japanese = sum("\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef" for c in chars)
    return japanese / len(chars) >= 0.5

