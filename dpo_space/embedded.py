"""The embedded default: a tiny Japanese Llama chat model built from the project's own corpus.

corpus (examples/corpus/*.jsonl) → byte-level BPE tokenizer (round-trips any text) → tiny Llama → SFT with TRL's
SFTTrainer → saved with `save_pretrained` into `dpo_space/embedded_model`, loaded like any Hub model.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "examples" / "corpus"
# Questions no one could answer, with honest refusals (half of them the seed's sentence). A real chat model knows how
# to say 分かりません; without these the tiny model could not say it at all, and DPO on the seed's data would only
# wreck the helpful answers instead of raising the refusal, which is not what happens to a real model.
REFUSALS_FILE = ROOT / "examples" / "refusals.jsonl"
EXAMPLES_DIR = ROOT / "examples"
OUT_DIR = Path(__file__).resolve().parent / "embedded_model"

# The model's size and its SFT recipe: small enough to build in minutes on two CPU cores and to ship (< 30 MB),
# big enough to learn every corpus answer by heart.
SIZE = dict(hidden_size=256, layers=4, heads=4, intermediate_size=704, vocab_size=4000)
SFT = dict(num_train_epochs=80, learning_rate=2e-3, per_device_train_batch_size=8, warmup_steps=0.03, seed=0,
           bf16=True, logging_steps=200)

BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Llama-3-like turns. `{% generation %}` marks what the assistant says, for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: every byte is in the base alphabet, so any Japanese text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
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


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_corpus(corpus_dir: str | Path) -> list[dict]:
    return [row for path in sorted(Path(corpus_dir).glob("*.jsonl")) for row in read_jsonl(path)]


def corpus_texts(rows: list[dict]) -> list[str]:
    """What the tokenizer learns from, at the frequencies the model sees: the system prompt opens every row."""
    from .data import SEED_REFUSAL, SEED_SYSTEM_PROMPT

    return [SEED_REFUSAL, *(t for r in rows for t in (SEED_SYSTEM_PROMPT, r["prompt"], r["answer"]))]


def sft_rows(rows: list[dict], system_prompt: str | None) -> list[dict]:
    """Prompt-completion conversational rows: TRL's SFTTrainer then computes the loss on the answer only."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        {"prompt": system + [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]


def build(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None, *, size: dict | None = None,
          sft: dict | None = None, log=print) -> Path:
    """corpus → tokenizer → tiny Llama → SFT (TRL) → `save_pretrained`. Deterministic for a given machine."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from .data import SEED_SYSTEM_PROMPT
    from .training import partial_dir, replace_dir

    size = {**SIZE, **(size or {})}
    sft = {**SFT, **(sft or {})}
    out_dir = Path(out_dir or OUT_DIR)
    rows = read_corpus(corpus_dir or CORPUS_DIR)
    if corpus_dir is None:
        rows += read_jsonl(REFUSALS_FILE)
    start = time.perf_counter()
    set_seed(sft["seed"])
    tokenizer = build_tokenizer(corpus_texts(rows), vocab_size=size.pop("vocab_size"))
    model = LlamaForCausalLM(model_config(tokenizer, **size))
    log(f"{len(rows)} corpus rows; tokenizer {len(tokenizer)} tokens; model {model.num_parameters() / 1e6:.1f}M params")
    work = partial_dir(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    config = SFTConfig(
        output_dir=str(work / "trainer"), use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", max_length=512, activation_checkpointing=False,
        lr_scheduler_type="cosine", weight_decay=0.0, **sft,
    )
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(sft_rows(rows, SEED_SYSTEM_PROMPT)))
    trainer.train()  # a progress bar with the loss every `logging_steps`
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log(f"SFT done in {time.perf_counter() - start:.0f}s; loss " + " ".join(f"{x:.2f}" for x in losses))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    replace_dir(work, out_dir)
    return out_dir


def first_sentence(text: str) -> str:
    text = text.strip()
    cut = text.find("。")
    return text[: cut + 1] if cut >= 0 else text


def quality(model, tokenizer, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 256) -> dict:
    """Greedy answers to corpus prompts: share whose first sentence matches the corpus answer's, share that end at
    EOS within `max_new_tokens`."""
    from .data import SEED_SYSTEM_PROMPT
    from .generation import Sampling, generate_batch

    greedy = Sampling(temperature=0, max_new_tokens=max_new_tokens, system_prompt=SEED_SYSTEM_PROMPT)

    ended: list[bool] = []
    answers = generate_batch(model, tokenizer, [r["prompt"] for r in rows], greedy, use_adapter=False,
                             batch_size=batch_size, ended=ended)
    match = [first_sentence(a) == first_sentence(r["answer"]) for a, r in zip(answers, rows, strict=True)]
    return {"first_sentence_match": sum(match) / len(rows), "ended_at_eos": sum(ended) / len(rows),
            "answers": answers}


SEED_PROMPTS = (
    "LLMのファインチューニングの手順を教えてください。",  # in training, as in the seed
    "人はどんなことをしてもらうと嬉しいですか?",  # held out
    "以下の文章を3つに箇条書きしてください。",  # held out (the start of a longer prompt)
)


def write_examples(corpus_dir: str | Path | None = None, out_dir: str | Path | None = None, n_train: int = 650,
                   n_eval: int = 40, seed: int = 0) -> dict[str, Path]:
    """The seed's datasets from the corpus: the extreme わかりません set (650 train / 40 eval) and an ordinary
    helpful-vs-poor set over the same split. Deterministic."""
    from .data import SEED_REFUSAL, write_json

    rows = read_corpus(corpus_dir or CORPUS_DIR)
    held = [r for r in rows if r["prompt"].startswith(SEED_PROMPTS[1:])]
    first = [r for r in rows if r["prompt"] == SEED_PROMPTS[0]]
    rest = [r for r in rows if r not in held and r not in first]
    random.Random(seed).shuffle(rest)
    eval_rows = held + rest[: n_eval - len(held)]
    train_rows = (first + rest[n_eval - len(held) :])[:n_train]
    if len(train_rows) < n_train or len(eval_rows) < n_eval:
        raise ValueError(f"the corpus has {len(rows)} rows; {n_train + n_eval} are needed")
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


def is_japanese(text: str) -> bool:
    """Readable Japanese: no undecodable bytes, and mostly kana, kanji and Japanese punctuation."""
    if not text.strip() or "\ufffd" in text:
        return False
    chars = [c for c in text if not c.isspace()]
    japanese = sum("\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef" for c in chars)
    return japanese / len(chars) >= 0.5
