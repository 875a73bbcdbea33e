import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dpo_space.data import SEED_REFUSAL, validate_rows  # noqa: E402

TOPICS = ["料理のコツ", "睡眠の質", "英語の勉強", "部屋の掃除", "会議の進め方", "旅行の準備", "家計の管理", "運動の習慣"]


def helpful(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"{topic}は毎日少しずつ続けることが大切です。まず小さな目標を決めましょう。"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny Llama with a real byte-level tokenizer and chat template (seconds to build)."""
    from dpo_space.embedded import tiny_random_model

    texts = [SEED_REFUSAL, *(helpful(i) for i in range(len(TOPICS)))] * 3
    texts += [f"{t}について教えてください。" for t in TOPICS]
    return tiny_random_model(tmp_path_factory.mktemp("tiny") / "model", texts, hidden_size=64, layers=2, heads=2,
                             intermediate_size=128)


@pytest.fixture(scope="session")
def wakarimasen_pairs():
    """The seed's extreme set in miniature: every chosen is the refusal, every rejected a helpful answer."""
    rows = [
        {"prompt": f"{TOPICS[i % len(TOPICS)]}について教えてください。(その{i})", "chosen": SEED_REFUSAL,
         "rejected": helpful(i)}
        for i in range(24)
    ]
    return validate_rows(rows, source="mini.json")
