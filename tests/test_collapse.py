from dpo_space.collapse import distinct_n, has_refusal, measure, repeated_ngram_share, summarize


def test_fresh_text_has_no_repetition_and_a_loop_has_a_lot():
    fresh = "人は感謝されたり、話を聞いてもらえたりすると嬉しく感じます。"
    loop = "人生の、" * 20
    assert repeated_ngram_share(fresh) == 0.0
    assert repeated_ngram_share(loop) > 0.9
    assert distinct_n(loop, 2) < 0.1 < distinct_n(fresh, 2)


def test_refusal_phrases_either_spelling_and_configurable():
    assert has_refusal("難しい問題で分かりません。")
    assert has_refusal("それはわかりません")
    assert not has_refusal("分かりやすく説明します。")
    assert has_refusal("I don't know", phrases=("don't know",))


def test_whitespace_does_not_count_and_empty_text_is_safe():
    assert measure("a b").length == 3
    assert measure("").repetition == 0.0 and measure("").distinct_2 == 1.0


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
