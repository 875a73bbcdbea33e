"""The project's own Japanese text: what the embedded model learns in SFT, and the held-out sets it is judged on.

examples/corpus/*.jsonl          one prompt a line: its paraphrases, a helpful answer, a poor answer
examples/conversations/*.jsonl   two-turn conversations (the second question follows up the first)
examples/heldout/*.jsonl         never trained on: unseen questions, paraphrases of corpus prompts, second turns

`check_file` is what every batch of writing passes before it joins (`python -m dpo_space check-corpus FILE`): the
fields, natural lengths, common kanji only, answers that stay on the question's topic and never refuse, and no
prompt that another row already has. No torch import: it runs in a fraction of a second.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from .collapse import content_words, has_refusal, is_common_kanji, is_kanji, ngrams
from .errors import Problem

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CORPUS_DIR = EXAMPLES / "corpus"
CONVERSATIONS_DIR = EXAMPLES / "conversations"
HELDOUT_DIR = EXAMPLES / "heldout"
POOR_KINDS = ("curt", "wrong", "rude")

# Lengths in characters. Short answers are what a tiny model can learn well, and what the seed's answers were like.
PROMPT_CHARS = (4, 90)
TASK_PROMPT_CHARS = (4, 400)  # a task with its text after a line break
ANSWER_CHARS = (30, 180)
POOR_CHARS = (4, 90)
PARAPHRASES = (2, 8)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_dir(directory: str | Path) -> list[dict]:
    return [row for path in sorted(Path(directory).glob("*.jsonl")) for row in read_jsonl(path)]


def key(text: str) -> str:
    """What two prompts share when they are the same question: NFKC, no spaces, no punctuation."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if not (c.isspace() or unicodedata.category(c).startswith("P")))


def variants(row: dict) -> list[str]:
    """Every way a corpus row asks its question: the prompt, then its paraphrases."""
    return [row["prompt"], *row.get("paraphrases", [])]


# The seed's 701 rows (part_*.jsonl), written before the rules on topic and common kanji: their prompts and
# paraphrases follow every rule, their answers stay as the shipped embedded model learned them.
SEED_FILES = "part_*.jsonl"
SEED_EXEMPT = ("shares no content word", "kanji outside JIS level 1")


def rare_kanji(text: str) -> list[str]:
    return [c for c in text if is_kanji(c) and not is_common_kanji(c)]


def _text(row: dict, name: str, bounds: tuple[int, int], where: int, problems: list[Problem]) -> str | None:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        problems.append(Problem("missing or not a string", where, name))
        return None
    if not bounds[0] <= len(value) <= bounds[1]:
        problems.append(Problem(f"{len(value)} characters; keep it within {bounds[0]}–{bounds[1]}", where, name))
    if value != value.strip() or "\n" in value and name != "prompt":
        problems.append(Problem("leading/trailing space or a line break", where, name))
    if rare := rare_kanji(value):
        problems.append(Problem(f"kanji outside JIS level 1: {''.join(rare)} (use common kanji or kana)", where, name))
    if "\ufffd" in value:
        problems.append(Problem("contains U+FFFD (broken text)", where, name))
    return value


def check_qa(row: dict, where: int, problems: list[Problem], *, prompt_chars=PROMPT_CHARS) -> None:
    """A question and its helpful answer: natural lengths, common kanji, on topic, never a refusal."""
    long_task = isinstance(row.get("prompt"), str) and "\n" in row["prompt"]  # "summarise this:\n<text>"
    prompt = _text(row, "prompt", TASK_PROMPT_CHARS if long_task else prompt_chars, where, problems)
    answer = _text(row, "answer", ANSWER_CHARS, where, problems)
    if prompt is None or answer is None:
        return
    if has_refusal(answer):
        problems.append(Problem("a helpful answer must not say 分かりません", where, "answer"))
    words = content_words(prompt)
    if words and not words & content_words(answer):
        problems.append(Problem(f"shares no content word with the prompt ({'・'.join(sorted(words))}): "
                                "name the topic in the answer with the prompt's own spelling", where, "answer"))


def check_corpus_row(row: dict, where: int, problems: list[Problem], *, prompt_chars=PROMPT_CHARS) -> None:
    for name in ("category", "prompt", "answer", "poor", "poor_kind"):
        if name not in row:
            problems.append(Problem("missing", where, name))
    check_qa(row, where, problems, prompt_chars=prompt_chars)
    _text(row, "poor", POOR_CHARS, where, problems)
    if row.get("poor_kind") not in POOR_KINDS:
        problems.append(Problem(f"must be one of {', '.join(POOR_KINDS)}", where, "poor_kind"))
    paraphrases = row.get("paraphrases")
    if not isinstance(paraphrases, list) or not PARAPHRASES[0] <= len(paraphrases) <= PARAPHRASES[1]:
        problems.append(Problem(f"a list of {PARAPHRASES[0]}–{PARAPHRASES[1]} other wordings", where, "paraphrases"))
        return
    for i, text in enumerate(paraphrases, start=1):
        _text({f"paraphrases[{i}]": text}, f"paraphrases[{i}]", PROMPT_CHARS, where, problems)
    keys = [key(v) for v in variants(row) if isinstance(v, str)]
    if len(set(keys)) < len(keys):
        problems.append(Problem("two wordings are the same", where, "paraphrases"))


