"""Malformed and hostile preference files: each is refused quickly with a message naming file, row and field.

The corpus is tests/bad_inputs/ (described in its README.md); the cases too big to store are generated here.
Every case goes through the Python API and the CLI's `validate`; a handful through a real `python -m dpo_space`.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_space.cli import build_parser, main
from dpo_space.data import Limits, PreferenceData, read_preferences, validate_rows, write_json
from dpo_space.errors import DataError
from tests.conftest import ROOT

BAD = Path(__file__).parent / "bad_inputs"
SECONDS = 2.0

# file -> the problems its message must list, each (row, field, phrase); row 0 / field None: the file as a whole
CASES = {
    "bad_role.json": [(1, "prompt", "message 1 has role 'bot'; use one of system, user, assistant")],
    "binary_garbage.json": [(0, None, "neither UTF-8 nor Shift-JIS (CP932)")],
    "blank_lines_then_bad_row.jsonl": [(4, "chosen", "is empty")],
    "bom_only.json": [(0, None, "the file is empty")],
    "bool_text.json": [(2, "rejected", "must be text or a list of messages, got true/false")],
    "broken_jsonl_line.jsonl": [(3, None, "not valid JSON")],
    "chosen_equals_rejected.json": [(2, "rejected", "is identical to 'chosen'")],
    "completion_not_assistant.json": [(1, "chosen", "must end with an 'assistant' message")],
    "csv_named_json.json": [(0, None, "it looks like CSV")],
    "deep_nesting.json": [(0, None, "nested too deeply")],
    "deep_nesting_line.jsonl": [(2, None, "nested too deeply")],
    "duplicate_keys.json": [(1, "chosen", "appears more than once in the row")],
    "duplicate_message_content.json": [(1, "prompt", "message 1 has 'content' more than once")],
    "duplicate_split_key.json": [(0, "train", "appears more than once")],
    "empty.json": [(0, None, "the file is empty")],
    "empty_list.json": [(0, None, "no rows")],
    "empty_message_list.json": [(1, "rejected", "is an empty list of messages")],
    "empty_text.json": [(2, "chosen", "is empty")],
    "euc_jp.json": [(0, None, "neither UTF-8 nor Shift-JIS (CP932)")],
    "gzip_named_json.json": [(0, None, "NUL bytes: it looks binary")],
    "html_named_json.json": [(0, None, "it looks like HTML")],
    "huge_integer.json": [(1, "chosen", "must be text or a list of messages, got a number")],
    "implicit_prompt_blank_remainder.json": [(1, None, "share no opening turn")],
    "implicit_prompt_no_shared_opening.json": [(1, None, "share no opening turn")],
    "json_list_named_jsonl.jsonl": [(1, None, "not valid JSON")],
    "jsonl_of_arrays.jsonl": [(1, None, "expected an object with 'prompt', 'chosen' and 'rejected', got a list"),
                              (2, None, "got a list")],
    "latin1.json": [(0, None, "neither UTF-8 nor Shift-JIS (CP932)")],
    "list_of_numbers.json": [(1, None, "expected an object"), (3, None, "got a number")],
    "list_of_strings.json": [(1, None, "expected an object"), (2, None, "got text")],
    "lone_surrogate.json": [(1, "chosen", "holds a lone surrogate")],
    "many_bad_rows.jsonl": [(1, "chosen", "is empty"), (20, "chosen", "is empty"),
                            (0, None, "and 10 more problem(s)")],
    "message_not_object.json": [(1, "chosen", "message 1 must be an object with 'role' and 'content'")],
    "message_without_content.json": [(1, "prompt", "message 1 'content' must be text, got null")],
    "missing_field.json": [(2, "rejected", "is missing")],
    "mixed_layout_across_rows.jsonl": [(2, None, "is conversational but earlier rows are standard")],
    "mixed_layout_in_row.json": [(1, None, "mixes plain text and message lists")],
    "nan_infinity.json": [(1, "chosen", "got a number"), (1, "rejected", "got a number")],
    "nul_bytes.json": [(0, None, "NUL bytes")],
    "null_field.json": [(3, "chosen", "is missing")],
    "number_text.json": [(1, "chosen", "got a number"), (1, "rejected", "got a number")],
    "numbers_list_text.json": [(1, "prompt", "message 1 must be an object with 'role' and 'content'")],
    "object_text.json": [(1, "chosen", "must be text or a list of messages, got an object")],
    "object_without_list.json": [(0, None, "expected a list of rows, or an object with one list under a split key")],
    "python_repr.json": [(0, None, "not valid JSON (Expecting property name enclosed in double quotes at line 1")],
    "shift_jis_bad_row.json": [(2, "rejected", "is empty")],
    "split_key_single_row.json": [(0, "train", "must be a list of rows, got an object")],
    "split_key_wrong_type.json": [(0, "train", "must be a list of rows, got text")],
    "top_level_null.json": [(0, None, "expected a list of rows, got null")],
    "top_level_number.json": [(0, None, "expected a list of rows, got a number")],
    "top_level_string.json": [(0, None, "expected a list of rows, got text")],
    "trailing_comma.json": [(0, None, "not valid JSON (Expecting value at line 12, column 1)")],
    "truncated.json": [(0, None, "not valid JSON (Unterminated string starting at line 1, column 128)")],
    "utf16_bom.json": [(2, "chosen", "is missing")],
    "utf16_no_bom.json": [(0, None, "UTF-16 without a BOM")],
    "utf32_bom.json": [(1, "rejected", "is identical to 'chosen'")],
    "whitespace_only.json": [(0, None, "the file is empty")],
    "whitespace_text.json": [(1, "rejected", "is empty")],
}

# run through a real `python -m dpo_space validate` (the rest call cli.main in this process: the import takes seconds)
SUBPROCESS = ["truncated.json", "missing_field.json", "broken_jsonl_line.jsonl", "deep_nesting.json",
              "huge_integer.json"]

GOOD = {"prompt": "空はなぜ青いのですか?", "chosen": "太陽の光が散乱するからです。", "rejected": "知らない。"}


def where(name: str, row: int, field: str | None) -> str:
    """The start of a message line: `file: row N: 'field': `."""
    return f"{name}: " + (f"row {row}: " if row else "") + (f"'{field}': " if field else "")


def assert_named(text: str, name: str, expected: list[tuple[int, str | None, str]]):
    """Each expected problem is one line of `text` naming the file, the row and the field, then the phrase."""
    lines = [line.removeprefix("error: ") for line in text.splitlines()]
    for row, field, phrase in expected:
        prefix = where(name, row, field)
        hits = [line for line in lines if line.startswith(prefix) and phrase in line[len(prefix):]]
        assert hits, f"no line starting {prefix!r} with {phrase!r} in:\n{text}"


def api_error(source, **kw) -> tuple[DataError, float]:
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        read_preferences(source, **kw)
    return e.value, time.perf_counter() - start


@pytest.fixture(scope="module")
def parser_imported():
    build_parser()  # imports the training module for its flags: seconds, once, outside the timed calls


@pytest.fixture
def validate(parser_imported, capsys):
    """`main(["validate", path])` in this process: (exit code, stdout and stderr, seconds)."""

    def run(path: Path) -> tuple[int, str, float]:
        capsys.readouterr()
        start = time.perf_counter()
        code = main(["validate", str(path)])
        seconds = time.perf_counter() - start
        out = capsys.readouterr()
        return code, out.out + out.err, seconds

    return run


# ------------------------------------------------------------------ the stored corpus


@pytest.fixture(scope="module", autouse=True)
def cli_processes():
    """`python -m dpo_space validate FILE` for each SUBPROCESS file, started at once, before the other tests run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "dpo_space", "validate", str(BAD / name)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in SUBPROCESS}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_corpus_is_complete_and_small():
    files = sorted(p.name for p in BAD.iterdir() if p.name != "README.md")
    assert files == sorted(CASES) and len(files) >= 30
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in readme for name in files)
    assert sum(p.stat().st_size for p in BAD.iterdir()) < 200_000


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_api(name):
    err, seconds = api_error(BAD / name)
    assert seconds < SECONDS
    assert err.source == name
    assert_named(str(err), name, CASES[name])
    for row, field, phrase in CASES[name]:
        if not (row == 0 and field is None and "more problem" in phrase):
            assert any(p.row == row and p.field == field and phrase in p.message for p in err.problems)


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_api_with_bytes(name):
    err, seconds = api_error((BAD / name).read_bytes(), name=name)
    assert seconds < SECONDS
    assert_named(str(err), name, CASES[name])


