"""Answers from the base and the DPO model out of ONE loaded base (the adapter toggled), and implicit rewards.

The prompt is rendered exactly as training renders it (see `data.as_training_rows`): the model's chat template when
it has one, else the seed's plain format. Base and DPO answers use the same sampling seed, so any difference comes
from the adapter, not from the dice.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from peft import PeftModel
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer
from tqdm.auto import tqdm
from trl.data_utils import common_prefix_length

from .collapse import REFUSAL_PHRASES, measure, sample_diversity, summarize
from .data import SEED_SYSTEM_PROMPT, plain_prompt
from .models import has_chat_template

# One model call at a time per process (generation, adapter loading): the sampling seed is global to torch, and a
# CPU has no cores to spare.
model_lock = threading.RLock()


@dataclass
class Sampling:
    """The seed article's defaults. temperature 0 means greedy."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    system_prompt: str | None = SEED_SYSTEM_PROMPT
    repetition_penalty: float = 1.0

    def generate_kwargs(self, tokenizer) -> dict:
        """`model.generate` arguments. Sampling draws from a generator of its own (`SeededSampling`), never from
        torch's global RNG: a run training beside the chat keeps its batch order and dropout, and an answer depends
        on its seed alone, whoever else is chatting."""
        processors = _utf8_guard(tokenizer)
        if self.temperature > 0:
            processors.append(SeededSampling(self.temperature, self.top_p, self.seed))
        return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty, "logits_processor": processors}


class SeededSampling(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with its own `torch.Generator`, as the last logits processor: it draws
    the token and leaves only that one allowed, so `generate` in greedy mode takes it. Rows of a batch draw in turn
    from the one generator, so a batch's answers depend on its seed and its prompts only."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > self.top_p, 0.0)  # the top token always stays
        token = order.gather(-1, torch.multinomial(ordered, 1, generator=self.generator))
        return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)


Conversation = str | list[dict]  # one prompt, or the turns so far ending with the user's


