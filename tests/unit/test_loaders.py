"""The device-side data loaders: built-ins against independent references, and every bad input
turned into a ``data_error``; fuzzers for :func:`check_data` and the CSV loader."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent import loaders
from edge_agent.loaders import (
    BUILTIN_LOADERS,
    DataError,
    DeviceContext,
    LocalData,
    check_data,
    device_options,
    load_device_data,
    resolve_loader,
)
from schemas.errors import InvalidMessage, Reason

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def make_ctx(root: Path, **options: Any) -> DeviceContext:
    return DeviceContext("SN-00042A", "region-0", root, options)


def load(name: str, root: Path, input_shape: tuple[int, ...], **options: Any) -> LocalData:
    return load_device_data(resolve_loader(name), make_ctx(root, **options), input_shape)


def assert_valid(d: LocalData, input_shape: tuple[int, ...]) -> None:
    """Every invariant check_data promises."""
    assert isinstance(d, LocalData)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
        assert x.dtype == np.float32
        assert x.shape[1:] == input_shape
        assert y.dtype in (np.int32, np.float32)
        assert y.ndim >= 1 and y.shape[0] == x.shape[0]
        assert np.isfinite(x).all() and np.isfinite(y).all()
    assert d.x_train.shape[0] > 0
    assert d.y_test.shape[1:] == d.y_train.shape[1:]


def data_error(match: str = "") -> Any:
    return pytest.raises(DataError, match=match)


def write_csv(path: Path, header: list[str], rows: Any) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def table(n: int, seed: int = 0, features: int = 3,
          classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).round(3)
    y = rng.integers(0, classes, size=n)
    return x, y


def write_table(path: Path, x: np.ndarray, y: np.ndarray, names: list[str] | None = None) -> None:
    names = names or [f"f{i}" for i in range(x.shape[1])]
    write_csv(path, [*names, "label"], [[*map(repr, r), str(v)] for r, v in zip(x.tolist(), y)])


def reference_windows(x: np.ndarray, y: np.ndarray, w: int | None, stride: int | None,
                      test_fraction: float) -> tuple[np.ndarray, ...]:
    """Windows by explicit loops, then the last floor(n * fraction) of them are the test set."""
    if w is None:
        xs, ys = x, y
    else:
        s = stride or w
        starts = list(range(0, len(x) - w + 1, s))
        xs = np.array([x[i:i + w] for i in starts])
        ys = np.array([y[i + w - 1] for i in starts])
    n_test = int(len(xs) * test_fraction + 1e-9)
    k = len(xs) - n_test
    return xs[:k], ys[:k], xs[k:], ys[k:]


def assert_matches(d: LocalData, ref: tuple[np.ndarray, ...]) -> None:
    for got, want in zip((d.x_train, d.y_train, d.x_test, d.y_test), ref):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype))


# --------------------------------------------------------------------------- device_options


def test_device_options_merge_and_substitute():
    defaults = {"path": "data/{device_id}.csv", "label": "fault", "window": 32,
                "features": ["{region}-t", "v"], "fmt": "{x} {0} {device_id}"}
    overrides = {"window": "16", "extra": "{region}/{device_id}{"}
    before = (dict(defaults), dict(overrides))
    got = device_options(defaults, overrides, device_id="SN-1", region="eu")
    assert got == {"path": "data/SN-1.csv", "label": "fault", "window": "16",
                   "features": ["eu-t", "v"], "fmt": "{x} {0} SN-1", "extra": "eu/SN-1{"}
    assert (defaults, overrides) == before


def test_device_options_substitutes_once():
    got = device_options({"p": "{device_id}"}, {}, device_id="{region}", region="eu")
    assert got == {"p": "{region}"}


# --------------------------------------------------------------------------- check_data


def test_check_data_forms_and_normalization():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4, 2))
    y = rng.integers(0, 3, size=10)
    batches = ((x[i:min(i + 3, 8)], y[i:min(i + 3, 8)]) for i in range(0, 8, 3))
    for data in (LocalData(x[:8], y[:8], x[8:], y[8:]), (x[:8], y[:8], x[8:], y[8:]),
                 [(x[:8], y[:8]), (x[8:], y[8:])], (batches, iter([(x[8:], y[8:])]))):
        d = check_data(data, (4, 2))
        assert_valid(d, (4, 2))
        assert d.y_train.dtype == np.int32
        np.testing.assert_array_equal(d.x_train, x[:8].astype(np.float32))
        np.testing.assert_array_equal(d.y_test, y[8:])


def test_check_data_label_dtypes_and_empty_test():
    x = np.ones((3, 2), np.float64)
    d = check_data((x, np.array([True, False, True]), [], []), [2])
    assert d.y_train.dtype == np.int32 and d.x_test.shape == (0, 2)
    assert d.y_test.dtype == np.int32 and d.y_test.shape == (0,)
    d = check_data((x, np.array([0.5, 1, 2]), x[:1], np.array([1.5])), (2,))
    assert d.y_train.dtype == np.float32 and d.y_test.dtype == np.float32
    d = check_data(((x, np.ones((3, 5), np.uint8)), []), (2,))       # no test batches at all
    assert d.y_train.shape == (3, 5) and d.y_test.shape == (0, 5)
    assert d.y_test.dtype == np.int32


IMG = (8, 8, 1)
BAD_DATA = [
    ((np.ones((4, 7)), np.zeros(4), np.ones((1, 7)), np.zeros(1)),
     r"x_train has per-example shape \(7,\), the project's input_shape is \(8, 8, 1\)"),
    ((np.ones((4, *IMG)), np.array(list("abcd")), np.ones((0, *IMG)), np.zeros(0)),
     r"y_train has dtype <U1"),
    ((np.ones((4, *IMG)), np.array([1, 2, None, 3], object), [], []), "y_train has dtype object"),
    ((np.array([["a"] * 64] * 4).reshape(4, 8, 8, 1), np.zeros(4), [], []), "x_train has dtype"),
    ((np.full((4, *IMG), np.nan), np.zeros(4), [], []),
     r"x_train contains NaN or Inf \(example 0\)"),
    ((np.ones((4, *IMG)), np.array([0, 1, np.inf, 2]), [], []),
     r"y_train contains NaN or Inf \(example 2\)"),
    ((np.ones((4, *IMG)), np.zeros(4), np.ones((2, *IMG)), np.zeros(3)),
     "y_test has 3 labels for 2 examples"),
    ((np.ones((0, *IMG)), np.zeros(0), np.ones((2, *IMG)), np.zeros(2)), "training set is empty"),
    ((np.ones((2, *IMG)), np.array([0, 2**40]), [], []), "outside the int32 range"),
    ((np.full((2, *IMG), 1e300), np.zeros(2), [], []), "too large for float32"),
    ((np.ones((2, *IMG)), np.float64(1), [], []), "y_train is a scalar"),
    ((np.ones((2, *IMG)), np.zeros(2), np.ones((1, *IMG)), np.zeros((1, 3))),
     "y_test has per-example shape"),
    ((np.ones((2, *IMG)) + 1j, np.zeros(2), [], []), "x_train has dtype complex128"),
    ("not data", "the loader returned a str"),
    ((1, 2, 3), "the loader returned a tuple"),
    (((np.ones((2, *IMG)), np.zeros(2)), np.ones(3)), "the test set is a ndarray"),
    (([(np.ones((2, *IMG)), np.zeros(2))] * 2 + ["oops"], []), "training batch 2 is a str"),
    (([(np.ones((2, *IMG)), np.zeros(2)), (np.ones((1, *IMG)), np.zeros((1, 2)))], []),
     r"y_train \(batch 1\) has per-example shape"),
    ((np.full((2, *IMG), None, object), np.zeros(2), [], []),
     "x_train holds a value that is not a finite float32 number .* in example 0"),
    ((np.full((2, *IMG), {}, object), np.zeros(2), [], []), "x_train is not convertible to float32"),
    ((np.full((2, *IMG), "1.5", object), np.zeros(2), [], []), None),
]


@pytest.mark.parametrize("data, match", BAD_DATA)
def test_check_data_refuses(data, match):
    if match is None:                     # an object array of numbers is float-convertible
        assert_valid(check_data(data, IMG), IMG)
        return
    with data_error(match) as e:
        check_data(data, (8, 8, 1))
    assert e.value.reason == Reason.DATA_ERROR == "data_error"
    assert isinstance(e.value, InvalidMessage) and "\n" not in e.value.detail


def test_check_data_batches_that_raise():
    def batches():
        yield np.ones((2, 3)), np.zeros(2)
        raise OSError("disk gone")

    with data_error("reading the training batches failed: disk gone"):
        check_data((batches(), []), (3,))


# --------------------------------------------------------------------------- npz


def test_npz_split_keys(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.normal(size=(9, 8, 8, 1)), "y_train": rng.integers(0, 10, 9),
              "x_test": rng.normal(size=(3, 8, 8, 1)), "y_test": rng.integers(0, 10, 3)}
    np.savez(tmp_path / "d.npz", **arrays, extra=np.zeros(2))
    d = load("npz", tmp_path, (8, 8, 1), path="d.npz")
    assert_valid(d, (8, 8, 1))
    with np.load(tmp_path / "d.npz") as z:
        assert_matches(d, tuple(z[k] for k in ("x_train", "y_train", "x_test", "y_test")))


@pytest.mark.parametrize("fraction, n_test", [(None, 2), ("0.5", 5), (0.0, 0), (0.29, 2)])
def test_npz_x_y_split_is_the_last_fraction(tmp_path, fraction, n_test):
    x = np.arange(10 * 3, dtype=np.float64).reshape(10, 3)
    y = np.arange(10) % 2
    np.savez(tmp_path / "{device_id}.npz", x=x, y=y)
    opts = {"path": "{device_id}.npz"}
    if fraction is not None:
        opts["test_fraction"] = fraction
    opts = device_options(opts, {}, device_id="{device_id}", region="r")
    d = load("npz", tmp_path, (3,), **opts)
    k = 10 - n_test
    assert_matches(d, (x[:k], y[:k], x[k:], y[k:]))


def test_npz_directory_concatenates_in_name_order(tmp_path):
    (tmp_path / "data").mkdir()
    parts = {"b.npz": 2.0, "a.npz": 1.0, "c.npz": 3.0}
    for name, v in parts.items():
        np.savez(tmp_path / "data" / name, x=np.full((5, 2), v), y=np.full(5, int(v)))
    (tmp_path / "data" / "notes.txt").write_text("ignored")
    d = load("npz", tmp_path, (2,), path="data", test_fraction=0.2)
    assert d.y_train.tolist() == [1] * 5 + [2] * 5 + [3] * 2
    assert d.y_test.tolist() == [3] * 3
    assert d.x_test[:, 0].tolist() == [3.0] * 3


def test_npz_bad_files(tmp_path):
    with data_error(f"{tmp_path / 'missing.npz'} does not exist"):
        load("npz", tmp_path, (2,), path="missing.npz")
    (tmp_path / "empty").mkdir()
    with data_error("holds no .npz files"):
        load("npz", tmp_path, (2,), path="empty")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], object), y=np.zeros(2))
    with data_error("holds pickled Python objects"):
        load("npz", tmp_path, (2,), path="obj.npz")
    np.savez(tmp_path / "keys.npz", features=np.zeros((2, 2)))
    with data_error(r"holds arrays \['features'\]; expected"):
        load("npz", tmp_path, (2,), path="keys.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with data_error("is not a readable .npz file"):
        load("npz", tmp_path, (2,), path="junk.npz")
    (tmp_path / "zero.npz").write_bytes(b"")
    with data_error("is not a readable .npz file"):
        load("npz", tmp_path, (2,), path="zero.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with data_error("single .npy array"):
        load("npz", tmp_path, (2,), path="plain.npy")
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with data_error("x has 3 records, y has 4"):
        load("npz", tmp_path, (2,), path="len.npz")
    np.savez(tmp_path / "nan.npz", x=np.array([[0, 1], [np.nan, 1]]), y=np.zeros(2))
    with data_error(r"x_train contains NaN or Inf \(example 1\)"):
        load("npz", tmp_path, (2,), path="nan.npz", test_fraction=0)
    (tmp_path / "mixed").mkdir()
    np.savez(tmp_path / "mixed" / "1.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    np.savez(tmp_path / "mixed" / "2.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(3),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1))
    with data_error("mixes files"):
        load("npz", tmp_path, (2,), path="mixed")
    (tmp_path / "shapes").mkdir()
    np.savez(tmp_path / "shapes" / "1.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    np.savez(tmp_path / "shapes" / "2.npz", x=np.zeros((3, 5)), y=np.zeros(3))
    with data_error(r"2.npz: array 'x' has per-record shape \(5,\)"):
        load("npz", tmp_path, (2,), path="shapes")


# --------------------------------------------------------------------------- csv


def test_csv_records_against_numpy(tmp_path):
    x, y = table(50, seed=2)
    write_table(tmp_path / "d.csv", x, y)
    d = load("csv", tmp_path, (3,), path="d.csv", label="label")
    assert_valid(d, (3,))
    ref = np.loadtxt(tmp_path / "d.csv", delimiter=",", skiprows=1)
    assert d.y_train.dtype == np.int32
    assert_matches(d, (ref[:40, :3], ref[:40, 3], ref[40:, :3], ref[40:, 3]))


def test_csv_feature_selection_and_float_labels(tmp_path):
    write_csv(tmp_path / "d.csv", ["t", "target", "u", "v"],
              [[i, i / 2, 10 * i, -i] for i in range(10)])
    d = load("csv", tmp_path, (2,), path="d.csv", label="target", features="v, t",
             test_fraction="0.3")
    assert d.y_train.dtype == np.float32
    np.testing.assert_array_equal(d.x_train, [[-i, i] for i in range(7)])
    np.testing.assert_array_equal(d.y_test, [3.5, 4.0, 4.5])


@pytest.mark.parametrize("window, stride, fraction", [
    (4, None, 0.2), (4, 1, 0.25), ("5", "3", "0"), (1, 2, 0.5), (37, 1, 0.2), (8, 8, 0.9)])
def test_csv_windows_and_stride(tmp_path, window, stride, fraction):
    x, y = table(37, seed=3)
    write_table(tmp_path / "d.csv", x, y)
    opts = {"window": window, "test_fraction": fraction}
    if stride is not None:
        opts["stride"] = stride
    d = load("csv", tmp_path, (int(window), 3), path="d.csv", label="label", **opts)
    assert_valid(d, (int(window), 3))
    ref = reference_windows(x.astype(np.float32), y, int(window),
                            None if stride is None else int(stride), float(fraction))
    assert_matches(d, ref)


def test_csv_directory_in_name_order(tmp_path):
    (tmp_path / "d").mkdir()
    x, y = table(30, seed=4)
    # column order differs between files: columns are taken by name
    write_table(tmp_path / "d" / "2024-01-02.csv", x[10:20][:, ::-1], y[10:20], ["f2", "f1", "f0"])
    write_table(tmp_path / "d" / "2024-01-01.csv", x[:10], y[:10])
    write_table(tmp_path / "d" / "2024-01-03.csv", x[20:], y[20:])
    write_csv(tmp_path / "d" / "2024-01-04.csv", ["f0", "f1", "f2", "label"], [])  # header only
    d = load("csv", tmp_path, (2, 3), path="d", label="label", window=2, stride=1)
    assert_matches(d, reference_windows(x.astype(np.float32), y, 2, 1, 0.2))


@pytest.mark.parametrize("text, match", [
    ("", "is empty: no header row"),
    ("\n\n", "is empty: no header row"),
    ("a,b,label\n", "has a header but no records"),
    ("a,b,label\n1,2,0\n1,x,1\n", r"d.csv, line 3, column 'b': 'x' is not a number"),
    ("a,b,label\n1,2,0\n1,,1\n", r"line 3, column 'b': '' is not a number"),
    ("a,b,label\n1,2,0\n1,nan,1\n", r"d.csv, line 3, column 'b': nan is not a finite number"),
    ("a,b,label\n1,2,0\n1,2,-inf\n", r"line 3, column 'label': -inf is not a finite number"),
    ("a,b,label\n1,2,0\n1,1e39,1\n", "is too large for float32"),
    ("a,b,label\n1,2,0\n1,2\n", "line 3: 2 fields, the header has 3"),
    ("a,b,c\n1,2,0\n", r"has no label column 'label' \(columns: \['a', 'b', 'c'\]\)"),
    ("label\n1\n", "has no feature columns besides the label"),
    ("a,a,label\n1,2,0\n", r"duplicate column names \['a'\]"),
    ("a,b,label\n1,2,0\n3,4,1\n", "fewer than one window of 3"),
    ("a,b,label\n1,2\x00,0\n", r"line 2, column 'b': '2\\x00' is not a number"),
    ("a,b,label\n1,\"" + "9" * 200_000 + "\",0\n", "is not a readable CSV file: field larger"),
])
def test_csv_bad_data(tmp_path, text, match):
    (tmp_path / "d.csv").write_text(text)
    window = 3 if "window" in match else None
    opts = {"window": window} if window else {}
    with data_error(match):
        load("csv", tmp_path, (3, 2) if window else (2,), path="d.csv", label="label", **opts)


def test_csv_not_utf8(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"a,label\n\xff\xfe,1\n")
    with data_error("is not UTF-8 text"):
        load("csv", tmp_path, (1,), path="d.csv", label="label")


@pytest.mark.parametrize("options, match", [
    ({"window": 0}, "option window=0 must be a positive integer"),
    ({"window": "abc"}, "option window='abc' must be a positive integer"),
    ({"window": 2.5}, "option window=2.5"),
    ({"window": True}, "option window=True"),
    ({"window": 2, "stride": "-1"}, "option stride='-1'"),
    ({"stride": 2}, "option stride=2 needs option window"),
    ({"test_fraction": 1}, r"option test_fraction=1 must be a number in \[0, 1\)"),
    ({"test_fraction": "-0.1"}, "option test_fraction='-0.1'"),
    ({"test_fraction": "nan"}, "option test_fraction='nan'"),
    ({"label": None}, "option label must name the label column"),
    ({"features": 3}, "option features=3 must be a list"),
    ({"features": []}, "must name at least one column"),
    ({"features": ["a", "label"]}, "names the label column"),
    ({"features": ["a", "zz"]}, "has no feature column 'zz'"),
    ({"path": None}, "option path must name a file or directory"),
])
def test_csv_bad_options(tmp_path, options, match):
    write_csv(tmp_path / "d.csv", ["a", "b", "label"], [[1, 2, 0]] * 5)
    opts = {"path": "d.csv", "label": "label", **options}
    with data_error(match):
        load("csv", tmp_path, (2,), **opts)


# --------------------------------------------------------------------------- parquet


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_matches_csv(tmp_path):
    x, y = table(40, seed=5)
    write_table(tmp_path / "d.csv", x, y)
    cols = {f"f{i}": x[:, i] for i in range(3)}
    (tmp_path / "p").mkdir()
    for name, part in (("b", slice(25, None)), ("a", slice(None, 25))):
        write_parquet(tmp_path / "p" / f"{name}.parquet",
                      {k: v[part] for k, v in cols.items()} | {"label": y[part]})
    for opts in ({}, {"window": 4, "stride": 2, "features": ["f2", "f0"]}):
        shape = (4, 2) if opts else (3,)
        want = load("csv", tmp_path, shape, path="d.csv", label="label", **opts)
        got = load("parquet", tmp_path, shape, path="p", label="label", **opts)
        assert_valid(got, shape)
        assert_matches(got, (want.x_train, want.y_train, want.x_test, want.y_test))
        assert got.y_train.dtype == np.int32


def test_parquet_bad_data(tmp_path):
    import pyarrow as pa

    write_parquet(tmp_path / "null.parquet",
                  {"a": pa.array([1.0, None, 3.0]), "label": [0, 1, 0]})
    with data_error(r"null.parquet, row 2, column 'a': missing value"):
        load("parquet", tmp_path, (1,), path="null.parquet", label="label")
    write_parquet(tmp_path / "str.parquet", {"a": ["x", "y"], "label": [0, 1]})
    with data_error("column 'a' has type string, expected numbers"):
        load("parquet", tmp_path, (1,), path="str.parquet", label="label")
    write_parquet(tmp_path / "inf.parquet", {"a": [1.0, np.inf], "label": [0, 1]})
    with data_error(r"row 2, column 'a': inf is not a finite number"):
        load("parquet", tmp_path, (1,), path="inf.parquet", label="label")
    write_parquet(tmp_path / "empty.parquet", {"a": pa.array([], pa.float64()),
                                               "label": pa.array([], pa.int64())})
    with data_error("has a header but no records"):
        load("parquet", tmp_path, (1,), path="empty.parquet", label="label")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with data_error("is not a readable Parquet file"):
        load("parquet", tmp_path, (1,), path="junk.parquet", label="label")
    with data_error("has no label column 'fault'"):
        load("parquet", tmp_path, (1,), path="inf.parquet", label="fault")


def test_parquet_without_pyarrow(tmp_path):
    with mock.patch.dict(sys.modules, {"pyarrow": None, "pyarrow.parquet": None}):
        with data_error(r"pip install fedstream\[parquet\]"):
            load("parquet", tmp_path, (1,), path="x.parquet", label="label")


def test_import_is_light():
    code = ("import sys, edge_agent.loaders; "
            "bad = {'pyarrow', 'pandas', 'jax'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------- rolling


def rolling_text(x: np.ndarray, y: np.ndarray) -> str:
    lines = ["f0,f1,f2,label"] + [",".join([*map(repr, r), str(v)]) for r, v in zip(x.tolist(), y)]
    return "\n".join(lines) + "\n"


def test_rolling_last_n_with_a_partial_line_then_appends(tmp_path):
    x, y = table(200, seed=6)
    store = tmp_path / "store.csv"
    store.write_text(rolling_text(x[:150], y[:150]) + "1.5,2.5,")     # a record being written
    opts = {"path": "store.csv", "label": "label", "last": "50", "test_fraction": 0.2}
    with mock.patch.object(loaders, "_BLOCK", 256):
        d = load("rolling", tmp_path, (3,), **opts)
        ref = reference_windows(x[100:150].astype(np.float32), y[100:150], None, None, 0.2)
        assert_matches(d, ref)
        with open(store, "a") as f:                   # the writer finishes it and appends more
            f.write("3.5," + str(y[150]) + "\n")
            f.write(rolling_text(x[151:170], y[151:170]).split("\n", 1)[1])
        d = load("rolling", tmp_path, (3,), **opts)
    xs = np.concatenate([x[:150], [[1.5, 2.5, 3.5]], x[151:170]]).astype(np.float32)
    ys = np.concatenate([y[:150], y[150:151], y[151:170]])
    assert_matches(d, reference_windows(xs[-50:], ys[-50:], None, None, 0.2))


def test_rolling_reads_only_the_tail(tmp_path):
    x, y = table(30, seed=7)
    text = rolling_text(x, y)
    head, body = text.split("\n", 1)
    # garbage records far back in the store are never read
    (tmp_path / "s.csv").write_text(head + "\n" + "junk,junk\n" * 10_000 + body)
    d = load("rolling", tmp_path, (5, 3), path="s.csv", label="label", last=20, window=5,
             stride=1, test_fraction=0)
    assert_matches(d, reference_windows(x[10:].astype(np.float32), y[10:], 5, 1, 0))
    with data_error("record at byte 100005: 2 fields, the header has 4"):
        load("rolling", tmp_path, (5, 3), path="s.csv", label="label", last=31, window=5)


def test_rolling_fewer_records_than_last(tmp_path):
    x, y = table(7, seed=8)
    (tmp_path / "s.csv").write_text(rolling_text(x, y).replace("\n", "\r\n"))
    d = load("rolling", tmp_path, (3,), path="s.csv", label="label", last=1000, test_fraction=0)
    assert_matches(d, (x, y, x[:0], y[:0]))
    with data_error("the training set is empty: 7 records, fewer than one window of 8"):
        load("rolling", tmp_path, (8, 3), path="s.csv", label="label", last=1000, window=8)


def test_rolling_directory(tmp_path):
    x, y = table(30, seed=9)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "00.csv").write_text(rolling_text(x[:12], y[:12]))
    (tmp_path / "s" / "01.csv").write_text(rolling_text(x[12:25], y[12:25]))
    (tmp_path / "s" / "02.csv").write_text(rolling_text(x[25:], y[25:]) + "0.1,0.2")
    d = load("rolling", tmp_path, (3,), path="s", label="label", last=20, test_fraction=0)
    assert_matches(d, (x[10:], y[10:], x[:0], y[:0]))
    (tmp_path / "s" / "03.csv").write_text("f0,f1")          # a new file, header being written
    d = load("rolling", tmp_path, (3,), path="s", label="label", last=20, test_fraction=0)
    assert_matches(d, (x[10:], y[10:], x[:0], y[:0]))
    for f in (tmp_path / "s").iterdir():
        f.write_text("")
    with data_error("no file in .* has a complete header line: the training set is empty"):
        load("rolling", tmp_path, (3,), path="s", label="label", last=20)


@pytest.mark.parametrize("text, options, match", [
    ("", {}, "is empty: no header row"),
    ("f0,f1,f2,label", {}, "no complete header line yet"),
    ("f0,f1,f2,label\n", {}, "has a header but no records"),
    ("f0,f1,f2,label\n1,2,3,0", {}, "has a header but no records"),
    ("f0,f1,f2,label\n1,2,3,0\n", {"last": None}, "needs option last"),
    ("f0,f1,f2,label\n1,2,3,0\n", {"last": "-1"}, "option last='-1' must be a positive integer"),
    ("f0,f1,f2,label\n1,2,x,0\n", {},
     r"s.csv, record at byte 15, column 'f2': 'x' is not a number"),
    ("f0,f1,f2,label\n1,2,3,0\n\xff,1,2,3\n", {}, "record at byte 23: not CSV text"),
])
def test_rolling_bad_data(tmp_path, text, options, match):
    (tmp_path / "s.csv").write_bytes(text.encode("latin-1"))
    opts = {"path": "s.csv", "label": "label", "last": 5, **options}
    with data_error(match):
        load("rolling", tmp_path, (3,), **opts)


@FUZZ
@given(n=st.integers(0, 40), last=st.integers(1, 50), block=st.integers(1, 64),
       window=st.sampled_from([None, 1, 3]), partial=st.sampled_from(["", "1.0,", "7"]),
       blank=st.booleans(), seed=st.integers(0, 3))
def test_rolling_matches_the_csv_loader(tmp_path_factory, n, last, block, window, partial, blank,
                                        seed):
    root = tmp_path_factory.mktemp("rolling", numbered=True)
    x, y = table(n, seed=seed)
    text = rolling_text(x, y)
    if blank:
        text = text.replace("\n", "\n\n", 3)
    (root / "s.csv").write_text(text + partial)
    keep = min(n, last)
    write_table(root / "ref.csv", x[n - keep:], y[n - keep:])
    shape = (3,) if window is None else (window, 3)
    opts = {"label": "label", "window": window, "test_fraction": 0.25}

    def run(name: str, **extra: Any) -> LocalData | str:
        try:
            return load(name, root, shape, **opts, **extra)
        except DataError as e:
            return "empty" if ("empty" in e.detail or "no records" in e.detail) else e.detail

    with mock.patch.object(loaders, "_BLOCK", block):
        got = run("rolling", path="s.csv", last=last)
    want = run("csv", path="ref.csv")
    if isinstance(want, str):
        assert got == want == "empty"
    else:
        assert isinstance(got, LocalData)
        assert_matches(got, (want.x_train, want.y_train, want.x_test, want.y_test))


# --------------------------------------------------------------------------- loading, resolving


def test_load_device_data_wraps_loader_errors(tmp_path):
    ctx = make_ctx(tmp_path)

    def broken(ctx: DeviceContext) -> object:
        raise OSError(f"no such sensor: {ctx.device_id}")

    with data_error(r"loader .*broken failed: no such sensor: SN-00042A") as e:
        load_device_data(broken, ctx, (2,))
    assert isinstance(e.value.__cause__, OSError) and e.value.reason == "data_error"

    def missing_key(ctx: DeviceContext) -> object:
        return {}["x_train"]

    with data_error("failed: KeyError: 'x_train'"):
        load_device_data(missing_key, ctx, (2,))

    err = DataError("my own words")

    def own(ctx: DeviceContext) -> object:
        raise err

    with pytest.raises(DataError) as e:
        load_device_data(own, ctx, (2,))
    assert e.value is err

    with data_error("the loader returned a NoneType"):
        load_device_data(lambda ctx: None, ctx, (2,))
    with data_error("loader csv failed|option label"):
        load_device_data(BUILTIN_LOADERS["csv"], make_ctx(tmp_path, path="x.csv"), (2,))


def test_custom_loader_through_resolve(tmp_path, monkeypatch):
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    (tmp_path / "myproj" / "data.py").write_text(textwrap.dedent("""
        import numpy as np

        def load(ctx):
            n = int(ctx.options["n"])
            x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
            return (x[:-1], np.arange(n - 1)), [(x[-1:], np.array([7]))]

        class Holder:
            @staticmethod
            def load(ctx):
                raise ValueError("bad")

        value = 3
        """))
    (tmp_path / "brokenmod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_device_data(resolve_loader("myproj.data:load"), make_ctx(tmp_path, n=4), (2,))
    assert_valid(d, (2,))
    assert d.y_test.tolist() == [7] and d.x_train.shape == (3, 2)
    with data_error("loader myproj.data:Holder.load failed: bad"):
        load_device_data(resolve_loader("myproj.data:Holder.load"), make_ctx(tmp_path), (2,))
    for spec, match in [("nope", "unknown loader 'nope'"), ("", "unknown loader"),
                        ("myproj.data:", "unknown loader"),
                        ("no_such_module_xyz:load", "cannot import no_such_module_xyz"),
                        ("brokenmod:load", "boom at import"),
                        ("myproj.data:missing", "has no attribute 'missing'"),
                        ("myproj.data:value", "is a int, not a function")]:
        with pytest.raises(ValueError, match=match) as e:
            resolve_loader(spec)
        assert not isinstance(e.value, DataError)
    for name, fn in BUILTIN_LOADERS.items():
        assert resolve_loader(name) is fn


# --------------------------------------------------------------------------- fuzzers

NUMERIC = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float16, np.float32,
           np.float64]
ODD = [np.complex64, "U3", "S2", "M8[s]", object]
# mostly numeric dtypes (Hypothesis favours the ends of a range, so the odd ones sit inside it)
DTYPES = st.integers(0, 29).map(lambda i: ODD[i - 12] if 12 <= i < 12 + len(ODD)
                                else NUMERIC[i % len(NUMERIC)])


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> Any:
    dtype = np.dtype(draw(DTYPES))
    if dtype.kind == "O":
        elements = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=2))
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def xy(draw: st.DrawFn, input_shape: tuple[int, ...], min_n: int = 0) -> tuple[Any, Any]:
    n = draw(st.integers(min_n, 4))
    good = draw(st.integers(0, 9)) != 4          # mostly the right shapes
    x_shape = (n, *input_shape) if good else draw(hnp.array_shapes(min_dims=0, max_dims=3,
                                                                   min_side=0, max_side=3))
    y_shape = (n, *draw(st.sampled_from([(), (2,)]))) if good else draw(
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
    x, y = draw(arrays(x_shape)), draw(arrays(y_shape))
    if draw(st.booleans()):
        x, y = x.tolist(), y.tolist()
    return x, y


@st.composite
def loader_results(draw: st.DrawFn, input_shape: tuple[int, ...]) -> object:
    form = draw(st.sampled_from(["local", "four", "four", "pairs", "batches", "junk"]))
    if form == "junk":
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=3),
                              st.lists(st.integers(), max_size=5), st.tuples(st.none(), st.none())))
    train = draw(xy(input_shape, min_n=draw(st.sampled_from([0, 1, 1, 1]))))
    test = draw(xy(input_shape))
    if form == "local":
        return LocalData(train[0], train[1], test[0], test[1])
    if form == "four":
        return (*train, *test)
    if form == "pairs":
        return train, test
    batches = draw(st.lists(xy(input_shape), max_size=3))
    return iter(batches), [test]


@FUZZ
@given(st.data())
def test_fuzz_check_data(data):
    input_shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    result = data.draw(loader_results(input_shape))
    try:
        d = check_data(result, input_shape)
    except DataError as e:
        assert e.reason == "data_error" and e.detail and "\n" not in e.detail
        event("refused")
        return
    event("accepted")
    assert_valid(d, input_shape)


CSV_ALPHABET = st.sampled_from(list("0123456789.,-+e\n\r \"") + ["nan", "inf", "a", "label",
                                                                     "\x00", "\u00e9"])
GOOD_CELLS = st.one_of(st.integers(-5, 5).map(str), st.floats(-1e3, 1e3).map(repr),
                       st.sampled_from([" 3 ", '"4"', "1_0", "-0", "2.", ".5e1"]))
BAD_CELLS = st.sampled_from(["", "x", "nan", "-inf", "1e39", "\u00e9", '"', "1,2"])


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any],
           one_in: int) -> st.SearchStrategy[Any]:
    """``bad`` about once in ``one_in`` draws (Hypothesis favours the ends of a range)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: bad if i == one_in // 2 else good)


