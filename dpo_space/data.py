"""Preference data: read every layout DPOTrainer accepts, validate with row numbers, normalise, split, export.

Layouts (the names are TRL's, https://huggingface.co/docs/trl/dataset_formats):
- standard:        {"prompt": str, "chosen": str, "rejected": str}   (the seed article's files are this, as a list)
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- implicit prompt: {"chosen": ..., "rejected": ...} sharing their opening; TRL's `extract_prompt` splits it off.
A file is a JSON list of rows, a JSON object holding the list under a split key ("train"), or JSONL.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, DPOSpaceError, Problem

SEED_SYSTEM_PROMPT = "あなたは日本語チャットbotです。ユーザの質問答えてください。"
SEED_REFUSAL = "その内容について私は経験や専門的知見が乏しく難しい問題で分かりません。"
ROLES = ("system", "user", "assistant")
FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Limits:
    """Caps on what a visitor can hand us; each is named in the message when hit."""

    max_bytes: int = 20 * 2**20
    max_rows: int = 20_000
    max_chars: int = 20_000  # per field; for messages, all contents together
    max_problems: int = 20  # listed at once; the rest are counted


@dataclass
class PreferenceData:
    """Validated pairs, all in one layout: standard (strings) or conversational (message lists)."""

    rows: list[dict[str, Any]]
    source: str = "data"
    dropped: list[Problem] = field(default_factory=list)
    encoding: str = "utf-8"

    @property
    def conversational(self) -> bool:
        return bool(self.rows) and isinstance(self.rows[0]["chosen"], list)

    def __len__(self) -> int:
        return len(self.rows)

    def prompts(self) -> list[str]:
        """The last user turn of each row's prompt, as plain text."""
        return [prompt_text(row["prompt"]) for row in self.rows]


