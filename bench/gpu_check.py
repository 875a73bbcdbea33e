"""Measured on a real GPU: the 4-bit paths, memory against the planner, speed against the seed's recipe (issue #16).

    python bench/gpu_check.py                       # on one GPU, about 8 minutes; prints a Markdown table
    python bench/gpu_check.py --write BENCHMARKS.md # and puts the table in BENCHMARKS.md's GPU section
    python bench/gpu_check.py --dry-run             # the same script on the CPU, tiny shapes, a few steps (a test)

Nothing is downloaded (a GPU machine lent for this has no network):
1. The embedded model in 4-bit nf4 on CUDA, the seed article's settings and DPO Space's default preset, in fp16 (fp32
   trainable weights: the T4 path), bf16 and fp32: loss, reward accuracy, seconds, peak memory, and the share of
   refusals on held-out prompts after DPO.
2. The GPU presets' real shapes (bench/shapes.json, from the model cards' config.json): random-initialised models,
   quantised to nf4 in memory, a few DPO steps at each preset's settings on synthetic pairs of `max_length` tokens:
   peak memory (torch.cuda.max_memory_allocated) against dpo_space/memory.py's estimate, seconds per pair, and the
   seed's recipe (batch 1, padding to max_length, the reference pass every step) on the same shapes for the ratio.
3. The app on the GPU: app.py serving the embedded model, one Train → Compare → Evaluate through gradio_client.
4. A Markdown table naming the card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES_FILE = Path(__file__).with_name("shapes.json")


def device_and_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return "cuda", torch.cuda.max_memory_allocated() / 2**30
    import resource

    return "cpu", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS, GiB, on the dry run


def reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- 1. the embedded model, three precisions


def embedded_runs(precisions: list[str], pairs: int, max_steps: int | None, out: Path) -> list[dict]:
    from dpo_space import data, embedded, generation, models
    from dpo_space.collapse import summarize
    from dpo_space.training import RunSettings, train

    rows = []
    train_data = data.read_preferences(embedded.EXAMPLES_DIR / "wakarimasen_train.json")
    train_data.rows = train_data.rows[:pairs]
    prompts = data.read_prompts(embedded.EXAMPLES_DIR / "wakarimasen_eval.json")[: 8 if max_steps else 40]
    hardware = models.detect_hardware()
    recipes = {"seed article's settings": dict(learning_rate=5e-5, per_device_train_batch_size=1, warmup_steps=100),
               "DPO Space default": {}}
    for recipe, overrides in recipes.items():
        for precision in precisions:
            reset_peak()
            settings = RunSettings.for_model(models.EMBEDDED, output_dir=str(out / f"embedded-{precision}"),
                                             precision=precision, **overrides,
                                             **({"max_steps": max_steps} if max_steps else {}))
            start = time.perf_counter()
            result = train(settings, train_data, hardware=hardware)
            seconds = time.perf_counter() - start
            _, peak = device_and_peak()
            answers = generation.generate_batch(result.model, result.tokenizer, prompts,
                                                generation.Sampling(max_new_tokens=64), use_adapter=True)
            last = result.metrics[-1]
            rows.append({"run": f"embedded, {recipe}, {precision}", "loss": last["loss"],
                         "accuracy": last["rewards/accuracies"], "seconds": seconds, "peak_gib": peak,
                         "refusals": summarize(answers).refusal_rate, "precision used": result.hardware.precision})
            del result
    return rows


# ---------------------------------------------------------------- 2. the presets' real shapes, random weights in nf4


def random_4bit_model(config: dict, hardware):
    """A model of this shape with random weights, its decoder's linear layers quantised to nf4 in memory (what loading
    a checkpoint with a BitsAndBytesConfig does), without a checkpoint on disk: built in the compute dtype on the
    device, then each linear layer replaced by a bitsandbytes Linear4bit holding its weight."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_space import models

    quant = models.quantization_config(hardware)
    device = "cuda" if hardware.device == "cuda" else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=hardware.dtype)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=hardware.dtype, quant_type=quant.bnb_4bit_quant_type,
                                          compress_statistics=quant.bnb_4bit_use_double_quant, device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                                 quant_type=quant.bnb_4bit_quant_type,
                                                 compress_statistics=quant.bnb_4bit_use_double_quant).to(device)
                if child.bias is not None:  # Qwen2's q, k, v projections have one; it stays in the compute dtype
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # what PEFT and TRL read to prepare a quantised model
    model.config.quantization_config = quant
    reset_peak()  # the full-precision weights are gone; measure the run from here
    return model


