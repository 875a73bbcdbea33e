"""The embedded default: a tiny Japanese Llama chat model built from the project's own corpus.

corpus (examples/corpus/*.jsonl) → byte-level BPE tokenizer (round-trips any text) → tiny Llama → SFT with TRL's
SFTTrainer → saved with `save_pretrained` into `dpo_space/embedded_model`, loaded like any Hub model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def read_corpus(corpus_dir: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(corpus_dir).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows
