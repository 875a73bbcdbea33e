"""How fast a DPO run is: the seed article's recipe against DPO Space's default, on the embedded model (issue #4).

    python bench/speed.py                 # seed vs ours, 3 repeats each, alternating; prints the table
    python bench/speed.py --levers        # also each lever on its own (one run each)
    python bench/speed.py --app           # also app start, first chart point, Compare with 256 new tokens
    python bench/speed.py --write BENCHMARKS.md

Every run is its own process (a clean peak-memory reading, nothing cached between runs). Same model (the embedded
one, 4-bit nf4, as the preset loads it), same 650 pairs; each recipe runs its own epochs, as a user would run it (the
seed's 2 at batch 1, the embedded preset's 1 at batch 12), and per-epoch figures divide by them. "Training" is everything after the model is loaded:
tokenising, the trainer, reference log-probs, the steps and the save. Held-out loss, reward accuracy and margin are
measured the same way for both, by TRL's own evaluation (the trainer's `evaluate`) on the 40 held-out pairs after the
clock stops, so speed never hides worse learning. The seed's own evaluations every 500 steps stay in its clock. FLOPs are counted from the model's matrices and the real token counts (padding does not count):

    forward(sequence of L tokens, completion C) = 2·N_body·L + 2·N_head·C + 2·layers·hidden·L²  (+ LoRA)
    policy = 2 × forward (forward, then the gradients of the activations: the base is frozen)
    reference = 1 × forward, every epoch (or once, with precompute_ref_log_probs)

N_body: the decoder's linear weights; N_head: the LM head, which only has to score completion tokens. The share is
achieved FLOP/s over this machine's fp32 matrix-multiply rate, measured on the model's own matrix shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS, EPOCHS = 650, 2  # EPOCHS: the seed's; DPO Space runs its preset's


# ---------------------------------------------------------------- one run, in a child process

def _seed_recipe(pairs: int, output_dir: str):
    """The seed article's script, with the embedded model in place of ELYZA-8B and TRL 1.16's argument names."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from dpo_space import embedded, models

    model, tokenizer = models.load_model(models.EMBEDDED)  # 4-bit nf4, as the preset and the seed's script load it
    loaded = time.perf_counter()
    peft_config = LoraConfig(r=12, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="none")
    model = get_peft_model(model, peft_config)
    train_rows = json.loads((embedded.EXAMPLES_DIR / "wakarimasen_train.json").read_text(encoding="utf-8"))[:pairs]
    eval_rows = json.loads((embedded.EXAMPLES_DIR / "wakarimasen_eval.json").read_text(encoding="utf-8"))
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize_function(examples):  # the seed's, as written: every text padded to the tokenizer's maximum
        prompt_input = tokenizer(examples["prompt"], padding="max_length", truncation=True)
        chosen_input = tokenizer(examples["chosen"], padding="max_length", truncation=True)
        rejected_input = tokenizer(examples["rejected"], padding="max_length", truncation=True)
        return {"prompt_input_ids": prompt_input["input_ids"], "chosen_input_ids": chosen_input["input_ids"],
                "rejected_input_ids": rejected_input["input_ids"]}

    train_dataset = Dataset.from_list(train_rows).map(tokenize_function, batched=True)
    eval_dataset = Dataset.from_list(eval_rows).map(tokenize_function, batched=True)
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=1, num_train_epochs=EPOCHS, learning_rate=5e-5,
                     logging_steps=10, save_steps=100, eval_strategy="steps", eval_steps=500, warmup_steps=100,
                     weight_decay=0.01, beta=0.1, remove_unused_columns=True, disable_tqdm=True, report_to="none",
                     use_cpu=True)
    measure = _Measure()
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=[measure])
    trainer.train()
    trainer.save_model(output_dir)
    done = time.perf_counter()
    heldout = _heldout(trainer.evaluate())  # after the clock: its last scheduled evaluation was at step 1000
    return loaded, done, measure, trainer.state.log_history, heldout, model