def synthetic_pairs(tokenizer, n: int, tokens: int):
    """n pairs whose prompt + answer fill about `tokens` tokens (chosen and rejected of equal length)."""
    import random

    from dpo_space.data import validate_rows

    rng = random.Random(0)
    kana = [chr(c) for c in range(0x3042, 0x3093)]  # hiragana: whatever the vocabulary, a token or a few each
    sample = "".join(rng.choice(kana) for _ in range(400))
    per_char = len(tokenizer(sample, add_special_tokens=False).input_ids) / len(sample)
    text = lambda k: "".join(rng.choice(kana) for _ in range(max(1, round(k / per_char))))  # noqa: E731
    return validate_rows([{"prompt": text(tokens // 5), "chosen": text(tokens * 2 // 5),
                           "rejected": text(tokens * 2 // 5)} for _ in range(n)], source="synthetic")


TINY = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=8000)  # the dry run's shapes: the same code, seconds on a CPU


def shape_runs(keys: list[str], steps: int, max_length: int | None, out: Path, tiny: bool = False) -> list[dict]:
    from dpo_space import memory, models
    from dpo_space.training import RunSettings, train

    shapes = json.loads(SHAPES_FILE.read_text(encoding="utf-8"))
    hardware = models.detect_hardware()
    _, tokenizer = models.load_model(models.EMBEDDED, load_in_4bit=False)  # text only: the ids are random anyway
    rows = []
    for key in keys:
        preset = models.PRESETS[key]
        config = {**shapes[preset.model_id], **(TINY if tiny else {})}
        for recipe in ("preset", "seed recipe"):
            settings = RunSettings.for_model(key, output_dir=str(out / f"{key}-{recipe}"), max_steps=steps,
                                             warmup_steps=0, **({"max_length": max_length} if max_length else {}))
            if recipe == "seed recipe":  # batch 1, and (below) every sequence padded to max_length
                settings.per_device_train_batch_size, settings.gradient_accumulation_steps = 1, 1
            pairs_per_step = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
            # the preset's pairs fill their length; the seed's recipe pads every sequence to it, which is the same
            # work: full-length pairs measure both
            pairs = synthetic_pairs(tokenizer, steps * pairs_per_step, settings.max_length)
            model = random_4bit_model(config, hardware)
            start = time.perf_counter()
            result = train(settings, pairs, model=model, tokenizer=tokenizer, hardware=hardware)
            seconds = time.perf_counter() - start
            _, peak = device_and_peak()
            shape = memory.Shape.from_config(config)
            estimate = memory.estimate(shape, batch=settings.per_device_train_batch_size,
                                       max_length=settings.max_length, load_in_4bit=True, lora_r=settings.lora_r,
                                       lora_targets=tuple(settings.lora_target_modules),
                                       checkpointing=settings.gradient_checkpointing,
                                       with_chat_copy=False).total / memory.GIB
            rows.append({"run": f"{key} shape, {recipe}", "batch": f"{settings.per_device_train_batch_size} × "
                         f"{settings.gradient_accumulation_steps}", "max_length": settings.max_length,
                         "checkpointing": settings.gradient_checkpointing, "seconds": seconds,
                         "s_per_pair": seconds / (len(result.metrics) * pairs_per_step), "peak_gib": peak,
                         "estimate_gib": estimate, "estimate_error": (estimate - peak) / peak if peak else math.nan})
            del result, model
    return rows


# ---------------------------------------------------------------- 3. the app on the GPU


def app_journey(pairs: int) -> dict:
    import gradio_client

    sys.path.insert(0, str(Path(__file__).parent))
    from load import free_port, start_app

    from dpo_space import ui
    from dpo_space.training import RunSettings

    port = free_port()
    begin = time.perf_counter()
    proc = start_app(port, env={"DPO_SPACE_MODEL": "embedded"})
    try:
        served = time.perf_counter() - begin
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        visitor, _ = client.predict(None, api_name="/visitor")
        client.predict("わかりません (seed, extreme)", api_name="/load_example")
        begin = time.perf_counter()
        client.predict(visitor, "embedded", pairs, "人はどんなことをしてもらうと嬉しいですか?",
                       *ui.widget_values(RunSettings.for_model("embedded")), api_name="/train")
        while "running" in (status := client.predict(visitor, api_name="/status")[0]) or "queued" in status:
            time.sleep(1)
        trained = time.perf_counter() - begin
        begin = time.perf_counter()
        client.predict(visitor, "部屋の掃除のコツは?", [], [], 0.6, 0.9, 128, 0, "", api_name="/compare")
        compared = time.perf_counter() - begin
        begin = time.perf_counter()
        _, summary, _, _ = client.predict(visitor, "旅行の準備は?\n朝ごはんを食べるメリットは?", 0.6, 0.9, 64, 0, "",
                                          api_name="/evaluate")
        return {"served_s": served, "train_s": trained, "status": status, "compare_s": compared,
                "evaluate_s": time.perf_counter() - begin, "summary": summary}
    finally:
        proc.terminate()


# ---------------------------------------------------------------- the table


def table(card: str, embedded: list[dict], shapes: list[dict], app: dict | None) -> str:
    lines = [f"Measured by `python bench/gpu_check.py` on {card}, {time.strftime('%Y-%m-%d')}.", "",
             "| run | loss | reward acc. | s | peak GiB | refusals after DPO (held out) | precision used |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['loss']:.3f} | {r['accuracy']:.2f} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['refusals']:.0%} | {r['precision used']} |" for r in embedded]
    lines += ["", "| shape (random nf4 weights) | batch | max_length | ckpt | s / pair | peak GiB | planner GiB | "
              "planner error |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['batch']} | {r['max_length']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['s_per_pair']:.2f} | {r['peak_gib']:.2f} | {r['estimate_gib']:.2f} | {r['estimate_error']:+.0%} |"
              for r in shapes]
    by_key: dict[str, dict] = {}
    for r in shapes:
        by_key.setdefault(r["run"].split(" shape")[0], {})[r["run"].split(", ")[-1]] = r["s_per_pair"]
    for key, pace in by_key.items():
        if {"preset", "seed recipe"} <= set(pace):
            lines.append(f"\n{key}: the preset is {pace['seed recipe'] / pace['preset']:.1f}× the seed's recipe "
                         "per pair on this card.")
    if app:
        lines += ["", f"The app on this card: served {app['served_s']:.1f} s after start; a Train run "
                  f"{app['train_s']:.1f} s ({app['status']}); Compare {app['compare_s']:.1f} s; Evaluate of two "
                  f"prompts {app['evaluate_s']:.1f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, a few steps")
    parser.add_argument("--write", help="put the table into this BENCHMARKS.md's GPU section")
    parser.add_argument("--skip-app", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU here: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    card = "the CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.dry_run:  # the same code, small enough for the test suite
            embedded = embedded_runs(["fp32"], pairs=16, max_steps=2, out=out)
            shapes = shape_runs(["qwen2.5-0.5b"], steps=1, max_length=64, out=out, tiny=True)
        else:
            precisions = ["fp16", "bf16", "fp32"] if torch.cuda.get_device_capability()[0] >= 8 else ["fp16", "fp32"]
            embedded = embedded_runs(precisions, pairs=650, max_steps=None, out=out)
            shapes = shape_runs(["qwen2.5-0.5b", "tinyswallow-1.5b", "elyza-8b"], steps=4, max_length=None, out=out)
        app = None if args.skip_app or args.dry_run else app_journey(pairs=160)
    text = table(card, embedded, shapes, app)
    print(text)
    if args.write:
        path = Path(args.write)
        body = path.read_text(encoding="utf-8")
        start = body.index("## On a GPU")
        end = body.find("\n## ", start + 1)
        section = "## On a GPU\n\n" + text + "\n"
        path.write_text(body[:start] + section + (body[end:] if end >= 0 else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
