"""One DPO run: settings → DPOConfig + LoraConfig (+ BitsAndBytesConfig) → DPOTrainer, metrics streamed, stop honoured.

The reference model is the base with the LoRA adapter disabled (TRL does this when it is given a `peft_config` and no
`ref_model`), so there is one copy of the weights in memory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from datasets import Dataset
from peft import PeftModel
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config, get_quantization_config

from .data import SEED_SYSTEM_PROMPT, PreferenceData, as_training_rows, split, write_json
from .errors import DPOSpaceError, TrainingError
from .models import (EMBEDDED, Hardware, detect_hardware, has_chat_template, keep_4bit_differentiable, load_for_run,
                     preset_for, resolve_model_id, with_precision)

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """Everything a run needs, and the one list of them: the CLI's flags, the app's widgets and run.yaml are all keyed
    by these names, which are TRL's own (`ModelConfig`, `DPOConfig`), so a saved run.yaml replays with
    `python -m dpo_space train --config run.yaml` and with `trl dpo --config run.yaml`. Defaults are the seed
    article's; a preset overrides them, a recipe overrides the preset (`for_recipe`), and `for_model` is the model
    with its preset's own recipe (`Preset.recipe`), as its runs start."""

    # the model and its adapter (trl.ModelConfig)
    model_name_or_path: str = EMBEDDED
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = True
    trust_remote_code: bool = False
    lora_r: int = 12
    lora_alpha: int = 12
    # Applied to the LoRA modules only (TRL's `disable_dropout` would zero it with the base's dropout, see `train`)
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # "auto": bf16 where the GPU has it, else fp16 if the model stays finite in it (checked at load), else fp32
    precision: str = "auto"
    # DPO and the optimiser (trl.DPOConfig)
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    # The regulariser that keeps the policy near the reference (f-DPO): "reverse_kl" is DPO's own. "alpha_divergence"
    # scores an answer f'(t) = (t^(α-1) - 1)/(α-1), t = πθ/πref; with α 2 (χ², Pearson) a rejected answer's score
    # cannot fall below -1, so the margin has to come from raising the chosen one (BENCHMARKS.md)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    num_train_epochs: float = 2
    max_steps: int = -1
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 100  # below 1: a fraction of the run
    weight_decay: float = 0.01
    lr_scheduler_type: str = "linear"
    max_length: int | None = 1024
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    train_sampling_strategy: str = "random"  # "group_by_length": batches of similar length, less padding
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    seed: int = 42  # the LoRA init and the batch order (`data_seed`): one seed, one run
    output_dir: str = "outputs/dpo-run"
    report_to: str = "none"  # "wandb", "tensorboard", "trackio"...: experiment tracking is opt-in
    # DPO Space's own: how rows are formatted, and the eval split when no eval file is given
    system_prompt: str | None = SEED_SYSTEM_PROMPT
    eval_fraction: float = 0.0

    @classmethod
    def for_model(cls, model: str, **overrides) -> RunSettings:
        """A run of `model` as it starts: its preset's settings with the preset's own recipe on top (the seed's for
        most models, χ² for the embedded one), explicit overrides winning."""
        return cls.for_recipe(model, default_recipe(model), **overrides)

    @classmethod
    def for_recipe(cls, model: str, recipe: str, **overrides) -> RunSettings:
        """The model's preset with a recipe of RECIPES on top (explicit overrides win): what the UI's recipe menu
        fills in, and what the benchmarks run. A recipe's `learning_rate_scale` multiplies the preset's rate."""
        preset = preset_for(model)
        values = {"model_name_or_path": model, **(preset.settings if preset else {}), **RECIPES[recipe]}
        scale = values.pop("learning_rate_scale", None)
        if scale is not None:
            # to 6 significant digits: 5e-4 × 3 is 0.0015, not 0.0015000000000000002 in the widget and run.yaml
            rate = values.get("learning_rate", cls.learning_rate)
            values["learning_rate"] = float(f"{rate * scale:.6g}")
        return cls(**coerce({**values, **overrides}))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - _TRL_ONLY_KEYS)
        if unknown:
            raise DPOSpaceError(f"unknown run settings: {', '.join(unknown)}")
        settings = cls(**coerce({k: v for k, v in values.items() if k in known}))
        settings.check()
        return settings

    def check(self):
        """Refuse values TRL would reject later, with the field named, before any model is loaded."""
        problems = []
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.lora_r < 1:
            problems.append(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            problems.append("num_train_epochs or max_steps must be > 0")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            problems.append(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types")
        if self.f_divergence_type not in F_DIVERGENCES:
            problems.append(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, "
                            f"got {self.f_divergence_type!r}")
        elif self.f_divergence_type != "reverse_kl" and not set(self.loss_type) <= F_DIVERGENCE_LOSSES:
            problems.append(f"f_divergence_type {self.f_divergence_type} works with the loss types "
                            f"{', '.join(sorted(F_DIVERGENCE_LOSSES))} only (TRL), got {'+'.join(self.loss_type)}")
        if self.f_divergence_type == "alpha_divergence" and self.f_alpha_divergence_coef <= 0:
            problems.append(f"f_alpha_divergence_coef must be > 0, got {self.f_alpha_divergence_coef}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            problems.append(f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        try:
            check_reporter(self.report_to)
        except DPOSpaceError as e:
            problems.append(str(e))
        if problems:
            raise DPOSpaceError("; ".join(problems))

    def steps(self, pairs: int, processes: int = 1) -> int:
        """Optimizer steps this run takes on `pairs` pairs (as Trainer counts them)."""
        batches = math.ceil(pairs / (self.per_device_train_batch_size * processes))
        per_epoch = max(1, math.ceil(batches / self.gradient_accumulation_steps))
        if self.max_steps > 0:
            return self.max_steps
        return math.ceil(per_epoch * self.num_train_epochs)

    def model_config(self, hardware: Hardware) -> ModelConfig:
        """TRL's ModelConfig for these settings: what `trl dpo` builds the quantization and LoRA configs from."""
        return ModelConfig(
            model_name_or_path=resolve_model_id(self.model_name_or_path), dtype=DTYPE_NAMES[hardware.precision],
            load_in_4bit=self.load_in_4bit, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            use_bnb_nested_quant=self.use_bnb_nested_quant, use_peft=True, lora_r=self.lora_r,
            lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            lora_target_modules=list(self.lora_target_modules),
        )

    def quantization_config(self, hardware: Hardware):
        """BitsAndBytesConfig through TRL's own `get_quantization_config` (compute dtype = the run's precision)."""
        return get_quantization_config(self.model_config(hardware))

    def lora_config(self, hardware: Hardware | None = None):
        return get_peft_config(self.model_config(hardware or Hardware("cpu", "CPU", "fp32")))

    def dpo_config(self, hardware: Hardware, output_dir: str | Path, *, has_eval: bool = False,
                   disable_tqdm: bool = True) -> DPOConfig:
        on_cpu = hardware.device == "cpu"
        return DPOConfig(
            output_dir=str(output_dir),
            beta=self.beta,
            loss_type=list(self.loss_type),
            loss_weights=self.loss_weights,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            max_length=self.max_length,
            precompute_ref_log_probs=self.precompute_ref_log_probs,
            precompute_ref_batch_size=self.precompute_ref_batch_size,
            train_sampling_strategy=self.train_sampling_strategy,
            # the length column that length grouping reads is not a model input; the collator ignores extra columns
            remove_unused_columns=self.train_sampling_strategy != "group_by_length",
            activation_checkpointing=self.gradient_checkpointing,  # transformers 5 name of the same switch
            logging_steps=self.logging_steps,
            seed=self.seed,
            data_seed=self.seed,  # the batch order from the run's own seed, not from whatever else used torch's RNG
            report_to=self.report_to,
            project=TRACKIO_PROJECT,  # trackio's project (local-first: `trackio show --project dpo-space`)
            run_name=Path(self.output_dir).name,  # the run folder (training writes into a hidden partial one)
            trust_remote_code=self.trust_remote_code,
            # TRL would zero lora_dropout along with the base's dropout; `train` zeroes the base's itself
            disable_dropout=False,
            # what the hardware decides, not the user
            use_cpu=on_cpu,
            bf16=hardware.precision == "bf16",
            fp16=hardware.precision == "fp16",
            optim="paged_adamw_32bit" if self.load_in_4bit and not on_cpu else "adamw_torch",
            dataloader_pin_memory=not on_cpu,
            ddp_find_unused_parameters=False,
            eval_strategy="epoch" if has_eval else "no",
            save_strategy="no",  # the adapter is saved once, atomically, at the end
            logging_nan_inf_filter=False,  # the default hides a NaN loss behind the running mean; we stop on it
            disable_tqdm=disable_tqdm,
        )

    def trl_configs(self, hardware: Hardware, output_dir: str | Path = "outputs/dpo-run") -> dict[str, Any]:
        """What TRL, PEFT and bitsandbytes get from these settings: every setting a user sees must change one."""
        return {"dpo": self.dpo_config(hardware, output_dir), "lora": self.lora_config(hardware),
                "bnb": self.quantization_config(hardware), "model": self.model_config(hardware)}

    def to_yaml(self, hardware: Hardware, data_files: dict[str, str] | None = None) -> str:
        """run.yaml: the run as it ran, in TRL's keys only, so that `trl dpo --config run.yaml` replays it (TRL hands
        any key it does not know to `accelerate launch`, which refuses it). The model is its local path or Hub id;
        the precision that ran is `dtype` with its bf16/fp16 switches; DPO Space's one setting TRL has no name for,
        the system prompt (already in the rows of train.json), rides under `env:`, which TRL exports as an
        environment variable that nothing reads. `read_run_config` reads it all back."""
        values = {k: v for k, v in asdict(self).items() if k not in _OWN_FIELDS}
        values["model_name_or_path"] = resolve_model_id(self.model_name_or_path)
        config = self.dpo_config(hardware, self.output_dir)
        values.update(use_peft=True, dtype=DTYPE_NAMES[hardware.precision], bf16=config.bf16, fp16=config.fp16,
                      use_cpu=config.use_cpu, data_seed=config.data_seed, disable_dropout=config.disable_dropout,
                      remove_unused_columns=config.remove_unused_columns, save_strategy="no")
        if self.report_to == "trackio":
            values["project"] = config.project
        values["env"] = {SYSTEM_PROMPT_ENV: self.system_prompt or ""}
        if data_files:
            values["datasets"] = [{"path": "json", "data_files": data_files["train"]}]
        return yaml.safe_dump(values, allow_unicode=True, sort_keys=False)


TRACKIO_PROJECT = "dpo-space"
REPORTERS = ("none", "trackio", "tensorboard", "wandb")


def check_reporter(report_to: str):
    """A tracker is opt-in and never required: one that is not installed is refused before the run, by name."""
    import importlib.util

    if report_to not in REPORTERS:
        raise DPOSpaceError(f"report_to: one of {', '.join(REPORTERS)}, got {report_to!r}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise DPOSpaceError(f"report_to {report_to}: the {report_to} package is not installed here "
                            f"(pip install {report_to}), or pick none")


# RunSettings fields that are DPO Space's own: not written to run.yaml as keys (see `to_yaml`)
_OWN_FIELDS = {"precision", "system_prompt", "eval_fraction"}
SYSTEM_PROMPT_ENV = "DPO_SPACE_SYSTEM_PROMPT"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses built on the chosen-rejected reward difference, where the f-DPO reparameterisation holds (TRL's list)
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Values from a widget, a flag or YAML to the types of RunSettings' fields: 8.0 → 8 for an int field."""
    types = {f.name: str(f.type) for f in fields(RunSettings)}
    out = dict(values)
    for name, value in values.items():
        kind = types.get(name, "")
        if isinstance(value, float) and kind.startswith("int") and value.is_integer():
            out[name] = int(value)
        elif isinstance(value, int) and not isinstance(value, bool) and kind.startswith("float"):
            out[name] = float(value)
    return out


# Recipes that teach: each overrides a few RunSettings fields on top of the model preset.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},  # the seed article's settings (with the model preset's adjustments)
    "t4_safe": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
                "max_length": 512, "load_in_4bit": True},
    "overtrain": {"num_train_epochs": 4, "beta": 0.05},
    "remedies": {"beta": 0.5, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
    "ipo": {"beta": 0.5, "loss_type": ["ipo"]},
    # β 0.5 at the preset's rate: on the embedded model 32% of the held-out questions turn into the refusal (the
    # seed's recipe: 100%), BENCHMARKS.md
    "gentle": {"beta": 0.5, "num_train_epochs": 1},
    # χ² in place of DPO's reverse KL (f-DPO, α 2): a rejected answer's score cannot fall below -1, so the margin comes
    # from raising the chosen answers. It moves the model less per step, hence three times the rate: on the embedded
    # model the わかりません set still collapses and the ordinary set's run keeps what the model knows (BENCHMARKS.md)
    "chi2": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0, "learning_rate_scale": 3},
}


def default_recipe(model: str) -> str:
    """The recipe a model's runs start from: its preset's (`Preset.recipe`), the seed's for a model with no preset."""
    preset = preset_for(model)
    return preset.recipe if preset else "seed"


# Keys of run.yaml that are TRL's alone: ours reads the precision from `dtype` and decides the rest from the hardware
# it runs on (a run.yaml from a CPU run replays on a GPU with our CLI; `trl dpo` takes --use_cpu false for that).
_TRL_ONLY_KEYS = {"use_peft", "datasets", "dataset_name", "dataset_train_split", "dataset_test_split", "dtype", "bf16",
                  "fp16", "project", "use_cpu", "data_seed", "disable_dropout", "remove_unused_columns",
                  "save_strategy", "env"}
_PRECISION_OF_DTYPE = {name: key for key, name in DTYPE_NAMES.items()}

METRIC_COLUMNS = [
    "step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "eval_loss", "eval_rewards/margins",
    "eval_rewards/accuracies", "max_steps", "elapsed",
]


class MetricsStream(TrainerCallback):
    """Every log TRL emits (every `logging_steps`; loss, rewards, logps, eval) goes to the consumers and metrics.csv.

    TRL averages each metric over the logging window; the final summary log (runtime, no `loss`) is kept apart.
    """

    def __init__(self, csv_path: Path | None, consumers: list[Callable[[dict], None]]):
        self.records: list[dict] = []
        self.summary: dict = {}
        self.consumers = consumers
        self.csv_path = csv_path
        self._file = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        if self.csv_path is not None and state.is_world_process_zero:
            self._file = open(self.csv_path, "w", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, METRIC_COLUMNS, extrasaction="ignore")
            self._writer.writeheader()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            self.summary.update(logs)
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "max_steps": state.max_steps,
                  "elapsed": round(time.perf_counter() - self._start, 3),
                  **{k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}}
        self.records.append(record)
        if self._file is not None:
            self._writer.writerow(record)
            self._file.flush()
        for consumer in self.consumers:
            consumer(record)

    def on_train_end(self, args, state, control, **kwargs):
        if self._file is not None:
            self._file.close()
            self._file = None


class StopSignal:
    """A stop request that another thread or process can make (ZeroGPU trains in a forked process): a file beside
    the run folder. Anything with `is_set()`, a `threading.Event` too, can stop a run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def beside(cls, output_dir: str | Path) -> StopSignal:
        output_dir = Path(output_dir)
        return cls(output_dir.with_name(f".{output_dir.name}.stop"))

    def set(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()


class RunGuard(TrainerCallback):
    """Stop on request (checked after every optimizer step) and on a NaN or infinite loss."""

    def __init__(self, stop: threading.Event | StopSignal | None):
        self.stop = stop
        self.stopped = False
        self.bad_loss: tuple[int, float] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop is not None and self.stop.is_set():
            self.stopped = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_loss = (state.global_step, loss)
            control.should_training_stop = True


# The Train tab's probe by default: the seed article's own example question, one of the 40 evaluation prompts that
# no DPO pair holds
PROBE_PROMPT = "人はどんなことをしてもらうと嬉しいですか?"


class SampleTimeline(TrainerCallback):
    """Every `every` optimizer steps (by default a tenth of the run: about ten answers), and at the first and the last,
    the policy's current answer to a probe prompt, written to samples.jsonl in the run folder: the collapse is seen
    forming, not only its curve. Taken when the step's metrics are logged, after they reach the chart, so sampling
    never delays a chart point."""

    def __init__(self, prompt: str, every: int | None = None, sampling=None):
        from .generation import Sampling

        self.prompt, self.every = prompt, None if every is None else max(1, every)
        self.sampling = sampling or Sampling(temperature=0, max_new_tokens=64)

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        from .generation import generate

        if not state.is_world_process_zero or "loss" not in (logs or {}):
            return
        every = self.every or max(1, state.max_steps // 10)
        if state.global_step % every and state.global_step not in (1, state.max_steps):
            return
        answer = generate(model, processing_class, self.prompt, self.sampling, use_adapter=True)
        record = {"step": state.global_step, "prompt": self.prompt, "answer": answer}
        with open(Path(args.output_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass
class RunResult:
    output_dir: Path | None  # None when the run was not saved (a stop with save_on_stop=False)
    metrics: list[dict]
    summary: dict
    stopped: bool
    model: Any  # the PeftModel: the base with the trained adapter, still in memory for chat
    tokenizer: Any
    hardware: Hardware | None = None  # as the run used it: device and precision


def train(
    settings: RunSettings,
    train_data: PreferenceData,
    eval_data: PreferenceData | None = None,
    *,
    model=None,
    tokenizer=None,
    on_metrics: Callable[[dict], None] | None = None,
    stop: threading.Event | StopSignal | None = None,
    callbacks: list[TrainerCallback] | None = None,
    hardware: Hardware | None = None,
    disable_tqdm: bool = True,
    save_on_stop: bool = True,
) -> RunResult:
    """Run DPO and save adapter, run.yaml, metrics.csv and the exact training rows to `settings.output_dir`.

    Pass an already loaded `model`/`tokenizer` (the app keeps one base in memory); a model that carries an adapter
    from an earlier run is unloaded back to its base first. Everything is written to a hidden sibling folder and
    renamed into place at the end, so a crash never leaves a half-written adapter that looks complete.
    """
    settings.check()
    hardware = hardware or detect_hardware()
    if model is None:
        model, tokenizer, hardware = load_for_run(
            settings.model_name_or_path, settings.precision, hardware, load_in_4bit=settings.load_in_4bit,
            trust_remote_code=settings.trust_remote_code, quantization=settings.quantization_config)
    else:
        hardware = with_precision(hardware, settings.precision)
        if isinstance(model, PeftModel):
            model = model.unload()
    keep_4bit_differentiable(model)
    no_dropout_outside_lora(model)  # eval passes and probe samples during training must not break its gradients
    if eval_data is None and settings.eval_fraction > 0:
        train_data, eval_data = split(train_data, settings.eval_fraction, settings.seed)
    chat = has_chat_template(tokenizer)
    train_rows = as_training_rows(train_data, system_prompt=settings.system_prompt, chat_template=chat)
    eval_rows = as_training_rows(eval_data, system_prompt=settings.system_prompt, chat_template=chat) if eval_data else None

    final_dir = Path(settings.output_dir)
    work_dir = partial_dir(final_dir)
    config = settings.dpo_config(hardware, work_dir, has_eval=eval_rows is not None, disable_tqdm=disable_tqdm)
    is_main = config.process_index == 0
    if is_main:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
    stream = MetricsStream(work_dir / "metrics.csv", [on_metrics] if on_metrics else [])
    guard = RunGuard(stop)

    score_completions_only()
    set_seed(settings.seed)  # the LoRA init happens in DPOTrainer.__init__, before Trainer seeds anything
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=settings.lora_config(hardware),
        callbacks=[stream, guard, *(callbacks or [])],
    )
    seed_length_grouping(trainer, settings.seed)
    pad_halves_separately(trainer.model)
    if config.train_sampling_strategy == "group_by_length":  # transformers groups the eval batches too
        trainer.train_dataset = with_lengths(trainer.train_dataset)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = with_lengths(trainer.eval_dataset)
    if disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # the consumers get the metrics; nothing to print
    _trainable_to_fp32(trainer.model, config)
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            "out of memory: lower per_device_train_batch_size or max_length, or turn on gradient_checkpointing"
        ) from e
    except DPOSpaceError:
        raise
    except Exception as e:
        raise TrainingError(f"training failed: {type(e).__name__}: {e}") from e
    finally:
        stream.on_train_end(None, None, None)
    if guard.bad_loss is not None:
        step, loss = guard.bad_loss
        raise TrainingError(
            f"the loss became {loss} at step {step}; nothing was saved. Lower learning_rate, or set precision to fp32 "
            "(or bf16, on a GPU that has it) instead of fp16"
        )

    saved = None
    if save_on_stop or not guard.stopped:
        trainer.save_model(str(work_dir))  # adapter_model.safetensors + adapter_config.json (+ tokenizer)
        if is_main:
            write_json(trained_rows(trainer.train_dataset), work_dir / "train.json")
            files = {"train": "train.json"}
            if eval_rows:
                write_json(eval_rows, work_dir / "eval.json")
                files["eval"] = "eval.json"
            (work_dir / "run.yaml").write_text(settings.to_yaml(hardware, files), encoding="utf-8")
            replace_dir(work_dir, final_dir)
        trainer.accelerator.wait_for_everyone()
        saved = final_dir
    elif is_main:
        shutil.rmtree(work_dir, ignore_errors=True)
    trainer.model.eval()
    return RunResult(saved, stream.records, stream.summary, guard.stopped, trainer.model, tokenizer, hardware)


def trained_rows(dataset: Dataset) -> list[dict]:
    """The rows as the run trained on them, in its order (after TRL dropped any that max_length cut to nothing), with
    the token length that length grouping read: train.json, from which `trl dpo` and our CLI replay the run."""
    keep = [c for c in ("prompt", "chosen", "rejected", "length") if c in dataset.column_names]
    return dataset.select_columns(keep).to_list()


def no_dropout_outside_lora(model) -> int:
    """Zero every dropout of the base model, as TRL's `disable_dropout` would, but leave LoRA's own (`lora_dropout`) to
    PEFT: DPO compares the policy with the reference (the same base, adapter off), so the base must be deterministic,
    while dropout on the adapter's input is an ordinary regulariser. Returns how many dropouts were zeroed."""
    zeroed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in f".{name}." and module.p:
            module.p = 0.0
            zeroed += 1
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if getattr(model.config, key, 0):  # functional dropouts (attention) read the config, not a module
            setattr(model.config, key, 0.0)
    return zeroed


def seed_length_grouping(trainer, seed: int):
    """transformers' LengthGroupedSampler draws its order from torch's global RNG, which another visitor's chat or a
    probe sample moves; give it a generator of the run's own seed, so the seed alone decides the batch order (the
    random sampler already follows `data_seed`)."""
    build = trainer._get_train_sampler

    def sampler(*args, **kwargs):
        chosen = build(*args, **kwargs)
        if isinstance(chosen, LengthGroupedSampler) and chosen.generator is None:
            chosen.generator = torch.Generator().manual_seed(seed)
        return chosen

    trainer._get_train_sampler = sampler


def score_completions_only():
    """Make TRL's fused LM head score only the completion tokens on the CPU too, as it already does on CUDA.

    TRL 1.16 (`add_fused_lm_head`) projects every position of the batch, prompt and padding included, through the
    vocabulary on devices without Triton (to keep shapes fixed for Neuron's compiler) and masks them out afterwards.
    On a CPU that is over a third of a DPO step spent on logits nobody reads. The log-probs are the same
    (tests/test_training.py); the embedded demo's run goes from 55 s to 44 s (bench/speed.py, BENCHMARKS.md).
    """
    import trl.trainer.utils as trl_utils

    scores_all = getattr(trl_utils, "_use_triton", None)
    if scores_all is None or getattr(scores_all, "compact_on_cpu", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or scores_all(device)

    compact.compact_on_cpu = True
    trl_utils._use_triton = compact


_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def pad_halves_separately(model):
    """Run the chosen and the rejected half of a DPO batch each at its own length.

    DPOTrainer stacks the chosen sequences over the rejected ones and pads all of them, on the right, to the longest
    of either. Where one side is short and the other long (the わかりません set: about 30 tokens against 90), a third
    of every forward and backward is padding. Each half is cut to its own longest sequence instead, and the per-token
    outputs of TRL's fused head (zero past each sequence's end, by its definition) are padded back to the batch's
    width: the same log-probs (tests/test_training.py) for less work. Anything but a right-padded, even-sized
    `fused_lm_head` call goes through untouched.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    fused = base.forward
    if getattr(fused, "pads_halves", False):
        return

    def forward(*args, fused_lm_head=False, input_ids=None, attention_mask=None, labels=None, **kwargs):
        rows = 0 if input_ids is None else input_ids.shape[0]
        plain = (args or not fused_lm_head or attention_mask is None or labels is None or rows < 2 or rows % 2
                 or kwargs.get("shift_labels") is not None or kwargs.get("output_router_logits"))
        if not plain:
            width = input_ids.shape[1]
            halves = (slice(0, rows // 2), slice(rows // 2, rows))
            lengths = [int(attention_mask[h].sum(dim=1).max()) for h in halves]
            plain = any(attention_mask[h, n:].any() for h, n in zip(halves, lengths, strict=True))  # not right-padded
        if plain:
            return fused(*args, fused_lm_head=fused_lm_head, input_ids=input_ids, attention_mask=attention_mask,
                         labels=labels, **kwargs)
        parts = []
        for half, n in zip(halves, lengths, strict=True):
            cut = {k: v[half, :n] if torch.is_tensor(v) and v.shape[:2] == (rows, width) else v
                   for k, v in kwargs.items()}
            parts.append(fused(fused_lm_head=True, input_ids=input_ids[half, :n],
                               attention_mask=attention_mask[half, :n], labels=labels[half, :n], **cut))
        joined = {}
        for name in _PER_TOKEN:
            values = [getattr(part, name) for part in parts]
            if values[0] is not None:
                joined[name] = torch.cat([torch.cat([v, v.new_zeros(v.shape[0], width - 1 - v.shape[1])], dim=1)
                                          for v in values])
        loss = -joined["log_probs"].sum() / joined["label_mask"].sum().clamp(min=1)
        return type(parts[0])(loss=loss, **joined)

    forward.pads_halves = True
    base.forward = forward


def with_lengths(dataset: Dataset) -> Dataset:
    """A `length` column for transformers' LengthGroupedSampler: a pair's prompt plus its longer answer, the side that
    sets a batch's width (each half of a batch is cut to its own longest sequence, see `pad_halves_separately`)."""
    def length(row):
        return {"length": len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))}

    return dataset.map(length)


