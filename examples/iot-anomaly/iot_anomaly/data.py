"""A synthetic fleet's sensor logs: one CSV per device, one row per time step.

    python examples/iot-anomaly/generate.py --devices 8 --out examples/iot-anomaly/data --seed 0
    python examples/iot-anomaly/generate.py --ids SN-001,SN-002 --out /tmp/logs
    python -m iot_anomaly.data --devices 8        # the same, from the project directory

``[tool.fedstream.simulation] data = "iot_anomaly.data:generate"`` lets the demo write the
simulated fleet's logs itself.

Each file ``<device_id>.csv`` has the header
``temperature,vibration,current,pressure,humidity,rpm,fault`` and 800-1000 rows. The six readings
are standardized: ``(reading - nominal) / spread`` with the fleet's nominal operating point and
spread (see ``NOMINAL`` / ``SPREAD``), so a healthy machine reads roughly zero mean, unit scale.
``fault`` is the state of the machine at that step:

====  ==============  ==========================================================================
0     normal          load-driven fluctuations of every sensor around the device's own baseline
1     overheating     temperature climbs 2.5-3.5 spreads above normal, current rises
2     vibration       vibration jumps 2.5-3.5 spreads and jitters, rpm becomes unsteady
3     sensor_drift    the pressure or the humidity sensor drifts steadily away from the truth
====  ==============  ==========================================================================

Faults come in episodes of 40-90 steps. No two devices are alike, as in a real fleet: each has its
own baseline per sensor, its own slow drift over the log (ageing, seasons), its own noise level,
its own fault rate and mix of fault types, and one or two devices of the fleet have a broken
sensor (the rpm sensor stuck at a constant value, or a current sensor with spikes). Everything is
drawn from numpy's seeded generator: the same ``--seed`` and device id give the same file.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SENSORS = ("temperature", "vibration", "current", "pressure", "humidity", "rpm")
FAULTS = ("normal", "overheating", "vibration", "sensor_drift")
HEADER = ",".join((*SENSORS, "fault"))

#: The fleet's nominal operating point and spread, in physical units: a reading ``r`` is written
#: as ``(r - NOMINAL) / SPREAD``. (A real fleet would standardize its own logs the same way.)
NOMINAL = {"temperature": 65.0, "vibration": 2.0, "current": 12.0,   # degC, mm/s RMS, A
           "pressure": 3.0, "humidity": 45.0, "rpm": 1500.0}         # bar, %RH, 1/min
SPREAD = {"temperature": 4.0, "vibration": 0.5, "current": 1.5,
          "pressure": 0.2, "humidity": 5.0, "rpm": 40.0}

TEMP, VIB, CUR, PRES, HUM, RPM = range(6)  # column indices

MIN_ROWS, MAX_ROWS = 800, 1000
PROJECT_DIR = Path(__file__).resolve().parent.parent


def device_ids(n: int) -> list[str]:
    """The simulation's device ids: ``device-000`` ... ``device-{n-1:03d}``."""
    return [f"device-{i:03d}" for i in range(n)]


def _device_rng(seed: int, device_id: str) -> np.random.Generator:
    # keyed by the id, not the position: a device's log depends on the seed, its id and whether
    # it is one of the fleet's broken-sensor devices, not on who else is in the fleet
    return np.random.default_rng([int(seed), zlib.crc32(device_id.encode())])


def _ar1(rng: np.random.Generator, n: int, phi: float, scale: float) -> np.ndarray:
    """A stationary AR(1) series with marginal std ``scale``."""
    eps = rng.normal(0.0, scale * np.sqrt(1 - phi * phi), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, scale)
    for t in range(1, n):
        out[t] = phi * out[t - 1] + eps[t]
    return out


def _fault_schedule(rng: np.random.Generator, n: int, rate: float, mix: np.ndarray) -> np.ndarray:
    """Per-step fault labels: healthy stretches alternating with episodes of 20-60 steps."""
    labels = np.zeros(n, np.int64)
    mean_episode = 65.0
    mean_gap = mean_episode * (1 - rate) / rate
    t = int(rng.integers(10, 40))  # every log starts healthy
    while t < n:
        length = int(rng.integers(40, 91))
        labels[t:t + length] = 1 + int(rng.choice(3, p=mix))
        t += length + max(24, int(rng.exponential(mean_gap)))
    # the most recent fifth of a log (a device's test set) always sees at least one fault
    tail = n - n // 5
    if np.mean(labels[tail:] > 0) < 0.25:
        start = int(rng.integers(tail + 8, n - 40))
        labels[start:start + int(rng.integers(40, 61))] = 1 + int(rng.choice(3, p=mix))
    return labels


