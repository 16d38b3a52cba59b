"""The CSV writer renders lists of rows as the csv module would write them cell by cell."""

from __future__ import annotations

import csv
import io
import typing

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.export.csv_writer import CsvExportWriter, csv_cell

NAMES = ["timestamp", "price", "merchant_id", "note"]
# Characters that matter to CSV (delimiter, quote, line ends) and to spreadsheets (formula starts).
TRICKY = st.text(alphabet=st.sampled_from(list(',"\r\n=+-@\t\x00 ab1.é😀')), max_size=8)
CELLS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64), st.floats(allow_nan=False, allow_infinity=False),
    TRICKY, st.text(max_size=6),
    st.sampled_from(["+KFxc7p6N6GbT8PPDtujnhp4FUSeq3cp3HwLumk2GlI=", "-5", "+3.25", "=SUM(A1)", ""]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["a", "b,c"]), TRICKY, max_size=2),
)
ROWS = st.lists(st.dictionaries(st.sampled_from(NAMES), CELLS), max_size=30)


def written_cell_by_cell(rows: list[dict[str, typing.Any]], columns: list[str]) -> str:
    """The oracle: the csv module's writerow() of csv_cell() of every cell."""
    stream = io.StringIO(newline="")
    writer = csv.writer(stream)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(column)) for column in columns])
    return stream.getvalue()


def write_in_lists(rows: list[dict[str, typing.Any]], cuts: list[int], columns: list[str] | None,
                   infer_from_rows: int = 1000) -> tuple[str, CsvExportWriter]:
    stream = io.StringIO(newline="")
    writer = CsvExportWriter(stream, columns, infer_from_rows=infer_from_rows)
    start = 0
    for cut in sorted(cuts) + [len(rows)]:
        writer.write_rows(rows[start:max(start, cut)])
        start = max(start, cut)
    writer.finish()
    return stream.getvalue(), writer


@settings(max_examples=300, deadline=None)
@given(rows=ROWS, cuts=st.lists(st.integers(0, 30), max_size=4),
       columns=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
def test_rows_written_in_lists_read_as_the_csv_module_writes_each_cell(
        rows: list[dict[str, typing.Any]], cuts: list[int], columns: list[str]) -> None:
    text, writer = write_in_lists(rows, cuts, columns)
    assert text == written_cell_by_cell(rows, columns)
    assert (writer.rows_written, writer.rows_skipped) == (len(rows), 0)


@settings(max_examples=100, deadline=None)
@given(rows=ROWS, cuts=st.lists(st.integers(0, 30), max_size=4), infer_from_rows=st.integers(1, 5))
def test_inferred_columns_are_the_keys_of_the_first_rows_whatever_the_lists(
        rows: list[dict[str, typing.Any]], cuts: list[int], infer_from_rows: int) -> None:
    text, writer = write_in_lists(rows, cuts, None, infer_from_rows)
    columns = list(dict.fromkeys(key for row in rows[:infer_from_rows] for key in row)) or ["timestamp"]
    assert text == written_cell_by_cell(rows, columns)
    late = [key for row in rows[infer_from_rows:] for key in row if key not in columns]
    assert writer.dropped_key_count == len(late)


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text for this one")


def test_a_row_with_a_cell_that_cannot_be_written_costs_only_itself() -> None:
    rows = [{"n": 1, "v": "a"}, {"n": 10 ** 5000, "v": "b"}, {"n": 3, "v": Unprintable()}, {"n": 4, "v": "d,e"}]
    text, writer = write_in_lists(rows, [1, 2, 3], ["n", "v"])  # lists of one row: some only bad ones
    assert text == 'n,v\r\n1,a\r\n4,"d,e"\r\n'
    assert (writer.rows_written, writer.rows_skipped) == (2, 2)


def test_a_single_column_row_without_a_value_is_an_empty_quoted_cell() -> None:
    text, _ = write_in_lists([{"note": ""}, {}, {"note": "x"}], [], ["note"])
    assert text == 'note\r\n""\r\n""\r\nx\r\n'
