"""What the Space serves, without Gradio: visitors, their runs and the line for the trainer, over the GPU calls of
`gpu` (one chat model with each visitor's adapter loaded on demand).

A run trains on its own freshly loaded copy of the base and hands its result back through disk (the saved adapter,
metrics.csv, samples.jsonl), so the chat model stays free for every visitor while a run trains, a crash in a run ends
that run only, and a page that reloads finds its run again by the visitor's id. Where the run executes is the one
difference between the two worlds:
- CPU or a dedicated GPU: one run at a time, in the Workbench's training thread; others wait in a bounded line;
- ZeroGPU (`inline`): inside the visitor's own request (`run`), so that their GPU quota pays for it; ZeroGPU lends each
  request its own GPU, so there is no line.
State stays bounded (space.Retention): adapters loaded in the chat model, runs kept on disk and the records of them.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu
from .data import PreferenceData, read_preferences
from .errors import DPOSpaceError
from .generation import Sampling, model_lock
from .models import Hardware, detect_hardware
from .space import Retention, adapter_zip, is_finished_run, remove_stale_zips, run_downloads, runs_to_evict
from .training import RunSettings, StopSignal, read_metrics, read_run_config, read_samples

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")  # a run's states while it holds its place in line or the trainer
VISITOR_ID = re.compile(r"^[a-f0-9]{32}$")
EVICTED = ("your last run was removed to make room for others (the Space keeps each visitor's newest runs for a "
           "while): train again in the Train tab")
INTERRUPTED = "the app restarted while this run was training: start it again"


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _glibc():
    """The C library, where it is glibc (for mallopt and malloc_trim); None elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_malloc(arenas: int = 2) -> bool:
    """Keep the server's native memory from creeping up with every visitor (bench/soak.py, BENCHMARKS.md): glibc gives
    the threads that allocate at once their own malloc arenas (up to 8 per core: Gradio's workers, the trainer, torch's)
    and keeps what each freed mapped. At most `arenas` arenas, as MALLOC_ARENA_MAX=2 in the environment would; the
    default run trains no slower for it (bench/speed.py). Called at start-up, before the server's threads start; True
    where applied, False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas))


def release_memory():
    """Hand the memory a finished run freed back to the system: a run's base copy is allocated in the trainer thread's
    own malloc arena, which glibc may keep mapped after the copy is freed. (The RSS growth bench/soak.py once measured,
    about 4 MiB a visitor, was Gradio keeping every session's state: Retention.sessions.) A no-op where the C library
    is not glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def new_visitor_id() -> str:
    return uuid.uuid4().hex


def check_visitor(visitor: str) -> str:
    """Visitor ids name folders, so only our own format is accepted."""
    if not isinstance(visitor, str) or not VISITOR_ID.match(visitor):
        raise DPOSpaceError("unknown visitor: reload the page")
    return visitor


def zero_gpu() -> bool:
    from spaces.config import Config

    return Config.zero_gpu


@dataclass
class Job:
    id: str
    visitor: str
    settings: RunSettings
    data: PreferenceData
    probe: str | None = None
    sample_every: int | None = None  # None: a tenth of the run (SampleTimeline)
    status: str = "queued"  # queued → running → done | stopped | failed; or restored: interrupted | evicted
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
        return self.status in ACTIVE

    @property
    def usable(self) -> bool:
        """Its adapter answers in Compare: a finished run (or a stopped one, saved at its last step) still on disk."""
        return self.status in ("done", "stopped", "interrupted") and is_finished_run(self.output_dir)

    def metrics(self) -> list[dict]:
        return read_metrics(self.output_dir)

    def samples(self) -> list[dict]:
        return read_samples(self.output_dir)


class Workbench:
    def __init__(self, model_id: str, root: str | Path = "outputs/space", *, hardware: Hardware | None = None,
                 load_in_4bit: bool | None = None, trust_remote_code: bool = False,
                 retention: Retention | None = None, inline: bool | None = None):
        self.model_id = model_id
        self.root = Path(root)
        self.hardware = hardware or detect_hardware()
        self.trust_remote_code = trust_remote_code
        self.retention = retention or Retention.from_env()
        # the chat copy is loaded as the preset trains (4-bit nf4 by default), so the adapter meets the base it knows;
        # now, at start-up (on ZeroGPU: import time), never inside a GPU call
        four_bit = RunSettings.for_model(model_id).load_in_4bit if load_in_4bit is None else load_in_4bit
        self.chat = gpu.start(model_id, self.hardware, load_in_4bit=four_bit, trust_remote_code=trust_remote_code,
                              max_adapters=self.retention.max_adapters)
        self.inline = zero_gpu() if inline is None else inline
        self._jobs: dict[str, Job] = {}  # visitor → their latest run; pruned with the runs retention removes
        self._gone: OrderedDict[str, str] = OrderedDict()  # visitor → why their run is gone (bounded)
        self._unrestorable: set[Path] = set()  # old runs that failed to load: not retried on every status tick
        self._queue: queue.Queue[Job] = queue.Queue()
        self._order: list[Job] = []  # queued jobs, for positions
        self._lock = threading.Lock()
        if not self.inline:
            threading.Thread(target=self._work, name="dpo-trainer", daemon=True).start()

    # ---------------------------------------------------------------- the chat model, per visitor

    def run_dir(self, visitor: str) -> str | None:
        """The run folder whose adapter answers this visitor in Compare, or None (no finished run)."""
        job = self.job(visitor)
        return str(job.output_dir) if job is not None and job.usable else None

    def adapter_name(self, visitor: str) -> str | None:
        run = self.run_dir(visitor)
        return self.chat.adapter(run) if run else None

    def _dpo_run(self, visitor: str, run_id: str | None = None) -> str:
        """The run folder of this visitor's run `run_id` (one of `runs`), or of their latest usable run."""
        if run_id:
            run = self.root / check_visitor(visitor) / run_id
            if run not in self.runs(visitor):
                raise DPOSpaceError(f"run {run_id!r} is no longer on disk (the Space keeps each visitor's newest "
                                    "runs): pick another or train again")
            return str(run)
        run = self.run_dir(check_visitor(visitor))
        if run is None:
            job = self.job(visitor)
            raise DPOSpaceError(job.message if job is not None and job.status == "evicted" else
                                "no DPO model yet: train one in the Train tab first")
        return run

    def runs(self, visitor: str) -> list[Path]:
        """This visitor's finished runs still on disk, oldest first (retention keeps their newest few): what the Train
        charts overlay, and what Compare and Evaluate put side by side."""
        folder = self.root / check_visitor(visitor)
        return sorted(p for p in folder.glob("[!.]*") if is_finished_run(p)) if folder.is_dir() else []

    @staticmethod
    def settings_of(run_dir: str | Path) -> RunSettings:
        values, _ = read_run_config(Path(run_dir) / "run.yaml")
        return RunSettings.from_dict({**values, "output_dir": str(run_dir)})

    def answer(self, visitor: str, conversation, sampling: Sampling, *, dpo: bool,
               run_id: str | None = None) -> Iterator[str]:
        """Stream one side of Compare: the base (every adapter off) or one of this visitor's DPO models (their latest
        unless `run_id` names another)."""
        yield from gpu.answer(conversation, sampling, self._dpo_run(visitor, run_id) if dpo else None)

    def rewards(self, visitor: str, scored: list, system_prompt: str | None,
                run_id: str | None = None) -> list[float | None]:
        """The implicit reward (with that run's β) of each (conversation, answer) under one of the visitor's DPO
        models (their latest unless `run_id`)."""
        run = self._dpo_run(visitor, run_id) if run_id else self.run_dir(check_visitor(visitor))
        if run is None:
            return [None] * len(scored)
        return gpu.rewards(scored, self.settings_of(run).beta, system_prompt, run)

    def base_answers(self, prompts: list[str], sampling: Sampling) -> list[str]:
        return gpu.base_answers(prompts, sampling)

    def evaluate(self, visitor: str, prompts: list[str], sampling: Sampling, run_ids: list[str] | None = None,
                 k: int = gpu.EVAL_K) -> dict:
        """The base and one or more of the visitor's DPO models (their latest unless `run_ids`) on the same prompts,
        `k` samples per prompt for the diversity measures (0: none)."""
        runs = [self._dpo_run(visitor, r) for r in run_ids] if run_ids else [self._dpo_run(visitor)]
        return gpu.evaluate(prompts, sampling, runs[0], runs[1:], k)

    def pair_report(self, visitor: str, rows: list[dict]) -> list[dict]:
        """Each pair scored as the visitor's run trained it: its β and its system prompt."""
        run = self._dpo_run(visitor)
        settings = self._jobs[visitor].settings
        return gpu.pair_report(rows, settings.beta, settings.system_prompt, run)

    # ---------------------------------------------------------------- runs

    def submit(self, visitor: str, settings: RunSettings, data: PreferenceData, *, probe: str | None = None,
               sample_every: int | None = None) -> Job:
        """A run for this visitor: in line for the training thread, or, inline (ZeroGPU), ready for `run` to train in
        the visitor's own request."""
        check_visitor(visitor)
        settings.check()
        with self._lock:
            current = self._jobs.get(visitor)
            if current is not None and current.active:
                raise DPOSpaceError("you already have a run in progress: stop it or wait for it to finish")
            waiting = sum(j.status == "queued" for j in self._order)
            if not self.inline and waiting >= self.retention.max_queue:
                raise DPOSpaceError(f"the line for training is full ({waiting} runs waiting, max_queue "
                                    f"{self.retention.max_queue}): try again in a few minutes")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            settings.output_dir = str(self.root / visitor / job_id)
            job = Job(job_id, visitor, settings, data, probe, sample_every)
            self._jobs[visitor] = job
            self._gone.pop(visitor, None)
            self._order.append(job)
        if not self.inline:
            self._queue.put(job)
        return job

    def run(self, job: Job) -> Job:
        """Train a submitted run here and now (ZeroGPU: inside the visitor's request, their quota)."""
        try:
            if job.stop.is_set():
                job.status, job.message = "stopped", "stopped before it started"
            else:
                self._run(job)
        finally:
            job.stop.path.unlink(missing_ok=True)
            with self._lock:
                if job in self._order:
                    self._order.remove(job)
        return job

    def _work(self):
        while True:
            self.run(self._queue.get())

    def _run(self, job: Job):
        job.status, job.started = "running", time.time()
        status, message = "failed", "the run ended unexpectedly"
        try:
            gpu.train_run(job.settings, job.data, str(job.stop.path), job.probe, job.sample_every, self.hardware,
                          self.shares_base(job.settings))
            status = "stopped" if job.stop.is_set() else "done"
            message = f"saved to {job.output_dir}"
            if is_finished_run(job.output_dir):  # its download, written now so that the policy below counts it
                try:
                    run_downloads(job.output_dir)
                except OSError as e:  # the run is saved all the same; the Train tab tries the zip again
                    log.warning("could not zip %s: %s", job.output_dir, e)
        except DPOSpaceError as e:
            message = str(e)
        except Exception as e:  # a crash in a run ends that run, never the app
            message = f"{type(e).__name__}: {e}"
        finally:
            self.housekeeping()  # while this run still counts as active: what anyone sees next is the policy's result
            release_memory()
            job.finished = time.time()
            job.status, job.message = status, message

    def job(self, visitor: str) -> Job | None:
        job = self._jobs.get(visitor)
        if job is None and isinstance(visitor, str) and VISITOR_ID.match(visitor):
            job = self._restore(visitor)
        # a finished run whose folder went by hand (retention forgets its own evictions as it makes them)
        if job is not None and job.status in ("done", "interrupted") and job.id != "interrupted" \
                and not job.output_dir.exists():
            self._forget_job(visitor, EVICTED)
            job = self._jobs.get(visitor) or self._restore(visitor)
        return job

    def _restore(self, visitor: str) -> Job | None:
        """A visitor the app holds no record of: one whose run was removed (told so), or one from before a restart,
        who gets their newest finished run back from disk. A run killed while saving is never served (until its final
        rename it lives in a hidden `.partial` folder); one that was training when the app stopped is reported as
        interrupted, and the finished run before it, if any, still answers."""
        if visitor in self._gone:
            return Job("gone", visitor, RunSettings(), PreferenceData([]), status="evicted", message=self._gone[visitor])
        folder = self.root / visitor
        finished = self.runs(visitor)
        partial = sorted(p for p in folder.glob(".*.partial") if p.is_dir())
        interrupted = partial and (not finished or partial[-1].name[1:] > finished[-1].name)
        if interrupted:
            shutil.rmtree(partial[-1], ignore_errors=True)
        remove_stale_zips(folder)
        job = self._finished_job(visitor, finished[-1]) if finished else None
        if interrupted:
            job = job or Job("interrupted", visitor, RunSettings(output_dir=str(folder / partial[-1].name[1:-8])),
                             PreferenceData([]))
            job.status = "interrupted"
            job.message = INTERRUPTED + (f" (your run before it, {job.id}, still answers)" if finished else "")
        return self._remember(job) if job is not None else None

    def _finished_job(self, visitor: str, run: Path) -> Job | None:
        if run in self._unrestorable:
            return None
        try:
            settings = self.settings_of(run)
            pairs = read_preferences(run / "train.json") if (run / "train.json").exists() else PreferenceData([])
        except Exception as e:  # noqa: BLE001 - an unreadable old run is skipped, never a crash of the page
            log.warning("could not restore %s: %s", run, e)
            self._unrestorable.add(run)
            return None
        return Job(run.name, visitor, settings, pairs, status="done", message=f"restored from {run}")

    def _remember(self, job: Job) -> Job:
        with self._lock:
            return self._jobs.setdefault(job.visitor, job)

    def _forget_job(self, visitor: str, why: str):
        with self._lock:
            self._jobs.pop(visitor, None)
            self._gone[visitor] = why
            while len(self._gone) > 10_000:
                self._gone.popitem(last=False)

    def housekeeping(self) -> list[Path]:
        """Apply the retention policy: remove the runs it evicts (never one in progress) with their zips, unload their
        adapters and drop their records; their visitors are told on their next visit. Returns what was removed."""
        with self._lock:
            active = {j.output_dir for j in self._jobs.values() if j.active}
        evicted = runs_to_evict(self.root, self.retention, active)
        for run in evicted:
            with model_lock:  # unloaded and removed in one hold: Compare cannot reload it from a half-removed folder
                self.chat.forget(run)
                shutil.rmtree(run, ignore_errors=True)
            adapter_zip(run).unlink(missing_ok=True)
            if not any(run.parent.iterdir()):  # nothing of this visitor's is left: no empty folder either
                run.parent.rmdir()
            job = self._jobs.get(run.parent.name)
            if job is not None and job.output_dir == run:
                self._forget_job(run.parent.name, EVICTED)
        return evicted

    def shares_base(self, settings: RunSettings) -> bool:
        """Whether a run must borrow the chat model's base (chat paused meanwhile): on a GPU that holds the run beside
        the chat copy by the memory planner's estimate, no; on one that holds the run alone, yes (an 8B model on a
        16 GB T4). Never on ZeroGPU, where each call has a GPU of its own."""
        from . import memory

        if self.inline or self.hardware.device != "cuda":
            return False
        return not memory.fits_beside_chat(settings, self.model_id, memory.gpu_gib())

    def health(self) -> dict:
        """Counts an operator watches: what the retention policy bounds."""
        with self._lock:
            return {"adapters_loaded": len(self.chat.loaded), "visitor_records": len(self._jobs),
                    "gone_records": len(self._gone), "queued": sum(j.status == "queued" for j in self._order),
                    "running": sum(j.status == "running" for j in self._order)}

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

    def forget(self, visitor: str):
        """Drop a visitor's adapter, files and record (tests and housekeeping)."""
        job = self._jobs.pop(visitor, None)
        if job is not None:
            self.chat.forget(job.output_dir)
        shutil.rmtree(self.root / visitor, ignore_errors=True)

