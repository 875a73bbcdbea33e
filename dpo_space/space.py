"""The Space's rules, without Gradio: when it is the shared public Space, the caps there, fitting a run into them,
which models it serves, what a finished run offers for download, and the push to the Hub.

On the shared Space visitors share one machine, so each run and answer is capped (each cap named when it applies);
on a duplicate or a local run the caps are lifted. A cap only ever lowers what a visitor asked for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import models
from .errors import DPOSpaceError
from .training import RunSettings, partial_dir

SHARED_SPACE_ID = os.environ.get("DPO_SPACE_SHARED_ID", "dpo-space/dpo-space")
# What a finished run offers for download, and pushes: the adapter, its settings and what it trained on.
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "run.yaml", "metrics.csv", "train.json", "README.md")
PUSHED_FILES = ("adapter_model.safetensors", "adapter_config.json", "run.yaml", "README.md")


def is_shared_space() -> bool:
    return os.environ.get("SPACE_ID") == SHARED_SPACE_ID


@dataclass(frozen=True)
class Limits:
    """Caps on a visitor's work. `Limits.for_space(shared=True)` on the shared public Space; else no real caps."""

    shared: bool = False
    max_pairs: int = 100_000
    max_epochs: float = 50
    max_steps: int = 100_000
    max_new_tokens: int = 1024
    max_length: int = 32_768  # tokens per training sequence
    eval_prompts: int = 1000
    eval_samples: int = 16  # K samples per prompt in Evaluate (Kirk et al. use 16)
    inspect_pairs: int = 2000
    runs_per_hour: int = 1000  # per visitor
    answers_per_minute: int = 1000  # per visitor: Compare, Evaluate and the inspector each count one

    @classmethod
    def for_space(cls, shared: bool | None = None) -> Limits:
        shared = is_shared_space() if shared is None else shared
        if not shared:
            return cls()
        # every recipe fits (the over-train one runs 4 epochs); 650 pairs × 4 epochs at batch 8 is 328 steps
        return cls(shared=True, max_pairs=700, max_epochs=4, max_steps=400, max_new_tokens=256, max_length=1024,
                   eval_prompts=40, eval_samples=4, inspect_pairs=100, runs_per_hour=6, answers_per_minute=20)


@dataclass(frozen=True)
class Retention:
    """What the Space keeps, so that memory and disk stay bounded however many people visit. Defaults suit a T4 Space
    (16 GB GPU, 50 GB disk); each is a named setting (environment variables DPO_SPACE_<NAME>)."""

    max_adapters: int = 8  # loaded in the chat model at once; the least recently used is unloaded, and reloaded later
    runs_per_visitor: int = 3  # each visitor's newest finished runs stay on disk
    disk_budget_mib: float = 2048.0  # all runs together; the oldest go first, never one in progress
    max_queue: int = 8  # runs waiting for the trainer
    # Gradio sessions whose state the server keeps (the rows a visitor edits, the values of updated components: about
    # 2 MiB each with a dataset loaded); beyond it the least recently used is dropped, its runs kept on disk. Gradio's
    # own default (state_session_capacity, 10,000) never drops a closed tab's session: memory grows with every visitor.
    sessions: int = 500

    @classmethod
    def from_env(cls) -> Retention:
        return cls(**{f: type(getattr(cls, f))(os.environ[f"DPO_SPACE_{f.upper()}"])
                      for f in cls.__dataclass_fields__ if f"DPO_SPACE_{f.upper()}" in os.environ})


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def adapter_zip(run: Path) -> Path:
    """Where a finished run's download lives: beside its folder, removed with it."""
    return run.with_name(f"{run.name}-adapter.zip")


def half_written_zip(run: Path) -> Path:
    """The hidden name `run_downloads` writes a run's zip under before renaming it to `adapter_zip`."""
    return run.with_name(f".{adapter_zip(run).name}")


def remove_stale_zips(folder: Path, older_than: float = 600):
    """Half-written zips a crash left in a visitor's folder; one younger than `older_than` seconds may still be being
    written by another thread, so it stays."""
    for stale in folder.glob(".*-adapter.zip"):
        try:
            if time.time() - stale.stat().st_mtime > older_than:
                stale.unlink()
        except FileNotFoundError:  # renamed or removed meanwhile
            pass