def simulate_device(device_id: str, seed: int, defect: str | None = None) -> np.ndarray:
    """One device's log: an ``(n, 7)`` array of the six standardized readings and the fault label.

    ``defect`` breaks one sensor for the whole log: ``"stuck_rpm"`` (the rpm sensor reads a
    constant after some point) or ``"spiky_current"`` (the current sensor has random spikes).
    """
    rng = _device_rng(seed, device_id)
    n = int(rng.integers(MIN_ROWS, MAX_ROWS + 1))
    steps = np.arange(n)

    # what makes this machine unlike the others
    baseline = rng.normal(0.0, 0.3, 6)                 # its own operating point
    drift = rng.normal(0.0, 0.3, 6) * steps[:, None] / n  # slow drift over the log
    noise = rng.uniform(0.15, 0.35) * rng.uniform(0.8, 1.25, 6)
    rate = rng.uniform(0.3, 0.55)                      # fraction of time in a fault
    mix = rng.dirichlet(np.full(3, 1.5))               # its own mix of fault types
    mix = 0.1 + 0.7 * mix                              # ... but every type can happen

    # healthy behaviour: a slowly varying load drives current, rpm and temperature
    load = _ar1(rng, n, 0.97, 0.6)
    x = np.empty((n, 6))
    x[:, TEMP] = 0.5 * load
    x[:, VIB] = 0.2 * load
    x[:, CUR] = 0.7 * load
    x[:, PRES] = 0.3 * load
    x[:, HUM] = _ar1(rng, n, 0.99, 0.4)  # ambient humidity, unrelated to load
    x[:, RPM] = 0.6 * load
    x += baseline + drift
    for c in range(6):
        x[:, c] += _ar1(rng, n, 0.5, noise[c])

    labels = _fault_schedule(rng, n, rate, mix)
    # fault signatures: each episode ramps in over a few steps
    starts = np.flatnonzero(np.diff(np.concatenate([[0], labels])) != 0)
    for s in starts:
        kind = labels[s]
        if kind == 0:
            continue
        e = s
        while e < n and labels[e] == kind:
            e += 1
        k = np.arange(e - s)
        ramp = np.minimum(1.0, (k + 1) / 3.0)
        if kind == 1:    # overheating: temperature climbs, the motor draws more current
            x[s:e, TEMP] += ramp * rng.uniform(2.5, 3.5) + 0.02 * k
            x[s:e, CUR] += ramp * rng.uniform(1.0, 1.5)
            x[s:e, HUM] -= ramp * 0.3
        elif kind == 2:  # vibration: bearing wear / imbalance
            x[s:e, VIB] += ramp * rng.uniform(2.5, 3.5) + rng.normal(0.0, 0.8, e - s)
            x[s:e, RPM] += rng.normal(0.0, 1.0, e - s)
            x[s:e, CUR] += ramp * 0.3
        else:            # sensor_drift: one sensor walks away from the truth
            c = PRES if rng.random() < 0.5 else HUM
            sign = 1.0 if rng.random() < 0.5 else -1.0
            x[s:e, c] += sign * (ramp * 2.0 + 0.05 * k)

    if defect == "stuck_rpm":
        at = int(rng.integers(n // 5, n // 2))
        x[at:, RPM] = np.round(x[at, RPM], 2)
    elif defect == "spiky_current":
        hits = rng.random(n) < 0.03
        x[hits, CUR] += rng.choice([-1.0, 1.0], hits.sum()) * rng.uniform(3.0, 6.0, hits.sum())

    return np.column_stack([x, labels])


def _defects(ids: Sequence[str], seed: int) -> dict[str, str]:
    """Which devices have a broken sensor: one in a fleet of 2-5, two in larger fleets."""
    k = 0 if len(ids) < 2 else 1 if len(ids) < 6 else 2
    rng = np.random.default_rng([int(seed), 0xDEFEC7])
    chosen = rng.choice(len(ids), size=k, replace=False)
    kinds = ("stuck_rpm", "spiky_current")
    return {ids[int(j)]: kinds[i % 2] for i, j in enumerate(sorted(chosen))}


def generate(ids: Sequence[str], out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write ``<out_dir>/<device_id>.csv`` for every id; return the paths in the order of ``ids``."""
    ids = [str(i) for i in ids]
    if not ids:
        raise ValueError("no device ids")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate device ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    defects = _defects(ids, seed)
    paths = []
    for device_id in ids:
        rows = simulate_device(device_id, seed, defects.get(device_id))
        path = out / f"{device_id}.csv"
        with path.open("w", encoding="utf-8") as f:
            f.write(HEADER + "\n")
            for row in rows:
                f.write(",".join(f"{v:.4f}" for v in row[:6]) + f",{int(row[6])}\n")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write synthetic machine-sensor logs (one CSV per device) for the iot-anomaly "
        "fedstream project.",
    )
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--devices", type=int, default=8,
                     help="number of devices, ids device-000 ... (default: 8)")
    who.add_argument("--ids", help="comma-separated device ids instead of --devices, e.g. a,b,c")
    ap.add_argument("--out", type=Path, default=PROJECT_DIR / "data",
                    help="output directory (default: the project's data/)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)
    if args.ids is not None:
        ids = [s.strip() for s in args.ids.split(",") if s.strip()]
    else:
        if args.devices < 1:
            ap.error("--devices must be >= 1")
        ids = device_ids(args.devices)
    try:
        paths = generate(ids, args.out, args.seed)
    except ValueError as e:
        ap.error(str(e))
    defects = _defects(ids, args.seed)
    for p in paths:
        note = f"  (broken sensor: {defects[p.stem]})" if p.stem in defects else ""
        rows = sum(1 for _ in p.open(encoding="utf-8")) - 1
        print(f"{p}  {rows} rows{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