@pytest.mark.parametrize("name", sorted(set(CASES) - set(SUBPROCESS)))
def test_cli_in_process(name, validate):
    code, output, seconds = validate(BAD / name)
    assert code == 1 and seconds < SECONDS
    assert "Traceback" not in output
    assert_named(output, name, CASES[name])


@pytest.mark.parametrize("name", SUBPROCESS)
def test_cli_subprocess(name, cli_processes):
    output, _ = cli_processes[name].communicate(timeout=300)
    code = cli_processes[name].returncode
    assert code == 1, output
    assert "Traceback" not in output
    assert_named(output, name, CASES[name])


# ------------------------------------------------------------------ generated: too big to store


def _rows_json(n: int) -> bytes:
    return json.dumps([GOOD] * n, ensure_ascii=False).encode()


def _rows_jsonl(n: int) -> bytes:
    return ("\n".join([json.dumps(GOOD, ensure_ascii=False)] * n) + "\n").encode()


# name -> (bytes for the given limits, the problem expected)
GENERATED = {
    "over_max_bytes.json": (lambda lim: b"[" + b" " * lim.max_bytes + b"]", (0, None, "(max_bytes)")),
    "over_max_rows.json": (lambda lim: _rows_json(lim.max_rows + 1), (0, None, "rows, over the cap of")),
    "over_max_rows.jsonl": (lambda lim: _rows_jsonl(lim.max_rows + 1), (0, None, "over the cap (max_rows)")),
    "over_max_chars.json": (lambda lim: json.dumps([{**GOOD, "chosen": "x" * (lim.max_chars + 1)}]).encode(),
                            (1, "chosen", "characters, over the cap of")),
    "over_max_chars_messages.json": (
        lambda lim: json.dumps([{"prompt": [{"role": "user", "content": "q"}],
                                 "chosen": [{"role": "assistant", "content": "x" * lim.max_chars}] * 2,
                                 "rejected": [{"role": "assistant", "content": "b"}]}]).encode(),
        (1, "chosen", "(max_chars)")),
    "nested_100000.json": (lambda lim: b"[" * 100_000 + b"]" * 100_000, (0, None, "nested too deeply")),
    "nested_100000_unclosed.json": (lambda lim: b"[" * 100_000, (0, None, "nested too deeply")),
    "nested_objects_100000.jsonl": (lambda lim: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                    (1, None, "nested too deeply")),
}
SMALL = Limits(max_bytes=1_000_000, max_rows=5, max_chars=100, max_problems=5)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_with_small_limits(name):
    make, expected = GENERATED[name]
    err, seconds = api_error(make(SMALL), name=name, limits=SMALL)
    assert seconds < SECONDS
    assert_named(str(err), name, [expected])


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_with_default_limits_through_the_cli(name, tmp_path, validate):
    path = tmp_path / name
    if name == "over_max_bytes.json":
        with path.open("wb") as f:  # sparse: refused from its size, never read
            f.truncate(Limits().max_bytes + 1)
    else:
        path.write_bytes(GENERATED[name][0](Limits()))
    err, seconds = api_error(path)
    assert seconds < SECONDS
    assert_named(str(err), name, [GENERATED[name][1]])
    code, output, seconds = validate(path)
    assert code == 1 and seconds < SECONDS and "Traceback" not in output
    assert_named(output, name, [GENERATED[name][1]])


