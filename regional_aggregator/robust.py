"""Robust aggregation rules for a trusted regional aggregator in plaintext mode (pure: numpy only).

In plaintext mode the regional aggregator sees every device's model delta for the round, so it
can aggregate them with a Byzantine-robust rule instead of the plain weighted mean. Every rule is
a frozen dataclass with one method, ``aggregate(updates, weights) -> RobustResult`` (the same
seam as an optax transformation or a Flower strategy), where ``updates`` is an ``(n, d)`` array
of un-weighted per-device deltas and ``weights`` the ``(n,)`` positive sample counts:

* :class:`WeightedMean` -- FedAvg, ``sum_i w_i u_i / sum_i w_i`` (McMahan et al. 2017). The
  default, no-op rule.
* :class:`NormBound` -- scale every row down to L2 norm ``<= max_norm``, then the weighted mean
  (norm bounding, Sun et al. 2019).
* :class:`CoordinateMedian` -- coordinate-wise median, un-weighted (Yin et al. 2018).
* :class:`TrimmedMean` -- coordinate-wise ``beta``-trimmed mean, un-weighted (Yin et al. 2018).
* :class:`Krum` / :class:`MultiKrum` -- the row(s) whose ``n - f - 2`` nearest other rows are
  closest in squared L2 distance (Blanchard et al. 2017).

:func:`make_rule` builds a rule from a config string such as ``"trimmed:0.2"``.

The rules follow Flower's reference implementations in ``flwr.server.strategy.aggregate``
(``aggregate``, ``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum``, checked
against flwr 1.41 by ``bench/flower_robust_compare.py``; results agree to float rounding). The
deliberate differences, none of which changes the result on inputs Flower accepts and has no
exact ties on:

* Krum/Multi-Krum break exact score ties by the rows' values (then weights), not by arrival
  index, so the result does not depend on the order in which devices' updates arrived. Flower
  takes the first index (``np.argmin``) for Krum and an unstable ``np.argsort`` for Multi-Krum.
* Flower's Multi-Krum silently returns fewer rows when ``to_keep > n`` and uses
  ``max(1, n - f - 2)`` neighbours when ``n`` is too small; here both raise ``ValueError``
  (Krum's guarantee needs ``n > 2f + 2``).
* Multi-Krum averages the selected rows weighted by sample count, like Flower; Blanchard et al.
  average them uniformly.
* Norm bounding computes each row's norm without overflow and leaves an all-zero row as is.
  Flower's ``clip_inputs_inplace`` raises ``ZeroDivisionError`` on a zero update, and its norm
  overflows to ``inf`` for entries near 1e308, which clips such a row to all zeros.
* Every rule raises ``ValueError`` rather than return a non-finite aggregate (which can only
  happen when finite inputs near the float64 limit overflow).

References:
    Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent." NeurIPS 2017.

    Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates." ICML 2018.

    Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor Federated Learning?"
    arXiv:1911.07963, 2019.

    McMahan, Moore, Ramage, Hampson, Aguera y Arcas. "Communication-Efficient Learning of Deep
    Networks from Decentralized Data." AISTATS 2017.

Example:
    >>> import numpy as np
    >>> rule = make_rule("median")
    >>> res = rule.aggregate(np.array([[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]),
    ...                      np.array([10.0, 20.0, 30.0]))
    >>> res.delta.tolist(), res.kept
    ([3.0, 2.0], (0, 1, 2))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "CoordinateMedian",
    "Krum",
    "MultiKrum",
    "NormBound",
    "RobustResult",
    "RobustRule",
    "TrimmedMean",
    "WeightedMean",
    "make_rule",
]


@dataclass(frozen=True, eq=False)
class RobustResult:
    """The outcome of one robust aggregation.

    Attributes:
        delta: ``(d,)`` float64 aggregate delta (read-only; never a view of the input).
        kept: Ascending indices of the input rows that contributed to ``delta``: all rows for
            the mean, norm bounding, median and trimmed mean; the selected rows for Krum and
            Multi-Krum.
    """

    delta: np.ndarray
    kept: tuple[int, ...]


class RobustRule(Protocol):
    """What every rule implements."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Aggregate one round.

        Args:
            updates: ``(n, d)`` finite per-device model deltas, not weighted.
            weights: ``(n,)`` positive finite sample counts.

        Returns:
            The aggregate and the rows that contributed to it.

        Raises:
            ValueError: On malformed input, or when ``n`` is too small for the rule.
        """
        ...


# --------------------------------------------------------------------------- helpers


def _validate(updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(updates, weights)`` as float64 arrays after checking shapes and values."""
    u = np.asarray(updates, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError(f"updates must be a 2-D (n, d) array, got shape {u.shape}")
    if u.shape[0] == 0:
        raise ValueError("updates is empty: need at least one device's update")
    if w.shape != (u.shape[0],):
        raise ValueError(
            f"weights must have shape ({u.shape[0]},) to match updates {u.shape}, got {w.shape}"
        )
    if not np.all(np.isfinite(u)):
        raise ValueError("updates contain NaN or infinite values")
    if not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError("weights must be finite and > 0 (sample counts)")
    return u, w


def _result(delta: np.ndarray, kept: tuple[int, ...], rule: str) -> RobustResult:
    if not np.all(np.isfinite(delta)):
        raise ValueError(f"{rule} produced a non-finite aggregate (float64 overflow)")
    out = np.array(delta, dtype=np.float64)  # own copy, never a view of the caller's updates
    out.flags.writeable = False
    return RobustResult(delta=out, kept=kept)


def _weighted_mean(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sum_i w_i u_i / sum_i w_i``, with normalised weights so that ``w_i u_i`` cannot overflow."""
    p = w / w.max()
    p = p / p.sum()
    return np.asarray(p @ u, dtype=np.float64)


def _row_norms(u: np.ndarray) -> np.ndarray:
    """L2 norm of each row, rescaling rows whose plain norm overflows."""
    with np.errstate(over="ignore"):  # an overflowing row is recomputed below
        norms = np.asarray(np.linalg.norm(u, axis=1), dtype=np.float64)
    big = ~np.isfinite(norms)
    if np.any(big):
        scale = np.max(np.abs(u[big]), axis=1)
        with np.errstate(over="ignore"):  # a norm beyond float64 is inf, handled by the caller
            norms[big] = scale * np.linalg.norm(u[big] / scale[:, None], axis=1)
    return norms


def _all_rows(n: int) -> tuple[int, ...]:
    return tuple(range(n))


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class WeightedMean:
    """FedAvg (McMahan et al. 2017): ``sum_i w_i u_i / sum_i w_i``. Not robust; the default."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Weighted mean of all rows. See :meth:`RobustRule.aggregate`."""
        u, w = _validate(updates, weights)
        return _result(_weighted_mean(u, w), _all_rows(u.shape[0]), "mean")


@dataclass(frozen=True)
class NormBound:
    """Norm bounding (Sun et al. 2019): clip each update to L2 norm ``max_norm``, then FedAvg.

    Row ``u_i`` becomes ``u_i * min(1, max_norm / ||u_i||)``, so the aggregate's norm is at most
    ``max_norm`` as well. This bounds how far one device can move the model; it does not discard
    anything.

    Attributes:
        max_norm: Positive finite L2 bound per update.
    """

    max_norm: float

    def __post_init__(self) -> None:
        _check_real("max_norm", self.max_norm)
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be finite and > 0, got {self.max_norm!r}")

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Weighted mean of the clipped rows. See :meth:`RobustRule.aggregate`."""
        u, w = _validate(updates, weights)
        norms = _row_norms(u)
        factor = np.ones_like(norms)
        over = norms > self.max_norm
        factor[over] = self.max_norm / norms[over]
        return _result(_weighted_mean(u * factor[:, None], w), _all_rows(u.shape[0]), "norm")


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018), un-weighted, as Flower's ``aggregate_median``.

    With an even ``n`` a coordinate's median is the mean of its two middle values
    (``numpy.median`` semantics). Sample counts are ignored, so a device cannot buy influence
    by claiming a large one.
    """

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Per-coordinate median of all rows. See :meth:`RobustRule.aggregate`."""
        u, _ = _validate(updates, weights)
        return _result(np.median(u, axis=0), _all_rows(u.shape[0]), "median")


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018), as Flower's ``aggregate_trimmed_avg``.

    Per coordinate, the ``k = int(beta * n)`` smallest and ``k`` largest values are dropped and
    the remaining ``n - 2k`` are averaged without weights. ``k`` is computed exactly as Flower
    (and ``scipy.stats.trim_mean``) do, including float rounding of the product: e.g.
    ``0.29 * 100 == 28.999999999999996`` cuts 28 values per side, not 29. ``beta = 0`` is the
    un-weighted mean, which differs from :class:`WeightedMean` when the weights differ.

    Attributes:
        beta: Fraction cut at each end, in ``[0, 0.5)``.
    """

    beta: float

    def __post_init__(self) -> None:
        _check_real("beta", self.beta)
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {self.beta!r}")

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Per-coordinate trimmed mean of all rows. See :meth:`RobustRule.aggregate`."""
        u, _ = _validate(updates, weights)
        n = u.shape[0]
        cut = int(self.beta * n)  # same as Flower's _trim_mean; beta < 0.5 keeps n - 2*cut >= 1
        # A full sort (Flower partitions) fixes the summation order, so the result is bit-for-bit
        # independent of the row order.
        kept_values = np.sort(u, axis=0)[cut : n - cut]
        return _result(np.mean(kept_values, axis=0), _all_rows(n), "trimmed")


def _check_krum_n(n: int, f: int, rule: str) -> None:
    if n <= 2 * f + 2:
        raise ValueError(
            f"{rule} with num_malicious={f} needs n > 2*f + 2 = {2 * f + 2} updates, got n={n}"
        )


def _pairwise_sq_dists(u: np.ndarray) -> np.ndarray:
    """``(n, n)`` squared L2 distances, computed from differences (no Gram-matrix cancellation).

    Each pair is computed once from ``u_j - u_i`` so the matrix is exactly symmetric and an
    entry depends only on the two rows, not on their positions.
    """
    n = u.shape[0]
    dist = np.zeros((n, n), dtype=np.float64)
    with np.errstate(over="ignore"):  # overflow -> inf: that pair is simply very far apart
        for i in range(n - 1):
            diff = u[i + 1 :] - u[i]
            row = np.einsum("ij,ij->i", diff, diff)
            dist[i, i + 1 :] = row
            dist[i + 1 :, i] = row
    return dist


def _krum_order(u: np.ndarray, w: np.ndarray, f: int) -> list[int]:
    """Row indices ordered best first by Krum score (Blanchard et al. 2017).

    ``score(i)`` is the sum of the squared distances from row ``i`` to its ``n - f - 2`` nearest
    other rows. Exact score ties are broken by the rows' values, then their weights, so the
    order of the rows' contents does not depend on the order of the input.
    """
    n = u.shape[0]
    dist = _pairwise_sq_dists(u)
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]  # sorted: a canonical summation order
    scores = nearest.sum(axis=1)

    def compare(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        differ = np.flatnonzero(u[i] != u[j])
        if differ.size:
            k = differ[0]
            return -1 if u[i, k] < u[j, k] else 1
        if w[i] != w[j]:
            return -1 if w[i] < w[j] else 1
        return 0

    return sorted(range(n), key=functools.cmp_to_key(compare))


@dataclass(frozen=True)
class Krum:
    """Krum (Blanchard et al. 2017): the single update closest to its ``n - f - 2`` neighbours.

    Returns that row unchanged (its weight plays no part), as Flower's
    ``aggregate_krum(..., to_keep=0)``. Requires ``n > 2f + 2`` updates.

    Attributes:
        num_malicious: ``f``, the number of Byzantine devices to tolerate (``>= 0``).
    """

    num_malicious: int

    def __post_init__(self) -> None:
        _check_int("num_malicious", self.num_malicious, minimum=0)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """The lowest-score row. See :meth:`RobustRule.aggregate`."""
        u, w = _validate(updates, weights)
        _check_krum_n(u.shape[0], self.num_malicious, "krum")
        best = _krum_order(u, w, self.num_malicious)[0]
        return _result(u[best], (best,), "krum")


@dataclass(frozen=True)
class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017): weighted mean of the ``num_selected`` best Krum rows.

    As Flower's ``aggregate_krum(..., to_keep=num_selected)``, the selected rows are averaged
    weighted by sample count (the paper averages them uniformly). ``num_selected = 1`` gives
    the Krum row; ``num_selected = n`` the plain weighted mean. With ``f`` actual Byzantine
    devices, only ``num_selected <= n - f`` can exclude all of them. Requires ``n > 2f + 2`` and
    ``num_selected <= n``.

    Attributes:
        num_malicious: ``f``, the number of Byzantine devices to tolerate (``>= 0``).
        num_selected: ``m``, how many rows to average (``>= 1``).
    """

    num_malicious: int
    num_selected: int

    def __post_init__(self) -> None:
        _check_int("num_malicious", self.num_malicious, minimum=0)
        _check_int("num_selected", self.num_selected, minimum=1)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> RobustResult:
        """Weighted mean of the ``num_selected`` lowest-score rows. See :meth:`RobustRule.aggregate`."""
        u, w = _validate(updates, weights)
        n = u.shape[0]
        _check_krum_n(n, self.num_malicious, "multikrum")
        if self.num_selected > n:
            raise ValueError(f"multikrum num_selected={self.num_selected} exceeds n={n} updates")
        chosen = _krum_order(u, w, self.num_malicious)[: self.num_selected]
        return _result(_weighted_mean(u[chosen], w[chosen]), tuple(sorted(chosen)), "multikrum")


# --------------------------------------------------------------------------- parsing


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


_SPECS = '"mean", "norm:MAX_NORM", "median", "trimmed:BETA", "krum:F", "multikrum:F:M"'


def _parse_float(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"robust rule {spec!r}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"robust rule {spec!r}: {name} must be finite, got {text!r}")
    return value


def _parse_int(spec: str, name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"robust rule {spec!r}: {name} {text!r} is not an integer") from None


def make_rule(spec: str) -> RobustRule:
    """Build a rule from its config string.

    Accepted forms (name case-insensitive, surrounding whitespace ignored): ``"mean"``,
    ``"norm:MAX_NORM"``, ``"median"``, ``"trimmed:BETA"``, ``"krum:F"`` and
    ``"multikrum:F:M"``, e.g. ``"norm:0.5"``, ``"trimmed:0.2"``, ``"krum:1"``,
    ``"multikrum:1:3"``.

    Args:
        spec: The rule description.

    Returns:
        The rule.

    Raises:
        ValueError: Unknown name, wrong number of arguments, a non-numeric or out-of-range
            argument (``MAX_NORM`` must be finite and > 0, ``BETA`` in ``[0, 0.5)``,
            ``F >= 0``, ``M >= 1``).
    """
    if not isinstance(spec, str):
        raise ValueError(f"robust rule spec must be a string, got {spec!r}")
    name, *args = spec.strip().split(":")
    name = name.strip().lower()
    arity = {"mean": 0, "median": 0, "norm": 1, "trimmed": 1, "krum": 1, "multikrum": 2}
    if name not in arity:
        raise ValueError(f"unknown robust rule {spec!r}; expected one of {_SPECS}")
    if len(args) != arity[name]:
        raise ValueError(
            f"robust rule {spec!r}: {name!r} takes {arity[name]} argument(s), got {len(args)};"
            f" expected one of {_SPECS}"
        )
    try:
        if name == "mean":
            return WeightedMean()
        if name == "median":
            return CoordinateMedian()
        if name == "norm":
            return NormBound(_parse_float(spec, "MAX_NORM", args[0]))
        if name == "trimmed":
            return TrimmedMean(_parse_float(spec, "BETA", args[0]))
        if name == "krum":
            return Krum(_parse_int(spec, "F", args[0]))
        return MultiKrum(_parse_int(spec, "F", args[0]), _parse_int(spec, "M", args[1]))
    except ValueError as exc:
        if str(exc).startswith("robust rule"):
            raise
        raise ValueError(f"robust rule {spec!r}: {exc}") from None