def _ours(pairs: int, output_dir: str, overrides: dict, lever: str | None):
    from datasets import Dataset

    from dpo_space import data, embedded, models, training

    if lever == "full_vocab_head":
        training.score_completions_only = lambda: None  # TRL's own CPU path: every position through the vocabulary
    if lever == "one_padding":
        training.pad_halves_separately = lambda model: None  # TRL's: chosen and rejected padded to one length
    model, tokenizer = models.load_model(models.EMBEDDED)  # 4-bit nf4, the preset's
    loaded = time.perf_counter()
    hardware = models.Hardware("cpu", "CPU", "bf16") if lever == "bf16" else None  # autocast; fp32 master weights
    settings = training.RunSettings.for_model(models.EMBEDDED, output_dir=output_dir, **overrides)
    train_data = data.read_preferences(embedded.EXAMPLES_DIR / "wakarimasen_train.json")
    train_data.rows = train_data.rows[:pairs]
    trainers = []

    class Kept(training.DPOTrainer):  # the engine's trainer, kept to evaluate after the clock
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    training.DPOTrainer = Kept
    measure = _Measure()
    result = training.train(settings, train_data, model=model, tokenizer=tokenizer, callbacks=[measure],
                            hardware=hardware)
    done = time.perf_counter()
    eval_rows = data.as_training_rows(data.read_preferences(embedded.EXAMPLES_DIR / "wakarimasen_eval.json"),
                                      system_prompt=settings.system_prompt, chat_template=True)
    trainers[0].args.train_sampling_strategy = "random"  # a new eval set has no length column to group by
    trainers[0].create_accelerator_and_postprocess()  # a TrainingArguments built since (run.yaml's) reset the state
    heldout = _heldout(trainers[0].evaluate(Dataset.from_list(eval_rows)))
    return loaded, done, measure, result.metrics, heldout, result.model


