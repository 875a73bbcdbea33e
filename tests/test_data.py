import json
import time

import pytest

from dpo_space.data import (
    SEED_REFUSAL,
    SEED_SYSTEM_PROMPT,
    Limits,
    as_training_rows,
    plain_prompt,
    read_preferences,
    read_prompts,
    split,
    validate_rows,
    write_json,
)
from dpo_space.errors import DataError

STANDARD = [
    {"prompt": "空はなぜ青いのですか?", "chosen": "太陽の光が散乱するからです。", "rejected": "知らない。"},
    {"prompt": "おすすめの朝食は?", "chosen": "ご飯と味噌汁です。", "rejected": "食べなくていい。"},
]


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]


def write(tmp_path, name, content, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def problems_of(excinfo):
    return [str(p) for p in excinfo.value.problems]


# ------------------------------------------------------------------ layouts


def test_standard_list_the_seed_layout(tmp_path):
    data = read_preferences(write(tmp_path, "seed.json", json.dumps(STANDARD, ensure_ascii=False)))
    assert len(data) == 2 and not data.conversational
    assert data.rows[0] == STANDARD[0]


def test_object_with_a_split_key_and_extra_keys_ignored(tmp_path):
    rows = [{**r, "id": i, "score": 0.5} for i, r in enumerate(STANDARD)]
    path = write(tmp_path, "d.json", json.dumps({"train": rows, "test": rows[:1]}))
    assert read_preferences(path).rows == STANDARD
    assert read_preferences(path, split="test").rows == STANDARD[:1]


def test_jsonl_with_crlf_and_bom(tmp_path):
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in STANDARD) + "\r\n"
    path = write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + text.encode())
    assert read_preferences(path).rows == STANDARD


def test_conversational_rows(tmp_path):
    p, c = conv("こんにちは", "こんにちは!")
    _, r = conv("", "何?")
    data = validate_rows([{"prompt": p, "chosen": c, "rejected": r}])
    assert data.conversational and data.rows[0]["prompt"] == p


def test_implicit_prompt_dialogues_share_their_opening():
    user = [{"role": "user", "content": "元気?"}]
    row = {"chosen": user + [{"role": "assistant", "content": "元気です。"}],
           "rejected": user + [{"role": "assistant", "content": "別に。"}]}
    data = validate_rows([row])
    assert data.rows[0]["prompt"] == user
    assert data.rows[0]["chosen"] == [{"role": "assistant", "content": "元気です。"}]


def test_shift_jis_file_is_read_correctly(tmp_path):
    path = write(tmp_path, "sjis.json", json.dumps(STANDARD, ensure_ascii=False), encoding="cp932")
    data = read_preferences(path)
    assert data.rows == STANDARD and data.encoding == "cp932"


def test_undecodable_bytes_are_refused_with_a_message(tmp_path):
    path = write(tmp_path, "bad.json", b'[{"prompt": "\x82\xff\xfe\x80"}]')
    with pytest.raises(DataError, match="neither UTF-8 nor Shift-JIS"):
        read_preferences(path)


# ------------------------------------------------------------------ problems, with file, row and field


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = [STANDARD[0], {"prompt": "x", "chosen": "y"}, STANDARD[1], {"prompt": "x", "rejected": "z"}]
    with pytest.raises(DataError) as e:
        read_preferences(write(tmp_path, "pairs.json", json.dumps(rows)))
    assert "pairs.json: row 2: 'rejected': is missing" in str(e.value)
    assert "pairs.json: row 4: 'chosen': is missing" in str(e.value)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "row 1: 'chosen': is empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "row 1: 'chosen': must be text or a list of messages, got a number"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "row 1: 'rejected': is identical to 'chosen'"),
        ({"prompt": [{"role": "bot", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "row 1: 'prompt': message 1 has role 'bot'"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "row 1: 'chosen': must end with an 'assistant' message"),
        ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "mixes plain text"),
        ({"chosen": "abc", "rejected": "xyz"}, "share no opening turn"),
        ([1, 2], "expected an object"),
    ],
)
def test_each_bad_row_gets_a_clear_message(row, expected):
    with pytest.raises(DataError) as e:
        validate_rows([row], source="f.json")
    assert expected in str(e.value)


def test_several_problems_reported_at_once_and_capped():
    rows = [{"prompt": "q", "chosen": "", "rejected": "b"}] * 30
    with pytest.raises(DataError) as e:
        validate_rows(rows, limits=Limits(max_problems=5))
    assert len(e.value.problems) == 5 and e.value.more == 25
    assert "and 25 more" in str(e.value)


def test_drop_invalid_explains_the_drops():
    data = validate_rows([STANDARD[0], {"prompt": "q", "chosen": "a", "rejected": "a"}], drop_invalid=True)
    assert len(data) == 1 and "row 2" in str(data.dropped[0])


