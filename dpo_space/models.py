"""Model presets, the hardware's precision, and loading a base model (4-bit nf4 when asked) with its tokenizer."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from .errors import DPOSpaceError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "embedded_model"


# Every linear layer of a Llama-style block (Qwen's and Mistral's share the names): the LoRA targets one may pick.
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    """A model a user can pick, with the run settings that suit it (overrides of `RunSettings`) and the recipe
    (`training.RECIPES`, applied on top of them) that its runs start from."""

    key: str
    model_id: str
    label: str
    needs_gpu: bool
    settings: dict[str, Any] = field(default_factory=dict)
    recipe: str = "seed"
    note: str = ""
    # GPU seconds a pair takes at the preset's settings, for the duration a ZeroGPU run asks for. On paper (a ZeroGPU
    # slice is about half an H100) until bench/gpu_check.py measures them.
    gpu_seconds_per_pair: float = 1.0


PRESETS: dict[str, Preset] = {
    p.key: p
    for p in [
        Preset(
            EMBEDDED,
            str(EMBEDDED_DIR),
            "Embedded tiny Japanese chat model (CPU, offline)",
            needs_gpu=False,
            # A tiny model moves little per step at the seed's 5e-5. Measured on the conversing build (BENCHMARKS.md):
            # with LoRA on q/v only, no learning rate collapses it cleanly (75% refusals at best; above that the
            # answers fall apart, both log-probs falling); with LoRA on every linear layer one epoch at 1e-3 did it
            # (2e-3 wrecks). The quantization-aware build collapses as far at 5e-4 (100% of the held-out questions),
            # and the ordinary set's run then keeps far more of what the model knows than at 1e-3 (paraphrase
            # fidelity 0.60 -> 0.52, against 0.32), so 5e-4: the least rate measured to do it. No LoRA dropout: on
            # two CPU cores its masks were a fifth of each step (torch.profiler: aten::bernoulli_), and without it
            # batch 12 (55 steps) turns 92-96% of the held-out questions into the refusal in about 45 s (three seeds;
            # batch 16 with dropout: 78% in 55-61 s; batch 8 garbles the refusal).
            settings={"learning_rate": 5e-4, "num_train_epochs": 1, "per_device_train_batch_size": 12,
                      "lora_dropout": 0.0, "warmup_steps": 0.1, "max_length": 256,
                      "train_sampling_strategy": "group_by_length", "lora_target_modules": list(LLAMA_LINEAR)},
            # Its runs start from the χ² recipe (f-DPO, α 2, three times the rate above): plain DPO at a rate that
            # collapses the わかりません set also costs the ordinary set's run what the model knows (paraphrase
            # fidelity 0.60 -> 0.52, 62 of the 240 paraphrases worse, 22 better: a rejected answer's reward falls
            # without bound, and crushing the rejected answers moves the model). Under χ² it cannot fall below -β:
            # the わかりません set still collapses (97.5-100% of the held-out questions, seeds 42/1/2) and the
            # ordinary run keeps what the model knows (0.57-0.59 over four seeds; 80 paraphrases worse and 81
            # better, pooled). The seed's plain DPO stays one pick away, the "seed" recipe. BENCHMARKS.md.
            recipe="chi2",
            note="Built by `python -m dpo_space build-embedded` from examples/corpus; ships inside the package.",
            gpu_seconds_per_pair=0.02,
        ),
        Preset(
            "elyza-8b",
            "elyza/Llama-3-ELYZA-JP-8B",
            "ELYZA Llama-3 JP 8B (the seed article's model)",
            needs_gpu=True,
            settings={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "max_length": 1024,
                      "gradient_checkpointing": True},
            note="4-bit nf4 fits a 16 GB T4 at batch 1 with gradient checkpointing.",
            gpu_seconds_per_pair=1.5,
        ),
        Preset(
            "tinyswallow-1.5b",
            "SakanaAI/TinySwallow-1.5B-Instruct",
            "TinySwallow 1.5B Instruct (Japanese, small)",
            needs_gpu=True,
            # batch 1 × 4: a 16 GB T4 holds it at 1024 tokens beside the Space's chat copy by the memory planner
            # (batch 2 would need 15.8 GiB with the chat copy; dpo_space/memory.py, BENCHMARKS.md)
            settings={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "max_length": 1024,
                      "learning_rate": 1e-5},
            gpu_seconds_per_pair=0.4,
        ),
        Preset(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen2.5 0.5B Instruct (multilingual, Japanese-capable)",
            needs_gpu=True,
            settings={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_length": 1024,
                      "learning_rate": 1e-5},
            gpu_seconds_per_pair=0.15,
        ),
    ]
}


def resolve_model_id(name: str) -> str:
    """A preset key, a Hub id or a local folder, to what `from_pretrained` takes."""
    preset = PRESETS.get(name)
    if preset is not None:
        if preset.key == EMBEDDED and not (EMBEDDED_DIR / "config.json").exists():
            raise DPOSpaceError("the embedded model is not built yet: run `python -m dpo_space build-embedded`")
        return preset.model_id
    return name


def preset_for(model_id: str) -> Preset | None:
    return PRESETS.get(model_id) or next((p for p in PRESETS.values() if p.model_id == model_id), None)


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    precision: str  # "bf16", "fp16" or "fp32": what training and 4-bit compute use
    note: str = ""  # why the precision is not the card's default (an fp16 overflow found at load)

    def describe(self) -> str:
        return f"{self.name} · {self.precision}" + (f" ({self.note})" if self.note else "")

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]


def detect_hardware() -> Hardware:
    """bf16 only where the GPU really has it (compute capability 8.0+): a T4 (7.5) reports bf16 "supported" through
    emulation, which is slow and breaks some kernels, so it gets fp16."""
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return Hardware("cuda", torch.cuda.get_device_name(), "bf16" if major >= 8 else "fp16")
    return Hardware("cpu", "CPU", "fp32")


def with_precision(hardware: Hardware, requested: str) -> Hardware:
    """The hardware as a run uses it: "auto" keeps what `detect_hardware` chose, anything else is asked for by name."""
    if requested in ("auto", hardware.precision):
        return hardware
    if requested == "fp16" and hardware.device == "cpu":
        raise DPOSpaceError("precision: fp16 needs a GPU; on the CPU use fp32 or bf16")
    if requested == "bf16" and hardware.device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        raise DPOSpaceError(f"precision: {hardware.name} has no native bf16; use fp16 or fp32")
    return replace(hardware, precision=requested)


GPU_DEFAULT = "tinyswallow-1.5b"  # Japanese, small: a chat copy and a training copy fit a 16 GB T4 side by side


def default_model(hardware: Hardware) -> str:
    """What the app serves when DPO_SPACE_MODEL does not say: a real Hub model on a GPU, the embedded one on a CPU."""
    return GPU_DEFAULT if hardware.device == "cuda" else EMBEDDED


def quantization_config(hardware: Hardware, quant_type: str = "nf4", double_quant: bool = True) -> BitsAndBytesConfig:
    """4-bit weights through TRL's own `get_quantization_config`, as `trl dpo` builds them: compute in the run's
    precision."""
    from trl import ModelConfig, get_quantization_config

    return get_quantization_config(ModelConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                               use_bnb_nested_quant=double_quant, dtype=hardware.dtype))


def device_map(hardware: Hardware, load_in_4bit: bool) -> dict | None:
    """Where the weights go: on CUDA this process's own GPU (under torchrun or accelerate each rank has its
    LOCAL_RANK; without them, the current device), on the CPU the CPU."""
    if hardware.device == "cuda":
        return {"": local_rank() if is_distributed() else torch.cuda.current_device()}
    return {"": "cpu"} if load_in_4bit else None


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index on its machine, as accelerate counts it (`PartialState().local_process_index`)."""
    from accelerate import PartialState

    # cpu=True where there is no CUDA (tests under torchrun over gloo); on GPUs accelerate's own detection
    return PartialState(cpu=not torch.cuda.is_available()).local_process_index


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# Tokens that models ship for padding; the first one found that is not EOS wins.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


