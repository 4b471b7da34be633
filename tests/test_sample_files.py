"""Reading samples written elsewhere without a database (app/sample_files.py): each column
shape's columns, a mapping overriding one field, what each file type reads and refuses, the
exact caps, and the row (1-based, the header not counted) and column a refusal names. Small
files made in memory; tests/test_sample_evaluations.py takes files through the API."""

from __future__ import annotations

import io
import json
from datetime import date, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.errors import (
    EmptyRow,
    InvalidEncoding,
    MissingColumn,
    PayloadTooLarge,
    SampleFileError,
    TooManySamples,
)
from app.sample_files import (
    MAX_LABEL_CHARS,
    MAX_LINE_VALUES,
    MAX_PARQUET_METADATA_LIST,
    MAX_PARQUET_VALUES,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    MAX_SAMPLES,
    MAX_THOUGHT_CHARS,
    MAX_THOUGHT_LIST_VALUES,
    MAX_THOUGHTS,
    Sample,
    is_mapping_field,
    read_samples,
    samples_of,
)

CAP = 1 << 30  # the reader's own checks alone


def jsonl(*rows: dict[str, Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def parquet(table: pa.Table, **options: Any) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, **options)
    return out.getvalue()


def refusal(raw: bytes, file_type: str, *, error: type[Exception] = SampleFileError, **options: Any) -> Any:
    """The refusal of the file, checked to be `error`."""
    with pytest.raises(error) as refused:
        read_samples(raw, file_type, max_bytes=options.pop("max_bytes", CAP), **options)  # type: ignore[arg-type]
    return refused.value


def only(raw: bytes, file_type: str, **options: Any) -> Sample:
    [sample] = read_samples(raw, file_type, max_bytes=CAP, **options)  # type: ignore[arg-type]
    return sample


# --- the column shapes, and a mapping over them ---------------------------------------------

ROW = {
    "prompt": "Why?",
    "thoughts": ["First.", "Second."],
    "response": "Because.",
    "label": "safe",
    "is_safe": False,
    "type": "homonyms",
    "forbidden_prompt": "How do I do harm?",
    "category": "Violence",
}


@pytest.mark.parametrize(
    ("format", "expected"),
    [
        ("generic", Sample("Why?", ["First.", "Second."], "Because.", "safe", {})),
        ("cot", Sample("Why?", ["First.", "Second."], "Because.", None, {})),
        ("safety", Sample("Why?", [], "Because.", "unsafe", {})),
        ("over_refusal", Sample("Why?", [], "Because.", "safe", {"type": "homonyms"})),
        ("jailbreak", Sample("How do I do harm?", [], "Because.", None, {"category": "Violence"})),
    ],
)
def test_each_shape_reads_its_columns_and_no_other(format: str, expected: Sample) -> None:
    assert only(jsonl(ROW), "jsonl", format=format) == expected
    assert samples_of([ROW], format, {}) == [expected]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("format", "required"),
    [
        ("generic", ["prompt", "response"]),
        ("cot", ["prompt", "thoughts", "response"]),
        ("safety", ["prompt", "response", "is_safe"]),
        ("over_refusal", ["prompt", "response", "label", "type"]),
        ("jailbreak", ["forbidden_prompt", "response", "category"]),
    ],
)
def test_each_shape_requires_its_columns_but_the_optional_ones(format: str, required: list[str]) -> None:
    for column in required:
        row = {name: value for name, value in ROW.items() if name != column}
        refused = refusal(jsonl(ROW, row), "jsonl", error=MissingColumn, format=format)
        assert refused.details == {"row": 2, "column": column}
        assert refused.message.startswith(f"row 2 has no column '{column}' (the ")
    kept = {name: value for name, value in ROW.items() if name in required}
    assert len(read_samples(jsonl(kept), "jsonl", format=format, max_bytes=CAP)) == 1  # type: ignore[arg-type]


def test_a_mapping_overrides_one_field_and_the_shape_keeps_the_others() -> None:
    row = {
        "question": "Why?",
        "response": "Because.",
        "prompt": "not this",
        "verdict": "unsafe",
        "label": "safe",
    }
    sample = only(jsonl(row), "jsonl", columns={"prompt": "question", "label": "verdict"})
    assert (sample.prompt, sample.response, sample.label) == ("Why?", "Because.", "unsafe")


def test_a_column_the_mapping_names_is_required_even_for_an_optional_field() -> None:
    row = {"prompt": "Why?", "response": "Because."}
    assert only(jsonl(row), "jsonl").label is None  # the generic shape's label is optional
    refused = refusal(jsonl(row), "jsonl", error=MissingColumn, columns={"label": "verdict"})
    assert refused.details == {"row": 1, "column": "verdict"}
    assert refused.message == "row 1 has no column 'verdict' (the label)"
    refused = refusal(
        b"prompt,response\nWhy?,Because.\n", "csv", error=MissingColumn, columns={"label": "verdict"}
    )
    assert refused.message == (
        "the file has no column 'verdict' (the label); its columns: prompt, response; "
        "map another with columns"
    )
    assert refused.details == {"row": None, "column": "verdict"}


