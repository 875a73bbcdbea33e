"""What the Space serves, without Gradio: one chat model with each visitor's adapter, one training at a time.

Training runs in a worker thread of the app process, on its own freshly loaded copy of the base model, and hands its
result back through disk (the saved adapter, metrics.csv, samples.jsonl), exactly as it must on ZeroGPU, where the
GPU function runs in a forked process. The chat model stays free for every visitor while a run trains, a crash in a
run ends that run only, and a page that reloads finds its run again by the visitor's id.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import spaces

from .data import PreferenceData, read_preferences
from .errors import DPOSpaceError
from .generation import Sampling, evaluate, generate_batch, implicit_rewards, model_lock, pair_report, stream
from .models import Hardware, detect_hardware, load_model
from .training import (RunSettings, SampleTimeline, StopSignal, load_adapter, read_metrics, read_run_config, read_samples,
                       train)

log = logging.getLogger(__name__)


VISITOR_ID = re.compile(r"^[a-f0-9]{32}$")


def new_visitor_id() -> str:
    return uuid.uuid4().hex


def check_visitor(visitor: str) -> str:
    """Visitor ids name folders and adapters, so only our own format is accepted."""
    if not isinstance(visitor, str) or not VISITOR_ID.match(visitor):
        raise DPOSpaceError("unknown visitor: reload the page")
    return visitor


@dataclass
class Job:
    id: str
    visitor: str
    settings: RunSettings
    data: PreferenceData
    probe: str | None = None
    sample_every: int = 5
    status: str = "queued"  # queued → running → done | stopped | failed
    message: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    @property
    def stop(self) -> StopSignal:
        return StopSignal.beside(self.output_dir)

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def metrics(self) -> list[dict]:
        return read_metrics(self.output_dir)

    def samples(self) -> list[dict]:
        return read_samples(self.output_dir)


class Workbench:
    def __init__(self, model_id: str, root: str | Path = "outputs/space", *, hardware: Hardware | None = None,
                 load_in_4bit: bool | None = None, trust_remote_code: bool = False):
        self.model_id = model_id
        self.root = Path(root)
        self.hardware = hardware or detect_hardware()
        # the chat copy is loaded as the preset trains (4-bit nf4 by default), so the adapter meets the base it knows
        self.load_in_4bit = RunSettings.for_model(model_id).load_in_4bit if load_in_4bit is None else load_in_4bit
        self.trust_remote_code = trust_remote_code
        self._model = None
        self.tokenizer = None
        self._adapters: dict[str, str] = {}  # visitor → adapter folder loaded in the chat model
        self._jobs: dict[str, Job] = {}  # visitor → their latest job
        self._unrestorable: set[Path] = set()  # old runs that failed to load: not retried on every status tick
        self._queue: queue.Queue[Job] = queue.Queue()
        self._order: list[Job] = []  # queued jobs, for positions
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="dpo-trainer", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- the chat model

    @property
    def model(self):
        with model_lock:
            if self._model is None:
                self._model, self.tokenizer = load_model(self.model_id, load_in_4bit=self.load_in_4bit,
                                                         hardware=self.hardware,
                                                         trust_remote_code=self.trust_remote_code)
            return self._model

    def adapter_name(self, visitor: str) -> str | None:
        if visitor not in self._adapters:
            self.job(visitor)  # a visitor from before a restart gets their finished run back
        return f"v{visitor}" if visitor in self._adapters else None

    def _attach(self, visitor: str, adapter_dir: Path):
        name = f"v{visitor}"
        with model_lock:
            model = self.model
            if visitor in self._adapters:
                model.delete_adapter(name)
            self._model = load_adapter(model, adapter_dir, adapter_name=name)
            self._adapters[visitor] = str(adapter_dir)

    # Everything that runs the chat model asks for a GPU: on ZeroGPU, CUDA exists only inside these calls.

    @spaces.GPU(duration=60)
    def answer(self, visitor: str, conversation, sampling: Sampling, *, dpo: bool) -> Iterator[str]:
        """Stream one side of Compare: the base (every adapter off) or this visitor's DPO model."""
        name = self._dpo_adapter(visitor) if dpo else None
        model = self.model
        yield from stream(model, self.tokenizer, conversation, sampling, use_adapter=dpo, adapter_name=name)

    @spaces.GPU(duration=30)
    def rewards(self, visitor: str, scored: list, system_prompt: str | None):
        """The implicit reward (β of the visitor's run) of each (conversation, answer) under their DPO model."""
        name = self.adapter_name(check_visitor(visitor))
        if name is None:
            return [None] * len(scored)
        beta = self._jobs[visitor].settings.beta
        return implicit_rewards(self.model, self.tokenizer, scored, beta, system_prompt, name)

    @spaces.GPU(duration=120)
    def base_answers(self, prompts: list[str], sampling: Sampling, progress=None) -> list[str]:
        """The base model's answers to many prompts (to build an extreme dataset the seed's way)."""
        return generate_batch(self.model, self.tokenizer, prompts, sampling, use_adapter=False, batch_size=8,
                              progress=progress)

    @spaces.GPU(duration=120)
    def evaluate(self, visitor: str, prompts: list[str], sampling: Sampling, progress=None) -> dict:
        name = self._dpo_adapter(visitor)
        return evaluate(self.model, self.tokenizer, prompts, sampling, adapter_name=name, progress=progress)

    @spaces.GPU(duration=120)
    def pair_report(self, visitor: str, rows: list[dict], progress=None) -> list[dict]:
        """Each pair scored as the visitor's run trained it: its β and its system prompt."""
        name = self._dpo_adapter(visitor)
        settings = self._jobs[visitor].settings
        return pair_report(self.model, self.tokenizer, rows, settings.beta, settings.system_prompt,
                           adapter_name=name, progress=progress)

    def _dpo_adapter(self, visitor: str) -> str:
        name = self.adapter_name(check_visitor(visitor))
        if name is None:
            raise DPOSpaceError("no DPO model yet: train one in the Train tab first")
        return name

    # ---------------------------------------------------------------- training, one at a time

    def submit(self, visitor: str, settings: RunSettings, data: PreferenceData, *, probe: str | None = None,
               sample_every: int = 5) -> Job:
        check_visitor(visitor)
        settings.check()
        with self._lock:
            current = self._jobs.get(visitor)
            if current is not None and current.active:
                raise DPOSpaceError("you already have a run in progress: stop it or wait for it to finish")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            settings.output_dir = str(self.root / visitor / job_id)
            job = Job(job_id, visitor, settings, data, probe, sample_every)
            self._jobs[visitor] = job
            self._order.append(job)
        self._queue.put(job)
        return job

    def job(self, visitor: str) -> Job | None:
        job = self._jobs.get(visitor)
        if job is None and isinstance(visitor, str) and VISITOR_ID.match(visitor):
            job = self._restore(visitor)
        return job

    def _restore(self, visitor: str) -> Job | None:
        """After a restart: the visitor's newest finished run on disk. A run killed mid-save is never served: until its
        final rename it lives in a hidden `.partial` folder, which is skipped here."""
        finished = sorted(p for p in (self.root / visitor).glob("[!.]*")
                          if (p / "adapter_config.json").exists() and (p / "run.yaml").exists())
        if not finished or finished[-1] in self._unrestorable:
            return None
        run = finished[-1]  # job ids start with their time
        try:
            values, _ = read_run_config(run / "run.yaml")
            settings = RunSettings.from_dict({**values, "output_dir": str(run)})
            pairs = read_preferences(run / "train.json") if (run / "train.json").exists() else PreferenceData([])
            self._attach(visitor, run)
        except Exception as e:  # noqa: BLE001 - an unreadable old run is skipped, never a crash of the page
            log.warning("could not restore %s: %s", run, e)
            self._unrestorable.add(run)
            return None
        job = Job(run.name, visitor, settings, pairs, status="done", message=f"restored from {run}")
        with self._lock:
            self._jobs.setdefault(visitor, job)
        return self._jobs[visitor]

    def position(self, job: Job) -> int:
        """1 for next in line, 2 after that...; 0 once it runs or has ended."""
        with self._lock:
            waiting = [j for j in self._order if j.status == "queued"]
            return waiting.index(job) + 1 if job in waiting else 0

    def stop(self, visitor: str) -> bool:
        job = self._jobs.get(visitor)
        if job is None or not job.active:
            return False
        job.stop.set()
        return True

    def _work(self):
        while True:
            job = self._queue.get()
            if job.stop.is_set():
                job.status, job.message = "stopped", "stopped before it started"
            else:
                self._run(job)
            with self._lock:
                self._order.remove(job)

    def _run(self, job: Job):
        job.status, job.started = "running", time.time()
        try:
            result = run_training(job.settings, job.data, job.stop, job.probe, job.sample_every,
                                  self.hardware)
            self._attach(job.visitor, result)
            job.status = "stopped" if job.stop.is_set() else "done"
            job.message = f"saved to {result}"
        except DPOSpaceError as e:
            job.status, job.message = "failed", str(e)
        except Exception as e:  # a crash in a run ends that run, never the app
            job.status, job.message = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.time()

    def forget(self, visitor: str):
        """Drop a visitor's adapter and files (used by tests and housekeeping)."""
        with model_lock:
            if visitor in self._adapters:
                self._model.delete_adapter(f"v{visitor}")
                del self._adapters[visitor]
        shutil.rmtree(self.root / visitor, ignore_errors=True)


@spaces.GPU(duration=300)  # ZeroGPU lends a GPU for the call; elsewhere a no-op
def run_training(settings: RunSettings, data: PreferenceData, stop: StopSignal, probe: str | None,
                 sample_every: int, hardware: Hardware) -> Path:
    """One run on a fresh copy of the base; returns the saved run folder. The GPU-bound part of the Space."""
    callbacks = [SampleTimeline(probe, sample_every)] if probe else []
    result = train(settings, data, stop=stop, callbacks=callbacks, hardware=hardware)
    del result.model
    return result.output_dir
