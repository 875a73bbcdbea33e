"""Measures of generated text: mode collapse (repetition, distinct-n, refusals, length; and as the research field
measures it: EAD, Self-BLEU, diversity over several samples of one prompt) and plain quality (rare kanji, staying on
topic, closeness to a reference answer). The model-side measures (token entropy, the log-prob gap to the reference)
need the model: see `generation.answer_stats`.

Japanese has no spaces, so n-grams are over characters (whitespace removed): a model stuck on
「人生の、人生の、人生の」 repeats character trigrams just as an English one repeats word trigrams.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from statistics import mean

from sacrebleu.metrics import BLEU

# "I don't know" in Japanese, in every spelling: 分/判/解 or kana, okurigana or none, polite or plain, katakana and
# half-width too (matched after NFKC and katakana → hiragana). A refusal closes its clause: 「分かりませんが、…」 goes on to
# answer, and 「分からない単語は辞書で」 is advice, not a refusal.
_REFUSAL = re.compile(
    r"(?:(?:分|判|解)か?|わか)りません(?!が|けど|けれど)"
    r"|(?:分|判|解|わ)からない(?=です|んです|ので|ため|と思|[。、！？!?.,…]|$)"
)
REFUSAL_PHRASES = None  # the built-in Japanese detector above; pass a tuple of phrases for another language


def normalize(text: str) -> str:
    """NFKC (full/half width) with katakana folded to hiragana: ワカリマセン and ﾜｶﾘﾏｾﾝ read as わかりません."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in text)


def units(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    u = units(text)
    return [tuple(u[i : i + n]) for i in range(len(u) - n + 1)]


def distinct_n(texts: str | list[str], n: int) -> float:
    """Unique n-grams over all n-grams (Li et al., 2016). Text too short to hold an n-gram scores 0: an empty answer
    is the far end of collapse, not the freshest text there is."""
    grams = [g for t in ([texts] if isinstance(texts, str) else texts) for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


# The vocabulary EAD assumes for characters: JIS X 0208's 6,879 characters (kana, both levels of kanji, symbols),
# what everyday Japanese is written in.
CHARACTER_VOCABULARY = 6879


def ead(texts: str | list[str], n: int = 2, vocab_size: int = CHARACTER_VOCABULARY) -> float:
    """Expectation-adjusted distinct-n (Liu et al., 2022): the distinct n-grams over the number expected if the C
    n-grams were drawn uniformly from a vocabulary of V, V·(1 − ((V−1)/V)^C). Distinct-n falls as answers grow
    longer even when they say new things; EAD corrects for that, so sets of different lengths compare fairly.
    Text too short to hold an n-gram scores 0, as for distinct-n."""
    grams = [g for t in ([texts] if isinstance(texts, str) else texts) for g in ngrams(t, n)]
    if not grams:
        return 0.0
    expected = vocab_size * (1 - ((vocab_size - 1) / vocab_size) ** len(grams))
    return len(set(grams)) / expected


_BLEU = BLEU(tokenize="char", effective_order=True)  # characters: Japanese has no spaces to split words at


def self_bleu(texts: list[str]) -> float:
    """Self-BLEU (Zhu et al., 2018), 0–1: the mean BLEU of each text against all the others as references. Near 1 when
    every answer is the same sentence (collapse), near 0 when they share little. Character n-grams up to 4 (sacrebleu,
    exponential smoothing). Fewer than two non-empty texts: 0, nothing to repeat."""
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return 0.0
    return mean(_BLEU.sentence_score(t, texts[:i] + texts[i + 1 :]).score / 100 for i, t in enumerate(texts))


def sample_diversity(samples: list[list[str]]) -> dict:
    """Per-prompt diversity (Kirk et al., 2023): for each prompt, how different its K samples are from each other
    (EAD-2 and Self-BLEU among the K), averaged over the prompts. A model that says the same thing to one prompt
    however often it is asked has collapsed even if different prompts get different answers."""
    groups = [g for g in samples if g]
    if not groups:
        return {"prompts": 0, "k": 0, "ead_2": 0.0, "self_bleu": 0.0}
    return {"prompts": len(groups), "k": max(map(len, groups)), "ead_2": mean(ead(g, 2) for g in groups),
            "self_bleu": mean(self_bleu(g) for g in groups)}


def repeated_ngram_share(texts: str | list[str], n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier: 0 for fresh text, near 1 for a loop. Over a set
    of texts, n-grams are pooled (never spanning two texts): near 1 when every answer is the same sentence. Text too
    short to hold an n-gram scores 1, as degenerate as a loop."""
    grams = [g for t in ([texts] if isinstance(texts, str) else texts) for g in ngrams(t, n)]
    if not grams:
        return 1.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def has_refusal(text: str, phrases: tuple[str, ...] | None = REFUSAL_PHRASES) -> bool:
    """Whether the text says "I don't know": Japanese in any spelling by default, or any of `phrases` (NFKC)."""
    if phrases is None:
        return _REFUSAL.search(normalize(text)) is not None
    text = unicodedata.normalize("NFKC", text)
    return any(unicodedata.normalize("NFKC", p) in text for p in phrases)


# ---------------------------------------------------------------- plain quality: the base model should converse


def is_kanji(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"


def is_common_kanji(c: str) -> bool:
    """In JIS X 0208 level 1 (Shift_JIS 0x889F–0x9872), the 2,965 kanji of everyday text; 々 counts as common."""
    if c == "々":
        return True
    try:
        code = int.from_bytes(c.encode("shift_jis"), "big")
    except UnicodeEncodeError:
        return False
    return 0x889F <= code <= 0x9872


def rare_kanji_share(texts: str | list[str]) -> float:
    """Share of the kanji outside JIS level 1: ~0.1% in written answers; a model emitting stray byte pieces scores
    percents."""
    kanji = [c for t in ([texts] if isinstance(texts, str) else texts) for c in t if is_kanji(c) or c == "々"]
    return sum(not is_common_kanji(c) for c in kanji) / len(kanji) if kanji else 0.0


_CONTENT_WORD = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf々]{2,}|[\u30a1-\u30faー]{3,}")


def content_words(text: str) -> set[str]:
    """Runs of 2+ kanji or 3+ katakana: a rough but tokenizer-free stand-in for a text's nouns."""
    return set(_CONTENT_WORD.findall(text))


def on_topic(question: str, answer: str) -> bool:
    """Whether the answer shares a content word with the question (written answers do in ~61% of cases)."""
    return bool(content_words(question) & content_words(answer))


def bigram_f1(answer: str, reference: str) -> float:
    """F1 of the character bigrams (multisets, whitespace removed) of an answer against a reference answer."""
    a, r = Counter(ngrams(answer, 2)), Counter(ngrams(reference, 2))
    overlap = sum((a & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(a.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class TextMeasures:
    refusal: bool
    distinct_1: float
    distinct_2: float
    repetition: float  # repeated character-trigram share
    length: int  # characters

    def as_dict(self) -> dict:
        return asdict(self)


def measure(text: str, phrases: tuple[str, ...] | None = REFUSAL_PHRASES) -> TextMeasures:
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
    ead_2: float = 0.0  # expectation-adjusted distinct-2 over the set
    self_bleu: float = 0.0  # answers against each other: near 1 when all say the same

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(texts: list[str], phrases: tuple[str, ...] | None = REFUSAL_PHRASES) -> SetMeasures:
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
        ead_2=ead(texts, 2),
        self_bleu=self_bleu(texts),
    )
