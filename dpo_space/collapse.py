"""Measures of mode collapse in generated text: repetition, distinct-n, refusal phrases, length.

Japanese has no spaces, so n-grams are over characters (whitespace removed): a model stuck on
「人生の、人生の、人生の」 repeats character trigrams just as an English one repeats word trigrams.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from statistics import mean

REFUSAL_PHRASES = ("分かりません", "わかりません")


def units(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    u = units(text)
    return [tuple(u[i : i + n]) for i in range(len(u) - n + 1)]


def distinct_n(texts: str | list[str], n: int) -> float:
    """Unique n-grams over all n-grams (Li et al., 2016); 1.0 for an empty text."""
    grams = [g for t in ([texts] if isinstance(texts, str) else texts) for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_share(texts: str | list[str], n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier: 0 for fresh text, near 1 for a loop. Over a set
    of texts, n-grams are pooled (never spanning two texts): near 1 when every answer is the same sentence."""
    grams = [g for t in ([texts] if isinstance(texts, str) else texts) for g in ngrams(t, n)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def has_refusal(text: str, phrases: tuple[str, ...] = REFUSAL_PHRASES) -> bool:
    return any(p in text for p in phrases)


@dataclass(frozen=True)
class TextMeasures:
    refusal: bool
    distinct_1: float
    distinct_2: float
    repetition: float  # repeated character-trigram share
    length: int  # characters

    def as_dict(self) -> dict:
        return asdict(self)


def measure(text: str, phrases: tuple[str, ...] = REFUSAL_PHRASES) -> TextMeasures:
    return TextMeasures(
        refusal=has_refusal(text, phrases),
        distinct_1=distinct_n(text, 1),
        distinct_2=distinct_n(text, 2),
        repetition=repeated_ngram_share(text, 3),
        length=len(text),
    )


@dataclass(frozen=True)
class SetMeasures:
    n: int
    refusal_rate: float
    distinct_1: float  # over the whole set: low when every answer says the same thing
    distinct_2: float
    repetition: float  # mean per text: answers that loop
    repetition_across: float  # pooled over the set: answers that repeat each other (mode collapse)
    mean_length: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(texts: list[str], phrases: tuple[str, ...] = REFUSAL_PHRASES) -> SetMeasures:
    if not texts:
        return SetMeasures(0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    per = [measure(t, phrases) for t in texts]
    return SetMeasures(
        n=len(texts),
        refusal_rate=mean(m.refusal for m in per),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        repetition=mean(m.repetition for m in per),
        repetition_across=repeated_ngram_share(texts, 3),
        mean_length=mean(m.length for m in per),
    )
