"""The benchmark scripts still run (their figures live in BENCHMARKS.md, not in tests)."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_speed_benchmark_measures_a_run_and_its_held_out_figures():
    """bench/speed.py's child for DPO Space's default on a few pairs: it trains, then evaluates the held-out pairs with
    the trainer it kept (a TrainingArguments built after training resets accelerate's state; it broke once on that)."""
    spec = {"recipe": "ours", "pairs": 16}
    out = subprocess.run([sys.executable, "bench/speed.py", "--child", json.dumps(spec)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train_s"] > 0 and result["tokens_per_s"] > 0 and result["params"] > 1_000_000
    assert result["epochs"] == 1 and result["epoch_s"] == result["train_s"]  # the preset's epochs, not the seed's 2
    assert set(result["heldout"]) == {"loss", "accuracy", "margin"} and 0 <= result["heldout"]["accuracy"] <= 1