def test_layouts_cannot_be_mixed_across_rows():
    p, c = conv("q", "a")
    _, r = conv("q", "b")
    with pytest.raises(DataError, match="row 2: is conversational but earlier rows are standard"):
        validate_rows([STANDARD[0], {"prompt": p, "chosen": c, "rejected": r}])


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.json", "   \n", "the file is empty"),
        ("trunc.json", '[{"prompt": "q", "chosen": "a"', "not valid JSON"),
        ("page.json", "<!DOCTYPE html><html></html>", "looks like HTML"),
        ("table.json", "prompt,chosen,rejected\nq,a,b\n", "looks like CSV"),
        ("num.json", "42", "expected a list of rows, got a number"),
        ("obj.json", '{"a": [1], "b": [2]}', "one list under a split key"),
        ("nul.json", "[\x00]", "NUL bytes"),
        ("none.json", "[]", "no rows"),
    ],
)
def test_bad_files(tmp_path, name, content, expected):
    with pytest.raises(DataError, match=expected):
        read_preferences(write(tmp_path, name, content))


def test_broken_jsonl_line_is_named(tmp_path):
    lines = [json.dumps(STANDARD[0]), '{"prompt": "q", ', json.dumps(STANDARD[1])]
    with pytest.raises(DataError, match=r"d.jsonl: row 2: not valid JSON"):
        read_preferences(write(tmp_path, "d.jsonl", "\n".join(lines)))


def test_caps_are_named_and_hit_quickly(tmp_path):
    with pytest.raises(DataError, match="max_bytes"):
        read_preferences(b"[" + b" " * 2000 + b"]", name="big.json", limits=Limits(max_bytes=1000))
    with pytest.raises(DataError, match="over the cap of 3 rows"):
        validate_rows(STANDARD * 2, limits=Limits(max_rows=3))
    with pytest.raises(DataError, match=r"row 1: 'rejected': has 101 characters, over the cap of 100"):
        validate_rows([{"prompt": "q", "chosen": "a", "rejected": "x" * 101}], limits=Limits(max_chars=100))
    start = time.perf_counter()
    with pytest.raises(DataError, match="nested too deeply"):
        read_preferences(write(tmp_path, "deep.json", "[" * 200_000 + "]" * 200_000))
    assert time.perf_counter() - start < 2


# ------------------------------------------------------------------ normalising, splitting, exporting


def test_plain_rows_become_conversational_for_a_chat_model():
    rows = as_training_rows(validate_rows(STANDARD), system_prompt=SEED_SYSTEM_PROMPT, chat_template=True)
    assert rows[0]["prompt"] == [
        {"role": "system", "content": SEED_SYSTEM_PROMPT},
        {"role": "user", "content": STANDARD[0]["prompt"]},
    ]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": STANDARD[0]["chosen"]}]


def test_plain_rows_get_the_seed_format_without_a_chat_template():
    rows = as_training_rows(validate_rows(STANDARD), system_prompt=SEED_SYSTEM_PROMPT, chat_template=False)
    assert rows[0]["prompt"] == f"{SEED_SYSTEM_PROMPT}\n{STANDARD[0]['prompt']}\n" == plain_prompt(
        STANDARD[0]["prompt"], SEED_SYSTEM_PROMPT)


def test_system_prompt_is_not_added_twice():
    p, c = conv("q", "a")
    _, r = conv("q", "b")
    sys_p = [{"role": "system", "content": "own"}] + p
    rows = as_training_rows(validate_rows([{"prompt": sys_p, "chosen": c, "rejected": r}]),
                            system_prompt=SEED_SYSTEM_PROMPT, chat_template=True)
    assert rows[0]["prompt"] == sys_p


def test_split_is_seeded_and_disjoint():
    data = validate_rows([{"prompt": f"q{i}", "chosen": SEED_REFUSAL, "rejected": f"a{i}"} for i in range(20)])
    train, held = split(data, 0.25, seed=1)
    again, _ = split(data, 0.25, seed=1)
    assert len(train) == 15 and len(held) == 5 and train.rows == again.rows
    assert not {r["prompt"] for r in train.rows} & {r["prompt"] for r in held.rows}


def test_export_round_trips(tmp_path):
    data = validate_rows(STANDARD)
    path = write_json(data.rows, tmp_path / "out.json")
    assert read_preferences(path).rows == data.rows


def test_read_prompts_text_and_json(tmp_path):
    assert read_prompts(write(tmp_path, "p.txt", "一つ目\n\n二つ目\n")) == ["一つ目", "二つ目"]
    assert read_prompts(write(tmp_path, "p.json", json.dumps(STANDARD))) == [r["prompt"] for r in STANDARD]
    assert read_prompts(write(tmp_path, "p.jsonl", '"a"\n"b"\n')) == ["a", "b"]
    with pytest.raises(DataError, match="row 2: expected a prompt"):
        read_prompts(write(tmp_path, "q.json", '["a", 3]'))