def test_a_metadata_mapping_copies_its_column_under_its_name_and_an_empty_cell_as_null() -> None:
    columns = {"metadata.source": "origin", "metadata.n": "n"}
    sample = only(b"prompt,response,origin,n\nWhy?,Because.,web,\n", "csv", columns=columns)
    assert sample.metadata == {"source": "web", "n": None}
    sample = only(
        jsonl({"prompt": "Why?", "response": "Because.", "origin": {"a": [1, 2.5, True]}, "n": 0}),
        "jsonl",
        columns=columns,
    )
    assert sample.metadata == {"source": {"a": [1, 2.5, True]}, "n": 0}
    refused = refusal(
        jsonl({"prompt": "Why?", "response": "Because.", "n": 1}),
        "jsonl",
        error=MissingColumn,
        columns=columns,
    )
    assert refused.details == {"row": 1, "column": "origin"}


def test_mapping_fields_are_the_sample_fields_and_named_metadata() -> None:
    assert all(is_mapping_field(name) for name in ("prompt", "thoughts", "response", "label", "metadata.x"))
    assert not any(is_mapping_field(name) for name in ("metadata.", "metadata", "Prompt", "source", ""))


@pytest.mark.parametrize(
    ("is_safe", "label"),
    [
        (True, "safe"),
        (False, "unsafe"),
        ("true", "safe"),
        (" TRUE ", "safe"),
        ("1", "safe"),
        ("yes", "safe"),
        ("Safe", "safe"),
        ("false", "unsafe"),
        ("0", "unsafe"),
        ("No", "unsafe"),
        ("unsafe", "unsafe"),
        (1, "safe"),
        (0, "unsafe"),
        ("", None),
    ],
)
def test_the_safety_shape_reads_is_safe_as_a_boolean_into_the_label(is_safe: Any, label: str | None) -> None:
    [sample] = samples_of([{"prompt": "Why?", "response": "Because.", "is_safe": is_safe}], "safety", {})
    assert sample.label == label


@pytest.mark.parametrize("is_safe", ["maybe", 2, "truthy", None, "y" * 41])
def test_an_is_safe_that_is_no_boolean_is_refused_naming_its_row_and_column(is_safe: Any) -> None:
    rows = [{"prompt": "Why?", "response": "Because.", "is_safe": True}] * 2
    rows[1] = {**rows[1], "is_safe": is_safe}
    if is_safe is None:  # a null label is no label, as in every shape
        assert samples_of(rows, "safety", {})[1].label is None
        return
    with pytest.raises(SampleFileError) as refused:
        samples_of(rows, "safety", {})
    assert refused.value.message == (
        f"row 2, column 'is_safe': expected a boolean (true/false), got {str(is_safe)[:40]!r}"
    )
    assert refused.value.details == {"row": 2, "column": "is_safe"}


def test_a_label_is_text_numbers_and_booleans_as_json_writes_them_up_to_its_cap() -> None:
    labels = ["harmful", 3, 2.5, True, None, "", "x" * MAX_LABEL_CHARS]
    rows = [{"prompt": "Why?", "response": "Because.", "label": label} for label in labels]
    assert [s.label for s in samples_of(rows, "generic", {})] == [
        "harmful",
        "3",
        "2.5",
        "true",
        None,
        None,
        "x" * MAX_LABEL_CHARS,
    ]
    rows.append({"prompt": "Why?", "response": "Because.", "label": "x" * (MAX_LABEL_CHARS + 1)})
    with pytest.raises(SampleFileError) as refused:
        samples_of(rows, "generic", {})
    assert (
        refused.value.message
        == f"row 8, column 'label': a label of 201 characters; at most {MAX_LABEL_CHARS}"
    )
    assert refused.value.details == {"row": 8, "column": "label"}


# --- prompts, responses and thoughts ----------------------------------------------------------


@pytest.mark.parametrize(("field", "cap"), [("prompt", MAX_PROMPT_CHARS), ("response", MAX_RESPONSE_CHARS)])
def test_a_prompt_or_response_is_text_of_at_most_its_cap(field: str, cap: int) -> None:
    row = {"prompt": "Why?", "response": "Because."}
    [sample] = samples_of([{**row, field: "x" * cap}], "generic", {})
    assert getattr(sample, field) == "x" * cap
    with pytest.raises(SampleFileError) as refused:
        samples_of([row, {**row, field: "x" * (cap + 1)}], "generic", {})
    assert refused.value.message == f"row 2, column '{field}': {cap + 1:,} characters; at most {cap:,}"
    assert refused.value.details == {"row": 2, "column": field}
    with pytest.raises(SampleFileError) as refused:
        samples_of([{**row, field: 12}], "generic", {})
    assert refused.value.message == f"row 1, column '{field}': expected text, got int"


