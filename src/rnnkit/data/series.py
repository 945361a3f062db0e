"""Numeric time series from CSV files, and the shipped sunspots and CO2 series."""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnkit.data._files import base_suffix, existing_file, iter_lines
from rnnkit.data.builtin import builtin_file
from rnnkit.data.errors import DataError

MIN_SERIES_LENGTH = 3
MISSING_MARKERS = frozenset({"", "na", "nan", "n/a", "null", "none", "?"})
# Numeric columns with these names are time stamps, not signals; they are skipped unless named.
TIME_COLUMN = re.compile(r"(date|time|timestamp|datetime|year|month|day|week|quarter)", re.I)

# name -> (file, value column, seasonal period)
BUILTIN_SERIES: dict[str, tuple[str, str, int]] = {
    "sunspots": ("sunspots.csv", "SUNACTIVITY", 11),
    "co2": ("co2.csv", "co2", 52),
}


@dataclass
class Series:
    """A multivariate series: values (T, C) float32, one name per column."""

    values: np.ndarray
    columns: list[str]
    name: str
    period: int | None


def load_series(
    path: str | os.PathLike | None = None,
    columns: list[str] | None = None,
    period: int | None = None,
) -> Series:
    """CSV/TSV file with a header -> Series (T, C) float32; None -> embedded yearly sunspots.

    ``path`` may also be a shipped series name, "sunspots" (period 11) or "co2" (weekly,
    period 52), when no file of that name exists. ``columns=None`` takes every numeric column
    except time stamps (date, year, ...). Missing cells (empty, NA, NaN, null, ?) inside the
    series are linearly interpolated; rows before the first or after the last value of any
    chosen column are dropped. ``period`` sets the seasonal period of a user file.
    """
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise TypeError(f"columns must be a list of column names, got {columns!r}")
        if not columns:
            raise ValueError("columns must name at least one column, got []")
        if len(set(columns)) != len(columns):
            raise ValueError(f"columns must not repeat a name, got {columns!r}")
    if period is not None and (
        isinstance(period, bool) or not isinstance(period, int) or period < 1
    ):
        raise ValueError(f"period must be a positive int or None, got {period!r}")
    if path is None:
        path = "sunspots"
    if isinstance(path, str) and path in BUILTIN_SERIES and not os.path.exists(path):
        file_name, value_column, builtin_period = BUILTIN_SERIES[path]
        file = builtin_file(file_name)
        columns = columns or [value_column]
        name, period = path, period or builtin_period
    else:
        file = existing_file(path)
        name = file.name.split(".")[0]
    values, chosen = _read_numeric_columns(file, columns)
    return Series(values=values, columns=chosen, name=name, period=period)


def _read_numeric_columns(file: Path, wanted: list[str] | None) -> tuple[np.ndarray, list[str]]:
    suffix = base_suffix(file)
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataError(
            f"{file}: unknown format {suffix!r}; expected .csv or .tsv (optionally .gz)"
        )
    reader = csv.reader(iter_lines(file), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DataError(f"{file}: no header row; the file is empty or blank")
        names = [cell.strip() for cell in header]
        if wanted is not None:
            missing = [column for column in wanted if column not in names]
            if missing:
                raise DataError(
                    f"{file}: missing column(s) {', '.join(map(repr, missing))}; "
                    f"the header has: {', '.join(map(repr, names))}"
                )
        cells: list[list[float]] = [[] for _ in names]
        # first non-numeric cell per column: (line, text), which rules the column out
        not_numeric: dict[int, tuple[int, str]] = {}
        row_count = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise DataError(
                    f"{file}: line {reader.line_num} has {len(row)} field(s), "
                    f"the header has {len(names)}"
                )
            row_count += 1
            for index, cell in enumerate(row):
                if index in not_numeric:
                    continue
                value = _parse_number(cell)
                if value is None:
                    not_numeric[index] = (reader.line_num, cell)
                else:
                    cells[index].append(value)
    except csv.Error as error:
        raise DataError(f"{file}: line {reader.line_num}: malformed CSV ({error})") from None
    if row_count == 0:
        raise DataError(f"{file}: has a header but no data rows")
    if wanted is None:
        chosen = [
            index
            for index, name in enumerate(names)
            if index not in not_numeric
            and not TIME_COLUMN.fullmatch(name)
            and not all(math.isnan(v) for v in cells[index])
        ]
        if not chosen:
            described = ", ".join(
                f"{name!r} (" + _why_not_numeric(index, name, not_numeric, cells) + ")"
                for index, name in enumerate(names)
            )
            raise DataError(f"{file}: no numeric column to model; columns: {described}")
    else:
        chosen = [names.index(column) for column in wanted]
        for index in chosen:
            if index in not_numeric:
                line, text = not_numeric[index]
                raise DataError(
                    f"{file}: column {names[index]!r} is not numeric: line {line} has {text!r}"
                )
    columns = [names[index] for index in chosen]
    values = np.array([cells[index] for index in chosen], dtype=np.float64).T
    return _fill_gaps(file, values, columns).astype(np.float32), columns


def _parse_number(cell: str) -> float | None:
    """A cell -> float, NaN for a missing marker, None if it is not a number (or not finite)."""
    text = cell.strip()
    if text.lower() in MISSING_MARKERS:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _why_not_numeric(
    index: int, name: str, not_numeric: dict[int, tuple[int, str]], cells: list[list[float]]
) -> str:
    if index in not_numeric:
        line, text = not_numeric[index]
        return f"line {line} has {text!r}"
    if TIME_COLUMN.fullmatch(name):
        return "a time stamp; name it in columns= to use it"
    return "every cell is missing"


def _fill_gaps(file: Path, values: np.ndarray, columns: list[str]) -> np.ndarray:
    """(T, C) with NaN -> trim rows outside every column's observed span, interpolate inside."""
    observed = ~np.isnan(values)
    for index, column in enumerate(columns):
        if not observed[:, index].any():
            raise DataError(f"{file}: column {column!r} has no values, every cell is missing")
    first = max(int(np.argmax(observed[:, c])) for c in range(len(columns)))
    last = min(len(values) - 1 - int(np.argmax(observed[::-1, c])) for c in range(len(columns)))
    if last - first + 1 < MIN_SERIES_LENGTH:
        raise DataError(
            f"{file}: only {max(last - first + 1, 0)} row(s) where every chosen column has a value; "
            f"a series needs at least {MIN_SERIES_LENGTH}"
        )
    values = values[first : last + 1].copy()
    steps = np.arange(len(values))
    for index in range(values.shape[1]):
        known = ~np.isnan(values[:, index])
        if not known.all():
            values[:, index] = np.interp(steps, steps[known], values[known, index])
    return values