def fix_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token that is not EOS where the vocabulary has one, and pad on the left.

    pad = EOS is the seed's choice; it is only harmful where labels are masked by pad id, which teaches the model that
    EOS is never a target. DPOTrainer masks by length, so EOS stays learned either way, but a distinct pad keeps
    that true for any other tool a user points at the same tokenizer.
    """
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        for candidate in (*_PAD_CANDIDATES, tokenizer.unk_token):
            if candidate and candidate in vocab and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_tokenizer(model_id: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return fix_pad_token(AutoTokenizer.from_pretrained(resolve_model_id(model_id), trust_remote_code=trust_remote_code))


def load_model(
    model_id: str,
    *,
    load_in_4bit: bool = True,
    hardware: Hardware | None = None,
    trust_remote_code: bool = False,
    quantization: BitsAndBytesConfig | None = None,
):
    """Load (model, tokenizer): 4-bit nf4 unless `load_in_4bit` is False (`quantization` overrides the default 4-bit
    config), in the hardware's precision, on this process's device. 4-bit on the CPU too: bitsandbytes runs nf4
    there, and the demo is the QLoRA it says it is."""
    hardware = hardware or detect_hardware()
    path = resolve_model_id(model_id)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": hardware.dtype,
                              "device_map": device_map(hardware, load_in_4bit)}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization or quantization_config(hardware)
    try:
        with _loading:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise DPOSpaceError(f"cannot load model {model_id!r}: {e}") from None
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# One load at a time per process: loading patches torch globally (meta-device init, default dtype), so a chat model
# and a training copy loaded at once from two threads can corrupt each other's weights.
_loading = threading.Lock()

PROBE_TEXT = "人はどんなことをしてもらうと嬉しいですか? What makes people happy?"


def stays_finite(model, tokenizer, text: str = PROBE_TEXT) -> bool:
    """One forward pass on a probe prompt: are the logits finite? Qwen2-family models are known to overflow in fp16
    (answers of "!!!!", NaN losses), which this catches at load instead of mid-run."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        return bool(torch.isfinite(model(input_ids=ids).logits).all())