@pytest.mark.parametrize("empty", ["", "  \n", None])
def test_an_empty_prompt_or_response_is_an_empty_row_naming_the_field_and_column(empty: Any) -> None:
    row = {"question": "Why?", "response": "Because."}
    for field, column in (("prompt", "question"), ("response", "response")):
        with pytest.raises(EmptyRow) as refused:
            samples_of([row, {**row, column: empty}], "generic", {"prompt": "question"})
        assert refused.value.message == f"row 2: the {field} ('{column}') is empty"
        assert refused.value.details == {"row": 2, "column": column}


def test_a_row_of_empty_cells_is_an_empty_row() -> None:
    refused = refusal(b"prompt,response,label\nWhy?,Because.,\n,,\n", "csv", error=EmptyRow)
    assert (refused.message, refused.details) == ("row 2 is empty", {"row": 2, "column": None})
    with pytest.raises(EmptyRow, match="^row 1 is empty$"):
        samples_of([{"prompt": None, "response": ""}], "generic", {})


@pytest.mark.parametrize(
    ("thoughts", "read"),
    [
        (["One.", " ", "Two."], ["One.", "Two."]),  # blank thoughts dropped
        ("One.\n\n  Two.  \r\nThree.", ["One.", "Two.", "Three."]),
        (
            "One.\rTwo.\vThree.\fFour.\x1cFive.\x85Six.\u2028Seven.\u2029Eight.",
            [
                "One.",
                "Two.",
                "Three.",
                "Four.",
                "Five.",
                "Six.",
                "Seven.",
                "Eight.",
            ],
        ),
        ('  ["One.", "Two, then three."]', ["One.", "Two, then three."]),
        ("[step 1] look.\n[step 2] answer.", ["[step 1] look.", "[step 2] answer."]),  # not JSON
        ("", []),
        (None, []),
        ([], []),
    ],
)
def test_thoughts_are_a_list_json_list_text_or_text_one_a_line(thoughts: Any, read: list[str]) -> None:
    [sample] = samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": thoughts}], "generic", {})
    assert sample.thoughts == read


@pytest.mark.parametrize(
    "thoughts", [[1, 2], "[1, 2]", '[{"a": 1}]', 3, ["ok", None], '["a", null]', {"a": 1}]
)
def test_thoughts_that_are_no_list_of_strings_are_refused(thoughts: Any) -> None:
    with pytest.raises(SampleFileError) as refused:
        samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": thoughts}], "cot", {})
    assert refused.value.message == (
        "row 1, column 'thoughts': expected a list of strings, or text with one thought a line"
    )


@pytest.mark.parametrize("as_text", [False, True], ids=["list", "lines"])
def test_at_most_max_thoughts_of_at_most_max_chars_each(as_text: bool) -> None:
    def read(thoughts: list[str]) -> list[str]:
        value: Any = "\n".join(thoughts) if as_text else thoughts
        [sample] = samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": value}], "cot", {})
        return sample.thoughts

    most = [f"t{n} " + "x" * 300 for n in range(MAX_THOUGHTS)]  # 30,000 characters in all
    assert read(most) == most
    assert read(["t", "x" * MAX_THOUGHT_CHARS]) == ["t", "x" * MAX_THOUGHT_CHARS]
    with pytest.raises(SampleFileError, match=f"column 'thoughts': over {MAX_THOUGHTS} thoughts$"):
        read([*most, "one more"])
    with pytest.raises(SampleFileError, match=f"a thought is over {MAX_THOUGHT_CHARS:,} characters$"):
        read(["t", "x" * (MAX_THOUGHT_CHARS + 1)])


def test_a_thoughts_line_far_past_the_cap_is_refused_unread() -> None:
    with pytest.raises(SampleFileError, match=f"a thought is over {MAX_THOUGHT_CHARS:,} characters$"):
        samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": "t\n" + "x" * 10**6}], "cot", {})


def test_a_thoughts_line_is_read_whole_up_to_twice_a_thoughts_cap() -> None:
    """A line longer is no thought, blanks around it or not: it is not matched whole."""
    thought = "x" * MAX_THOUGHT_CHARS
    line = " " * MAX_THOUGHT_CHARS + thought
    [sample] = samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": f"t\n{line}"}], "cot", {})
    assert sample.thoughts == ["t", thought]
    with pytest.raises(SampleFileError, match=f"a thought is over {MAX_THOUGHT_CHARS:,} characters$"):
        samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": f"t\n {line}"}], "cot", {})


def test_thoughts_json_text_of_exactly_the_values_a_list_may_hold_is_decoded() -> None:
    text = json.dumps(["t"] * (MAX_THOUGHT_LIST_VALUES - 1))  # the list and its strings
    with pytest.raises(SampleFileError, match=f"over {MAX_THOUGHTS} thoughts$") as refused:
        samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": text}], "cot", {})
    assert "JSON values" not in refused.value.message  # decoded: not read one thought a line
    over = json.dumps(["t"] * MAX_THOUGHT_LIST_VALUES)
    with pytest.raises(SampleFileError, match=f"over {MAX_THOUGHT_LIST_VALUES:,} JSON values, more than"):
        samples_of([{"prompt": "Why?", "response": "Because.", "thoughts": over}], "cot", {})