def test_a_directory_or_a_missing_file_is_named(tmp_path, validate):
    folder = tmp_path / "pairs.json"
    folder.mkdir()
    err, _ = api_error(folder)
    assert_named(str(err), "pairs.json", [(0, None, "cannot read the file")])
    for path in (folder, tmp_path / "missing.jsonl"):
        code, output, _ = validate(path)
        assert code == 1 and "Traceback" not in output
        assert_named(output, path.name, [(0, None, "cannot read the file")])


def test_too_many_problems_are_capped():
    err, _ = api_error(BAD / "many_bad_rows.jsonl", limits=Limits(max_problems=3))
    assert len(err.problems) == 3 and err.more == 27


# ------------------------------------------------------------------ properties of the loader


def refused_or_read(raw: bytes, name: str) -> PreferenceData | None:
    """Read `raw`: a DataError (None) or pairs that validate again unchanged, never another exception, quickly."""
    start = time.perf_counter()
    try:
        data = read_preferences(raw, name=name)
    except DataError as e:
        assert e.problems and all(line.startswith(f"{name}: ") for line in str(e).splitlines())
        data = None
    assert time.perf_counter() - start < SECONDS
    if data is not None:
        assert len(data) and all(row["chosen"] != row["rejected"] and row["prompt"] for row in data.rows)
        assert validate_rows(data.rows).rows == data.rows
    return data