def _messages(conversation: Conversation, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def prompt_ids(tokenizer, conversation: Conversation, system_prompt: str | None) -> list[int]:
    """Token ids of the prompt as DPOTrainer tokenizes it in training, ready for the answer to follow."""
    if has_chat_template(tokenizer):
        messages = _messages(conversation, system_prompt)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    return tokenizer(text=_plain_text(conversation, system_prompt))["input_ids"]


def _plain_text(conversation: Conversation, system_prompt: str | None) -> str:
    if isinstance(conversation, str):
        return plain_prompt(conversation, system_prompt)
    turns = [m["content"] for m in conversation if m["role"] != "system"]
    return plain_prompt("\n".join(turns), system_prompt)


def response_ids(tokenizer, conversation: Conversation, response: str, system_prompt: str | None):
    """(prompt ids, response ids) split where DPOTrainer splits them: at the common prefix, EOS included."""
    p_ids = prompt_ids(tokenizer, conversation, system_prompt)
    if has_chat_template(tokenizer):
        messages = _messages(conversation, system_prompt) + [{"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    else:
        full = tokenizer(text=_plain_text(conversation, system_prompt) + response + tokenizer.eos_token)["input_ids"]
    cut = common_prefix_length(p_ids, full)
    return full[:cut], full[cut:]


def _text(value) -> str:
    """An answer's text: a string, or the last message of a conversational one."""
    return value if isinstance(value, str) else value[-1]["content"]


def token_lengths(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int | None) -> dict:
    """A token-length audit of preference pairs, tokenized as DPOTrainer tokenizes them (chat template, EOS, the
    split at the common prefix): prompt, chosen and rejected token counts at p50 / p90 / p99, the longest, and the
    share of pairs that `max_length` cuts (prompt + the longer answer over it; TRL keeps the start, so the answers'
    ends are what is lost)."""
    import numpy as np

    lengths = {"prompt": [], "chosen": [], "rejected": []}
    for row in rows:
        p, c = response_ids(tokenizer, row["prompt"], _text(row["chosen"]), system_prompt)
        _, r = response_ids(tokenizer, row["prompt"], _text(row["rejected"]), system_prompt)
        for key, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
            lengths[key].append(len(ids))
    if not rows:
        return {"pairs": 0, "max_length": max_length, "cut": 0.0, "columns": {}}
    longest = [p + max(c, r) for p, c, r in zip(*lengths.values(), strict=True)]
    return {
        "pairs": len(rows), "max_length": max_length,
        "cut": sum(n > max_length for n in longest) / len(rows) if max_length else 0.0,
        "columns": {key: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                          "p99": float(np.percentile(v, 99)), "max": max(v)} for key, v in lengths.items()},
    }


def is_adapted(model) -> bool:
    return isinstance(model, PeftModel)


@contextmanager
def adapter(model, enabled: bool, name: str | None = None):
    """Run the block as the DPO model (adapter `name` on) or as the base (every adapter off)."""
    if not is_adapted(model):
        if enabled:
            raise ValueError("this model has no adapter: train one or load one first")
        yield
        return
    if not enabled:
        with model.disable_adapter():
            yield
        return
    if name is not None and model.active_adapter != name:
        model.set_adapter(name)
    yield


class ValidUTF8(LogitsProcessor):
    """Only tokens that keep the answer valid UTF-8, for byte-level BPE vocabularies (the embedded model's, Llama 3's,
    Qwen's). Such a vocabulary holds single bytes and pieces of characters; a small model can sample a byte that no
    character continues, which decodes as U+FFFD. A token is allowed where it continues the row's text as valid UTF-8,
    possibly ending inside a character that a later token finishes."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [states, vocab]: the state after the token, or -1 where the token is not allowed
        self.states: torch.Tensor | None = None

    @staticmethod
    def table_for(tokenizer) -> torch.Tensor | None:
        """The state table for a byte-level vocabulary (GPT-2 style: every piece spells bytes) or a byte-fallback one
        (SentencePiece style: whole characters, plus <0xE3>-like pieces for single bytes); None for any other."""
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        added = set(tokenizer.get_added_vocab())
        vocab = tokenizer.get_vocab()
        if all(c in to_byte for token in vocab if token not in added for c in token):
            def raw(token: str) -> bytes:
                return bytes(to_byte[c] for c in token)
        elif all(f"<0x{b:02X}>" in vocab for b in range(256)):
            def raw(token: str) -> bytes:
                byte = _BYTE_PIECE.fullmatch(token)
                return bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode()
        else:
            return None
        table = torch.full((_UTF8_STATES, max(len(tokenizer), max(vocab.values()) + 1)), -1, dtype=torch.long)
        for token, index in vocab.items():
            piece = token.encode() if token in added else raw(token)
            for state in range(_UTF8_STATES):
                table[state, index] = _utf8_state(piece, state)
        return table

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        table = self.table.to(scores.device)
        if self.states is None:  # the prompt ends on a whole character
            self.states = torch.zeros(input_ids.shape[0], dtype=torch.long, device=scores.device)
        else:
            self.states = table[self.states, input_ids[:, -1]].clamp(min=0)
        allowed = table[self.states, : scores.shape[-1]] >= 0
        return scores.masked_fill(~allowed, float("-inf"))


_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
# Where a row's text stands: 0 at a character boundary; 1-3 owing that many continuation bytes (0x80-0xBF); 4-7 just
# after a lead byte whose next byte has a narrower range (no overlong forms, no surrogates, nothing past U+10FFFF).
_NEXT_RANGE = {4: (0xA0, 0xBF, 1), 5: (0x80, 0x9F, 1), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}
_UTF8_STATES = 8


def _utf8_state(raw: bytes, state: int) -> int:
    """The state after the bytes `raw`, or -1 where they cannot continue valid UTF-8 from `state`."""
    for byte in raw:
        if state in _NEXT_RANGE:
            low, high, after = _NEXT_RANGE[state]
            if not low <= byte <= high:
                return -1
            state = after
        elif state:
            if not 0x80 <= byte <= 0xBF:
                return -1
            state -= 1
        elif byte < 0x80:
            continue
        elif 0xC2 <= byte <= 0xDF:
            state = 1
        elif byte in (0xE0, 0xED, 0xF0, 0xF4):
            state = {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}[byte]
        elif 0xE1 <= byte <= 0xEF:
            state = 2
        elif 0xF1 <= byte <= 0xF3:
            state = 3
        else:
            return -1
    return state


def _utf8_guard(tokenizer) -> LogitsProcessorList:
    if not hasattr(tokenizer, "_utf8_table"):
        tokenizer._utf8_table = ValidUTF8.table_for(tokenizer)  # once per tokenizer: a pass over the vocabulary
    table = tokenizer._utf8_table
    return LogitsProcessorList([ValidUTF8(table)] if table is not None else [])


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    return sorted({*ids, tokenizer.eos_token_id})


def generate(model, tokenizer, conversation: Conversation, sampling: Sampling = Sampling(), *, use_adapter: bool,
             adapter_name: str | None = None) -> str:
    """One complete answer."""
    text = ""
    for text in stream(model, tokenizer, conversation, sampling, use_adapter=use_adapter, adapter_name=adapter_name):
        pass
    return text


def stream(model, tokenizer, conversation: Conversation, sampling: Sampling = Sampling(), *, use_adapter: bool,
           adapter_name: str | None = None, resolve: Callable[[], tuple[Any, str | None]] | None = None
           ) -> Iterator[str]:
    """Yield the answer so far, growing, until the model stops (EOS) or hits `max_new_tokens`.

    `resolve`, for a model shared between threads whose adapters others load and unload (the Space's chat model): called
    under `model_lock` in the thread that generates, right before it does, it returns (model, adapter name or None for
    the base), so that no one can unload the adapter or rewrap the model between choosing it and using it."""
    ids = torch.tensor([prompt_ids(tokenizer, conversation, sampling.system_prompt)], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    errors: list[BaseException] = []

    def run():
        try:
            with model_lock:
                m, on, name = model, use_adapter, adapter_name
                if resolve is not None:
                    m, name = resolve()
                    on = name is not None
                was_training = m.training
                m.eval()
                try:
                    with adapter(m, on, name), torch.inference_mode():
                        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                   eos_token_id=_eos_ids(m, tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   **sampling.generate_kwargs(tokenizer))
                finally:
                    m.train(was_training)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text.rstrip("\ufffd")  # a character cut by max_new_tokens (or still arriving) is not shown
    finally:
        thread.join()
    if errors:
        raise errors[0]


def generate_batch(model, tokenizer, prompts: list[str], sampling: Sampling = Sampling(), *, use_adapter: bool,
                   adapter_name: str | None = None, batch_size: int = 16,
                   ended: list[bool] | None = None, desc: str = "answers") -> list[str]:
    """Answers to many prompts, left-padded in batches (much faster than one by one), with a tqdm bar (which the page
    shows through `gr.Progress(track_tqdm=True)`). `ended`, if given, receives for each answer whether it ended at EOS
    rather than at `max_new_tokens`."""
    answers = []
    stop_ids = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", disable=not prompts)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt_ids(tokenizer, p, sampling.system_prompt) for p in prompts[start : start + batch_size]]
            width = max(map(len, chunk))
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=model.device)
            with model_lock, adapter(model, use_adapter, adapter_name), torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, eos_token_id=stop_ids,
                                     pad_token_id=pad, **sampling.generate_kwargs(tokenizer))
            answers += [a.rstrip("\ufffd") for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
            if ended is not None:
                ended += [any(t in stop_ids for t in row.tolist()) for row in out[:, width:]]
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return answers


# ---------------------------------------------------------------- implicit reward


def _response_logits(model, tokenizer, conversation: Conversation, response: str, system_prompt: str | None):
    """The next-token logits at each response token (EOS included), and those tokens."""
    p, r = response_ids(tokenizer, conversation, response, system_prompt)
    ids = torch.tensor([p + r], device=model.device)
    return model(input_ids=ids).logits[0, len(p) - 1 : -1].float(), ids[0, len(p) :]


@torch.inference_mode()
def response_logps(model, tokenizer, conversation: Conversation, responses: list[str], system_prompt: str | None,
                   *, use_adapter: bool, adapter_name: str | None = None) -> list[float]:
    """log π(y|x) summed over the response tokens (EOS included), one value per response."""
    out = []
    with model_lock, adapter(model, use_adapter, adapter_name):
        for response in responses:
            logits, targets = _response_logits(model, tokenizer, conversation, response, system_prompt)
            out.append(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item())
    return out


def topk_entropy(logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """The entropy (nats) of each next-token distribution over its k likeliest tokens, renormalised: what is left
    of the model's hesitation among plausible words (a collapsed policy puts nearly all mass on one, entropy → 0)."""
    top = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.inference_mode()
def answer_stats(model, tokenizer, prompts: list[Conversation], answers: list[str], system_prompt: str | None, *,
                 use_adapter: bool, adapter_name: str | None = None, top_k: int = 10) -> dict:
    """Model-side collapse measures of answers, read by teacher forcing (one forward pass per answer and side):
    - `entropy`: the mean top-k token entropy along the answers under the model that wrote them (the DPO model if
      `use_adapter`, else the base);
    - `logp_gap`: the mean of log π(y|x) − log πref(y|x) over the answers, πref the base (adapter off): when the
      answers are samples of π at temperature 1 this estimates the sequence-level KL(π‖πref) that DPO's β holds
      back; 0 for the base by definition."""
    entropies, gaps = [], []
    for conversation, answer in zip(prompts, answers, strict=True):
        with model_lock, adapter(model, use_adapter, adapter_name):
            logits, targets = _response_logits(model, tokenizer, conversation, answer, system_prompt)
        entropies.append(topk_entropy(logits, top_k).mean().item())
        if use_adapter:
            policy = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item()
            reference, = response_logps(model, tokenizer, conversation, [answer], system_prompt, use_adapter=False)
            gaps.append(policy - reference)
    return {"entropy": sum(entropies) / len(entropies) if entropies else 0.0,
            "logp_gap": sum(gaps) / len(gaps) if gaps else 0.0, "top_k": top_k}


def implicit_reward(policy_logp: float, reference_logp: float, beta: float) -> float:
    """DPO's implicit reward of a response, r(x, y) = β·(log πθ(y|x) − log πref(y|x)): what TRL logs as
    `rewards/chosen` and `rewards/rejected`, and what Compare and the pair inspector show."""
    return beta * (policy_logp - reference_logp)


def implicit_rewards(model, tokenizer, scored: list[tuple[Conversation, str]], beta: float,
                     system_prompt: str | None, adapter_name: str | None = None) -> list[float]:
    """The implicit reward of each (conversation, response), with πref the base (adapter off)."""
    out = []
    for conversation, response in scored:
        policy, = response_logps(model, tokenizer, conversation, [response], system_prompt, use_adapter=True,
                                 adapter_name=adapter_name)
        reference, = response_logps(model, tokenizer, conversation, [response], system_prompt, use_adapter=False)
        out.append(implicit_reward(policy, reference, beta))
    return out


# ---------------------------------------------------------------- evaluation


@dataclass
class Comparison:
    prompt: str
    base: str
    dpo: str
    base_measures: dict
    dpo_measures: dict
    others: dict = field(default_factory=dict)  # more DPO runs: label → {"answer", "measures"}


def k_samples(model, tokenizer, prompts: list[str], sampling: Sampling, k: int, *, use_adapter: bool,
              adapter_name: str | None = None, batch_size: int = 16) -> list[list[str]]:
    """K answers to each prompt drawn at temperature 1 without a nucleus (the model's own distribution; Kirk et al.
    2023 use 16), seeds seed, seed+1, …: per prompt, its K samples."""
    draws = [generate_batch(model, tokenizer, prompts, replace(sampling, temperature=1.0, top_p=1.0, seed=sampling.seed + i),
                            use_adapter=use_adapter, adapter_name=adapter_name, batch_size=batch_size,
                            desc=f"samples {i + 1}/{k}") for i in range(k)]
    return [list(group) for group in zip(*draws, strict=True)] if draws else [[] for _ in prompts]


def evaluate(model, tokenizer, prompts: list[str], sampling: Sampling = Sampling(), *,
             phrases: tuple[str, ...] | None = REFUSAL_PHRASES, adapter_name: str | None = None,
             others: dict[str, str] | None = None, batch_size: int = 16, k: int = 4, diversity_prompts: int = 8,
             top_k: int = 10) -> dict:
    """The base's and the DPO model's answers to every prompt (and those of more DPO runs: `others`, label → adapter
    name) with their collapse measures, and a summary per model: the text measures of `collapse.summarize`, the
    model-side ones of `answer_stats` (top-k entropy; the log-prob gap to the base), and the per-prompt diversity of
    `k` samples at temperature 1 of the first `diversity_prompts` prompts, whose log-prob gap is the sequence-level KL
    estimate (`kl`). Every model answers with the same sampling and seed."""
    sides = [("base", False, None), ("dpo", True, adapter_name)] + [(label, True, name) for label, name in
                                                                   (others or {}).items()]
    answers = {side: generate_batch(model, tokenizer, prompts, sampling, use_adapter=on, adapter_name=name,
                                    batch_size=batch_size, desc=f"{side} answers") for side, on, name in sides}
    rows = [
        Comparison(p, answers["base"][i], answers["dpo"][i], measure(answers["base"][i], phrases).as_dict(),
                   measure(answers["dpo"][i], phrases).as_dict(),
                   {side: {"answer": answers[side][i], "measures": measure(answers[side][i], phrases).as_dict()}
                    for side, _, _ in sides[2:]})
        for i, p in enumerate(prompts)
    ]
    summary = {}
    some = prompts[:diversity_prompts] if k > 1 else []
    for side, on, name in sides:
        summary[side] = summarize(answers[side], phrases).as_dict()
        stats = answer_stats(model, tokenizer, prompts, answers[side], sampling.system_prompt, use_adapter=on,
                             adapter_name=name, top_k=top_k)
        summary[side].update(entropy=stats["entropy"], logp_gap=stats["logp_gap"])
        groups = k_samples(model, tokenizer, some, sampling, k, use_adapter=on, adapter_name=name,
                           batch_size=batch_size)
        diversity = sample_diversity(groups)
        summary[side].update(sample_ead_2=diversity["ead_2"], sample_self_bleu=diversity["self_bleu"])
        flat = [(p, a) for p, g in zip(some, groups, strict=True) for a in g]
        summary[side]["kl"] = answer_stats(model, tokenizer, [p for p, _ in flat], [a for _, a in flat],
                                           sampling.system_prompt, use_adapter=True,
                                           adapter_name=name)["logp_gap"] if on and flat else 0.0
    return {
        "sampling": asdict(sampling),
        "measures": {"k": k if some else 0, "diversity_prompts": len(some), "top_k": top_k},
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }



PAIR_REPORT_COLUMNS = ("row", "prompt", "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
                       "reward_chosen", "reward_rejected", "margin", "ranked_right")


def pair_report(model, tokenizer, rows: list[dict], beta: float, system_prompt: str | None, *,
                adapter_name: str | None = None) -> list[dict]:
    """Per preference pair: policy and reference log-probs of chosen and rejected, implicit rewards, and whether the
    DPO model now ranks the pair right (reward margin > 0). Wrong ones first: they are what to look at."""
    out = []
    for i, row in enumerate(tqdm(rows, desc="pairs", unit="pair"), start=1):
        chosen, rejected = row["chosen"], row["rejected"]
        texts = [_text(chosen), _text(rejected)]
        policy = response_logps(model, tokenizer, row["prompt"], texts, system_prompt, use_adapter=True,
                                adapter_name=adapter_name)
        reference = response_logps(model, tokenizer, row["prompt"], texts, system_prompt, use_adapter=False)
        r_c, r_r = (implicit_reward(p, r, beta) for p, r in zip(policy, reference, strict=True))
        out.append({"row": i, "prompt": row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"],
                    "policy_chosen": policy[0], "policy_rejected": policy[1], "ref_chosen": reference[0],
                    "ref_rejected": reference[1], "reward_chosen": r_c, "reward_rejected": r_r,
                    "margin": r_c - r_r, "ranked_right": r_c > r_r})
    return sorted(out, key=lambda r: (r["ranked_right"], r["margin"]))
