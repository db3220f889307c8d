"""Device-side data loaders: the project's ``loader`` turns a device's own files into arrays.

A loader is called on the device once per round with a :class:`DeviceContext` (the device's id,
region, the project directory and its merged ``loader_options``) and returns its local train and
test data. :func:`load_device_data` calls it and :func:`check_data` checks and normalizes what it
returned; anything wrong with the data (a missing file, a wrong shape or dtype, NaN, an empty
training set, an exception in the loader) raises :class:`DataError` (reason ``data_error``): the
device logs one line, counts the rejection and sits the round out. A loader that cannot even be
found (:func:`resolve_loader`) is a configuration error and raises ``ValueError`` at start-up.

Built-in loaders (:data:`BUILTIN_LOADERS`), all reading option ``path`` (relative to the project
directory; a file, or a directory whose files of the loader's type are read in name order and
concatenated):

* ``npz`` — arrays ``x_train, y_train, x_test, y_test``, or ``x, y`` of which the last
  ``test_fraction`` (0.2) of the records is the test set. Pickled object arrays are refused.
* ``csv`` — a header row, then one record per row. ``label`` names the label column, ``features``
  the feature columns (default: all others, in file order). With ``window`` W (and ``stride``,
  default W) a sample is W consecutive records, shape ``(W, F)``, labelled with its last record's
  label; without, a sample is one record, shape ``(F,)``. The last ``test_fraction`` (0.2) of the
  samples (the most recent records) is the test set. Integral labels become int32.
* ``parquet`` — as ``csv``, read with pyarrow (``pip install fedstream[parquet]``).
* ``rolling`` — as ``csv``, on an append-only CSV store that another program keeps writing: only
  the last ``last`` complete records are read, seeking from the end of the file; a trailing line
  without its newline is still being written and is ignored. Records must be one line each.

Options may arrive as strings (``--data window=32``); numbers are parsed and checked (a window of
0, a negative ``last``, a ``test_fraction`` outside ``[0, 1)`` are :class:`DataError`).

Only numpy and the standard library are imported here; pyarrow is imported by the Parquet loader
when it runs, and pandas is never used.

Example:
    >>> loader = resolve_loader("csv")
    >>> ctx = DeviceContext("SN-00042A", "region-0", Path("iot-anomaly"),
    ...                     device_options({"path": "data/{device_id}.csv", "label": "fault"},
    ...                                    {"window": "32"}, device_id="SN-00042A",
    ...                                    region="region-0"))
    >>> data = load_device_data(loader, ctx, input_shape=(32, 6))
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from schemas.errors import InvalidMessage, Reason

DEFAULT_TEST_FRACTION = 0.2
_F32_MAX = float(np.finfo(np.float32).max)
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_BLOCK = 1 << 16                 # bytes read per seek when the rolling loader reads backwards
_MAX_HEADER = 1 << 20            # a header line longer than this is not a CSV header
_PLACEHOLDER = re.compile(r"\{(device_id|region)\}")


class DataError(InvalidMessage):
    """The device's local data is missing or unusable (reason data_error)."""

    def __init__(self, detail: str):
        super().__init__(Reason.DATA_ERROR, detail)


@dataclass(frozen=True)
class DeviceContext:
    """What a loader knows about the device it runs on.

    Args:
        device_id: the fleet's own id of the device, e.g. ``"SN-00042A"``.
        region: the device's region (from the trust store).
        root: the project directory; relative paths in options resolve against it.
        options: the project's ``loader_options`` overridden by the device's own settings, with
            ``{device_id}`` and ``{region}`` substituted (:func:`device_options`).
    """

    device_id: str
    region: str
    root: Path
    options: Mapping[str, Any]


