"""The CSV writer: cell encoding, formula-injection guard, declared and inferred columns."""

from __future__ import annotations

import csv
import io
import json
import re
import typing

import pandas
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.export.csv_writer import CsvExportWriter, csv_cell

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write(rows: list[dict], columns: list[str] | None = None, infer_from_rows: int = 1000) -> tuple[str, CsvExportWriter]:
    stream = io.StringIO(newline="")
    writer = CsvExportWriter(stream, columns, infer_from_rows=infer_from_rows)
    for row in rows:
        writer.write_row(row)
    writer.finish()
    return stream.getvalue(), writer


def read(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


@pytest.mark.parametrize("value, cell", [
    (35, "35"), (22.75, "22.75"), (35.0, "35.0"), (-3, "-3"), (0, "0"),
    ("YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew=", "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="),
    ("2018-03-16T10:01:01.673Z", "2018-03-16T10:01:01.673Z"),
    (True, "true"), (False, "false"), (None, ""),
    ({"offer_id": 2, "prime": False}, '{"offer_id":2,"prime":false}'),
    ([1, "a/b", None], '[1,"a/b",null]'),
])
def test_cells_keep_numbers_and_strings_and_spell_booleans_null_and_nesting(value: typing.Any, cell: str) -> None:
    assert csv_cell(value) == cell


@pytest.mark.parametrize("value", ["=1+1", "=HYPERLINK(\"http://x\")", "+cmd", "-2+3", "@SUM(A1)", "-", "+",
                                   "\tx", "\r=1", "+vLAIwHTf3zXqLi1rd/S9AjcOJFGHS2LwQN6p6V7nI=x",
                                   "+SUM(A1)+HYPERLINK(1)+aaaaaaaaaaaaaaaaaaaaaaaaaa="])
def test_formula_like_strings_are_prefixed_with_a_quote(value: str) -> None:
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["-5", "+3.25", "-0.5e-3", "-.5", "42"])
def test_signed_numbers_written_as_strings_stay_numbers(value: str) -> None:
    assert csv_cell(value) == value


@pytest.mark.parametrize("value", ["+KFxc7p6N6GbT8PPDtujnhp4FUSeq3cp3HwLumk2GlI=", "/9Qj3UKaNep4GpXXtKLFt8Y1hEMTH1KQd+p+wFwvt/I="])
def test_merchant_ids_starting_with_plus_stay_unchanged_so_merchants_can_match_them(value: str) -> None:
    assert csv_cell(value) == value


@given(st.text())
def test_a_string_cell_is_the_string_unless_it_could_run_as_a_formula(value: str) -> None:
    cell = csv_cell(value)
    if cell != value:
        assert value.startswith(FORMULA_STARTS) and cell == "'" + value
    if cell.startswith(FORMULA_STARTS):
        # Only a plain signed number or a base64 id (no parentheses: no function) may start like a formula.
        if not re.fullmatch(r"\+[A-Za-z0-9+/]{42}=", cell):
            assert re.fullmatch(r"[+-][0-9.eE+-]+", cell)
            float(cell)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)


@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), json_values), max_size=10))
def test_rows_read_back_cell_for_cell(rows: list[dict]) -> None:
    text, writer = write(rows, ["a", "b", "c"])
    assert read(text) == [["a", "b", "c"]] + [[csv_cell(row.get(column)) for column in "abc"] for row in rows]
    assert writer.rows_written == len(rows)


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=4)
       .filter(lambda value: value != {}))
def test_nested_values_are_compact_json_that_parses_back(value: dict) -> None:
    text, _ = write([{"value": value}], ["value"])
    assert json.loads(read(text)[1][0]) == value


def test_empty_export_with_declared_columns_is_the_header_only() -> None:
    text, writer = write([], ["offer_id", "timestamp"])
    assert text == "offer_id,timestamp\r\n"
    assert writer.rows_written == 0


def test_empty_export_with_inferred_columns_still_has_a_timestamp_header() -> None:
    text, _ = write([])
    assert text == "timestamp\r\n"
    assert list(pandas.read_csv(io.StringIO(text), parse_dates=["timestamp"]).columns) == ["timestamp"]


def test_columns_are_inferred_from_the_first_rows_in_first_seen_order() -> None:
    text, writer = write([{"b": 1, "a": 2}, {"a": 3, "c": True}])
    assert read(text) == [["b", "a", "c"], ["1", "2", ""], ["", "3", "true"]]
    assert writer.columns == ["b", "a", "c"]
    assert writer.dropped_key_count == 0


def test_keys_first_seen_after_the_inference_window_are_dropped_and_counted() -> None:
    rows = [{"a": 1}, {"a": 2, "b": 3}, {"a": 4, "late": 5}, {"late": 6, "later": 7}]
    text, writer = write(rows, infer_from_rows=2)
    assert read(text) == [["a", "b"], ["1", ""], ["2", "3"], ["4", ""], ["", ""]]
    assert writer.dropped_keys == {"late": 2, "later": 1}
    assert writer.dropped_key_count == 3


def test_declared_columns_ignore_other_keys_without_counting_them() -> None:
    text, writer = write([{"a": 1, "extra": 2}], ["a"])
    assert read(text) == [["a"], ["1"]]
    assert writer.dropped_key_count == 0


def test_declared_header_is_written_before_any_row() -> None:
    stream = io.StringIO()
    CsvExportWriter(stream, ["timestamp", "price"])
    assert stream.getvalue() == "timestamp,price\r\n"


def test_cells_with_commas_quotes_and_newlines_survive_pandas() -> None:
    rows = [{"timestamp": "2018-03-16T10:01:01.673Z", "note": 'a, "quoted"\nline', "price": 22.75}]
    text, _ = write(rows, ["timestamp", "note", "price"])
    frame = pandas.read_csv(io.StringIO(text), parse_dates=["timestamp"])
    assert frame["note"][0] == 'a, "quoted"\nline'
    assert frame["price"][0] == 22.75
    assert frame["timestamp"][0] == pandas.Timestamp("2018-03-16T10:01:01.673Z")
