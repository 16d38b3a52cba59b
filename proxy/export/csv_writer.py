"""The streaming CSV writer of exports: columns, cell encoding and formula-injection guard."""

from __future__ import annotations

import collections
import csv
import logging
import operator
import re
import typing
from collections.abc import Iterable, Mapping, Sequence

import ujson

log = logging.getLogger("proxy.export")

# Columns of a topic without declared columns come from the keys of this many first rows.
INFER_COLUMNS_FROM_ROWS = 1000
# The header of an empty export whose columns would have been inferred: every Price Wars
# message has a timestamp, and clients parse it (read_csv(parse_dates=["timestamp"])).
EMPTY_INFERRED_HEADER = ("timestamp",)

# Spreadsheets run a cell starting with one of these as a formula (OWASP "CSV injection";
# tab and carriage return are on OWASP's list too).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# A merchant or consumer id (base64 of a SHA-256) starts with "+" one time in 64. Its alphabet has
# no parentheses, so no spreadsheet function can hide in it, and merchants match rows by id:
# an id must reach them unchanged.
_MERCHANT_ID = re.compile(r"[A-Za-z0-9+/]{43}=")
_TEXT = frozenset((str,))
_NUMBERS = frozenset((int, float))
# What makes the csv module (excel dialect, as CsvExportWriter uses it) quote a cell.
_NEEDS_QUOTES = ('"', ",", "\r", "\n")