def run_mib(run: Path) -> float:
    """What a finished run takes on disk: its folder and its adapter zip."""
    zipped = adapter_zip(run)
    return folder_mib(run) + (zipped.stat().st_size / 2**20 if zipped.exists() else 0.0)


def is_finished_run(path: Path) -> bool:
    return (not path.name.startswith(".") and path.is_dir() and (path / "adapter_config.json").exists()
            and (path / "run.yaml").exists())


def runs_to_evict(root: Path, retention: Retention, active: set[Path]) -> list[Path]:
    """Finished runs the retention policy removes: beyond each visitor's newest `runs_per_visitor`, then the oldest
    until all runs, their adapter zips counted, fit `disk_budget_mib`. A run in progress (`active`) is never one of
    them."""
    runs = [run for visitor in sorted(root.glob("*")) if visitor.is_dir() for run in sorted(visitor.iterdir())
            if is_finished_run(run)]  # a run's folder name starts with its time: sorted is oldest first
    evict = []
    by_visitor: dict[Path, list[Path]] = {}
    for run in runs:
        by_visitor.setdefault(run.parent, []).append(run)
    for visitor_runs in by_visitor.values():
        evict += [r for r in visitor_runs[: -retention.runs_per_visitor] if r not in active]
    kept = sorted((r for r in runs if r not in evict), key=lambda r: r.name)
    sizes = {r: run_mib(r) for r in kept}
    total = sum(sizes.values()) + sum(folder_mib(partial_dir(a)) for a in active)  # runs still being written
    for run in kept:
        if total <= retention.disk_budget_mib:
            break
        if run not in active:
            evict.append(run)
            total -= sizes[run]
    return evict


class RateLimit:
    """At most `limit` events per visitor in any `window` seconds (a sliding window); the record of a visitor who has
    not come back for a window is dropped."""

    def __init__(self, limit: int, window: float, what: str):
        self.limit, self.window, self.what = limit, window, what
        self._events: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def check(self, visitor: str, now: float | None = None):
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in [k for k, times in self._events.items() if times[-1] < now - self.window]:
                del self._events[key]
            recent = [t for t in self._events.get(visitor, []) if t >= now - self.window]
            if len(recent) >= self.limit:
                wait = recent[0] + self.window - now
                raise DPOSpaceError(f"{self.what}: at most {self.limit} per {self.window / 60:g} minutes on the shared "
                                    f"Space; try again in {wait:.0f} s (duplicate the Space to lift the cap)")
            self._events[visitor] = recent + [now]


@dataclass(frozen=True)
class FittedRun:
    settings: RunSettings
    pairs: int  # how many of the visitor's pairs the run trains on
    steps: int
    notes: tuple[str, ...]  # each cap that applied, named


def fit_run(settings: RunSettings, pairs: int, limits: Limits, requested_pairs: int | None = None) -> FittedRun:
    """The run as the caps allow it. Pairs, epochs and steps are lowered to their caps with a note; a longer
    max_length than the cap is refused (it would silently cut the visitor's text). Never raises what was asked."""
    notes = []
    wanted = min(pairs, requested_pairs) if requested_pairs else pairs
    n = min(wanted, limits.max_pairs)
    if n < wanted:
        notes.append(f"the first {n} pairs (max_pairs: the shared Space's cap)")
    if n < 1:
        raise DPOSpaceError("No data: pick an example or upload a file in the Data tab.")
    if settings.max_length is not None and settings.max_length > limits.max_length:
        raise DPOSpaceError(f"max_length: at most {limits.max_length} tokens per sequence here (duplicate the Space "
                            "to lift the cap).")
    if settings.num_train_epochs > limits.max_epochs:
        notes.append(f"{limits.max_epochs:g} epochs, not {settings.num_train_epochs:g} (max_epochs: the shared "
                     "Space's cap)")
        settings = replace(settings, num_train_epochs=float(limits.max_epochs))
    steps = settings.steps(n)
    if steps > limits.max_steps:
        notes.append(f"{limits.max_steps} steps, not {steps} (max_steps: the shared Space's cap)")
        settings = replace(settings, max_steps=limits.max_steps)
        steps = limits.max_steps
    return FittedRun(settings, n, steps, tuple(notes))


