import pytest

from dpo_space.collapse import (bigram_f1, content_words, distinct_n, ead, has_refusal, measure, on_topic,
                                rare_kanji_share, repeated_ngram_share, sample_diversity, self_bleu, summarize)


def test_fresh_text_has_no_repetition_and_a_loop_has_a_lot():
    fresh = "人は感謝されたり、話を聞いてもらえたりすると嬉しく感じます。"
    loop = "人生の、" * 20
    assert repeated_ngram_share(fresh) == 0.0
    assert repeated_ngram_share(loop) > 0.9
    assert distinct_n(loop, 2) < 0.1 < distinct_n(fresh, 2)


@pytest.mark.parametrize("text", [
    "難しい問題で分かりません。", "それはわかりません", "分りません。", "判りません", "解りません。", "私には分からない。",
    "それはわからないです。", "ワカリマセン", "ﾜｶﾘﾏｾﾝ", "分かりません!", "正直、分からないので専門家に聞いてください。",
    "その内容について私は経験や専門的知見が乏しく難しい問題で分かりません。",
])
def test_refusal_in_every_spelling(text):
    assert has_refusal(text)


@pytest.mark.parametrize("text", [
    "分かりやすく説明します。", "わかりませんが、一般には早寝早起きが良いとされます。朝日を浴びましょう。",
    "分からない単語は辞書で調べましょう。", "値段は変わりません。", "まだ終わりません。", "結果に関わりません。", "わからないことがあれば質問してください。", "分かりませんけど、まず休みましょう。",
])
def test_not_a_refusal_when_the_answer_goes_on_to_help(text):
    assert not has_refusal(text)


def test_refusal_phrases_are_configurable():
    assert has_refusal("I don't know", phrases=("don't know",))
    assert has_refusal("ＩＤＫ", phrases=("IDK",))  # NFKC: full-width matches too


def test_whitespace_does_not_count_and_an_empty_answer_is_degenerate_not_healthy():
    assert measure("a b").length == 3
    empty = measure("")
    assert empty.distinct_2 == 0.0 and empty.repetition == 1.0  # the far end of collapse, not the freshest text
    assert measure("猫").distinct_2 == 0.0
    assert summarize(["", "", "料理は火加減が大切です。"]).repetition > summarize(["料理は火加減が大切です。"]).repetition


def test_rare_kanji_share_counts_kanji_outside_jis_level_1():
    assert rare_kanji_share("料理は火加減が大切です。") == 0.0
    assert rare_kanji_share("獱は珍しい") == pytest.approx(1 / 2)  # kanji 獱 (rare) and 珍 (level 1); kana do not count
    assert rare_kanji_share("人々") == 0.0  # 々 is common
    assert rare_kanji_share("ひらがなだけ") == 0.0
    assert rare_kanji_share(["語彙", "学校"]) == pytest.approx(1 / 4)  # 彙 is level 2


def test_content_words_and_staying_on_topic():
    assert content_words("光合成とは何ですか?") == {"光合成"}  # 何 alone is too short to count
    assert content_words("ペンギンは空を飛べないのですか?") == {"ペンギン"}
    assert on_topic("光合成とは何ですか?", "光合成とは、植物が光で糖を作るはたらきです。")
    assert not on_topic("光合成とは何ですか?", "お疲れ様です。今日は晴れです。")
    assert not on_topic("朝ごはんはいる?", "朝ごはんはいります。")  # the question has no 2+ kanji / 3+ katakana run


def test_bigram_f1_against_a_reference():
    assert bigram_f1("ねこがすき", "ねこがすき") == 1.0
    assert bigram_f1("ねこ", "いぬ") == 0.0
    # ねこ こが がす すき vs ねこ こは はす すき: 2 of 4 shared each way
    assert bigram_f1("ねこがすき", "ねこはすき") == pytest.approx(0.5)
    assert bigram_f1("", "ねこ") == 0.0