PROPERTY = settings(max_examples=200, deadline=None, database=None)
NAMES = st.sampled_from(["x.json", "x.jsonl", "upload"])


@PROPERTY
@given(raw=st.binary(max_size=2000), name=NAMES)
def test_arbitrary_bytes_are_read_or_refused(raw, name):
    refused_or_read(raw, name)


SHORT = st.text("ab あ\u3000", max_size=4)  # often blank, equal or sharing an opening
SURROGATE = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), min_size=1,
                    max_size=2)
TEXT = st.one_of(st.text(max_size=12), SHORT, SHORT, SURROGATE)
KEYS = st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "train", "test"]) | st.text(max_size=6)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=20)
ROLE = st.sampled_from(["system", "user", "assistant", "assistant", "bot"])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": SHORT}) | st.fixed_dictionaries(
    {}, optional={"role": ROLE | SCALARS, "content": TEXT | SCALARS})
FIELD = st.one_of(TEXT, SHORT, st.lists(MESSAGE, min_size=1, max_size=3), JSON)
ROW = st.fixed_dictionaries({"chosen": FIELD, "rejected": FIELD}, optional={"prompt": FIELD}) | st.fixed_dictionaries(
    {}, optional={"prompt": FIELD, "chosen": FIELD, "rejected": FIELD})
FILE = (st.lists(ROW | JSON, max_size=5) | st.dictionaries(KEYS, st.lists(ROW, max_size=3) | JSON, max_size=3)
        | ROW | JSON)


@PROPERTY
@given(value=FILE, name=NAMES)
def test_arbitrary_json_is_read_or_refused(value, name):
    refused_or_read(json.dumps(value).encode(), name)
    if isinstance(value, list):
        refused_or_read("\n".join(json.dumps(v) for v in value).encode(), "x.jsonl")


JAPANESE = st.sampled_from("あいうえおかきくけこ日本語の質問答えです。、「」ー・　？！")
PLAIN = st.text(st.characters(codec="utf-8") | JAPANESE, min_size=1, max_size=40).filter(str.strip)
STANDARD_ROW = st.tuples(PLAIN, PLAIN, PLAIN).filter(lambda t: t[1] != t[2]).map(
    lambda t: {"prompt": t[0], "chosen": t[1], "rejected": t[2]})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("roundtrip")


@PROPERTY
@given(rows=st.lists(STANDARD_ROW, min_size=1, max_size=8))
def test_valid_standard_rows_round_trip(rows, folder):
    path = write_json(rows, folder / "rows.json")
    assert read_preferences(path).rows == rows
    lines = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    assert read_preferences(lines.encode(), name="rows.jsonl").rows == rows