def check_model(model: str, hardware: models.Hardware, served: str) -> models.Preset:
    """The preset a visitor picked, if this app can train it: listed, on hardware it needs, the one it serves."""
    preset = models.PRESETS.get(model)
    if preset is None:  # the Space accepts only its listed models
        raise DPOSpaceError(f"Unknown model {model!r}: pick one of the listed presets.")
    if preset.needs_gpu and hardware.device == "cpu":
        raise DPOSpaceError(f"{preset.label} needs a GPU; this machine has none. Duplicate the Space onto GPU "
                            "hardware.")
    if models.preset_for(served) is not preset:
        raise DPOSpaceError(f"This app serves {served}; start it with DPO_SPACE_MODEL={model} to train that one.")
    return preset


def space_settings(model: str, values: dict) -> RunSettings:
    """A visitor's settings for a run here: never the model repository's own code."""
    return RunSettings.for_model(model, **{**values, "trust_remote_code": False})


def run_downloads(output_dir: str | Path) -> tuple[str | None, str | None, str]:
    """(adapter zip, run.yaml, the commands that replay the run) for a finished run folder; for one removed meanwhile
    (retention), (None, None, commands), and no zip is left behind for a run that is not there."""
    out = Path(output_dir)
    archive = adapter_zip(out)
    if not archive.exists() and is_finished_run(out):
        with tempfile.TemporaryDirectory(prefix="dpo-space-zip-") as keep:  # removed even if zipping fails
            for name in RUN_FILES:
                if (out / name).exists():
                    shutil.copy2(out / name, Path(keep) / name)
            # written under a hidden name beside it, then renamed: a zip is there whole or not at all
            os.replace(shutil.make_archive(str(half_written_zip(out).with_suffix("")), "zip", keep), archive)
    command = (f"# on your own machine, in a clone of this Space:\nunzip {archive.name} -d adapter\n"
               "pip install -r requirements.txt\n"
               "python -m dpo_space train --config adapter/run.yaml --output outputs/replay\n"
               "# or with TRL's own script, from the adapter folder (on a GPU: add --use_cpu false and the\n"
               "# precision you want, --bf16 true or --fp16 true; run.yaml records what ran here):\n"
               "cd adapter && trl dpo --config run.yaml --output_dir replay")
    return (str(archive) if archive.exists() else None, str(out / "run.yaml") if (out / "run.yaml").exists() else None,
            command)


def push_adapter(output_dir: str | Path, token: str, repo_id: str, api_factory=None) -> str:
    """Upload a run's adapter with the visitor's token, private. The token is used for this call only: never logged,
    echoed or saved; an error message has it scrubbed."""
    if not token or not repo_id or "/" not in repo_id:
        return "Give a write token and a repository name like user/name."
    if api_factory is None:
        from huggingface_hub import HfApi as api_factory
    try:
        api = api_factory(token=token)
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, allow_patterns=list(PUSHED_FILES))
    except Exception as e:  # network, auth, name: say which without echoing the token
        return f"Push failed: {type(e).__name__}: {str(e).replace(token, '***')[:300]}"
    return f"Pushed to https://huggingface.co/{repo_id} (private)."


def describe_run(settings: RunSettings, hardware: models.Hardware, output_dir: str | Path | None = None) -> str:
    """Device, precision and weights of a run, as it ran (from its run.yaml once finished) or as it will run."""
    import yaml

    run_yaml = Path(output_dir) / "run.yaml" if output_dir else None
    if run_yaml is not None and run_yaml.exists():
        ran = yaml.safe_load(run_yaml.read_text(encoding="utf-8")) or {}
        device = "CPU" if ran.get("use_cpu") else hardware.name
        precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(ran.get("dtype"), settings.precision)
        if settings.precision == "auto" and hardware.precision == "fp16" and precision == "fp32":
            precision += " (the model overflowed in fp16 at load: fp32 compute)"
    else:
        device, precision = hardware.name, models.with_precision(hardware, settings.precision).precision
    weights = (f"4-bit {settings.bnb_4bit_quant_type}" + (" (double quant)" if settings.use_bnb_nested_quant else "")
               if settings.load_in_4bit else "full-precision weights")
    return f"{device} · {precision} · {weights} + LoRA r{settings.lora_r}"