def test_thoughts_text_opening_with_a_bracket_of_more_commas_than_json_values_is_read_a_line_each() -> None:
    lines = [f"[step {n}] " + "a, " * 120 + "so on." for n in range(90)]  # 10,800 commas, not JSON
    [sample] = samples_of(
        [{"prompt": "Why?", "response": "Because.", "thoughts": "\n".join(lines)}], "cot", {}
    )
    assert sample.thoughts == lines


def test_thoughts_json_text_with_nul_or_a_long_number_is_refused_as_ever() -> None:
    rows = [{"prompt": "Why?", "response": "Because.", "thoughts": '["a\\u0000b"]'}]
    with pytest.raises(SampleFileError, match="column 'thoughts': text must not contain the NUL"):
        samples_of(rows, "cot", {})
    rows = [{"prompt": "Why?", "response": "Because.", "thoughts": "[" + "1" * 101 + "]"}]
    with pytest.raises(SampleFileError, match="column 'thoughts': numbers must have at most"):
        samples_of(rows, "cot", {})


# --- how many samples -------------------------------------------------------------------------


def test_a_file_holds_at_most_max_samples_and_at_least_one() -> None:
    row = {"prompt": "Why?", "response": "Because."}
    assert len(samples_of([row] * MAX_SAMPLES, "generic", {})) == MAX_SAMPLES
    with pytest.raises(TooManySamples) as refused:
        samples_of([row] * (MAX_SAMPLES + 1), "generic", {})
    assert refused.value.details == {"row": MAX_SAMPLES + 1, "column": None}
    assert refused.value.message == f"the file holds over {MAX_SAMPLES:,} samples"
    with pytest.raises(EmptyRow, match="^the file holds no sample$"):
        samples_of([], "generic", {})
    for raw, file_type in ((b"", "jsonl"), (b"prompt,response\n", "csv"), (b"", "csv")):
        assert refusal(raw, file_type, error=MissingColumn if raw == b"" and file_type == "csv" else EmptyRow)


def test_a_jsonl_file_of_more_lines_than_samples_is_refused_before_it_is_split() -> None:
    line = b'{"prompt": "Why?", "response": "Because."}\n'
    assert len(read_samples(line * MAX_SAMPLES, "jsonl", max_bytes=CAP)) == MAX_SAMPLES
    refused = refusal(line * MAX_SAMPLES + b"\n\n", "jsonl", error=TooManySamples)
    assert refused.message == f"the file holds over {MAX_SAMPLES:,} samples"
    assert refused.details == {"row": MAX_SAMPLES + 1, "column": None}
    refused = refusal(line * MAX_SAMPLES + b"\n", "jsonl", error=EmptyRow)  # as ever: an empty row
    assert refused.details == {"row": MAX_SAMPLES + 1, "column": None}


# --- JSONL ------------------------------------------------------------------------------------


def test_jsonl_lines_are_rows_the_last_newline_and_a_byte_order_mark_let_through() -> None:
    rows = [{"prompt": f"Why {n}?", "response": "Because."} for n in range(3)]
    for raw in (
        jsonl(*rows),
        jsonl(*rows).rstrip(b"\n"),
        b"\xef\xbb\xbf" + jsonl(*rows),
        jsonl(*rows) + b"  ",
    ):
        assert [s.prompt for s in read_samples(raw, "jsonl", max_bytes=CAP)] == ["Why 0?", "Why 1?", "Why 2?"]
    crlf = jsonl(*rows).replace(b"\n", b"\r\n")
    assert len(read_samples(crlf, "jsonl", max_bytes=CAP)) == 3


@pytest.mark.parametrize(
    ("line", "message", "error"),
    [
        (b"", "row 2 is empty", EmptyRow),
        (b"  \t", "row 2 is empty", EmptyRow),
        (
            b'{"prompt": "Why?"',
            "row 2 is not JSON: Expecting ',' delimiter: line 1 column 18 (char 17)",
            SampleFileError,
        ),
        (b'["Why?", "Because."]', "row 2 is not a JSON object", SampleFileError),
        (
            b'{"prompt": "Why?", "response": "Because.", "n": ' + b"1" * 101 + b"}",
            "row 2: numbers must have at most 100 characters",
            SampleFileError,
        ),
    ],
    ids=["empty", "blank", "not-json", "not-an-object", "long-number"],
)
def test_a_jsonl_line_that_is_no_sample_is_refused_naming_its_row(
    line: bytes, message: str, error: type[Exception]
) -> None:
    raw = (
        jsonl({"prompt": "Why?", "response": "Because."})
        + line
        + b"\n"
        + jsonl({"prompt": "Why?", "response": "Because."})
    )
    refused = refusal(raw, "jsonl", error=error)
    assert (refused.message, refused.details) == (message, {"row": 2, "column": None})