def check_conversation(row: dict, where: int, problems: list[Problem]) -> None:
    turns = row.get("turns")
    if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
        problems.append(Problem("two turns, each {prompt, answer}", where, "turns"))
        return
    for turn in turns:
        check_qa(turn, where, problems)


def check_rows(rows: list[dict], kind: str, seen: dict[str, str] | None = None,
               originals: set[str] | frozenset = frozenset()) -> list[Problem]:
    """Every problem of a batch. `seen` maps the key of every prompt already in the project to where it is; a batch
    may not repeat one (nor repeat itself). `originals`: the corpus prompts a held-out paraphrase may reword."""
    problems: list[Problem] = []
    seen = dict(seen or {})
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            problems.append(Problem("not a JSON object", i))
            continue
        if kind in ("corpus", "seed"):
            before = len(problems)
            check_corpus_row(row, i, problems)
            if kind == "seed":  # answers and poor answers as the shipped model learned them: their words stay
                problems[before:] = [p for p in problems[before:] if p.field not in ("answer", "poor")
                                     or not p.message.startswith(SEED_EXEMPT)]
            texts = [v for v in variants(row) if isinstance(v, str)]
        elif kind == "conversations":
            check_conversation(row, i, problems)
            texts = [t.get("prompt") for t in row.get("turns", [])[:1] if isinstance(t, dict)]
        elif kind == "paraphrases":  # a held-out rewording of a corpus prompt: {"prompt", "original"}
            _text(row, "prompt", PROMPT_CHARS, i, problems)
            if row.get("original") not in originals:
                problems.append(Problem("not a prompt of examples/corpus (copy it exactly)", i, "original"))
            texts = [row.get("prompt")]
        else:  # held-out question/answer rows
            check_qa(row, i, problems)
            texts = [row.get("prompt")]
        for text in texts:
            if not isinstance(text, str):
                continue
            k = key(text)
            if k in seen:
                problems.append(Problem(f"already asked: {seen[k]}", i, "prompt"))
            seen[k] = f"row {i} of this batch"
    return problems


def project_keys(exclude: Path | None = None) -> dict[str, str]:
    """The key of every question already in the project (corpus, conversations' first turns, held-out sets)."""
    seen: dict[str, str] = {}
    for directory in (CORPUS_DIR, CONVERSATIONS_DIR, HELDOUT_DIR):
        for path in sorted(directory.glob("*.jsonl")):
            if exclude is not None and path.resolve() == exclude.resolve():
                continue
            for i, row in enumerate(read_jsonl(path), start=1):
                texts = variants(row) if "prompt" in row else [row["turns"][0]["prompt"]] if "turns" in row else []
                for text in texts:
                    seen.setdefault(key(text), f"{path.relative_to(ROOT)} row {i}")
    return seen


def kind_of(path: Path) -> str:
    """What a file holds, by where it lies: corpus rows, conversations, or held-out questions (heldout/), among them
    paraphrases*.jsonl (rewordings of corpus prompts) and second_turn*.jsonl (conversations)."""
    if path.parent.name == "heldout":
        return next((kind for stem, kind in (("paraphrases", "paraphrases"), ("second_turn", "conversations"))
                     if path.name.startswith(stem)), "qa")
    if path.parent.name == "corpus" and path.match(SEED_FILES):
        return "seed"
    return {"corpus": "corpus", "conversations": "conversations"}.get(path.parent.name, "qa")


def check_file(path: str | Path) -> list[Problem]:
    path = Path(path)
    try:
        rows = read_jsonl(path)
    except (OSError, json.JSONDecodeError) as err:
        return [Problem(f"cannot read: {err}")]
    originals = {row["prompt"] for row in read_dir(CORPUS_DIR)}
    return check_rows(rows, kind_of(path), project_keys(exclude=path), originals)


def bigram_set(text: str) -> set[tuple[str, ...]]:
    return set(ngrams(key(text), 2))


def near_duplicates(questions: list[str], against: list[str], threshold: float = 0.7) -> list[tuple[int, str, float]]:
    """(index in `questions`, the closest of `against`, Jaccard of character bigrams) for each question at least
    `threshold` close to one of `against`: how a held-out question is kept from being a reworded training one."""
    index: dict[tuple[str, ...], list[int]] = {}
    grams = [bigram_set(t) for t in against]
    for j, g in enumerate(grams):
        for b in g:
            index.setdefault(b, []).append(j)
    out = []
    for i, q in enumerate(questions):
        mine = bigram_set(q)
        hits: dict[int, int] = {}
        for b in mine:
            for j in index.get(b, ()):
                hits[j] = hits.get(j, 0) + 1
        best = max(((n / (len(mine) + len(grams[j]) - n), j) for j, n in hits.items()), default=(0.0, -1))
        if best[0] >= threshold:
            out.append((i, against[best[1]], best[0]))
    return out