class _Measure(TrainerCallback):
    """Real token counts of the training set, as TRL tokenised it, and whether reference log-probs were precomputed."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = train_dataloader.dataset
        self.lengths = [(len(p), len(c), len(r)) for p, c, r in
                        zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
        self.precomputed = "ref_chosen_logps" in dataset.column_names


def _heldout(metrics: dict) -> dict:
    return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_rewards/accuracies"],
            "margin": metrics["eval_rewards/margins"]}


def flops(model, lengths: list[tuple[int, int, int]], epochs: float, precomputed: bool) -> float:
    """Useful FLOPs of a LoRA DPO run (see the module docstring)."""
    import torch

    config = model.config
    body = head = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            if name.endswith("lm_head"):
                head += module.weight.numel()
            else:
                body += module.weight.numel()
        elif name.endswith("lora_A.default"):
            lora += module.weight.numel() * 2  # A and B have the same number of weights
    if head == 0:  # tied to the embedding and not a module of its own
        head = config.vocab_size * config.hidden_size

    def forward(prompt: int, completion: int) -> float:
        length = prompt + completion
        return 2 * body * length + 2 * head * completion + 2 * config.num_hidden_layers * config.hidden_size * length**2

    per_pass = sum(forward(p, c) + forward(p, r) for p, c, r in lengths)
    lora_per_pass = sum(2 * lora * (2 * p + c + r) for p, c, r in lengths) * 3  # forward, input and weight grads
    reference = per_pass * (1 if precomputed else epochs)
    return epochs * (2 * per_pass + lora_per_pass) + reference


def child(spec: dict) -> dict:
    import torch

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if spec["recipe"] == "seed":
            loaded, done, measure, history, heldout, model = _seed_recipe(spec["pairs"], tmp)
        else:
            loaded, done, measure, history, heldout, model = _ours(spec["pairs"], tmp, spec.get("overrides", {}),
                                                                    spec.get("lever"))
    train_s = done - loaded
    last = [h for h in history if "loss" in h][-1]
    epochs = last["epoch"]  # each recipe's own: the seed's 2, the embedded preset's 1
    tokens = sum(2 * p + c + r for p, c, r in measure.lengths)
    return {
        "load_s": loaded - start, "train_s": train_s, "epochs": epochs, "epoch_s": train_s / epochs,
        "pairs_per_s": len(measure.lengths) * epochs / train_s, "tokens_per_s": tokens * epochs / train_s,
        "flops": flops(model, measure.lengths, epochs, measure.precomputed),
        "params": sum(p.numel() for n, p in model.get_base_model().named_parameters() if "lora_" not in n),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": last["loss"], "train_accuracy": last.get("rewards/accuracies"),
        "train_margin": last.get("rewards/margins"), "heldout": heldout, "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the parent: matmul rate, runs, table

def matmul_rate(tokens: int = 2048, seconds: float = 0.5) -> tuple[float, float]:
    """fp32 GFLOP/s on the embedded model's own matrix shapes (FLOP-weighted), and on 1024² squares."""
    import torch

    from dpo_space import models

    config = json.loads((models.EMBEDDED_DIR / "config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [(tokens, h, h)] * 4 + [(tokens, h, i)] * 2 + [(tokens, i, h), (tokens // 2, h, v)]

    def rate(m, k, n):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        runs, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            a @ b
            runs += 1
        return 2 * m * k * n * runs / (time.perf_counter() - begin)

    work = [2 * m * k * n for m, k, n in shapes]
    shape_time = sum(w / rate(*s) for w, s in zip(work, shapes, strict=True))
    return sum(work) / shape_time / 1e9, rate(1024, 1024, 1024) / 1e9


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"run {spec} failed:\n{out.stderr[-3000:]}")


def median_of(runs: list[dict]) -> dict:
    def med(key, sub=None):
        values = [r[key][sub] if sub else r[key] for r in runs]
        return statistics.median(v for v in values if v is not None) if any(v is not None for v in values) else None

    out = {k: med(k) for k in runs[0] if k != "heldout"}
    out["heldout"] = {k: med("heldout", k) for k in runs[0]["heldout"]}
    out["repeats"] = len(runs)
    return out


LEVERS = {  # name: (what, settings overrides on top of ours, lever switch)
    "full_vocab_head": ("ours, but TRL's CPU head (every position through the vocabulary)", {}, "full_vocab_head"),
    "one_padding": ("ours, but chosen and rejected padded to one length (TRL's)", {}, "one_padding"),
    "no_grouping": ("ours, but random batches (no length grouping)", {"train_sampling_strategy": "random"}, None),
    "precompute": ("ours + precompute_ref_log_probs", {"precompute_ref_log_probs": True}, None),
    "batch_1": ("ours at batch 1 (the seed's batch size)", {"per_device_train_batch_size": 1}, None),
    "bf16": ("ours + bf16 autocast (CPU AVX512-BF16)", {}, "bf16"),
}


def app_timings(repeats: int) -> list[tuple[str, str, str]]:
    """Start app.py, time until the page is served; through gradio_client: Start → first chart point, and both Compare
    answers with 256 new tokens (sampling on, the UI's defaults)."""
    import gradio_client
    from load import free_port, start_app  # bench/load.py, beside this file

    from dpo_space import ui
    from dpo_space.training import RunSettings

    served, first_point, compare_s = [], [], []
    for _ in range(repeats):
        port = free_port()
        begin = time.perf_counter()
        proc = start_app(port)
        try:
            served.append(time.perf_counter() - begin)
            url = f"http://127.0.0.1:{port}/"
            client = gradio_client.Client(url, verbose=False)
            visitor, _ = client.predict(None, api_name="/visitor")
            client.predict("わかりません (seed, extreme)", api_name="/load_example")
            args = [visitor, "embedded", 650, "人はどんなことをしてもらうと嬉しいですか?",
                    *ui.widget_values(RunSettings.for_model("embedded"))]  # the Train tab as it opens
            begin = time.perf_counter()
            client.predict(*args, api_name="/train")
            while not client.predict(visitor, api_name="/status")[1]["value"]["data"]:
                time.sleep(0.25)  # the page polls once a second; polling flat out would steal the training's cores
            first_point.append(time.perf_counter() - begin)
            client.predict(visitor, api_name="/stop")
            while "running" in client.predict(visitor, api_name="/status")[0]:
                time.sleep(0.2)
            begin = time.perf_counter()
            base, dpo, *_ = client.predict(visitor, "人はどんなことをしてもらうと嬉しいですか?", [], [], 0.6, 0.9,
                                           256, 0, "あなたは日本語チャットbotです。ユーザの質問答えてください。",
                                           api_name="/compare")
            compare_s.append(time.perf_counter() - begin)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return [
        ("app start → page served", f"{statistics.median(served):.1f} s", "≤ 10 s"),
        ("Start → first chart point", f"{statistics.median(first_point):.1f} s", "≤ 3 s"),
        ("Compare: both answers, 256 new tokens", f"{statistics.median(compare_s):.1f} s", "≤ 3 s"),
    ]


def planner_table() -> list[str]:
    """The memory planner (dpo_space/memory.py) for each GPU preset at its own settings, on each usual GPU."""
    from dpo_space import memory, models
    from dpo_space.training import RunSettings

    lines = ["Estimated peak GPU memory (dpo_space/memory.py, on paper: no GPU measured it here) of each GPU preset at "
             "its own settings, with the Space's chat copy resident beside the run (its weights, the KV cache of a "
             "16-answer batch, eight adapters), and the batch × accumulation (+ gradient checkpointing) the planner "
             "picks per GPU; where nothing fits beside the chat copy, the run alone (the Space pauses chat and lends "
             "the run its base):",
             "", "| preset | settings | run alone | chat copy | both | " + " | ".join(memory.GPUS) + " |",
             "|---|---|---|---|---|" + "---|" * len(memory.GPUS)]
    for key, preset in models.PRESETS.items():
        if not preset.needs_gpu:
            continue
        s = RunSettings.for_model(key)
        shape = memory.shape_for(preset.model_id)
        sizes = dict(max_length=s.max_length, lora_r=s.lora_r, lora_targets=tuple(s.lora_target_modules))
        e = memory.estimate(shape, batch=s.per_device_train_batch_size, checkpointing=s.gradient_checkpointing,
                            **sizes)
        cells = []
        for gib in memory.GPUS.values():
            effective = s.per_device_train_batch_size * s.gradient_accumulation_steps
            p = memory.plan(shape, gib, effective_batch=effective, **sizes)
            alone = "" if p.fits else " alone, chat paused"
            p = p if p.fits else memory.plan(shape, gib, effective_batch=effective, with_chat_copy=False, **sizes)
            cells.append(f"{p.batch} × {p.accumulation}{' + ckpt' if p.checkpointing else ''} "
                         f"({p.estimate.total / memory.GIB:.1f} GiB{alone})" if p.fits else "does not fit")
        lines.append(f"| {key} | batch {s.per_device_train_batch_size} × {s.gradient_accumulation_steps}, "
                     f"{s.max_length} tokens{', ckpt' if s.gradient_checkpointing else ''} | "
                     f"{(e.total - e.chat) / memory.GIB:.1f} GiB | {e.chat / memory.GIB:.1f} GiB | "
                     f"{e.total / memory.GIB:.1f} GiB | " + " | ".join(cells) + " |")
    return lines


GPU_PEERS = """## On a GPU

Not measured: no GPU machine was lent to this project when this was written (the `device` tool), so the GPU row is
empty. For context, Unsloth reports DPO 1.55× faster than plain Hugging Face on a T4 and 1.88× on an A100; its T4
notebook trains a 7B 4-bit DPO at about 4.4 s per pair (1024-token pairs, batch 2 × 4) with a 14.7 GB peak.

| GPU | model | s / pair | peak memory |
|---|---|---|---|
| (none lent) | | | |"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--levers", action="store_true", help="also each speed lever on its own, one run each")
    parser.add_argument("--app", action="store_true", help="also the app's start, first chart point and Compare")
    parser.add_argument("--write", metavar="FILE", help="also write the tables as Markdown to FILE")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rate_before, square = matmul_rate()
    runs = {"seed": [], "ours": []}
    for _ in range(args.repeats):  # alternating, so a slow minute on the machine hits both
        for recipe in runs:
            runs[recipe].append(run_child({"recipe": recipe, "pairs": args.pairs}))
            print(f"  {recipe}: {runs[recipe][-1]['train_s']:.1f} s", file=sys.stderr, flush=True)
    rate_after, _ = matmul_rate()
    rate = max(rate_before, rate_after)
    seed, ours = median_of(runs["seed"]), median_of(runs["ours"])

    def row(name, r):
        share = r["flops"] / r["train_s"] / 1e9 / rate
        h = r["heldout"]
        return (f"| {name} | {r['train_s']:.1f} | {r['epoch_s']:.1f} | {r['pairs_per_s']:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['flops'] / r['train_s'] / 1e9:.1f} ({share:.0%}) | "
                f"{r['peak_mib']:,.0f} | {r['final_loss']:.3f} | {h['loss']:.3f} / {h['accuracy']:.2f} / "
                f"{h['margin']:.2f} |")

    header = ("| run | training s | s / epoch | pairs/s | tokens/s | GFLOP/s (share of matmul) | peak RSS MiB | "
              "final train loss | held-out loss / reward acc / margin |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"Machine: {os.cpu_count()} CPU cores, torch {ours['threads']:.0f} threads; fp32 matmul "
             f"{rate:.0f} GFLOP/s on the model's shapes ({square:.0f} on 1024² squares). "
             f"{args.pairs} pairs, each recipe its own epochs (the seed's {seed['epochs']:g}, the preset's "
             f"{ours['epochs']:g}), median of {args.repeats} runs each.", "", header,
             row("seed article's recipe (batch 1)", seed), row("DPO Space default", ours), "",
             f"Speed-up: {seed['train_s'] / ours['train_s']:.1f}× (training), "
             f"{(seed['train_s'] + seed['load_s']) / (ours['train_s'] + ours['load_s']):.1f}× (with the model load: "
             f"{ours['train_s'] + ours['load_s']:.1f} s for ours, target ≤ 60 s)."]
    if args.levers:
        lines += ["", "Each lever on its own (one run each; compare with the default above):", "", header]
        for name, (what, overrides, lever) in LEVERS.items():
            result = run_child({"recipe": "ours", "pairs": args.pairs, "overrides": overrides, "lever": lever})
            print(f"  {name}: {result['train_s']:.1f} s", file=sys.stderr, flush=True)
            lines.append(row(what, median_of([result])))
    rule = ours["tokens_per_s"] * 6 * ours["params"] / 1e9 / rate
    lines += ["", f"By the rule of thumb (6N FLOPs per real token, N = all {ours['params'] / 1e6:.1f}M parameters, the "
              f"head counted on every token) DPO Space's default reaches {rule:.0%} of the matmul rate; the table counts "
              "only the work that has to be done (the head on completion tokens only), which is stricter."]
    if args.app:
        lines += ["", "| the app (median of 3) | value | target |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in app_timings(3)]
    lines += ["", *planner_table()]
    text = "\n".join(lines)
    print(text)
    if args.write:
        header = (f"# Benchmarks\n\nWritten by `python bench/speed.py {' '.join(sys.argv[1:])}` on "
                  f"{time.strftime('%Y-%m-%d')}. How each figure is measured: the docstring of `bench/speed.py`.\n\n")
        path = Path(args.write)  # the file's sections from "## On a GPU" on are kept (other benches write them)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        rest = old[old.index("## On a GPU"):] if "## On a GPU" in old else GPU_PEERS + "\n"
        path.write_text(header + text + "\n\n" + rest, encoding="utf-8")


if __name__ == "__main__":
    main()