def test_a_jsonl_line_holds_at_most_max_line_values() -> None:
    def line(values: int) -> bytes:  # the object, its two strings, the list and its numbers
        return b'{"prompt": "p", "response": "r", "n": [' + b",".join([b"0"] * (values - 4)) + b"]}\n"

    assert len(read_samples(line(MAX_LINE_VALUES), "jsonl", max_bytes=CAP)) == 1
    refused = refusal(
        jsonl({"prompt": "p", "response": "r"}) + line(MAX_LINE_VALUES + 1), "jsonl", error=PayloadTooLarge
    )
    assert refused.message == f"row 2 holds over {MAX_LINE_VALUES:,} JSON values, more than a sample needs"
    assert refused.details == {"row": 2, "column": None}


# --- not UTF-8 --------------------------------------------------------------------------------


def test_text_that_is_not_utf8_is_refused_at_the_row_of_its_first_bad_byte() -> None:
    good = b'{"prompt": "Caf\xc3\xa9?", "response": "Oui."}\n'
    raw = good * 2 + b'{"prompt": "Caf\xe9?", "response": "Non."}\n' + b"\xff\n"
    refused = refusal(raw, "jsonl", error=InvalidEncoding)
    offset = len(good * 2) + 15
    assert (
        refused.message == f"row 3 is not UTF-8 text (byte 0xe9 at offset {offset}); save the file as UTF-8"
    )
    assert refused.details == {"row": 3, "column": None}

    csv_raw = b'prompt,response\n"Caf\xc3\xa9,\nthen?",Oui.\nCaf\xe9?,Non.\n'
    refused = refusal(csv_raw, "csv", error=InvalidEncoding)
    assert refused.message.startswith("row 2 is not UTF-8 text (byte 0xe9")  # a record, not a line
    assert refused.details == {"row": 2, "column": None}
    refused = refusal(b"prompt,r\xe9ponse\nWhy?,Because.\n", "csv", error=InvalidEncoding)
    assert refused.message.startswith("the header is not UTF-8 text (byte 0xe9 at offset 8)")
    assert refused.details == {"row": None, "column": None}


@pytest.mark.parametrize(
    ("raw", "file_type", "row", "offset"),
    [
        (b'{"prompt": "Why?", "response": "Because."}\n\xff\n', "jsonl", 2, 46),
        (b"prompt,response\n\xff,Because.\n", "csv", 1, 19),
        (b'{"prompt": "\xc3\xa9\xc3\xa9\xff", "response": "b"}\n', "jsonl", 1, 19),
        (b"\xff", "jsonl", 1, 3),
    ],
    ids=["jsonl-line-start", "csv-row-start", "after-two-byte-characters", "first-byte"],
)
def test_a_byte_order_mark_moves_no_bad_byte_to_another_row_or_offset(
    raw: bytes, file_type: str, row: int, offset: int
) -> None:
    """The codec's error counts from after the mark: the text before the bad byte was taken
    three bytes short, naming the row before one that starts with it (the header for the first
    row) or cutting a character in two (a UnicodeDecodeError: a 500)."""
    refused = refusal(b"\xef\xbb\xbf" + raw, file_type, error=InvalidEncoding)
    assert (
        refused.message
        == f"row {row} is not UTF-8 text (byte 0xff at offset {offset}); save the file as UTF-8"
    )
    assert refused.details == {"row": row, "column": None}


# --- CSV --------------------------------------------------------------------------------------


def test_csv_cells_are_read_by_the_header_quoted_newlines_and_a_byte_order_mark_let_through() -> None:
    raw = '\ufeffresponse,prompt,extra\r\n"Because,\r\nwhy not.",Why?,\r\nNo.,"Say ""no"".",x\r\n'.encode()
    samples = read_samples(raw, "csv", max_bytes=CAP)
    assert [(s.prompt, s.response) for s in samples] == [
        ("Why?", "Because,\r\nwhy not."),
        ('Say "no".', "No."),
    ]


def test_csv_rows_may_end_in_a_carriage_return_alone() -> None:
    samples = read_samples(b"prompt,response\rWhy?,Because.\rHow?,So.\r", "csv", max_bytes=CAP)
    assert [(s.prompt, s.response) for s in samples] == [("Why?", "Because."), ("How?", "So.")]


def test_csv_that_is_not_csv_is_refused_naming_the_row_and_the_problem() -> None:
    problem = "',' expected after '\"'"
    for raw, row in (
        (b'prompt,response\nWhy?,Because.\n"a"b,c\n', 2),
        (b'prompt,response\nWhy?,Because.\n"a"b,c\nd,\xff\n', 2),  # and then not UTF-8
        (b'"prompt"x,response\nWhy?,Because.\n', 1),  # the header: the first row
        (b'"prompt"x,response\nd,\xff\n', 1),
    ):
        refused = refusal(raw, "csv")
        assert type(refused) is SampleFileError
        assert (refused.message, refused.details) == (
            f"row {row} is not CSV: {problem}",
            {"row": row, "column": None},
        )


