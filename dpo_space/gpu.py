"""What runs on the GPU: module-level functions whose arguments and results pickle, around one chat model placed at
start-up. The same functions serve a CPU machine, a dedicated GPU and ZeroGPU.

ZeroGPU (`spaces` with SPACES_ZERO_GPU=true) lends a GPU per call: each `@spaces.GPU` function runs in a worker
forked from the app, which receives its arguments by pickle and hands back only its return value (or what it yields).
So, following the platform's rules:
- the chat model is loaded once, at start-up, in the main process (`start`): on ZeroGPU it is placed on "cuda" there,
  which ZeroGPU records and moves onto the GPU it lends; no call loads it;
- every call names the visitor's adapter by its run folder, and the chat model loads it there if it has not already
  (at most `max_adapters` at once, the least recently used unloaded first): an adapter attached inside a forked worker
  never reaches the main process, a path on disk does;
- progress goes through tqdm, which `gr.Progress(track_tqdm=True)` shows on the page, from the app's process or from
  ZeroGPU's worker alike; no callback crosses the boundary;
- a training run is one call (`train_run`), made from inside the visitor's request on ZeroGPU, so that their quota
  applies, and from the Workbench's training thread elsewhere; what it trains comes back through disk (the run folder);
- each call asks for a duration computed from its work (a 650-pair run and a 40-prompt evaluation differ).
Elsewhere `spaces.GPU` is a no-op, and the same functions run in process. tests/test_zerogpu.py holds the contract:
every call's arguments and results pickle, and each call run in a forked child with pickled arguments gives what it
gives in process.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import spaces

from .data import PreferenceData
from .errors import DPOSpaceError
from .generation import Conversation, Sampling, generate_batch, implicit_rewards, model_lock, stream
from .generation import evaluate as evaluate_answers
from .generation import pair_report as score_pairs
from .models import Hardware, load_model, preset_for

# The longest call asked of ZeroGPU: its own cap for a free account is a few minutes; a PRO account may go longer.
MAX_GPU_SECONDS = 1500
# Seconds per new token of one batch of answers, on paper for a small model on a ZeroGPU slice (bench/gpu_check.py
# measures it); with the load and a margin, what a generation call asks for.
SECONDS_PER_TOKEN = 0.05


class ChatModel:
    """The one base model every visitor chats with, and the adapters of the runs being chatted with."""

    def __init__(self, model_id: str, hardware: Hardware, *, load_in_4bit: bool = True,
                 trust_remote_code: bool = False, max_adapters: int = 8):
        self.model_id, self.hardware, self.max_adapters = model_id, hardware, max_adapters
        self.model, self.tokenizer = load_model(model_id, load_in_4bit=load_in_4bit, hardware=hardware,
                                                trust_remote_code=trust_remote_code)
        self.loaded: OrderedDict[str, str] = OrderedDict()  # run folder → adapter name, least recently used first
        self.paused: str | None = None  # why chat is paused (a run training on this very copy), or None

    def check_available(self):
        if self.paused:
            raise DPOSpaceError(self.paused)

    def lend_base(self, why: str):
        """The base model, every adapter unloaded (they reload from disk when asked again), for a run to train on when
        the GPU cannot hold a second copy; chat is paused, with `why` as its message, until `take_back`."""
        from peft import PeftModel

        with model_lock:
            self.paused = why
            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()
            self.loaded.clear()
            return self.model, self.tokenizer

    def take_back(self, model):
        """The base again, from the run that borrowed it (its adapter went to disk), and chat resumes."""
        from peft import PeftModel

        with model_lock:
            self.model = model.unload() if isinstance(model, PeftModel) else model
            self.model.eval()
            self.paused = None

    def adapter(self, run_dir: str | Path | None) -> str | None:
        """The adapter name of a run folder, loaded from disk if it is not loaded yet; None for the base."""
        from .training import load_adapter

        if run_dir is None:
            return None
        run_dir = str(run_dir)
        with model_lock:
            self.check_available()
            if run_dir in self.loaded:
                self.loaded.move_to_end(run_dir)
                return self.loaded[run_dir]
            if not (Path(run_dir) / "adapter_config.json").exists():
                raise DPOSpaceError("that run is no longer on disk: train again in the Train tab")
            name = "run_" + hashlib.sha1(run_dir.encode()).hexdigest()[:16]
            self.model = load_adapter(self.model, run_dir, adapter_name=name)
            self.loaded[run_dir] = name
            while len(self.loaded) > self.max_adapters:
                self._unload(next(iter(self.loaded)))
            return name

    def current(self, run_dir: str | Path | None) -> tuple:
        """(model, adapter name or None for the base) for a run, the adapter loaded first: loading one wraps the
        model. Hold `model_lock` from this call until the model has been used: another visitor's adapter may unload
        this one, or rewrap the model, as soon as it is released."""
        name = self.adapter(run_dir)
        return self.model, name

    @contextmanager
    def using(self, run_dir: str | Path | None):
        """`current(run_dir)` for the block, under `model_lock`."""
        with model_lock:
            yield self.current(run_dir)

    def forget(self, run_dir: str | Path):
        with model_lock:
            if str(run_dir) in self.loaded:
                self._unload(str(run_dir))

    def _unload(self, run_dir: str):
        name = self.loaded.pop(run_dir)
        if self.loaded:
            if self.model.active_adapter == name:
                self.model.set_adapter(next(reversed(self.loaded.values())))
            self.model.delete_adapter(name)
        else:  # PEFT keeps at least one adapter: the last one goes with its wrapper
            self.model = self.model.unload()


CHAT: ChatModel | None = None


def start(model_id: str, hardware: Hardware, **kwargs) -> ChatModel:
    """Load the chat model: at start-up, in the app's own process (on ZeroGPU, at import time)."""
    global CHAT
    CHAT = ChatModel(model_id, hardware, **kwargs)
    return CHAT


