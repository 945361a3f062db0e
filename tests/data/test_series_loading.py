import gzip

import numpy as np
import pytest

from rnnkit.data import BUILTIN_SERIES, DataError, Series, load_series


def test_default_is_yearly_sunspots():
    series = load_series()
    assert isinstance(series, Series)
    assert series.name == "sunspots"
    assert series.period == 11
    assert series.columns == ["SUNACTIVITY"]
    assert series.values.shape == (309, 1)
    assert series.values.dtype == np.float32
    np.testing.assert_array_equal(series.values[:4, 0], [5, 11, 16, 23])  # 1700-1703
    assert series.values[-1, 0] == pytest.approx(2.9)  # 2008


def test_co2_by_name_has_its_gaps_interpolated():
    series = load_series("co2")
    assert set(BUILTIN_SERIES) == {"sunspots", "co2"}
    assert series.name == "co2" and series.period == 52
    assert series.values.shape == (2284, 1)
    assert np.isfinite(series.values).all()
    # 1958-05-10 is missing; its neighbours are 316.9 (05-03) and 317.5 (05-17)
    assert series.values[6, 0] == pytest.approx((316.9 + 317.5) / 2)


def test_csv_skips_dates_and_interpolates(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text(
        "date,store,sales,temp\n"
        "2024-01-01,A,10,1.5\n"
        "2024-01-02,A,,2.5\n"
        "2024-01-03,A,14,NA\n"
        "2024-01-04,A,16,4.5\n"
    )
    series = load_series(path)
    assert series.name == "sales"
    assert series.period is None
    assert series.columns == ["sales", "temp"]
    np.testing.assert_allclose(series.values, [[10, 1.5], [12, 2.5], [14, 3.5], [16, 4.5]])


def test_numeric_time_column_is_skipped_unless_named(tmp_path):
    path = tmp_path / "yearly.csv"
    path.write_text("year,value\n2000,1\n2001,2\n2002,3\n")
    assert load_series(path).columns == ["value"]
    both = load_series(path, columns=["year", "value"], period=2)
    assert both.columns == ["year", "value"]
    assert both.period == 2
    np.testing.assert_array_equal(both.values[:, 0], [2000, 2001, 2002])


def test_leading_and_trailing_gaps_are_trimmed(tmp_path):
    path = tmp_path / "edges.tsv.gz"
    content = "a\tb\n\t1\n2\t2\n3\t3\n4\t4\n5\t\n"
    path.write_bytes(gzip.compress(content.encode()))
    series = load_series(path)
    np.testing.assert_array_equal(series.values, [[2, 2], [3, 3], [4, 4]])


def test_no_numeric_column_explains_each_column(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("date,word\n2024-01-01,hello\n2024-01-02,there\n")
    with pytest.raises(DataError) as caught:
        load_series(path)
    message = str(caught.value)
    assert "words.csv: no numeric column" in message
    assert "'word' (line 2 has 'hello')" in message


def test_named_non_numeric_column(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("x,y\n1,2\n3,oops\n5,6\n")
    with pytest.raises(
        DataError, match=r"mixed\.csv: column 'y' is not numeric: line 3 has 'oops'"
    ):
        load_series(path, columns=["y"])


def test_missing_named_column_lists_header(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("x,y\n1,2\n3,4\n5,6\n")
    with pytest.raises(DataError, match=r"missing column\(s\) 'z'; the header has: 'x', 'y'"):
        load_series(path, columns=["z"])


def test_too_few_rows(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("x\n1\n2\n")
    with pytest.raises(DataError, match=r"short\.csv: only 2 row\(s\)"):
        load_series(path)


def test_all_missing_named_column(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("x,y\n1,\n2,NA\n3,?\n")
    with pytest.raises(DataError, match=r"column 'y' has no values"):
        load_series(path, columns=["x", "y"])


def test_ragged_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("x,y\n1,2\n3\n")
    with pytest.raises(DataError, match=r"ragged\.csv: line 3 has 1 field\(s\), the header has 2"):
        load_series(path)


def test_infinite_value_is_not_numeric(tmp_path):
    path = tmp_path / "inf.csv"
    path.write_text("x\n1\ninf\n3\n")
    with pytest.raises(DataError, match="line 3 has 'inf'"):
        load_series(path, columns=["x"])


def test_bad_arguments():
    with pytest.raises(TypeError, match="columns must be a list"):
        load_series(None, columns="SUNACTIVITY")
    with pytest.raises(ValueError, match="period must be a positive int"):
        load_series(None, period=0)
