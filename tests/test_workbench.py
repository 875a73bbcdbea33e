"""The Space's engine without Gradio: runs in line, failures that leave it usable, and restarts that lose nothing."""

import json
import subprocess
import sys
import time

import torch

from dpo_space.training import RunSettings, train
from dpo_space.workbench import Workbench, new_visitor_id
from tests.conftest import ROOT

FAST = dict(learning_rate=5e-3, per_device_train_batch_size=4, num_train_epochs=1, warmup_steps=0, max_length=128,
            lora_r=8, lora_alpha=16, load_in_4bit=False)


def wait(job, timeout=120):
    deadline = time.time() + timeout
    while job.active and time.time() < deadline:
        time.sleep(0.1)
    assert not job.active, "the run did not end"
    return job


def test_out_of_memory_ends_the_run_with_advice_and_the_next_run_works(tiny_model_dir, wakarimasen_pairs, tmp_path,
                                                                        monkeypatch):
    from trl import DPOTrainer

    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    visitor = new_visitor_id()
    settings = RunSettings.for_model(str(tiny_model_dir), **FAST)

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(DPOTrainer, "training_step", out_of_memory)
        job = wait(bench.submit(visitor, settings, wakarimasen_pairs))
    assert job.status == "failed" and "out of memory: lower per_device_train_batch_size" in job.message
    assert bench.adapter_name(visitor) is None and not list(tmp_path.glob(f"{visitor}/*/adapter_config.json"))
    job = wait(bench.submit(visitor, RunSettings.for_model(str(tiny_model_dir), **FAST), wakarimasen_pairs))
    assert job.status == "done" and bench.adapter_name(visitor) == f"v{visitor}"


def test_a_run_killed_mid_save_is_never_served_after_a_restart(tiny_model_dir, wakarimasen_pairs, tmp_path):
    visitor = new_visitor_id()
    finished = tmp_path / visitor / "20260101-000000-aaaaaa"
    killed = tmp_path / visitor / "20260101-000001-bbbbbb"
    train(RunSettings.for_model(str(tiny_model_dir), output_dir=str(finished), **FAST), wakarimasen_pairs)
    data_file = tmp_path / "pairs.json"
    data_file.write_text(json.dumps(wakarimasen_pairs.rows, ensure_ascii=False), encoding="utf-8")
    child = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from dpo_space import training
from dpo_space.data import read_preferences
training.replace_dir = lambda src, dst: os._exit(9)  # killed with everything written, before the rename
settings = training.RunSettings.for_model({str(tiny_model_dir)!r}, output_dir={str(killed)!r}, **{FAST!r})
training.train(settings, read_preferences({str(data_file)!r}))
"""
    assert subprocess.run([sys.executable, "-c", child], capture_output=True).returncode == 9
    partial = killed.with_name(f".{killed.name}.partial")
    assert (partial / "adapter_model.safetensors").exists() and not killed.exists()

    bench = Workbench(str(tiny_model_dir), root=tmp_path)  # the restarted app
    job = bench.job(visitor)
    assert job is not None and job.output_dir == finished and job.status == "done"
    assert bench.adapter_name(visitor) == f"v{visitor}" and len(job.data) == len(wakarimasen_pairs)
    assert bench.job(new_visitor_id()) is None  # nothing on disk: nothing to restore


def test_an_unreadable_old_run_is_skipped_once_not_on_every_status_tick(tiny_model_dir, tmp_path, caplog):
    visitor = new_visitor_id()
    run = tmp_path / visitor / "20260101-000000-aaaaaa"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / "run.yaml").write_text("lora_rank: [unclosed", encoding="utf-8")
    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    assert bench.job(visitor) is None and bench.job(visitor) is None and bench.adapter_name(visitor) is None
    assert sum("could not restore" in r.message for r in caplog.records) == 1


def test_an_app_run_with_a_probe_and_chat_beside_it_is_what_its_run_yaml_replays(tiny_model_dir, wakarimasen_pairs,
                                                                                   tmp_path):
    """The seed alone decides a run: neither the probe's samples nor a visitor chatting meanwhile (both sample
    tokens) move its batch order or its dropout, so the CLI replay of run.yaml writes the same metrics.csv."""
    import csv
    import threading

    from dpo_space.generation import Sampling

    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    settings = RunSettings.for_model(str(tiny_model_dir), **{**FAST, "load_in_4bit": True, "num_train_epochs": 2,
                                                              "lora_dropout": 0.2,
                                                              "train_sampling_strategy": "group_by_length"})
    chatting = threading.Event()

    def chat():
        visitor = new_visitor_id()
        while not chatting.is_set():
            for _ in bench.answer(visitor, "旅行の準備は?", Sampling(max_new_tokens=8, temperature=1.0), dpo=False):
                pass

    chatter = threading.Thread(target=chat, daemon=True)
    chatter.start()
    job = wait(bench.submit(new_visitor_id(), settings, wakarimasen_pairs, probe="料理のコツは?", sample_every=1))
    chatting.set()
    chatter.join()
    assert job.status == "done", job.message
    assert len(job.samples()) >= 4  # the probe really sampled during the run

    replay = tmp_path / "replay"
    proc = subprocess.run([sys.executable, "-m", "dpo_space", "train", "--config", str(job.output_dir / "run.yaml"),
                           "--output", str(replay)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def metrics(folder):
        with open(folder / "metrics.csv", encoding="utf-8") as f:
            return [{k: v for k, v in row.items() if k != "elapsed"} for row in csv.DictReader(f)]

    ran, replayed = metrics(job.output_dir), metrics(replay)
    assert len(ran) == 12 and ran == replayed