def chat_model() -> ChatModel:
    if CHAT is None:
        raise RuntimeError("the chat model is not started: call gpu.start() at start-up")
    return CHAT


def generation_seconds(answers: int, sampling: Sampling, batch_size: int = 16) -> int:
    return 15 + math.ceil(answers / batch_size) * math.ceil(sampling.max_new_tokens * SECONDS_PER_TOKEN)


# ---------------------------------------------------------------- chat: Compare, Evaluate, the inspector, building data


@spaces.GPU(duration=lambda conversation, sampling, run_dir=None: generation_seconds(1, sampling))
def answer(conversation: Conversation, sampling: Sampling, run_dir: str | None = None) -> Iterator[str]:
    """One side of Compare, streamed: the base (`run_dir` None) or the DPO model of that run."""
    chat = chat_model()
    chat.check_available()
    chat.adapter(run_dir)  # loaded now, so that a run no longer on disk is said before streaming starts
    # chosen again where it is used, in the thread that generates (see `ChatModel.current`)
    yield from stream(chat.model, chat.tokenizer, conversation, sampling, use_adapter=run_dir is not None,
                      resolve=lambda: chat.current(run_dir))


@spaces.GPU(duration=lambda scored, beta, system_prompt, run_dir: 10 + 2 * len(scored))
def rewards(scored: list[tuple[Conversation, str]], beta: float, system_prompt: str | None, run_dir: str) -> list[float]:
    """The implicit reward of each (conversation, answer) under the run's DPO model."""
    chat = chat_model()
    with chat.using(run_dir) as (model, name):
        return implicit_rewards(model, chat.tokenizer, scored, beta, system_prompt, name)


@spaces.GPU(duration=lambda prompts, sampling: generation_seconds(len(prompts), sampling, batch_size=8))
def base_answers(prompts: list[str], sampling: Sampling) -> list[str]:
    """The base model's answers to many prompts (to build an extreme dataset the seed's way)."""
    chat = chat_model()
    chat.check_available()
    with chat.using(None) as (model, _):  # another visitor's first adapter would wrap the model between two batches
        return generate_batch(model, chat.tokenizer, prompts, sampling, use_adapter=False, batch_size=8)


def evaluation_seconds(prompts: list[str], sampling: Sampling, models: int = 2, k: int = 0) -> int:
    """Each model's answers, k samples of the first few prompts from each, and a scoring pass per answer."""
    answers = models * (len(prompts) + k * min(len(prompts), EVAL_DIVERSITY_PROMPTS))
    return generation_seconds(answers, sampling) + answers // 4


EVAL_K, EVAL_DIVERSITY_PROMPTS = 4, 8


@spaces.GPU(duration=lambda prompts, sampling, run_dir, more_runs=(), k=EVAL_K:
            evaluation_seconds(prompts, sampling, 2 + len(more_runs), k))
def evaluate(prompts: list[str], sampling: Sampling, run_dir: str, more_runs: list[str] | tuple = (),
             k: int = EVAL_K) -> dict:
    """The base and the run's DPO model (and `more_runs`' models, labelled by run folder name) on the same prompts,
    with `k` samples of the first few prompts per model for the per-prompt diversity and the KL estimate."""
    chat = chat_model()
    with chat.using(run_dir) as (_, name):
        others = {Path(run).name: chat.adapter(run) for run in more_runs}
        return evaluate_answers(chat.model, chat.tokenizer, prompts, sampling, adapter_name=name, others=others,
                                k=k, diversity_prompts=EVAL_DIVERSITY_PROMPTS)


@spaces.GPU(duration=lambda rows, beta, system_prompt, run_dir: 15 + len(rows))
def pair_report(rows: list[dict], beta: float, system_prompt: str | None, run_dir: str) -> list[dict]:
    chat = chat_model()
    with chat.using(run_dir) as (model, name):
        return score_pairs(model, chat.tokenizer, rows, beta, system_prompt, adapter_name=name)


# ---------------------------------------------------------------- training


def training_seconds(settings, data: PreferenceData, *args, **kwargs) -> int:
    """What a run asks of ZeroGPU: loading the model, then its steps at the preset's measured pace (a few seconds a
    pair for an 8B model, far less for a small one), with half again for margin; at most MAX_GPU_SECONDS."""
    preset = preset_for(settings.model_name_or_path)
    per_pair = preset.gpu_seconds_per_pair if preset else 1.0
    pairs = settings.steps(len(data)) * settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    return min(MAX_GPU_SECONDS, math.ceil(60 + 1.5 * pairs * per_pair))


SHARED_BASE = ("Compare is paused while a run trains: this GPU holds one copy of the model, and the run is using it. "
               "It resumes when the run ends.")


@spaces.GPU(duration=training_seconds)
def train_run(settings, data: PreferenceData, stop_path: str, probe: str | None, sample_every: int | None,
              hardware: Hardware, share_base: bool = False) -> str:
    """One run on a fresh copy of the base, or, with `share_base` (a GPU too small for two copies), on the chat
    model's own base with chat paused meanwhile; returns the saved run folder (metrics, samples and adapter are on disk
    as they are written, for the page to read)."""
    from .training import SampleTimeline, StopSignal, train

    callbacks = [SampleTimeline(probe, sample_every)] if probe else []
    model = tokenizer = None
    if share_base:
        model, tokenizer = chat_model().lend_base(SHARED_BASE)
    try:
        result = train(settings, data, model=model, tokenizer=tokenizer, stop=StopSignal(stop_path),
                       callbacks=callbacks, hardware=hardware)
        model = result.model
    finally:
        if share_base:
            chat_model().take_back(model)
    return str(result.output_dir)