def _trainable_to_fp32(model, config: DPOConfig):
    """TRL casts the LoRA weights of a 4-bit model to bf16 whatever `fp16` says. fp16 grad scaling then fails
    ("Attempting to unscale FP16 gradients" or bf16 grads the scaler cannot read), and bf16 LoRA on a CPU is slow and
    coarse. So unless the run is bf16, trainable weights go back to fp32 before the optimizer is built."""
    if config.bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def replace_dir(src: Path, dst: Path):
    """Move a finished run folder into place; an older run there is moved aside first, then removed."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter(model, adapter_dir: str | Path, adapter_name: str = "default"):
    """Put a saved adapter on a loaded base; returns the PeftModel. PEFT checks the files and the base's shapes."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise DPOSpaceError(f"{adapter_dir}: no adapter_config.json here; is this a finished run folder?")
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
        model.set_adapter(adapter_name)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)


def read_run_config(path: str | Path) -> tuple[dict, dict]:
    """A run.yaml to its settings (checked against RunSettings) and the data files it names, resolved against the
    YAML's folder. Reads what `to_yaml` writes (TRL's keys, the system prompt under `env:`) and hand-written files
    in RunSettings' own names."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DPOSpaceError(f"{path}: cannot read run settings ({e})") from None
    if not isinstance(values, dict):
        raise DPOSpaceError(f"{path}: expected a YAML mapping of run settings")
    data_files = {}
    for entry in values.get("datasets") or []:
        files = entry.get("data_files") if isinstance(entry, dict) else None
        if isinstance(files, str):
            data_files["train"] = str(path.parent / files)
    env = values.get("env") if isinstance(values.get("env"), dict) else {}
    if SYSTEM_PROMPT_ENV in env:
        values.setdefault("system_prompt", env[SYSTEM_PROMPT_ENV] or None)
    if values.get("dtype") in _PRECISION_OF_DTYPE:
        values.setdefault("precision", _PRECISION_OF_DTYPE[values["dtype"]])
    settings = {k: v for k, v in values.items() if k not in _TRL_ONLY_KEYS}
    RunSettings.from_dict(settings)  # names the unknown or bad keys now
    return settings, data_files


def partial_dir(output_dir: str | Path) -> Path:
    """The hidden sibling a folder is written in before `replace_dir` renames it into place."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f".{output_dir.name}.partial")