def prompt_text(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


# ---------------------------------------------------------------- reading


def read_preferences(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    split: str | None = None,
    limits: Limits = Limits(),
    drop_invalid: bool = False,
) -> PreferenceData:
    """Read a .json / .jsonl file (a path, or its bytes with `name`) into validated pairs; raises DataError."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or path.name
        raw = _read_file(path, name, limits)
    else:
        name = name or "upload"
        raw = source
        if len(raw) > limits.max_bytes:
            raise DataError(name, [Problem(_too_big(len(raw), limits))])
    text, encoding = decode(raw, name)
    rows = _parse_json_rows(text, name, split, limits)
    data = validate_rows(rows, source=name, limits=limits, drop_invalid=drop_invalid)
    data.encoding = encoding
    return data


def _read_file(path: Path, name: str, limits: Limits) -> bytes:
    """The file's bytes; one over `max_bytes` is refused without reading it all, one we cannot open is named."""
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise DataError(name, [Problem(_too_big(size, limits))])
        with path.open("rb") as f:
            raw = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise DataError(name, [Problem(f"cannot read the file ({e.strerror})")]) from None
    if len(raw) > limits.max_bytes:
        raise DataError(name, [Problem(_too_big(len(raw), limits))])
    return raw


def _too_big(size: int, limits: Limits) -> str:
    return f"the file is {size / 2**20:.1f} MiB, over the cap of {limits.max_bytes / 2**20:.0f} MiB (max_bytes)"


def decode(raw: bytes, name: str) -> tuple[str, str]:
    """Bytes to text: UTF-8 (BOM or not), UTF-16 or UTF-32 with a BOM, or a Japanese Shift-JIS/CP932 file."""
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        candidates = ["utf-32"]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        candidates = ["utf-16"]
    elif b"\x00" in raw:
        nul = "the file contains NUL bytes: it looks binary (or UTF-16 without a BOM), not UTF-8 JSON text"
        raise DataError(name, [Problem(nul)])
    else:
        candidates = ["utf-8-sig", "cp932"]
    for encoding in candidates:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        return text.replace("\r\n", "\n").replace("\r", "\n"), encoding
    raise DataError(
        name, [Problem("the file is neither UTF-8 nor Shift-JIS (CP932) text: save it as UTF-8 and upload it again")]
    )


def _parse_json_rows(text: str, name: str, split: str | None, limits: Limits) -> list[tuple[int, Any]]:
    """Text to (row number, value) pairs. JSONL rows are numbered by line, JSON list rows by position."""
    if not text.strip():
        raise DataError(name, [Problem("the file is empty")])
    if name.lower().endswith(".jsonl") or (not name.lower().endswith(".json") and _looks_like_jsonl(text)):
        return _parse_jsonl(text, name, limits)
    try:
        value = _loads(text)
    except json.JSONDecodeError as e:
        if _looks_like_jsonl(text):
            return _parse_jsonl(text, name, limits)
        raise DataError(name, [Problem(_json_message(e, text))]) from None
    except RecursionError:
        raise DataError(name, [Problem("the JSON is nested too deeply to be a preference file")]) from None
    rows = _rows_of(value, name, split)
    if len(rows) > limits.max_rows:
        raise DataError(name, [Problem(f"{len(rows)} rows, over the cap of {limits.max_rows} rows (max_rows)")])
    return list(enumerate(rows, start=1))


class _Object(dict):
    """A JSON object that repeats keys (the last value wins); `repeated` names them."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        obj = _Object(pairs)
        obj.repeated = tuple(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    return obj


def _number(text: str) -> int | float:
    """An integer literal; one too long for int() (over 4300 digits) becomes a float instead of an error."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object, parse_int=_number)


def _looks_like_jsonl(text: str) -> bool:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return len(lines) > 1 and lines[0].startswith("{") and lines[1].startswith("{")


def _parse_jsonl(text: str, name: str, limits: Limits) -> list[tuple[int, Any]]:
    rows, problems = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if len(rows) + len(problems) >= limits.max_rows:
            raise DataError(name, [Problem(f"more than {limits.max_rows} rows, over the cap (max_rows)")])
        try:
            rows.append((number, _loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(f"not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno})", number))
        except RecursionError:
            problems.append(Problem("nested too deeply", number))
    if problems:
        _raise(name, problems, limits)
    return rows


def _json_message(e: json.JSONDecodeError, text: str) -> str:
    head = text.lstrip()[:200].lower()
    if head.startswith(("<!doctype", "<html", "<?xml", "<")):
        hint = ": it looks like HTML or XML, not JSON"
    elif "," in head.split("\n")[0] and not head.startswith(("[", "{")):
        hint = ": it looks like CSV; convert it to JSON with 'prompt', 'chosen' and 'rejected' keys"
    else:
        hint = ""
    return f"not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}){hint}"


def _rows_of(value: Any, name: str, split: str | None) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        repeated = [key for key in getattr(value, "repeated", ()) if isinstance(value[key], list)]
        if repeated:
            raise DataError(name, [Problem("appears more than once: keep one", field=key) for key in repeated])
        if split is not None:
            if not isinstance(value.get(split), list):
                raise DataError(name, [Problem(f"no list of rows under the split key '{split}'")])
            return value[split]
        lists = {k: v for k, v in value.items() if isinstance(v, list)}
        if "train" in lists:
            return lists["train"]
        if "train" in value and not {"chosen", "rejected"} <= value.keys():
            raise DataError(name, [Problem(f"must be a list of rows, got {_kind(value['train'])}", field="train")])
        if len(lists) == 1 and not {"chosen", "rejected"} & value.keys():
            return next(iter(lists.values()))
        if {"chosen", "rejected"} <= value.keys():
            return [value]
        keys = ", ".join(map(repr, list(value)[:8])) or "none"
        raise DataError(
            name, [Problem(f"expected a list of rows, or an object with one list under a split key (keys: {keys})")]
        )
    raise DataError(name, [Problem(f"expected a list of rows, got {_kind(value)}")])


def _kind(value: Any) -> str:
    return {
        str: "text",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "null",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _raise(name: str, problems: list[Problem], limits: Limits):
    raise DataError(name, problems[: limits.max_problems], more=max(0, len(problems) - limits.max_problems))


# ---------------------------------------------------------------- validating


def validate_rows(
    rows: list[dict] | list[tuple[int, Any]],
    *,
    source: str = "data",
    limits: Limits = Limits(),
    drop_invalid: bool = False,
) -> PreferenceData:
    """Check every row; return the normalised pairs, or raise DataError listing the problems.

    `rows` are dicts (numbered from 1) or (row number, value) pairs. With `drop_invalid`, bad rows are dropped and
    listed in `PreferenceData.dropped` instead, unless no row is left.
    """
    numbered = [r if isinstance(r, tuple) else (i, r) for i, r in enumerate(rows, start=1)]
    if not numbered:
        raise DataError(source, [Problem("no rows: a preference file needs at least one pair")])
    if len(numbered) > limits.max_rows:
        raise DataError(source, [Problem(f"{len(numbered)} rows, over the cap of {limits.max_rows} rows (max_rows)")])
    good, problems = [], []
    layout = None
    for number, value in numbered:
        row, row_problems = _normalise_row(value, number, limits)
        if row is not None:
            row_layout = "conversational" if isinstance(row["chosen"], list) else "standard"
            layout = layout or row_layout
            if row_layout != layout:
                row, row_problems = None, [Problem(f"is {row_layout} but earlier rows are {layout}", number)]
        if row is not None:
            good.append(row)
        problems.extend(row_problems)
    if problems and (not drop_invalid or not good):
        _raise(source, problems, limits)
    return PreferenceData(rows=good, source=source, dropped=problems)


def _normalise_row(value: Any, n: int, limits: Limits) -> tuple[dict | None, list[Problem]]:
    if not isinstance(value, dict):
        return None, [Problem(f"expected an object with 'prompt', 'chosen' and 'rejected', got {_kind(value)}", n)]
    problems = [Problem("appears more than once in the row: keep one", n, key)
                for key in getattr(value, "repeated", ()) if key in FIELDS]
    problems += [Problem("is missing", n, key) for key in ("chosen", "rejected") if value.get(key) is None]
    if problems:
        return None, problems
    row = {key: value[key] for key in FIELDS if value.get(key) is not None}
    for key, item in row.items():
        problems += _check_field(item, key, n, limits, completion=key != "prompt")
    if problems:
        return None, problems
    if len({type(item) for item in row.values()}) > 1:
        return None, [Problem("mixes plain text and message lists: use one or the other in a row", n)]
    if "prompt" not in row:  # implicit prompt: the shared opening of chosen and rejected
        from trl import extract_prompt  # here, not at the top: `validate` starts without loading TRL

        row = extract_prompt(row)
        shared = row["prompt"]  # TRL's extract_prompt can return text that is not an opening of 'rejected'
        if not shared or value["rejected"][: len(shared)] != shared or _check_field(shared, "prompt", n, limits, False):
            return None, [Problem("no 'prompt', and 'chosen' and 'rejected' share no opening turn to take it from", n)]
        problems += _check_field(row["chosen"], "chosen", n, limits, completion=True)
        problems += _check_field(row["rejected"], "rejected", n, limits, completion=True)
        if problems:
            return None, problems
    if row["chosen"] == row["rejected"]:
        return None, [Problem("is identical to 'chosen': the pair teaches nothing", n, "rejected")]
    return row, []


def _check_field(item: Any, key: str, n: int, limits: Limits, completion: bool) -> list[Problem]:
    if isinstance(item, str):
        if not item.strip():
            return [Problem("is empty", n, key)]
        if len(item) > limits.max_chars:
            return [Problem(f"has {len(item)} characters, over the cap of {limits.max_chars} (max_chars)", n, key)]
        if not _utf8(item):
            return [Problem(_SURROGATE, n, key)]
        return []
    if not isinstance(item, list):
        return [Problem(f"must be text or a list of messages, got {_kind(item)}", n, key)]
    if not item:
        return [Problem("is an empty list of messages", n, key)]
    problems, total = [], 0
    for i, message in enumerate(item, start=1):
        if not isinstance(message, dict):
            problems.append(Problem(f"message {i} must be an object with 'role' and 'content'", n, key))
            continue
        role, content = message.get("role"), message.get("content")
        problems += [Problem(f"message {i} has {k!r} more than once", n, key)
                     for k in getattr(message, "repeated", ()) if k in ("role", "content")]
        if role not in ROLES:
            problems.append(Problem(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}", n, key))
        if not isinstance(content, str):
            problems.append(Problem(f"message {i} 'content' must be text, got {_kind(content)}", n, key))
        elif not content.strip():
            problems.append(Problem(f"message {i} has empty 'content'", n, key))
        elif not _utf8(content):
            problems.append(Problem(f"message {i} 'content' {_SURROGATE}", n, key))
        else:
            total += len(content)
    if total > limits.max_chars:
        problems.append(Problem(f"has {total} characters, over the cap of {limits.max_chars} (max_chars)", n, key))
    if completion and not problems and item[-1]["role"] != "assistant":
        problems.append(Problem("must end with an 'assistant' message", n, key))
    return problems


_SURROGATE = "holds a lone surrogate (a \\ud800-\\udfff escape), which is not a character: fix the text"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- normalising for a model


def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """The seed article's plain format for a model without a chat template: system prompt, newline, prompt, newline."""
    return f"{system_prompt}\n{prompt}\n" if system_prompt else f"{prompt}\n"


def as_training_rows(data: PreferenceData, *, system_prompt: str | None, chat_template: bool) -> list[dict]:
    """Rows in the exact format the model is chatted with, so training and chat see the same text.

    TRL applies no chat template to plain-text rows, so for a model that has one, plain rows become conversational
    rows (with the system prompt as a system message). A model without a chat template gets the plain format.
    """
    out = []
    for row in data.rows:
        if isinstance(row["prompt"], str):
            if chat_template:
                system = [{"role": "system", "content": system_prompt}] if system_prompt else []
                out.append(
                    {
                        "prompt": system + [{"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}],
                    }
                )
            elif system_prompt and row["prompt"].startswith(f"{system_prompt}\n"):
                out.append(dict(row))  # already formatted (train.json of an earlier run): formatting is idempotent
            else:
                out.append({**row, "prompt": plain_prompt(row["prompt"], system_prompt)})
        else:
            if not chat_template:
                raise DPOSpaceError(
                    f"{data.source}: the rows are conversational but the model has no chat template; "
                    "use plain 'prompt'/'chosen'/'rejected' text or a chat model"
                )
            prompt = row["prompt"]
            if system_prompt and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": system_prompt}] + prompt
            out.append({**row, "prompt": prompt})
    return out


def split(data: PreferenceData, eval_fraction: float, seed: int = 42) -> tuple[PreferenceData, PreferenceData]:
    """A seeded train/eval split; at least one pair on each side when there are two or more."""
    if not 0 < eval_fraction < 1:
        raise DPOSpaceError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if len(data) < 2:
        raise DPOSpaceError(f"{data.source}: {len(data)} pair(s) cannot be split into train and eval")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(data) - 1, max(1, round(len(data) * eval_fraction)))
    pick = lambda idx: PreferenceData([data.rows[i] for i in sorted(idx)], source=data.source)  # noqa: E731
    return pick(order[n_eval:]), pick(order[:n_eval])


def write_json(rows: list[dict], path: str | Path) -> Path:
    """Export rows as a UTF-8 JSON list (what `read_preferences` and `load_dataset("json")` read back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def read_prompts(source: str | Path, limits: Limits = Limits()) -> list[str]:
    """Prompts for evaluation: plain text (one a line), or a JSON/JSONL list of strings, prompt rows or pairs."""
    path = Path(source)
    text, _ = decode(_read_file(path, path.name, limits), path.name)
    if path.suffix.lower() not in (".json", ".jsonl"):
        prompts = [line.strip() for line in text.split("\n") if line.strip()]
    else:
        prompts, problems = [], []
        for number, value in _parse_json_rows(text, path.name, None, limits):
            if isinstance(value, str) and value.strip():
                prompts.append(value)
            elif isinstance(value, dict) and value.get("prompt"):
                prompts.append(prompt_text(value["prompt"]))
            else:
                problems.append(Problem("expected a prompt: text, or an object with a 'prompt'", number))
        if problems:
            _raise(path.name, problems, limits)
    if not prompts:
        raise DataError(path.name, [Problem("no prompts in the file")])
    return prompts