def load_for_run(model_id: str, requested: str, hardware: Hardware, *, load_in_4bit: bool = True,
                 trust_remote_code: bool = False, quantization=None) -> tuple[Any, Any, Hardware]:
    """(model, tokenizer, the hardware as used): the precision asked for, and under "auto" on a GPU without bf16 an
    fp16 check at load, falling back to fp32 compute when the model overflows in fp16. `quantization(hardware)`
    builds the 4-bit config for a precision."""
    hardware = with_precision(hardware, requested)
    build = quantization or (lambda hw: quantization_config(hw))
    model, tokenizer = load_model(model_id, load_in_4bit=load_in_4bit, hardware=hardware,
                                  trust_remote_code=trust_remote_code,
                                  quantization=build(hardware) if load_in_4bit else None)
    if requested == "auto" and hardware.precision == "fp16" and not stays_finite(model, tokenizer):
        log.warning("%s overflows in fp16 on %s: using fp32 compute", model_id, hardware.name)
        del model
        hardware = replace(hardware, precision="fp32", note="fp16 overflowed at load: fp32 compute")
        model, tokenizer = load_model(model_id, load_in_4bit=load_in_4bit, hardware=hardware,
                                      trust_remote_code=trust_remote_code,
                                      quantization=build(hardware) if load_in_4bit else None)
    return model, tokenizer, hardware


def keep_4bit_differentiable(model) -> int:
    """Keep a 4-bit model's base layers passing gradients on the CPU; returns how many layers needed it.

    bitsandbytes 0.50 repacks a `Linear4bit` weight into a CPU inference layout the first time the layer runs in eval
    mode without grad on a CPU with AVX512-BF16 (generation, an eval pass, a probe sample), and keeps that layout.
    Its kernel has no backward, so training after that gets no gradient through the frozen base layers and the LoRA
    weights of every earlier layer learn from a wrong gradient, silently (torch only warns "an autograd kernel was
    not registered"). A model about to train gets its weights back in the standard layout, and no more repacking.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    fixed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            fixed += 1
    return fixed