def test_a_csv_row_of_more_cells_than_the_header_is_refused_and_of_fewer_misses_its_columns() -> None:
    refused = refusal(b"prompt,response\nWhy?,Because.\na,b,c\n", "csv")
    assert (refused.message, refused.details) == (
        "row 2 has 3 cells, the header 2",
        {"row": 2, "column": None},
    )
    refused = refusal(b"prompt,response\nWhy?,Because.\nWhy?\n", "csv", error=MissingColumn)
    assert (refused.message, refused.details) == (
        "row 2 has no column 'response' (the response)",
        {"row": 2, "column": "response"},
    )
    assert only(b"prompt,response,label\nWhy?,Because.\n", "csv").label is None


def test_a_csv_cell_may_be_longer_than_csvs_default_cap_but_not_without_bound() -> None:
    long_cell = "x" * 4 * MAX_RESPONSE_CHARS
    raw = f"prompt,response,label\nWhy?,Because.,x\nWhy?,Because.,{long_cell}\n".encode()
    refused = refusal(raw, "csv")
    assert refused.message == f"row 2, column 'label': a label of {len(long_cell):,} characters; at most 200"
    refused = refusal(raw.replace(b"x\n", b"xx\n"), "csv")
    assert refused.message.startswith("row 2 is not CSV: field larger than field limit")
    assert refused.details == {"row": 2, "column": None}


def test_a_csv_file_with_no_header_misses_every_column() -> None:
    refused = refusal(b"", "csv", error=MissingColumn)
    assert (
        refused.message
        == "the file has no column 'prompt' (the prompt); its columns: (none); map another with columns"
    )


def test_a_missing_column_lists_at_most_fifty_of_the_files_columns() -> None:
    header = ",".join(f"c{n}" for n in range(60))
    refused = refusal(f"{header}\n".encode(), "csv", error=MissingColumn)
    assert f"its columns: {', '.join(f'c{n}' for n in range(50))}; map another" in refused.message


# --- Parquet ----------------------------------------------------------------------------------


def test_parquet_reads_the_mapped_columns_of_every_type_json_holds() -> None:
    table = pa.table(
        {
            "prompt": ["Why?", "How?"],
            "response": pa.array(["Because.", "So."]).dictionary_encode(),
            "thoughts": [["One.", "Two."], None],
            "label": [True, None],
            "meta": [{"n": 1, "at": date(2026, 12, 7), "tags": ["a"]}, None],
            "when": pa.array([time(16, 30), None], pa.time64("us")),
            "score": [0.5, None],
        }
    )
    columns = {"metadata.meta": "meta", "metadata.when": "when", "metadata.score": "score"}
    samples = read_samples(parquet(table), "parquet", columns=columns, max_bytes=CAP)
    assert samples == [
        Sample(
            "Why?",
            ["One.", "Two."],
            "Because.",
            "true",
            {
                "meta": {"n": 1, "at": "2026-12-07", "tags": ["a"]},
                "when": "16:30:00",
                "score": 0.5,
            },
        ),
        Sample("How?", [], "So.", None, {"meta": None, "when": None, "score": None}),
    ]


def test_a_parquet_file_without_a_mapped_column_is_refused_naming_it() -> None:
    raw = parquet(pa.table({"question": ["Why?"], "response": ["Because."]}))
    refused = refusal(raw, "parquet", error=MissingColumn)
    assert refused.message == (
        "the file has no column 'prompt' (the prompt); its columns: question, response; "
        "map another with columns"
    )
    assert only(raw, "parquet", columns={"prompt": "question"}).prompt == "Why?"


def test_rows_past_the_first_batch_are_named_by_their_number_in_the_file() -> None:
    prompts = [f"Why {n}?" for n in range(70)]
    prompts[65] = ""
    raw = parquet(pa.table({"prompt": prompts, "response": ["Because."] * 70}), row_group_size=40)
    refused = refusal(raw, "parquet", error=EmptyRow)
    assert refused.details == {"row": 66, "column": "prompt"}
    prompts[65] = "Why 65?"
    raw = parquet(pa.table({"prompt": prompts, "response": ["Because."] * 70}), row_group_size=40)
    assert [s.prompt for s in read_samples(raw, "parquet", max_bytes=CAP)] == prompts


def test_a_parquet_file_of_more_rows_than_samples_is_refused_by_its_metadata() -> None:
    raw = parquet(
        pa.table({"prompt": ["Why?"] * (MAX_SAMPLES + 1), "response": ["Because."] * (MAX_SAMPLES + 1)})
    )
    refused = refusal(raw, "parquet", error=TooManySamples)
    assert refused.message == f"the file holds {MAX_SAMPLES + 1:,} samples; at most {MAX_SAMPLES:,}"
    raw = parquet(pa.table({"prompt": ["Why?"] * MAX_SAMPLES, "response": ["Because."] * MAX_SAMPLES}))
    assert len(read_samples(raw, "parquet", max_bytes=CAP)) == MAX_SAMPLES


def test_a_file_that_is_not_parquet_is_refused() -> None:
    refused = refusal(b"PAR1 not really", "parquet")
    assert type(refused) is SampleFileError
    assert refused.message.startswith("the file is not Parquet: ")
    assert refused.details == {"row": None, "column": None}