ROW = mostly(st.lists(mostly(GOOD_CELLS, BAD_CELLS, 40), min_size=3, max_size=3),
             st.lists(st.one_of(GOOD_CELLS, BAD_CELLS), max_size=4), 20).map(",".join)
ROWS = st.lists(ROW, min_size=1, max_size=12).map(lambda rows: "".join(r + "\n" for r in rows))
TEXT = st.lists(CSV_ALPHABET, max_size=120).map("".join)
HEADERS = [b"", b"a,label,a\n", b"label,a\r\n", b"\xef\xbb\xbfa,b,label\n"]


@FUZZ
@given(body=mostly(ROWS.map(str.encode), st.one_of(st.binary(max_size=200), TEXT.map(str.encode)),
                   4),
       header=mostly(st.just(b"a,b,label\n"), st.sampled_from(HEADERS), 3),
       window=st.sampled_from([None, 1, 2]), stride=st.sampled_from([None, 1, 3]),
       fraction=st.sampled_from([0, 0.5]))
def test_fuzz_csv_loader(tmp_path_factory, body, header, window, stride, fraction):
    root = tmp_path_factory.mktemp("csvfuzz", numbered=True)
    (root / "d.csv").write_bytes(header + body)
    opts = {"path": "d.csv", "label": "label", "window": window, "test_fraction": fraction,
            "stride": stride if window else None}
    for name in ("csv", "rolling"):
        try:
            raw = BUILTIN_LOADERS[name](make_ctx(root, **opts, last=50))
        except DataError as e:
            assert e.reason == "data_error" and e.detail and "\n" not in e.detail
            event(f"{name} refused")
            continue
        event(f"{name} accepted")
        assert isinstance(raw, LocalData)
        assert raw.x_train.ndim == (2 if window is None else 3)
        d = check_data(raw, raw.x_train.shape[1:])
        assert_valid(d, raw.x_train.shape[1:])
        assert_matches(d, (raw.x_train, raw.y_train, raw.x_test, raw.y_test))
