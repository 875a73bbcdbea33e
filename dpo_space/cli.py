"""`python -m dpo_space validate | train | compare | eval | build-embedded` — the engine from a shell.

`train` runs unchanged under `torchrun --nproc_per_node N` and `accelerate launch` (DDP; gloo on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from .errors import DPOSpaceError

# Short names for the flags people type most; every RunSettings field is also a flag under its own name.
ALIASES = {
    "model_name_or_path": ["--model"],
    "num_train_epochs": ["--epochs"],
    "output_dir": ["--output"],
    "learning_rate": ["--lr"],
    "per_device_train_batch_size": ["--batch-size"],
}


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _settings_flags(parser: argparse.ArgumentParser):
    from .training import RunSettings

    group = parser.add_argument_group("run settings (TRL's names; defaults: the model preset's, else the seed's)")
    for f in fields(RunSettings):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []) + ALIASES.get(f.name, [])
        cast, nargs = _caster(str(f.type))
        group.add_argument(*names, dest=f.name, type=cast, nargs=nargs, default=None)


def _caster(type_text: str):
    """An argparse type for a field annotation such as "int | None" or "list[float] | None"."""
    if type_text.startswith("bool"):
        return _bool, None
    if type_text.startswith("list"):
        return (float if "float" in type_text else str), "+"
    cast = {"int": int, "float": float, "str": str}[type_text.split("|")[0].strip()]
    if "None" in type_text and cast is not str:
        return (lambda text: None if text.lower() in ("none", "null") else cast(text)), None
    return cast, None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(settings_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. Without `settings_flags` the train command lacks its RunSettings flags, which need the
    training stack (torch, TRL) imported: `validate` starts in a fraction of a second that way."""
    parser = argparse.ArgumentParser(prog="python -m dpo_space", description="DPO Space: see what DPO does.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a preference file; exit 0 with the pair count, or 1 with problems")
    p.add_argument("file")
    p.add_argument("--split", help="the split key of a JSON object file (default: train)")

    p = sub.add_parser("train", help="run 4-bit LoRA DPO and save adapter, run.yaml and metrics.csv")
    p.add_argument("--data", help="preference file (.json / .jsonl)")
    p.add_argument("--eval-data", help="preference file for evaluation during training")
    p.add_argument("--config", help="a run.yaml (from an earlier run, or written by hand); flags override it")
    if settings_flags:
        _settings_flags(p)

    for name, text in (("compare", "answer one prompt with the base and the DPO model"),
                       ("eval", "answer many prompts with both models and measure collapse")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--adapter", required=True, help="a run folder written by `train`")
        p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
        if name == "compare":
            p.add_argument("--prompt", required=True)
        else:
            p.add_argument("--prompts", required=True, help="text (one prompt a line) or JSON/JSONL prompts or pairs")
            p.add_argument("--output", help="write the report as JSON here")
            p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--temperature", type=float, default=0.6)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--system-prompt", default=None, help="default: the one the adapter was trained with")
        p.add_argument("--load-in-4bit", type=_bool, default=None, metavar="true|false")

    p = sub.add_parser("check-corpus", help="check corpus, conversation or held-out batches before they join examples/")
    p.add_argument("files", nargs="+")

    p = sub.add_parser("build-embedded", help="build the embedded tiny Japanese chat model (and the example datasets) from examples/corpus")
    p.add_argument("--corpus", default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--from-sft", default=None, metavar="DIR",
                   help="a model this command saved, taken as the SFT's result: only the quantization-aware stage runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(settings_flags=command in (None, "train")).parse_args(argv)
    try:
        return {"validate": cmd_validate, "train": cmd_train, "compare": cmd_compare, "eval": cmd_eval,
                "build-embedded": cmd_build_embedded, "check-corpus": cmd_check_corpus}[args.command](args)
    except DPOSpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_validate(args) -> int:
    from .data import read_preferences

    data = read_preferences(args.file, split=args.split)
    layout = "conversational" if data.conversational else "standard"
    note = f", read as {data.encoding}" if data.encoding not in ("utf-8", "utf-8-sig") else ""
    print(f"{data.source}: {len(data)} pairs ({layout}{note})")
    return 0


def cmd_check_corpus(args) -> int:
    from .corpus import check_file, read_jsonl

    bad = 0
    for path in args.files:
        problems = check_file(path)
        for problem in problems:
            print(f"{path}: {problem}")
        if not problems:
            print(f"{path}: {len(read_jsonl(path))} rows, ok")
        bad += bool(problems)
    return 1 if bad else 0


def cmd_train(args) -> int:
    from .data import read_preferences
    from .training import RunSettings, read_run_config, train

    flags = {f.name: getattr(args, f.name) for f in fields(RunSettings) if getattr(args, f.name) is not None}
    config, data_files = read_run_config(args.config) if args.config else ({}, {})
    model = flags.get("model_name_or_path") or config.get("model_name_or_path") or RunSettings.model_name_or_path
    # precedence: the seed's defaults < the model preset's (with its own recipe) < the config file < flags
    settings = RunSettings.for_model(model, **{**config, **flags})
    data_path = args.data or data_files.get("train")
    if not data_path:
        raise DPOSpaceError("train needs --data FILE (or a --config whose datasets name one)")
    train_data = read_preferences(data_path)
    eval_data = read_preferences(args.eval_data) if args.eval_data else None
    if _is_main():
        print(f"{train_data.source}: {len(train_data)} pairs; model {settings.model_name_or_path}; "
              f"beta {settings.beta}, lora_r {settings.lora_r}, {settings.num_train_epochs} epochs")
    result = train(settings, train_data, eval_data, disable_tqdm=not _is_main(), stop=_graceful_stop())
    if _is_main():
        last = result.metrics[-1] if result.metrics else {}
        print(f"saved to {result.output_dir}: loss {last.get('loss', float('nan')):.4f}, "
              f"margin {last.get('rewards/margins', float('nan')):.3f}, "
              f"accuracy {last.get('rewards/accuracies', float('nan')):.2f}")
    return 0


def _graceful_stop() -> threading.Event:
    """First Ctrl-C or SIGTERM: finish this optimizer step, save, exit. A second Ctrl-C aborts."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("stopping after this step and saving (Ctrl-C again to abort)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _load_pair(args):
    """The base model and tokenizer with the run's adapter on top, and the run's settings."""
    from .models import load_model
    from .training import RunSettings, load_adapter, read_run_config

    run_yaml = Path(args.adapter) / "run.yaml"
    settings = RunSettings.from_dict(read_run_config(run_yaml)[0]) if run_yaml.exists() else None
    model_id = args.model or (settings.model_name_or_path if settings else None)
    if model_id is None:
        model_id = json.loads((Path(args.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    four_bit = args.load_in_4bit if args.load_in_4bit is not None else (settings.load_in_4bit if settings else True)
    model, tokenizer = load_model(model_id, load_in_4bit=four_bit)
    model = load_adapter(model, args.adapter)
    return model, tokenizer, settings


def _sampling(args, settings):
    from .data import SEED_SYSTEM_PROMPT
    from .generation import Sampling

    system = args.system_prompt if args.system_prompt is not None else (
        settings.system_prompt if settings else SEED_SYSTEM_PROMPT)
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, system_prompt=system or None)


def cmd_compare(args) -> int:
    from .generation import generate

    model, tokenizer, settings = _load_pair(args)
    sampling = _sampling(args, settings)
    for label, on in (("base", False), ("dpo", True)):
        print(f"--- {label}")
        print(generate(model, tokenizer, args.prompt, sampling, use_adapter=on))
    return 0


def cmd_eval(args) -> int:
    from .data import read_prompts
    from .generation import evaluate

    prompts = read_prompts(args.prompts)
    model, tokenizer, settings = _load_pair(args)
    report = evaluate(model, tokenizer, prompts, _sampling(args, settings), batch_size=args.batch_size)
    text = json.dumps(report, ensure_ascii=False, indent=1)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    for side in ("base", "dpo"):
        s = report["summary"][side]
        print(f"{side:>4}: refusal {s['refusal_rate']:.0%}, distinct-2 {s['distinct_2']:.2f}, "
              f"repetition {s['repetition']:.2f}, mean length {s['mean_length']:.0f}")
    if not args.output:
        print(text)
    return 0


def cmd_build_embedded(args) -> int:
    from . import embedded

    embedded.build(corpus_dir=args.corpus, out_dir=args.output, from_sft=args.from_sft)
    if args.corpus is None and args.output is None:  # the shipped build also refreshes the shipped datasets
        for path in embedded.write_examples().values():
            print(f"wrote {path}")
    return 0