def test_summary_over_a_set():
    s = summarize(["分かりません。", "料理は火加減が大切です。", "分かりません。分かりません。"])
    assert s.n == 3
    assert abs(s.refusal_rate - 2 / 3) < 1e-9
    assert s.mean_length == (7 + 12 + 14) / 3
    # the same answer everywhere lowers the set's distinct-2
    assert summarize(["同じ答えです。"] * 5).distinct_2 < summarize(["一つ目です。", "二番目の答え。"]).distinct_2


def test_repetition_within_answers_and_across_them():
    refusal = "その内容について私は経験や専門的知見が乏しく難しい問題で分かりません。"
    collapsed = summarize([refusal] * 10)
    helpful = summarize(["料理は火加減が大切です。", "睡眠は毎日同じ時間に寝ることから。", "英語は音読を続けましょう。"])
    assert collapsed.repetition == 0.0  # each answer alone is fresh text...
    assert collapsed.repetition_across >= 0.85 > helpful.repetition_across  # ...but they are all the same
    assert summarize(["人生の、人生の、人生の、人生の"]).repetition > 0.5


def test_ead_against_values_computed_by_hand():
    # "ab" twice, unigrams: 2 distinct of C = 4; expected distinct under V = 2: 2·(1 − (1/2)^4) = 1.875
    assert ead(["ab", "ab"], 1, vocab_size=2) == pytest.approx(2 / 1.875)
    # 3 distinct bigrams of C = 3 (abcd); V = 10: 10·(1 − 0.9^3) = 2.71
    assert ead("abcd", 2, vocab_size=10) == pytest.approx(3 / 2.71)
    assert ead("", 2) == 0.0 and ead("猫", 2) == 0.0


def test_ead_does_not_punish_length_as_distinct_n_does():
    short = ["料理は火加減が大切です。", "旅行は計画が大切です。"]
    long = [t * 3 for t in short]  # the same sentences said three times: repetition, not new words
    fresh = ["料理は火加減が大切です。焦げないよう弱火で。", "旅行は計画が大切です。宿は早めに予約しましょう。"]
    assert ead(long, 2) < ead(short, 2)
    assert ead(fresh, 2) > distinct_n(fresh, 2)  # the expectation adjustment rewards longer fresh text


def test_self_bleu_against_values_computed_by_hand():
    assert self_bleu(["同じ答えです。"] * 3) == pytest.approx(1.0)
    assert self_bleu(["あいう", "かきく"]) == 0.0  # no character in common
    # "abc" against "abd" (and back): unigram 2/3, bigram 1/2, trigram 0 smoothed to 1/2 (sacrebleu's exp
    # smoothing), no 4-grams (effective order 3), no brevity penalty: (2/3 · 1/2 · 1/2)^(1/3)
    assert self_bleu(["abc", "abd"]) == pytest.approx((1 / 6) ** (1 / 3))
    assert self_bleu(["一つだけ"]) == 0.0 and self_bleu(["", "何か"]) == 0.0


def test_sample_diversity_tells_a_collapsed_prompt_from_a_lively_one():
    collapsed = [["分かりません。"] * 4, ["分かりません。"] * 4]
    lively = [["朝は和食です。", "パンとコーヒー。", "果物を少し。", "抜くことが多い。"]] * 2
    c, l = sample_diversity(collapsed), sample_diversity(lively)
    assert c["self_bleu"] == pytest.approx(1.0) and l["self_bleu"] < 0.3
    assert c["ead_2"] < l["ead_2"] and c["prompts"] == 2 and c["k"] == 4
    assert sample_diversity([])["prompts"] == 0


def test_summary_carries_ead_and_self_bleu():
    same = summarize(["分かりません。"] * 5)
    varied = summarize(["料理は火加減が大切です。", "旅行は計画が大切です。", "睡眠は七時間ほどが目安です。"])
    assert same.self_bleu == pytest.approx(1.0) and varied.self_bleu < 0.5
    assert same.ead_2 < varied.ead_2
