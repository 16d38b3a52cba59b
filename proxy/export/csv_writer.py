"""The streaming CSV writer of exports: columns, cell encoding and formula-injection guard."""

from __future__ import annotations

import collections
import csv
import logging
import re
import typing
from collections.abc import Mapping, Sequence

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
    """Writes export rows to a text stream as CSV, with declared or inferred columns."""

    def __init__(self, stream: typing.TextIO, columns: Sequence[str] | None = None,
                 infer_from_rows: int = INFER_COLUMNS_FROM_ROWS):
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

    def write_rows(self, rows: typing.Iterable[Mapping[str, typing.Any]]) -> None:
        """write_row() for each row."""
        rows = iter(rows)
        if not self._header_written:
            for row in rows:
                self.write_row(row)
                if self._header_written:
                    break
            else:
                return
        write = self._write
        for row in rows:
            write(row)

    def write_row(self, row: Mapping[str, typing.Any]) -> None:
        if self._header_written:
            self._write(row)
            return
        self._pending.append(row)
        if len(self._pending) >= self._infer_from_rows:
            self._infer_columns()

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
        for row in pending:
            self._write(row)

    def _write_header(self) -> None:
        assert self.columns is not None
        self._csv.writerow(self.columns)
        self._header_written = True
        self._known = frozenset(self.columns)

    def _write(self, row: Mapping[str, typing.Any]) -> None:
        try:
            cells = list(map(row.get, self.columns))
            # The csv module writes ints and floats as repr() and None as "", like csv_cell: only
            # the other cells go through it (this loop is most of an export's CPU time).
            for index, value in enumerate(cells):
                kind = type(value)
                if kind is str:
                    if value.startswith(_FORMULA_STARTS):
                        cells[index] = _text_cell(value)
                elif not (kind is int or kind is float or value is None):
                    cells[index] = csv_cell(value)
            # The csv module renders the whole line before writing it: a bad cell writes nothing.
            self._csv.writerow(cells)
        except (ValueError, TypeError, OverflowError) as exc:
            # One row costs only itself.
            if not self.rows_skipped:
                log.warning("export skips a row whose cells cannot be written: %r", exc)
            self.rows_skipped += 1
            return
        self.rows_written += 1
        if self._inferred and not self._known.issuperset(row):
            self.dropped_keys.update(key for key in row if key not in self._known)