def csv_cell(value: typing.Any) -> str:
    """One CSV cell: numbers and strings as they are, true/false, "" for null, compact JSON for nesting."""
    kind = type(value)
    if kind is str:
        return _text_cell(value)
    if kind is int or kind is float:
        return repr(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _text_cell(value)
    if isinstance(value, (Mapping, list, tuple)):
        # Starts with { or [, so never a formula. Values come from proxy.records, which refuses
        # NaN and infinities, so allow_nan=False never raises for them.
        return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
    return csv_cell(str(value))


def _text_cell(value: str) -> str:
    if value.startswith(_FORMULA_STARTS) and not (_NUMBER.fullmatch(value) or _MERCHANT_ID.fullmatch(value)):
        return "'" + value
    return value


class CsvExportWriter:
    """Writes export rows to a text stream as CSV, with declared or inferred columns.

    Rows come in lists (write_rows); each list goes to the stream in one write.
    """

    def __init__(self, stream: typing.TextIO, columns: Sequence[str] | None = None,
                 infer_from_rows: int = INFER_COLUMNS_FROM_ROWS):
        self._stream = stream
        self._csv = csv.writer(stream)
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self._infer_from_rows = infer_from_rows
        # Rows held back until the columns are known; at most infer_from_rows of them.
        self._pending: list[Mapping[str, typing.Any]] = []
        self._header_written = False
        self._inferred = columns is None
        self.rows_written = 0
        # Rows no cell could be written for (not expected for values from proxy.records).
        self.rows_skipped = 0
        # Keys seen after the columns were inferred, which have no column: key -> rows dropping it.
        self.dropped_keys: collections.Counter[str] = collections.Counter()
        if self.columns is not None:
            self._write_header()

    def write_rows(self, rows: Iterable[Mapping[str, typing.Any]]) -> None:
        rows = list(rows)
        if not self._header_written:
            room = self._infer_from_rows - len(self._pending)
            self._pending += rows[:room]
            rows = rows[room:]
            if len(self._pending) < self._infer_from_rows:
                return
            self._infer_columns()
        self._write(rows)

    def write_row(self, row: Mapping[str, typing.Any]) -> None:
        self.write_rows((row,))

    def finish(self) -> None:
        """Write what is held back; an export without rows still gets its header."""
        if not self._header_written:
            self._infer_columns()

    @property
    def dropped_key_count(self) -> int:
        return sum(self.dropped_keys.values())

    def _infer_columns(self) -> None:
        keys: dict[str, None] = {}
        for row in self._pending:
            keys.update(dict.fromkeys(row))
        self.columns = list(keys) or list(EMPTY_INFERRED_HEADER)
        self._write_header()
        pending, self._pending = self._pending, []
        self._write(pending)

    def _write_header(self) -> None:
        assert self.columns is not None
        self._csv.writerow(self.columns)
        self._header_written = True
        self._known = frozenset(self.columns)

    def _write(self, rows: list[Mapping[str, typing.Any]]) -> None:
        if not rows:
            return
        assert self.columns is not None
        try:
            text, bad = _csv_lines(rows, self.columns)
        except (ValueError, TypeError, OverflowError):
            # Not expected: let the csv module write row by row, and skip the rows it cannot write.
            self._write_each(rows)
        else:
            if bad:
                self._skip(len(bad), next(iter(bad.values())))
            self._stream.write(text)
            self.rows_written += len(rows) - len(bad)
        known = self._known
        if self._inferred and not all(map(known.issuperset, rows)):
            for row in rows:
                self.dropped_keys.update(key for key in row if key not in known)

    def _write_each(self, rows: list[Mapping[str, typing.Any]]) -> None:
        for row in rows:
            try:
                # The csv module renders the whole line before writing it: a bad cell writes nothing.
                self._csv.writerow([csv_cell(row.get(column)) for column in self.columns or ()])
            except (ValueError, TypeError, OverflowError) as exc:
                self._skip(1, exc)
            else:
                self.rows_written += 1

    def _skip(self, count: int, error: Exception) -> None:
        # One row costs only itself.
        if not self.rows_skipped:
            log.warning("export skips a row whose cells cannot be written: %r", error)
        self.rows_skipped += count


def _csv_lines(rows: list[Mapping[str, typing.Any]], columns: Sequence[str]) -> tuple[str, dict[int, Exception]]:
    """The CSV lines of rows, and the rows left out because one of their cells cannot be written.

    Each cell is csv_cell() of its value, quoted as csv.writer() (excel dialect) quotes it. The
    csv module reads every cell a character at a time (about 1 µs for a 44-character merchant
    id: most of an export's time); this looks at a column at a time with C calls (map, str.join,
    `in`), at single cells only in a column that has one needing it, and formats each line with
    one str.format() call, which writes numbers as csv_cell() does (str(): repr() for floats).
    """
    if not columns:
        raise ValueError("no columns")
    bad: dict[int, Exception] = {}
    cells = []
    for name in columns:
        try:
            column = list(map(operator.itemgetter(name), rows))
        except KeyError:  # a row without this column
            column = list(map(operator.methodcaller("get", name), rows))
        kinds = set(map(type, column))
        if kinds <= _NUMBERS:
            cells.append(column)
            continue
        if kinds == _TEXT:
            # Every cell follows a NUL here: a formula start shows as NUL and that character.
            joined = "\0" + "\0".join(column)
            if any(f"\0{start}" in joined for start in _FORMULA_STARTS):
                column = list(map(_text_cell, column))  # a quote in front changes nothing below
        else:
            for position, value in enumerate(column):
                try:
                    column[position] = csv_cell(value)
                except (ValueError, TypeError, OverflowError) as exc:
                    bad[position], column[position] = exc, ""
            joined = "".join(column)
        if any(special in joined for special in _NEEDS_QUOTES):
            column = [_quoted(text) if any(special in text for special in _NEEDS_QUOTES) else text
                      for text in column]
        if len(columns) == 1 and "" in column:
            # The csv module writes a line that would be empty as one empty quoted cell.
            column = [text or '""' for text in column]
        cells.append(column)
    lines = map(",".join(["{}"] * len(columns)).format, *cells)
    if bad:
        lines = (line for position, line in enumerate(lines) if position not in bad)
    text = "\r\n".join(lines)  # no line is empty: at least a comma, or ""
    return (text + "\r\n" if text else text), bad


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'
