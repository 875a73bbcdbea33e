"""Peak GPU memory of a (Q)LoRA DPO run, estimated on paper, and the batch, accumulation and checkpointing that fit.

An estimate from the model's shape, not a measurement: weights (nf4 with double quantisation: about 0.52 bytes per
linear weight; embeddings and head in the compute dtype), the LoRA weights with their gradients and Adam state, the
activations autograd keeps for the backward pass, TRL's chunked LM-head tiles and the CUDA context. DPO puts chosen and
rejected in one batch, so a batch of B pairs is 2B sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DPOSpaceError

GIB = 1024**3

# What torch.cuda.get_device_properties().total_memory reports, in GiB: a "16 GB" T4 gives 14.7.
GPUS: dict[str, float] = {"T4 16 GB": 14.7, "L4 24 GB": 22.0, "A10G 24 GB": 22.0, "A100 80 GB": 79.2,
                          "H100 80 GB": 79.1}

# The preset models' shapes (from their config.json), so the planner works offline.
SHAPES: dict[str, dict] = {
    "elyza/Llama-3-ELYZA-JP-8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      tie_word_embeddings=False),
    "SakanaAI/TinySwallow-1.5B-Instruct": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960,
                                               num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                               tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
}

CUDA_CONTEXT = 0.6 * GIB  # the CUDA context and kernels, outside torch's allocator
FRAGMENTATION = 1.10  # the caching allocator never packs perfectly
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768  # TRL's fused LM head tile (trl.kernels.chunked_logprob)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                   config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                   config["vocab_size"], bool(config.get("tie_word_embeddings", False)))

    @property
    def kv_width(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what 4-bit quantises)."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def module_dims(self, name: str) -> tuple[int, int]:
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}.get(name, (h, h))


def shape_for(model_id: str) -> Shape | None:
    """A preset's shape, or a local model folder's config.json; None where neither is at hand (a Hub id offline)."""
    from .models import resolve_model_id

    if model_id in SHAPES:
        return Shape.from_config(SHAPES[model_id])
    try:
        path = Path(resolve_model_id(model_id)) / "config.json"
        return Shape.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, DPOSpaceError):  # no readable config: no estimate
        return None


@dataclass(frozen=True)
class Estimate:
    weights: float
    lora: float  # LoRA weights, gradients and Adam state
    activations: float
    head: float  # the LM-head tiles of TRL's chunked log-prob
    overhead: float  # CUDA context and allocator slack
    chat: float = 0.0  # the Space's chat copy, resident beside the training copy (0 for a run on its own)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.head + self.overhead + self.chat

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in {**self.__dict__, "total": self.total}.items()}


CHAT_BATCH, CHAT_NEW_TOKENS = 16, 256  # the chat copy's worst call: an evaluation batch of 16 answers


def chat_copy(shape: Shape, *, load_in_4bit: bool = True, prompt_tokens: int = 256, bytes_per_value: int = 2) -> float:
    """The chat model the Space keeps loaded: its weights, the KV cache and logits of its largest generation batch,
    and a handful of loaded adapters (each a LoRA of r 16 on q/v, in the compute dtype)."""
    b = bytes_per_value
    weights = shape.linear_params * (0.52 if load_in_4bit else b) + shape.embedding_params * b
    tokens = CHAT_BATCH * (prompt_tokens + CHAT_NEW_TOKENS)
    kv_cache = 2 * shape.layers * shape.kv_width * tokens * b
    logits = CHAT_BATCH * shape.vocab * 4
    adapters = 8 * shape.layers * 16 * (sum(shape.module_dims("q_proj")) + sum(shape.module_dims("v_proj"))) * b
    return (weights + kv_cache + logits + adapters) * FRAGMENTATION


def estimate(shape: Shape, *, batch: int, max_length: int, load_in_4bit: bool = True, lora_r: int = 12,
             lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), checkpointing: bool = False,
             bytes_per_value: int = 2, with_chat_copy: bool = True) -> Estimate:
    """Peak memory in bytes of one training step at `batch` pairs of `max_length` tokens (the worst batch), with the
    Space's chat copy beside it unless `with_chat_copy` is False (a run from the CLI)."""
    b = bytes_per_value
    linear = shape.linear_params * (0.52 if load_in_4bit else b)  # nf4 + double-quantised absmax
    weights = linear + shape.embedding_params * b
    lora_params = shape.layers * sum(lora_r * sum(shape.module_dims(t)) for t in lora_targets)
    lora = lora_params * 16  # fp32 weight, gradient, two Adam moments
    tokens = 2 * batch * max_length  # chosen and rejected sequences
    # kept per token per layer without checkpointing: norms, q/k/v (with RoPE), attention output, residuals, the
    # SwiGLU gate/up/act/product, and the inputs the LoRA layers need
    per_layer = (8 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate) * b
    if checkpointing:  # the layers' inputs, plus one layer recomputed at a time
        activations = tokens * (shape.layers * shape.hidden * b + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    activations += tokens * shape.hidden * 4  # the final hidden states, in fp32 for the head
    head = 2 * min(tokens, HEAD_TOKENS) * min(shape.vocab, HEAD_VOCAB) * 4  # a tile and its fp32 copy
    overhead = (weights + lora + activations + head) * (FRAGMENTATION - 1) + CUDA_CONTEXT
    chat = chat_copy(shape, load_in_4bit=load_in_4bit, bytes_per_value=b) if with_chat_copy else 0.0
    return Estimate(weights, lora, activations, head, overhead, chat)


@dataclass(frozen=True)
class Plan:
    batch: int
    accumulation: int
    checkpointing: bool
    estimate: Estimate
    fits: bool


def plan(shape: Shape, gpu_gib: float, *, effective_batch: int, max_length: int, **kwargs) -> Plan:
    """The largest per-device batch (a power of two dividing `effective_batch`) that fits, without gradient
    checkpointing if possible (it costs about a third more compute), the rest as gradient accumulation. With the chat
    copy beside the run unless `with_chat_copy=False` is passed."""
    sizes = [s for s in (64, 32, 16, 8, 4, 2, 1) if s <= effective_batch and effective_batch % s == 0] or [1]
    for checkpointing in (False, True):
        for batch in sizes:
            e = estimate(shape, batch=batch, max_length=max_length, checkpointing=checkpointing, **kwargs)
            if e.total <= gpu_gib * GIB:
                return Plan(batch, max(1, effective_batch // batch), checkpointing, e, True)
    e = estimate(shape, batch=1, max_length=max_length, checkpointing=True, **kwargs)
    return Plan(1, effective_batch, True, e, False)


def gpu_gib() -> float:
    """This machine's GPU memory as torch reports it (0 without one)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 0.0


def settings_estimate(settings, model_id: str, *, with_chat_copy: bool = True) -> Estimate | None:
    """The estimate for a run's settings (RunSettings) on a model, or None where its shape is unknown."""
    from .models import preset_for

    preset = preset_for(model_id)
    shape = shape_for(preset.model_id if preset else model_id)
    if shape is None:
        return None
    return estimate(shape, batch=settings.per_device_train_batch_size, max_length=int(settings.max_length or 1024),
                    load_in_4bit=settings.load_in_4bit, lora_r=settings.lora_r,
                    lora_targets=tuple(settings.lora_target_modules), checkpointing=settings.gradient_checkpointing,
                    with_chat_copy=with_chat_copy)


def fits_beside_chat(settings, model_id: str, gpu_memory_gib: float) -> bool:
    """Whether a run fits this GPU with the chat copy resident beside it (unknown shapes are given the benefit)."""
    e = settings_estimate(settings, model_id)
    return e is None or e.total <= gpu_memory_gib * GIB
