"""The CLI as a user runs it: separate processes, exit codes, files on disk."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args, check=True, prefix=(sys.executable, "-m")):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*prefix, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def pairs_file(wakarimasen_pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "pairs.json"
    path.write_text(json.dumps(wakarimasen_pairs.rows, ensure_ascii=False), encoding="utf-8")
    return path


TRAIN = ["--lr", "5e-3", "--batch-size", "4", "--epochs", "1", "--warmup_steps", "0", "--max_length", "128"]


def test_validate_exit_codes(pairs_file, tmp_path):
    ok = run("dpo_space", "validate", str(pairs_file))
    assert "pairs.json: 24 pairs (standard)" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "a"}\n{"prompt": 1}\n', encoding="utf-8")
    proc = run("dpo_space", "validate", str(bad), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bad.jsonl: row 1: 'rejected': is identical to 'chosen'" in proc.stderr
    assert "bad.jsonl: row 2: 'chosen': is missing" in proc.stderr


def test_train_compare_eval(pairs_file, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    trained = run("dpo_space", "train", "--data", str(pairs_file), "--model", str(tiny_model_dir), "--beta", "0.2",
                  "--lora-r", "4", "--load-in-4bit", "true", "--output", str(out), *TRAIN)
    assert f"saved to {out}" in trained.stdout
    assert "beta: 0.2" in (out / "run.yaml").read_text() and "lora_r: 4" in (out / "run.yaml").read_text()

    compare = run("dpo_space", "compare", "--adapter", str(out), "--prompt", "旅行の準備は?", "--max-new-tokens", "8",
                  "--load-in-4bit", "true")
    assert compare.stdout.index("--- base") < compare.stdout.index("--- dpo")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("旅行の準備は?\n家計の管理のコツは?\n", encoding="utf-8")
    report_path = tmp_path / "report.json"
    run("dpo_space", "eval", "--adapter", str(out), "--prompts", str(prompts), "--max-new-tokens", "8",
        "--output", str(report_path))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert [r["prompt"] for r in report["rows"]] == ["旅行の準備は?", "家計の管理のコツは?"]
    assert {"refusal_rate", "distinct_2", "repetition", "mean_length"} <= set(report["summary"]["dpo"])

    # the saved run.yaml replays the run; flags still override it
    replay = tmp_path / "replay"
    run("dpo_space", "train", "--config", str(out / "run.yaml"), "--output", str(replay), "--epochs", "1")
    assert "beta: 0.2" in (replay / "run.yaml").read_text()


def test_bad_input_is_a_message_not_a_traceback(tmp_path, tiny_model_dir):
    proc = run("dpo_space", "train", "--data", str(tmp_path / "missing.json"), "--model", str(tiny_model_dir),
               check=False)
    assert proc.returncode == 1 and "missing.json: cannot read the file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_two_processes(pairs_file, tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp"
    proc = run("--nproc_per_node", "2", "-m", "dpo_space", "train", "--data", str(pairs_file), "--model",
               str(tiny_model_dir), "--output", str(out), "--load-in-4bit", "false", *TRAIN, prefix=(torchrun,))
    assert proc.stdout.count("saved to") == 1  # rank 0 speaks
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 3  # 24 pairs / (batch 4 × 2 processes) = 3 steps
    assert (out / "adapter_model.safetensors").exists()


def test_validate_starts_without_the_training_stack(tmp_path):
    """`validate` is a quick check: it must not import torch or TRL (seconds of start-up)."""
    good = tmp_path / "good.json"
    good.write_text('[{"prompt": "q", "chosen": "a", "rejected": "b"}]', encoding="utf-8")
    code = ("import sys; from dpo_space.cli import main; rc = main(['validate', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules, 'trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "1 pairs" in out and out.strip().endswith("0 False False")