@dataclass(frozen=True)
class LocalData:
    """A device's local train and test sets, as :func:`check_data` returns them.

    ``x_*`` are float32 of shape ``(n, *input_shape)``; ``y_*`` hold one label per example,
    int32 if the labels are integers, float32 otherwise. The test set may be empty.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------- options


def device_options(defaults: Mapping[str, Any], overrides: Mapping[str, Any], *, device_id: str,
                   region: str) -> dict[str, Any]:
    """A device's loader options: ``defaults`` overridden by ``overrides``, placeholders filled.

    ``"{device_id}"`` and ``"{region}"`` are replaced in every string value (also inside lists,
    tuples and nested tables) in one pass: other braces are left alone and an id that happens to
    contain ``"{region}"`` is not substituted again. The inputs are not modified.
    """
    values = {"device_id": device_id, "region": region}

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, tuple):
            return tuple(fill(v) for v in value)
        if isinstance(value, Mapping):
            return {k: fill(v) for k, v in value.items()}
        return value

    return {key: fill(value) for key, value in {**defaults, **overrides}.items()}


def _int_option(options: Mapping[str, Any], name: str, default: int | None) -> int | None:
    """Option ``name`` as a positive integer (it may arrive as a string); ``default`` if unset."""
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        n = None
    elif isinstance(value, Integral):
        n = int(value)
    elif isinstance(value, float):
        n = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            n = None
    else:
        n = None
    if n is None or n < 1:
        raise DataError(f"option {name}={value!r} must be a positive integer")
    return n


def _test_fraction(options: Mapping[str, Any]) -> float:
    value = options.get("test_fraction")
    if value is None:
        return DEFAULT_TEST_FRACTION
    f: float | None = None
    if isinstance(value, Real) and not isinstance(value, bool):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            f = None
    if f is None or not 0.0 <= f < 1.0:
        raise DataError(f"option test_fraction={value!r} must be a number in [0, 1)")
    return f


def _label_option(options: Mapping[str, Any]) -> str:
    label = options.get("label")
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"option label must name the label column, got {label!r}")
    return label.strip()


def _features_option(options: Mapping[str, Any]) -> list[str] | None:
    value = options.get("features")
    if value is None:
        return None
    if isinstance(value, str):       # from the command line: --data features=a,b,c
        names = [v.strip() for v in value.split(",")]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise DataError(f"option features={value!r} must be a list of column names")
    if not names or not all(names):
        raise DataError(f"option features={value!r} must name at least one column")
    if len(set(names)) != len(names):
        raise DataError(f"option features={value!r} names a column twice")
    return names


@dataclass(frozen=True)
class _TableOptions:
    """The options shared by the tabular loaders (csv, parquet, rolling)."""

    label: str
    features: list[str] | None
    window: int | None
    stride: int
    test_fraction: float

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> _TableOptions:
        window = _int_option(options, "window", None)
        stride = _int_option(options, "stride", None)
        if stride is not None and window is None:
            raise DataError(f"option stride={options['stride']!r} needs option window")
        features = _features_option(options)
        label = _label_option(options)
        if features is not None and label in features:
            raise DataError(f"option features names the label column {label!r}")
        return cls(label=label, features=features, window=window,
                   stride=stride if stride is not None else (window or 1),
                   test_fraction=_test_fraction(options))


def _files(ctx: DeviceContext, suffix: str) -> list[Path]:
    """The files option ``path`` names: itself, or a directory's ``*suffix`` files by name."""
    value = ctx.options.get("path")
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise DataError(f"option path must name a file or directory, got {value!r}")
    path = Path(ctx.root) / os.fspath(value)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.name.endswith(suffix) and p.is_file()),
                       key=lambda p: p.name)
        if not files:
            raise DataError(f"directory {path} holds no {suffix} files")
        return files
    if not path.exists():
        raise DataError(f"{path} does not exist")
    raise DataError(f"{path} is neither a file nor a directory")


def _split_count(n: int, test_fraction: float) -> int:
    """How many of ``n`` samples are test samples: ``floor(n * test_fraction)`` (< n)."""
    return min(n - 1, math.floor(n * test_fraction + 1e-9)) if n else 0


# --------------------------------------------------------------------------- checking


def _where(name: str, batch: int | None) -> str:
    return name if batch is None else f"{name} (batch {batch})"