def test_a_parquet_file_whose_metadata_lists_more_columns_than_samples_need_is_refused() -> None:
    """Each is read and walked however little it holds; the schema lists its root as well."""
    columns: dict[str, list[str | None]] = {"prompt": ["Why?"], "response": ["Because."]}
    columns |= {f"extra{n}": [None] for n in range(MAX_PARQUET_METADATA_LIST - 2)}
    refused = refusal(parquet(pa.table(columns), write_statistics=False), "parquet", error=PayloadTooLarge)
    assert (
        refused.message
        == f"the file's metadata lists over {MAX_PARQUET_METADATA_LIST:,} row groups or columns"
    )


def _values_table(thoughts_each: int, rows: int) -> pa.Table:
    return pa.table(
        {
            "prompt": ["p"] * rows,
            "response": ["r"] * rows,
            "thoughts": [["t"] * thoughts_each] * rows,
            "thoughts_unmapped": [["u"] * 500] * rows,  # not the thoughts' leaf, though named alike
            "other": [["o"] * 500] * rows,
        }
    )


def test_the_mapped_columns_hold_at_most_max_parquet_values() -> None:
    """No file of valid samples holds that many: one at the cap is read, and refused for
    its thoughts, not its values."""
    rows = 100
    each = MAX_PARQUET_VALUES // rows - 2  # the prompt's and response's value a row
    refused = refusal(parquet(_values_table(each, rows)), "parquet")
    assert refused.message == f"row 1, column 'thoughts': over {MAX_THOUGHTS} thoughts"
    refused = refusal(parquet(_values_table(each + 1, rows)), "parquet", error=PayloadTooLarge)
    assert refused.message == (
        f"the file's mapped columns hold {MAX_PARQUET_VALUES + rows:,} values; at most {MAX_PARQUET_VALUES:,}"
    )


def test_the_mapped_columns_are_counted_in_every_row_group() -> None:
    rows = 100
    each = MAX_PARQUET_VALUES // rows - 2
    refused = refusal(
        parquet(_values_table(each + 1, rows), row_group_size=10), "parquet", error=PayloadTooLarge
    )
    assert f"hold {MAX_PARQUET_VALUES + rows:,} values" in refused.message


def _sized(rows: int, text: str, **options: Any) -> bytes:
    return parquet(
        pa.table({"prompt": [text] * rows, "response": ["r"] * rows, "unmapped": ["u" * 5000] * rows}),
        **options,
    )


def test_the_mapped_columns_may_be_stored_in_at_most_max_bytes() -> None:
    raw = _sized(4, "p" * 1000, use_dictionary=False, compression="none")
    stored = sum(
        pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0).column(i).total_uncompressed_size
        for i in (0, 1)
    )
    assert len(read_samples(raw, "parquet", max_bytes=stored)) == 4
    refused = refusal(raw, "parquet", error=PayloadTooLarge, max_bytes=stored - 1)
    assert (
        refused.message
        == f"the file's mapped columns hold {stored:,} bytes uncompressed; at most {stored - 1:,}"
    )


def test_the_mapped_columns_may_decode_to_at_most_max_bytes_counted_a_batch_at_a_time() -> None:
    """A value repeated is stored once and decoded every time it is used: 70 prompts of 1,000
    characters in a dictionary, read in 3 batches of at most 32 rows."""
    raw = _sized(70, "p" * 1000, compression="zstd")
    decoded = 70 * (4 + 1000) + 70 * (4 + 1)  # each row: an index and its value, the prompt's and response's
    assert len(read_samples(raw, "parquet", max_bytes=decoded)) == 70
    labelled = parquet(pa.table({"prompt": ["p" * 1000] * 70, "response": ["r"] * 70, "label": [""] * 70}))
    assert len(read_samples(labelled, "parquet", max_bytes=decoded + 70 * 4)) == 70  # "" decodes to nothing
    refused = refusal(raw, "parquet", error=PayloadTooLarge, max_bytes=decoded - 1)
    assert refused.message == f"the file's mapped columns decode to over {decoded - 1:,} bytes"


def test_a_value_repeated_is_decoded_once_until_the_batch_is_counted() -> None:
    """32 prompts of 3 MB, one value in a dictionary: read dictionary-encoded they are counted
    (and refused) holding some 9 MB; read plain, 99 MB are decoded first."""
    raw = parquet(
        pa.table({"prompt": ["p" * 3_000_000] * 32, "response": ["r"] * 32}),
        compression="zstd",
        dictionary_pagesize_limit=1 << 30,
    )
    default, pool = pa.default_memory_pool(), pa.proxy_memory_pool(pa.default_memory_pool())
    pa.set_memory_pool(pool)
    try:
        refused = refusal(raw, "parquet", error=PayloadTooLarge)
    finally:
        pa.set_memory_pool(default)
    assert (
        refused.message
        == "rows 1 to 32: the file's mapped columns decode to over 67,108,864 bytes in 32 rows"
    )
    assert pool.max_memory() < 30_000_000