def live_dir(output_dir: str | Path) -> Path:
    """Where a run's files are now: its hidden work folder while it runs, its own folder once finished."""
    work = partial_dir(output_dir)
    return work if work.exists() else Path(output_dir)


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The metrics a run has logged so far (from metrics.csv, so another process can be watched too)."""
    path = live_dir(output_dir) / "metrics.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


# The likelihood-displacement warning fires when the chosen answers' log-prob (summed over their tokens, as TRL logs
# `logps/chosen`) ends this many nats below its first logged value: each chosen answer made e^5 ≈ 150 times less likely.
DISPLACEMENT_NATS = 5.0


def likelihood_displacement(metrics: list[dict], nats: float = DISPLACEMENT_NATS) -> str | None:
    """A warning when the run has pushed its chosen answers down (Razin et al., 2024), else None."""
    chosen = [m["logps/chosen"] for m in metrics if "logps/chosen" in m]
    if len(chosen) < 2 or chosen[0] - chosen[-1] <= nats:
        return None
    rejected = [m["logps/rejected"] for m in metrics if "logps/rejected" in m]
    both = f"; rejected {rejected[0]:.1f} → {rejected[-1]:.1f}" if len(rejected) >= 2 else ""
    return (f"likelihood displacement: the chosen answers' log-prob fell {chosen[0] - chosen[-1]:.1f} nats "
            f"({chosen[0]:.1f} → {chosen[-1]:.1f}{both}), more than {nats:g}. The margin can still grow, but "
            "probability is going to answers in neither column (see Learn); an SFT term or a larger β holds the "
            "chosen answers up.")


def read_samples(output_dir: str | Path) -> list[dict]:
    path = live_dir(output_dir) / "samples.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out
