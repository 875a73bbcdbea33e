"""The Space's engine without Gradio: runs in line, failures that leave it usable, and restarts that lose nothing."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dpo_space.errors import DPOSpaceError
from dpo_space.space import half_written_zip
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
    assert job.status == "done" and bench.adapter_name(visitor)


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
    # and half an adapter zip a crash left (written hidden, then renamed), beside one another thread is writing now
    crashed, writing = (half_written_zip(finished.with_name(finished.name + n)) for n in ("", "x"))
    for zipped in (crashed, writing):
        zipped.write_bytes(b"PK half")
    os.utime(crashed, (time.time() - 3600,) * 2)

    bench = Workbench(str(tiny_model_dir), root=tmp_path)  # the restarted app
    job = bench.job(visitor)
    # the killed run is reported as interrupted; the finished run before it is what answers
    assert job is not None and job.output_dir == finished and job.status == "interrupted"
    assert "still answers" in job.message and not partial.exists()
    assert not crashed.exists() and writing.exists()
    assert bench.adapter_name(visitor) and len(job.data) == len(wakarimasen_pairs)
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


def test_the_chat_model_holds_at_most_max_adapters_and_reloads_an_unloaded_one(tiny_model_dir, wakarimasen_pairs,
                                                                               tmp_path):
    from dpo_space import gpu
    from dpo_space.generation import Sampling

    runs = [train(RunSettings.for_model(str(tiny_model_dir), output_dir=str(tmp_path / f"r{i}"), **FAST,
                                        seed=i), wakarimasen_pairs).output_dir for i in range(3)]
    chat = gpu.start(str(tiny_model_dir), __import__("dpo_space.models").models.detect_hardware(), max_adapters=2)
    greedy = Sampling(temperature=0, max_new_tokens=10)
    first = list(gpu.answer("旅行の準備は?", greedy, str(runs[0])))[-1]
    for run in runs[1:]:
        list(gpu.answer("旅行の準備は?", greedy, str(run)))
    assert list(chat.loaded) == [str(runs[1]), str(runs[2])]  # the least recently used went first
    assert len(chat.model.peft_config) == 2
    assert list(gpu.answer("旅行の準備は?", greedy, str(runs[0])))[-1] == first  # reloaded from disk, same answers
    assert list(chat.loaded) == [str(runs[2]), str(runs[0])]

    # Another visitor's adapter unloads this one after Compare chose it and before it generates (what the soak met,
    # 4 answers in 12 visitors, when adapters outgrew the cache): the answer still comes, from the run asked for.
    chose, raced_once = chat.adapter, []

    def then_another_visitor_loads_two(run_dir):
        name = chose(run_dir)
        if run_dir == str(runs[1]) and not raced_once:
            raced_once.append(run_dir)
            chose(str(runs[2]))
            chose(str(runs[0]))  # runs[1] is unloaded now (cap 2)
        return name

    chat.adapter = then_another_visitor_loads_two
    try:
        raced = list(gpu.answer("旅行の準備は?", greedy, str(runs[1])))[-1]
    finally:
        del chat.adapter
    assert raced == list(gpu.answer("旅行の準備は?", greedy, str(runs[1])))[-1]


def test_runs_beyond_retention_are_removed_and_their_visitor_is_told_not_shown_an_error(tiny_model_dir,
                                                                                         wakarimasen_pairs, tmp_path):
    from dpo_space.space import Retention, adapter_zip, folder_mib, run_mib
    from dpo_space.workbench import EVICTED

    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    first, second = new_visitor_id(), new_visitor_id()
    job = wait(bench.submit(first, RunSettings.for_model(str(tiny_model_dir), **FAST), wakarimasen_pairs))
    assert job.status == "done" and bench.run_dir(first)
    assert adapter_zip(job.output_dir).exists()  # written as the run ended: the policy counts it from then on
    assert run_mib(job.output_dir) > folder_mib(job.output_dir)
    bench.retention = Retention(runs_per_visitor=1, disk_budget_mib=1.5 * run_mib(job.output_dir))  # one run
    bench.adapter_name(first)  # loaded in the chat model
    wait(bench.submit(second, RunSettings.for_model(str(tiny_model_dir), **FAST), wakarimasen_pairs))
    # the budget holds one run: the first visitor's went, with its adapter and its record
    assert not job.output_dir.exists() and str(job.output_dir) not in bench.chat.loaded
    assert not adapter_zip(job.output_dir).exists()
    assert folder_mib(tmp_path) <= bench.retention.disk_budget_mib  # zips counted, nothing else left on disk
    gone = bench.job(first)
    assert gone.status == "evicted" and gone.message == EVICTED and bench.run_dir(first) is None
    with pytest.raises(DPOSpaceError, match="removed to make room"):
        bench.evaluate(first, ["q"], __import__("dpo_space.generation").generation.Sampling())
    assert first not in bench._jobs and bench.run_dir(second)
    assert not (tmp_path / first).exists()  # no empty folder left behind


def test_a_run_whose_zip_cannot_be_written_is_still_done(tiny_model_dir, wakarimasen_pairs, tmp_path, monkeypatch):
    from dpo_space import workbench

    def disk_full(output_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workbench, "run_downloads", disk_full)
    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    visitor = new_visitor_id()
    job = wait(bench.submit(visitor, RunSettings.for_model(str(tiny_model_dir), **FAST), wakarimasen_pairs))
    assert job.status == "done" and job.message == f"saved to {job.output_dir}"  # not the zip's error
    assert bench.run_dir(visitor) == str(job.output_dir)  # saved, and it answers


def test_the_training_line_is_bounded(tiny_model_dir, wakarimasen_pairs, tmp_path, monkeypatch):
    import threading

    from dpo_space import gpu
    from dpo_space.space import Retention

    release = threading.Event()
    monkeypatch.setattr(gpu, "train_run", lambda *a, **k: release.wait(30) and None)
    bench = Workbench(str(tiny_model_dir), root=tmp_path, retention=Retention(max_queue=1))
    settings = lambda: RunSettings.for_model(str(tiny_model_dir), **FAST)  # noqa: E731
    running = bench.submit(new_visitor_id(), settings(), wakarimasen_pairs)
    deadline = time.time() + 10
    while running.status != "running" and time.time() < deadline:
        time.sleep(0.05)
    waiting = bench.submit(new_visitor_id(), settings(), wakarimasen_pairs)  # waits in line
    with pytest.raises(DPOSpaceError, match=r"the line for training is full \(1 runs waiting, max_queue 1\)"):
        bench.submit(new_visitor_id(), settings(), wakarimasen_pairs)
    release.set()
    wait(waiting)  # drained while train_run is still the stand-in: no real run outlives the test


def test_a_run_too_big_for_two_copies_borrows_the_chat_base_and_chat_pauses_meanwhile(tiny_model_dir,
                                                                                       wakarimasen_pairs, tmp_path):
    """A GPU too small for the chat copy and a training copy (an 8B model on a T4): the run trains on the chat
    model's own base, Compare says it is paused, and afterwards chat resumes with the new adapter."""
    from transformers import TrainerCallback

    from dpo_space import gpu
    from dpo_space.generation import Sampling

    chat = gpu.start(str(tiny_model_dir), __import__("dpo_space.models").models.detect_hardware())
    greedy = Sampling(temperature=0, max_new_tokens=10)
    before = list(gpu.answer("旅行の準備は?", greedy))[-1]
    seen = []

    class TryChat(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            try:
                list(gpu.answer("旅行の準備は?", greedy))
            except DPOSpaceError as e:
                seen.append(str(e))

    settings = RunSettings.for_model(str(tiny_model_dir), output_dir=str(tmp_path / "run"), **FAST)
    original = __import__("dpo_space.training").training.train

    def with_callback(*args, **kwargs):
        return original(*args, **{**kwargs, "callbacks": [*kwargs.get("callbacks", []), TryChat()]})

    import dpo_space.training as training_module

    training_module.train, restore = with_callback, training_module.train
    try:
        out = gpu.train_run(settings, wakarimasen_pairs, str(tmp_path / ".stop"), None, 5,
                            __import__("dpo_space.models").models.detect_hardware(), share_base=True)
    finally:
        training_module.train = restore
    assert seen and all("Compare is paused while a run trains" in s for s in seen)
    assert chat.paused is None and list(gpu.answer("旅行の準備は?", greedy))[-1] == before  # the base, unchanged
    assert list(gpu.answer("旅行の準備は?", greedy, out))  # the run's adapter answers


def test_shares_base_only_where_the_gpu_cannot_hold_both_copies(tiny_model_dir, tmp_path, monkeypatch):
    from dpo_space import memory, models

    bench = Workbench(str(tiny_model_dir), root=tmp_path)
    assert not bench.shares_base(RunSettings.for_model("elyza-8b"))  # a CPU never shares
    bench.hardware = models.Hardware("cuda", "Tesla T4", "fp16")
    bench.model_id = "elyza-8b"
    monkeypatch.setattr(memory, "gpu_gib", lambda: memory.GPUS["T4 16 GB"])
    assert bench.shares_base(RunSettings.for_model("elyza-8b"))
    monkeypatch.setattr(memory, "gpu_gib", lambda: memory.GPUS["L4 24 GB"])
    assert not bench.shares_base(RunSettings.for_model("elyza-8b"))
    bench.inline = True  # ZeroGPU: every call its own GPU
    monkeypatch.setattr(memory, "gpu_gib", lambda: memory.GPUS["T4 16 GB"])
    assert not bench.shares_base(RunSettings.for_model("elyza-8b"))


def test_a_kill_9_mid_run_loses_no_finished_run_and_the_visitor_is_told_their_run_was_interrupted(
        tiny_model_dir, tmp_path):
    from dpo_space.workbench import INTERRUPTED

    visitor = new_visitor_id()
    child = f"""
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import TOPICS, helpful
from dpo_space import training
from dpo_space.data import SEED_REFUSAL, validate_rows
from dpo_space.workbench import Workbench
pairs = validate_rows([{{"prompt": f"{{TOPICS[i % 8]}}?({{i}})", "chosen": SEED_REFUSAL, "rejected": helpful(i)}}
                       for i in range(24)], source="mini")
bench = Workbench({str(tiny_model_dir)!r}, root={str(tmp_path)!r})
settings = lambda: training.RunSettings.for_model({str(tiny_model_dir)!r}, **{FAST!r})
job = bench.submit({visitor!r}, settings(), pairs)
while job.active:
    time.sleep(0.1)
assert job.status == "done", job.message
log = training.MetricsStream.on_log
def killed(self, args, state, control, logs=None, **kw):
    log(self, args, state, control, logs=logs, **kw)
    if state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the app dies mid-run, as a Space restart would kill it
training.MetricsStream.on_log = killed
time.sleep(1.1)  # the next run's id (its time) sorts after the first's
bench.submit({visitor!r}, settings(), pairs)
time.sleep(120)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / visitor).glob("[!.]*") if p.is_dir())
    assert len(runs) == 1 and list((tmp_path / visitor).glob(".*.partial"))
    assert sorted(p.name for p in (tmp_path / visitor).glob("[!.]*") if p.is_file()) == [f"{runs[0].name}-adapter.zip"]

    bench = Workbench(str(tiny_model_dir), root=tmp_path)  # the restarted app
    job = bench.job(visitor)
    assert job.status == "interrupted" and job.message.startswith(INTERRUPTED) and "still answers" in job.message
    assert bench.run_dir(visitor) == str(runs[0]) and bench.adapter_name(visitor)  # the finished run still answers
    assert not list((tmp_path / visitor).glob(".*.partial"))  # the half-written one is gone


ARENAS = """
import ctypes, re, sys, tempfile, threading
if sys.argv[1] == "bound":
    from dpo_space.workbench import bound_malloc
    assert bound_malloc()
barrier = threading.Barrier(8)
def work():  # eight threads allocating at once, as Gradio's workers do
    barrier.wait()
    keep = [bytearray(40_000) for _ in range(200)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
f = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
libc.malloc_info(0, f)
libc.fclose(f)
print(len(re.findall("<heap nr=", open(path).read())))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_server_bounds_glibcs_malloc_arenas_before_its_threads_start():
    """app.py calls bound_malloc at start-up: however many worker threads allocate at once, two arenas, not one per
    thread (whose freed memory glibc keeps mapped: the RSS creep bench/soak.py measured)."""
    def arenas(mode):
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert arenas("free") > 4 and arenas("bound") == 2
    assert "bound_malloc()" in (ROOT / "app.py").read_text(encoding="utf-8")