def test_a_batch_of_32_rows_decodes_to_at_most_64_mib_and_a_refusal_names_its_rows() -> None:
    """The rows are counted 32 at a time: the third batch, rows 65 to 96, is over."""
    big = "p" * 3_000_000  # stored once, in the column's dictionary
    raw = parquet(
        pa.table({"prompt": ["p"] * 64 + [big] * 32, "response": ["r"] * 96}),
        dictionary_pagesize_limit=1 << 30,
    )
    refused = refusal(raw, "parquet", error=PayloadTooLarge)
    assert (
        refused.message
        == "rows 65 to 96: the file's mapped columns decode to over 67,108,864 bytes in 32 rows"
    )


def test_a_batch_of_exactly_64_mib_is_counted_and_read() -> None:
    # 32 prompts of 2,097,143 characters, each an index and its value, and 32 one-letter responses
    # likewise: 32 * (4 + 2_097_143) + 32 * (4 + 1) = 64 MiB.
    raw = parquet(
        pa.table({"prompt": ["p" * 2_097_143] * 32, "response": ["r"] * 32}),
        dictionary_pagesize_limit=1 << 30,
    )
    refused = refusal(raw, "parquet")  # past the batch count, to the first sample
    assert refused.message == f"row 1, column 'prompt': 2,097,143 characters; at most {MAX_PROMPT_CHARS:,}"


def test_thoughts_of_a_list_column_are_counted_decoded() -> None:
    table = pa.table({"prompt": ["p"] * 40, "response": ["r"] * 40, "thoughts": [["t" * 500] * 4] * 40})
    raw = parquet(table, compression="zstd")
    decoded = 40 * 5 + 40 * 5 + 160 * (4 + 500)  # the list's values, its offsets not
    assert len(read_samples(raw, "parquet", max_bytes=decoded)) == 40
    refusal(raw, "parquet", error=PayloadTooLarge, max_bytes=decoded - 1)


def test_metadata_of_a_struct_column_is_counted_decoded() -> None:
    table = pa.table(
        {"prompt": ["p"] * 40, "response": ["r"] * 40, "meta": [{"a": "x" * 500, "b": "y" * 500}] * 40}
    )
    raw = parquet(table, compression="zstd")
    columns = {"metadata.meta": "meta"}
    decoded = 40 * 5 + 40 * 5 + 2 * 40 * (4 + 500)
    assert len(read_samples(raw, "parquet", columns=columns, max_bytes=decoded)) == 40
    refusal(raw, "parquet", error=PayloadTooLarge, columns=columns, max_bytes=decoded - 1)


@pytest.mark.parametrize(
    ("column", "row", "kind"),
    [
        (pa.array([0, 0, 2**40], pa.timestamp("s")), 3, "timestamp[ms]"),  # Parquet holds no seconds
        (
            pa.array([0, 0, 0], pa.timestamp("s", tz="Mars/Olympus_Mons")),
            1,
            "timestamp[ms, tz=Mars/Olympus_Mons]",
        ),
    ],
    ids=["timestamp-past-9999", "unknown-time-zone"],
)
def test_a_parquet_value_python_cannot_read_is_refused_naming_its_row_and_column(
    column: pa.Array, row: int, kind: str
) -> None:
    raw = parquet(pa.table({"prompt": ["Why?"] * 3, "response": ["Because."] * 3, "seen": column}))
    refused = refusal(raw, "parquet", columns={"label": "seen"})
    assert refused.message.startswith(f"row {row}, column 'seen': a {kind} value Python cannot read (")
    assert refused.details == {"row": row, "column": "seen"}


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array([Decimal("1.50")], pa.decimal128(5, 2)), "Decimal"),
        (pa.array([b"\x00\x01"], pa.binary()), "bytes"),
        (pa.array([[timedelta(seconds=3)]], pa.list_(pa.duration("s"))), "timedelta"),
    ],
    ids=["decimal", "binary", "list-of-durations"],
)
def test_a_parquet_value_json_has_no_type_for_is_refused_to_be_cast(column: pa.Array, kind: str) -> None:
    raw = parquet(pa.table({"prompt": ["Why?"], "response": ["Because."], "odd": column}))
    refused = refusal(raw, "parquet", columns={"metadata.odd": "odd"})
    assert (
        refused.message == f"row 1, column 'odd': a {kind} value, which JSON has no type for: cast the column"
    )
    assert refused.details == {"row": 1, "column": "odd"}


def test_a_parquet_string_that_is_not_utf8_is_refused_naming_its_row_and_column() -> None:
    table = pa.table(
        {
            "prompt": pa.array([b"Why?", b"Why?", b"Caf\xe9?"], pa.binary()).view(pa.string()),
            "response": ["Because."] * 3,
        }
    )
    refused = refusal(parquet(table), "parquet", error=InvalidEncoding)
    assert refused.message == "row 3, column 'prompt' is not UTF-8 text"
    assert refused.details == {"row": 3, "column": "prompt"}
