"""The corpus checks every batch of writing passes before it joins examples/."""

from pathlib import Path

from dpo_space.corpus import check_rows, key, kind_of, near_duplicates

GOOD = {"category": "科学", "prompt": "光合成とは何ですか?",
        "paraphrases": ["光合成ってなに?", "光合成について教えていただけますか。", "光合成 とは"],
        "answer": "光合成とは、植物が日光のエネルギーを使って、水と二酸化炭素から糖を作るはたらきです。このとき酸素が出ます。",
        "poor": "植物のことです。", "poor_kind": "curt"}


def problems(row, kind="corpus", **kw):
    return [str(p) for p in check_rows([row], kind, **kw)]


def test_a_good_row_passes():
    assert problems(GOOD) == []


def test_each_rule_is_named_with_row_and_field():
    assert any("'answer': a helpful answer must not say 分かりません" in p
               for p in problems({**GOOD, "answer": "光合成については分かりません。" + "あ" * 30}))
    assert any("'answer': shares no content word with the prompt (光合成)" in p
               for p in problems({**GOOD, "answer": "植物が日光で糖を作るはたらきです。このとき酸素も出ます。ふしぎですね。"}))
    assert any("'answer': kanji outside JIS level 1: 璧" in p
               for p in problems({**GOOD, "answer": GOOD["answer"] + "完璧です。"}))
    assert any("'poor_kind': must be one of curt, wrong, rude" in p for p in problems({**GOOD, "poor_kind": "bad"}))
    assert any("'paraphrases': a list of 2–8" in p for p in problems({**GOOD, "paraphrases": ["光合成って?"]}))
    assert any("two wordings are the same" in p
               for p in problems({**GOOD, "paraphrases": ["光合成とは何ですか。", "光合成って?"]}))
    assert any("row 1: 'answer': 8 characters" in p for p in problems({**GOOD, "answer": "光合成は大事です。"[:8]}))


def test_a_question_already_in_the_project_is_refused_in_any_punctuation():
    seen = {key("光合成とは何ですか？"): "examples/corpus/x.jsonl row 3"}
    assert any("already asked: examples/corpus/x.jsonl row 3" in p for p in problems(GOOD, seen=seen))
    assert any("already asked: row 1 of this batch" in p for p in [str(p) for p in check_rows([GOOD, GOOD], "corpus")])


def test_held_out_paraphrases_must_reword_a_real_corpus_prompt():
    row = {"prompt": "光合成って何のこと?", "original": "光合成とは何ですか?"}
    assert problems(row, "paraphrases", originals={"光合成とは何ですか?"}) == []
    assert any("'original': not a prompt of examples/corpus" in p for p in problems(row, "paraphrases"))


def test_file_kinds_by_place():
    assert kind_of(Path("examples/corpus/g1_01.jsonl")) == "corpus"
    assert kind_of(Path("examples/corpus/part_0.jsonl")) == "seed"
    assert kind_of(Path("examples/conversations/conv_a01.jsonl")) == "conversations"
    assert kind_of(Path("examples/heldout/second_turn.jsonl")) == "conversations"
    assert kind_of(Path("examples/heldout/paraphrases.jsonl")) == "paraphrases"
    assert kind_of(Path("examples/heldout/unseen.jsonl")) == "qa"


def test_near_duplicates_by_character_bigrams():
    found = near_duplicates(["ペンギンは空を飛べないのですか?", "朝ごはんを食べるメリットは?"],
                            ["ペンギンは空を飛べないのですか。", "夕食の献立の決め方"])
    assert [(i, match) for i, match, _ in found] == [(0, "ペンギンは空を飛べないのですか。")]


def test_a_seed_row_keeps_its_answer_but_not_its_other_faults():
    """The seed rows' answers are what the shipped model learned: off-topic wording and rare kanji stay there, and
    nowhere else (a missing paraphrase list is still a fault)."""
    row = {**GOOD, "answer": "植物が日光で糖を作るはたらきで、炒めた野菜とは関係ありません。"}
    assert not check_rows([row], "seed")
    assert {p.message.split(":")[0] for p in check_rows([row], "corpus")} >= {"kanji outside JIS level 1"}
    assert any("other wordings" in str(p) for p in check_rows([{**row, "paraphrases": []}], "seed"))


def test_every_shipped_file_passes_the_checker():
    from dpo_space.corpus import CONVERSATIONS_DIR, CORPUS_DIR, HELDOUT_DIR, check_file

    paths = [p for d in (CORPUS_DIR, CONVERSATIONS_DIR, HELDOUT_DIR) for p in sorted(d.glob("*.jsonl"))]
    assert len(paths) > 100
    problems = {str(p): [str(x) for x in check_file(p)][:3] for p in paths}
    assert not {p: v for p, v in problems.items() if v}


def test_no_held_out_paraphrase_is_a_trained_wording_in_all_but_spelling():
    """A held-out paraphrase is a new wording of a corpus question: none is as close as 0.7 (character-bigram
    Jaccard) to any wording the model trains on, or its fidelity would measure recall, not understanding. The corpus
    wordings written to teach new ways of asking were kept only below 0.6."""
    from dpo_space.corpus import CORPUS_DIR, HELDOUT_DIR, read_dir, read_jsonl, variants

    trained = [v for row in read_dir(CORPUS_DIR) for v in variants(row)]
    held = [row["prompt"] for row in read_jsonl(HELDOUT_DIR / "paraphrases.jsonl")]
    assert len(held) >= 200 and len(trained) > 6 * 6000
    assert near_duplicates(held, trained, threshold=0.7) == []