def _as_array(value: object, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:
        raise DataError(f"{name} is not an array: {_describe(exc)}") from exc


def _first_bad(mask: np.ndarray) -> int:
    """The example index of the first True in ``mask`` (examples along axis 0)."""
    return int(np.unravel_index(int(np.argmax(mask)), mask.shape)[0])


def _check_x(x_raw: object, name: str, input_shape: tuple[int, ...]) -> np.ndarray:
    x = _as_array(x_raw, name)
    if x.ndim == 1 and x.shape[0] == 0:              # [] : no examples at all
        return np.zeros((0, *input_shape), np.float32)
    if x.ndim == 0:
        raise DataError(f"{name} is a scalar, expected an array of examples of shape "
                        f"{input_shape}")
    if x.shape[1:] != input_shape:
        raise DataError(f"{name} has per-example shape {x.shape[1:]}, the project's input_shape "
                        f"is {input_shape}")
    if x.dtype.kind not in "biufO":
        raise DataError(f"{name} has dtype {x.dtype}, expected numbers (bool, int or float)")
    try:
        with np.errstate(all="ignore"):
            x32 = x.astype(np.float32, copy=False)
    except Exception as exc:
        raise DataError(f"{name} is not convertible to float32: {_describe(exc)}") from exc
    bad = ~np.isfinite(x32)
    if bad.any():
        i = _first_bad(bad)
        if x.dtype.kind == "O":
            raise DataError(f"{name} holds a value that is not a finite float32 number (None, "
                            f"NaN, Inf or too large) in example {i}")
        if x.dtype.kind == "f" and not np.isfinite(x[i]).all():
            raise DataError(f"{name} contains NaN or Inf (example {i})")
        raise DataError(f"{name} contains a value too large for float32 (example {i})")
    return x32


def _check_y(y_raw: object, name: str, n: int) -> np.ndarray:
    y = _as_array(y_raw, name)
    if y.ndim == 0:
        raise DataError(f"{name} is a scalar, expected one label per example")
    if y.shape[0] != n:
        raise DataError(f"{name} has {y.shape[0]} labels for {n} examples")
    kind = y.dtype.kind
    if kind in "biu":
        if y.size and kind != "b":
            lo, hi = int(y.min()), int(y.max())
            if lo < _I32_MIN or hi > _I32_MAX:
                raise DataError(f"{name} holds integer labels outside the int32 range "
                                f"({lo}..{hi})")
        return y.astype(np.int32, copy=False)
    if kind != "f":
        raise DataError(f"{name} has dtype {y.dtype}, expected numeric labels (bool, int or "
                        f"float)")
    with np.errstate(all="ignore"):
        y32 = y.astype(np.float32, copy=False)
    bad = ~np.isfinite(y32)
    if bad.any():
        i = _first_bad(bad)
        if not np.isfinite(y[i]).all():
            raise DataError(f"{name} contains NaN or Inf (example {i})")
        raise DataError(f"{name} contains a value too large for float32 (example {i})")
    return y32


def _check_pair(x: object, y: object, split: str, input_shape: tuple[int, ...],
                batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x32 = _check_x(x, _where(f"x_{split}", batch), input_shape)
    return x32, _check_y(y, _where(f"y_{split}", batch), x32.shape[0])


def _is_pair(value: object) -> bool:
    return isinstance(value, tuple | list) and len(value) == 2


def _check_part(part: object, split: str,
                input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One side of a ``(train, test)`` pair: an ``(x, y)`` pair of arrays, or ``(x, y)`` batches.

    A 2-sequence is taken for ``(x, y)`` unless both its items are themselves 2-sequences, in
    which case it is two batches.
    """
    what = "training" if split == "train" else "test"
    if isinstance(part, tuple | list) and len(part) == 2 and not all(map(_is_pair, part)):
        return _check_pair(part[0], part[1], split, input_shape)
    if isinstance(part, str | bytes | np.ndarray | Mapping) or not isinstance(part, Iterable):
        raise DataError(f"the {what} set is a {type(part).__name__}, expected an (x, y) pair of "
                        f"arrays or an iterable of (x, y) batches")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    try:
        for i, batch in enumerate(part):
            if not _is_pair(batch):
                raise DataError(f"{what} batch {i} is a {type(batch).__name__}, expected an "
                                f"(x, y) pair")
            xb, yb = _check_pair(batch[0], batch[1], split, input_shape, batch=i)
            if not yb.shape[0]:
                continue                               # an empty batch
            if ys and ys[0].shape[1:] != yb.shape[1:]:
                raise DataError(f"y_{split} (batch {i}) has per-example shape {yb.shape[1:]}, "
                                f"earlier batches have {ys[0].shape[1:]}")
            xs.append(xb)
            ys.append(yb)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"reading the {what} batches failed: {_describe(exc)}") from exc
    if not xs:
        return np.zeros((0, *input_shape), np.float32), np.zeros((0,), np.int32)
    y = np.concatenate(ys)
    if y.dtype != np.int32:
        y = y.astype(np.float32)            # int32 batches mixed with float32 ones
    return np.concatenate(xs), y


def check_data(data: object, input_shape: tuple[int, ...]) -> LocalData:
    """Check what a loader returned and normalize it to float32 features and int32/float32 labels.

    Args:
        data: a :class:`LocalData`, a 4-tuple ``(x_train, y_train, x_test, y_test)``, or a pair
            ``(train, test)`` where each is an ``(x, y)`` pair of arrays or an iterable of
            ``(x, y)`` batches (concatenated).
        input_shape: the project's shape of one example, without the batch axis.

    Returns:
        :class:`LocalData` with ``x`` float32 of shape ``(n, *input_shape)`` and ``y`` of ``n``
        labels, int32 if their dtype is bool or integer, else float32. An empty test set comes
        back as ``(0, *input_shape)`` features and labels of the training labels' dtype.

    Raises:
        DataError: one sentence saying what is wrong and where: a per-example shape other than
            ``input_shape``, non-numeric values, labels that do not match the examples one for
            one, NaN or Inf, integer labels beyond int32, an empty training set.
    """
    shape = tuple(int(d) for d in input_shape)
    if isinstance(data, LocalData):
        parts: tuple[object, ...] = (data.x_train, data.y_train, data.x_test, data.y_test)
    elif isinstance(data, tuple | list) and len(data) in (2, 4):
        parts = tuple(data)
    else:
        raise DataError(f"the loader returned a {type(data).__name__}; expected LocalData, "
                        f"(x_train, y_train, x_test, y_test) or (train, test)")
    if len(parts) == 4:
        x_train, y_train = _check_pair(parts[0], parts[1], "train", shape)
        x_test, y_test = _check_pair(parts[2], parts[3], "test", shape)
    else:
        x_train, y_train = _check_part(parts[0], "train", shape)
        x_test, y_test = _check_part(parts[1], "test", shape)
    if x_train.shape[0] == 0:
        raise DataError("the training set is empty (x_train has 0 examples)")
    if y_test.shape[0] == 0:
        y_test = np.zeros((0, *y_train.shape[1:]), y_train.dtype)
    elif y_test.shape[1:] != y_train.shape[1:]:
        raise DataError(f"y_test has per-example shape {y_test.shape[1:]}, y_train has "
                        f"{y_train.shape[1:]}")
    return LocalData(x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------- npz


def _npz_arrays(file: Path) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file that the npz loader uses."""
    try:
        with open(file, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{file} is a single .npy array, not an .npz archive")
            with z:
                keys = set(z.files)
                if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                    wanted: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
                elif {"x", "y"} <= keys:
                    wanted = ("x", "y")
                else:
                    raise DataError(f"{file} holds arrays {sorted(keys)}; expected x_train, "
                                    f"y_train, x_test, y_test or x, y")
                out = {}
                for key in wanted:
                    try:
                        out[key] = z[key]
                    except ValueError as exc:
                        if "allow_pickle" in str(exc):
                            raise DataError(f"{file}: array {key!r} holds pickled Python objects; "
                                            f"save numeric arrays") from exc
                        raise
                return out
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{file} is not a readable .npz file: {_describe(exc)}") from exc


def _concat(arrays: Sequence[np.ndarray], files: Sequence[Path], key: str) -> np.ndarray:
    """Concatenate one array across files, refusing scalars and mismatched per-example shapes."""
    if len(arrays) == 1:
        return arrays[0]
    for a, f in zip(arrays, files):
        if a.ndim == 0:
            raise DataError(f"{f}: array {key!r} is a scalar, expected one entry per record")
        if a.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{f}: array {key!r} has per-record shape {a.shape[1:]}, {files[0]} "
                            f"has {arrays[0].shape[1:]}")
    try:
        return np.concatenate(arrays)
    except Exception as exc:
        raise DataError(f"cannot concatenate array {key!r} of {files[0].parent}: "
                        f"{_describe(exc)}") from exc


def load_npz(ctx: DeviceContext) -> LocalData:
    """The ``npz`` loader: ``x_train, y_train, x_test, y_test`` or ``x, y`` from ``.npz`` files.

    With ``x, y`` the last ``floor(n * test_fraction)`` records are the test set (no shuffling).
    A directory's files must all hold the same kind of arrays.
    """
    files = _files(ctx, ".npz")
    loaded = [_npz_arrays(f) for f in files]
    kinds = {"x" in a for a in loaded}
    if len(kinds) > 1:
        raise DataError(f"{files[0].parent} mixes files of x, y with files of x_train, y_train, "
                        f"x_test, y_test")
    if kinds == {True}:
        test_fraction = _test_fraction(ctx.options)
        for a, f in zip(loaded, files):
            for key in ("x", "y"):
                if a[key].ndim == 0:
                    raise DataError(f"{f}: array {key!r} is a scalar, expected one entry per "
                                    f"record")
            if a["x"].shape[0] != a["y"].shape[0]:
                raise DataError(f"{f}: x has {a['x'].shape[0]} records, y has "
                                f"{a['y'].shape[0]}")
        x = _concat([a["x"] for a in loaded], files, "x")
        y = _concat([a["y"] for a in loaded], files, "y")
        n_train = x.shape[0] - _split_count(x.shape[0], test_fraction)
        return LocalData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    return LocalData(*(_concat([a[k] for a in loaded], files, k)
                       for k in ("x_train", "y_train", "x_test", "y_test")))


# --------------------------------------------------------------------------- tables


def _columns(where: object, header: Sequence[str], opts: _TableOptions,
             features: Sequence[str]) -> list[int]:
    """Indices of ``[label, *features]`` in ``header``."""
    if len(set(header)) != len(header):
        dup = sorted({c for c in header if header.count(c) > 1})
        raise DataError(f"{where} has duplicate column names {dup}")
    index = {c: i for i, c in enumerate(header)}
    out = []
    for c in (opts.label, *features):
        if c not in index:
            role = "label column" if c == opts.label else "feature column"
            raise DataError(f"{where} has no {role} {c!r} (columns: {list(header)})")
        out.append(index[c])
    return out


def _resolve_features(where: object, header: Sequence[str], opts: _TableOptions) -> list[str]:
    if opts.features is not None:
        return list(opts.features)
    features = [c for c in header if c != opts.label]
    if not features:
        raise DataError(f"{where} has no feature columns besides the label {opts.label!r}")
    return features


def _check_values(where: object, values: np.ndarray, names: Sequence[str],
                  locations: Sequence[str]) -> None:
    """Refuse NaN, Inf and values beyond float32 in a ``(records, [label, *features])`` table."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (np.abs(values) > _F32_MAX)
    if bad.any():
        i, j = (int(v) for v in np.unravel_index(int(np.argmax(bad)), bad.shape))
        v = float(values[i, j])
        what = "is not a finite number" if not math.isfinite(v) else "is too large for float32"
        raise DataError(f"{where}, {locations[i]}, column {names[j]!r}: {v!r} {what}")


def _parse_rows(where: object, header: Sequence[str], rows: Iterable[tuple[str, list[str]]],
                opts: _TableOptions, features: Sequence[str]) -> np.ndarray:
    """Parse CSV records into a float64 table ``(records, 1 + F)``: the label, then features."""
    idx = _columns(where, header, opts, features)
    names = [opts.label, *features]
    table: list[list[float]] = []
    locations: list[str] = []
    for loc, cells in rows:
        if not cells or cells == [""]:
            continue                                   # a blank line
        if len(cells) != len(header):
            raise DataError(f"{where}, {loc}: {len(cells)} fields, the header has {len(header)}")
        try:
            table.append([float(cells[i]) for i in idx])
        except ValueError:
            for i, name in zip(idx, names):
                try:
                    float(cells[i])
                except ValueError:
                    raise DataError(f"{where}, {loc}, column {name!r}: {cells[i]!r} is not a "
                                    f"number") from None
            raise                                      # unreachable
        locations.append(loc)
    values = np.array(table, np.float64).reshape(len(table), len(names))
    _check_values(where, values, names, locations)
    return values


def _samples(where: object, values: np.ndarray, opts: _TableOptions) -> LocalData:
    """Turn a ``(records, 1 + F)`` table into windows or records and split off the test set."""
    n = values.shape[0]
    if n == 0:
        raise DataError(f"{where} has a header but no records: the training set is empty")
    labels = values[:, 0]
    if (np.all(labels == np.floor(labels)) and labels.min() >= _I32_MIN
            and labels.max() <= _I32_MAX):
        y = labels.astype(np.int32)
    else:
        y = labels.astype(np.float32)
    x = values[:, 1:].astype(np.float32)
    if opts.window is not None:
        w = opts.window
        if n < w:
            raise DataError(f"{where}: the training set is empty: {n} records, fewer than one "
                            f"window of {w}")
        view = np.lib.stride_tricks.sliding_window_view(x, w, axis=0)   # (n-w+1, F, w)
        x = np.ascontiguousarray(view[::opts.stride].transpose(0, 2, 1))
        y = y[w - 1::opts.stride]
    n_train = x.shape[0] - _split_count(x.shape[0], opts.test_fraction)
    return LocalData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _csv_header(file: Path, reader: Iterator[list[str]]) -> list[str]:
    for row in reader:
        if row and row != [""]:
            return [c.strip() for c in row]
    raise DataError(f"{file} is empty: no header row")


def _read_csv(file: Path, opts: _TableOptions,
              features: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """One CSV file as a float64 ``(records, 1 + F)`` table, and the feature names it used."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = _csv_header(file, reader)
            feats = features if features is not None else _resolve_features(file, header, opts)
            rows = ((f"line {reader.line_num}", row) for row in reader)
            return _parse_rows(file, header, rows, opts, feats), feats
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text: {exc}") from exc
    except (OSError, csv.Error) as exc:
        raise DataError(f"{file} is not a readable CSV file: {_describe(exc)}") from exc


def _load_tables(
    ctx: DeviceContext, suffix: str,
    read: Callable[[Path, _TableOptions, list[str] | None], tuple[np.ndarray, list[str]]],
) -> LocalData:
    """Every ``suffix`` file of ``path`` read with ``read`` (the first file fixes the feature
    columns of the rest), concatenated in name order and cut into samples."""
    opts = _TableOptions.parse(ctx.options)
    files = _files(ctx, suffix)
    tables = []
    features: list[str] | None = None
    for file in files:
        table, features = read(file, opts, features)
        tables.append(table)
    where = files[0] if len(files) == 1 else files[0].parent
    return _samples(where, np.concatenate(tables), opts)


def load_csv(ctx: DeviceContext) -> LocalData:
    """The ``csv`` loader: records of CSV files with a header row (options in the module doc)."""
    return _load_tables(ctx, ".csv", _read_csv)


def _read_parquet(file: Path, opts: _TableOptions,
                  features: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """One Parquet file as a float64 ``(records, 1 + F)`` table, and the feature names it used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        header = list(pq.read_schema(file).names)
        feats = features if features is not None else _resolve_features(file, header, opts)
        names = [opts.label, *feats]
        _columns(file, header, opts, feats)
        table = pq.read_table(file, columns=names)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{file} is not a readable Parquet file: {_describe(exc)}") from exc
    columns = []
    for name in names:
        column = table.column(name)
        t = column.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_decimal(t)):
            raise DataError(f"{file}, column {name!r} has type {t}, expected numbers")
        if column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{file}, row {row + 1}, column {name!r}: missing value")
        try:
            columns.append(np.asarray(column.to_numpy(), np.float64))
        except Exception as exc:
            raise DataError(f"{file}, column {name!r}: {_describe(exc)}") from exc
    values = np.stack(columns, axis=1)
    _check_values(file, values, names, [f"row {i + 1}" for i in range(values.shape[0])])
    return values, feats


def load_parquet(ctx: DeviceContext) -> LocalData:
    """The ``parquet`` loader: as ``csv``, on Parquet files read with pyarrow."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise DataError("the parquet loader needs pyarrow: pip install fedstream[parquet]"
                        ) from exc
    return _load_tables(ctx, ".parquet", _read_parquet)


# --------------------------------------------------------------------------- rolling


def _read_at(f: BinaryIO, pos: int, size: int, file: Path) -> bytes:
    f.seek(pos)
    data = f.read(size)
    if len(data) != size:
        raise DataError(f"{file} shrank while being read")
    return data


def _header_line(f: BinaryIO, size: int, file: Path) -> tuple[bytes, int] | None:
    """The first line of the file (without its newline) and where the records start.

    ``None`` if the file has no complete first line yet.
    """
    buf = b""
    while len(buf) < min(size, _MAX_HEADER):
        buf += _read_at(f, len(buf), min(_BLOCK, size - len(buf)), file)
        nl = buf.find(b"\n")
        if nl >= 0:
            return buf[:nl], nl + 1
    if size > _MAX_HEADER:
        raise DataError(f"{file}: the first line is longer than {_MAX_HEADER} bytes, not a header")
    return None


def _tail_records(f: BinaryIO, start: int, size: int, n: int,
                  file: Path) -> list[tuple[int, bytes]]:
    """The last ``n`` complete non-blank lines in ``[start, size)`` with their byte offsets.

    Reads backwards in blocks of ``_BLOCK`` bytes; bytes after the last newline are a record
    still being written and are skipped.
    """
    pos = size
    carry = b""
    found: list[tuple[int, bytes]] = []
    complete = False                 # has the last newline been seen (the end of complete data)?
    while pos > start and len(found) < n:
        step = min(_BLOCK, pos - start)
        pos -= step
        parts = (_read_at(f, pos, step, file) + carry).split(b"\n")
        carry = parts[0]
        offset = pos + len(carry) + 1
        lines: list[tuple[int, bytes]] = []
        for part in parts[1:]:
            lines.append((offset, part))
            offset += len(part) + 1
        if not complete and lines:
            lines.pop()              # the bytes after the last newline
            complete = True
        found.extend((o, line) for o, line in reversed(lines) if line.strip())
    if pos <= start and complete and carry.strip() and len(found) < n:
        found.append((start, carry))
    found = found[:n]
    found.reverse()
    return found


def _rolling_file(file: Path, n: int, opts: _TableOptions, features: list[str] | None,
                  optional: bool) -> tuple[np.ndarray, list[str]] | None:
    """The last ``n`` complete records of one append-only CSV file as a float64 table.

    ``None`` for an ``optional`` file without a complete header line yet (a store's newest file,
    just created); such a file is a :class:`DataError` otherwise.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = _header_line(f, size, file) if size else None
            if head is None:
                if optional:
                    return None
                if size == 0:
                    raise DataError(f"{file} is empty: no header row")
                raise DataError(f"{file} has no complete header line yet: the training set is "
                                f"empty")
            header_bytes, start = head
            records = _tail_records(f, start, size, n, file)
    except OSError as exc:
        raise DataError(f"{file} is not readable: {_describe(exc)}") from exc
    try:
        header_row = next(csv.reader([header_bytes.decode("utf-8-sig").rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: the header line is not CSV text: {_describe(exc)}") from exc
    header = [c.strip() for c in header_row]
    if not header or header == [""]:
        raise DataError(f"{file} is empty: no header row")
    feats = features if features is not None else _resolve_features(file, header, opts)

    def rows() -> Iterator[tuple[str, list[str]]]:
        for offset, line in records:
            loc = f"record at byte {offset}"
            try:
                text = line.decode("utf-8").rstrip("\r")
                yield loc, next(csv.reader([text]), [])
            except (UnicodeDecodeError, csv.Error) as exc:
                raise DataError(f"{file}, {loc}: not CSV text: {_describe(exc)}") from exc

    return _parse_rows(file, header, rows(), opts, feats), feats


def load_rolling(ctx: DeviceContext) -> LocalData:
    """The ``rolling`` loader: the last ``last`` complete records of an append-only CSV store.

    Only the header line and the tail of the file are read, so the store may grow without
    bound. A directory's files are taken as one store in name order (the newest last); files
    without a complete header line yet are skipped.
    """
    opts = _TableOptions.parse(ctx.options)
    last = _int_option(ctx.options, "last", None)
    if last is None:
        raise DataError("the rolling loader needs option last (how many records to use)")
    files = _files(ctx, ".csv")
    tables: list[np.ndarray] = []
    needed = last
    features: list[str] | None = None
    # the feature names come from the newest file that has a header; older files must have them
    for file in reversed(files):
        if needed <= 0:
            break
        got = _rolling_file(file, needed, opts, features, optional=len(files) > 1)
        if got is not None:
            table, features = got
            tables.append(table)
            needed -= table.shape[0]
    where = files[0] if len(files) == 1 else files[0].parent
    if not tables:
        raise DataError(f"no file in {where} has a complete header line: the training set is "
                        f"empty")
    return _samples(where, np.concatenate(tables[::-1]), opts)


# --------------------------------------------------------------------------- resolving, loading


BUILTIN_LOADERS: dict[str, Callable[[DeviceContext], object]] = {
    "npz": load_npz,
    "csv": load_csv,
    "parquet": load_parquet,
    "rolling": load_rolling,
}


def resolve_loader(spec: str) -> Callable[[DeviceContext], object]:
    """The loader a project names: a built-in name or ``"package.module:function"``.

    Raises:
        ValueError: an unknown name, a module that fails to import, a missing or non-callable
            attribute. This is a configuration error, raised at start-up (not a ``DataError``).
    """
    if not isinstance(spec, str):
        raise ValueError(f"loader must be a string, got {spec!r}")
    if spec in BUILTIN_LOADERS:
        return BUILTIN_LOADERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ValueError(f"unknown loader {spec!r}: expected one of {sorted(BUILTIN_LOADERS)} "
                         f"or 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name.strip())
    except Exception as exc:
        raise ValueError(f"loader {spec!r}: cannot import {module_name.strip()}: "
                         f"{_describe(exc)}") from exc
    for part in attr.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(f"loader {spec!r}: {module_name.strip()} has no attribute "
                             f"{attr.strip()!r}") from exc
    if not callable(obj):
        raise ValueError(f"loader {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _loader_name(loader: Callable[..., object]) -> str:
    for name, builtin in BUILTIN_LOADERS.items():
        if loader is builtin:
            return name
    module = getattr(loader, "__module__", None)
    qualname = getattr(loader, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}:{qualname}"
    return repr(loader)


def _describe(exc: BaseException) -> str:
    """An exception on one line: its message, or its type if the message is empty or bare."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) or not text:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def load_device_data(loader: Callable[[DeviceContext], object], ctx: DeviceContext,
                     input_shape: tuple[int, ...]) -> LocalData:
    """Run ``loader`` for the device and check what it returns (:func:`check_data`).

    Raises:
        DataError: the loader raised (``loader NAME failed: ...``, chained to the original
            exception; a ``DataError`` from the loader passes unchanged) or returned unusable
            data.
    """
    name = _loader_name(loader)
    try:
        data = loader(ctx)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"loader {name} failed: {_describe(exc)}") from exc
    try:
        return check_data(data, input_shape)
    except DataError:
        raise
    except Exception as exc:          # e.g. a batch generator of the loader that raises
        raise DataError(f"loader {name} returned unusable data: {_describe(exc)}") from exc
