"""Update codec benchmark: float32, int8+zstd, CKKS as NVIDIA FLARE configures it, fedstream.

All four schemes run side by side in one process over the same ``--summands`` random updates of
``--params`` parameters. Per scheme: wire bytes per parameter, encode throughput (Mparams/s),
add throughput (deserialize one whole update and add it into a running sum kept in memory,
updates/s), decode throughput (Mparams/s) and the max abs error of the decoded sum against the
ideal sum (float64 sum of the float32 deltas for float32/ckks_naive, the exact integer sum of the
quantized updates for int8_zstd/fedstream).

Then a sweep of the fedstream plan over bits {2, 3, 4, 5, 6, 8} x max_summands {16, 64}
(``--sweep-updates`` updates each, all decoded exactly), ``schemes.fedstream_min``: the smallest
plan whose bit width costs at most one accuracy point against float32 FedAvg according to
``bench/simulate.py``'s bit-width sweep (``--accuracy``, its JSON), and ``ct_size_options``: what
the ring and the serialization do to one ciphertext's bytes per parameter.

Usage: ``python bench/codec.py --params 1000000 --json out/codec.json`` (also writes two PNGs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.codec import Codec, CodecParams, update_seed  # noqa: E402
from schemas.he import HEContext, generate_keys  # noqa: E402


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_float32(deltas: list[np.ndarray]) -> dict:
    n = deltas[0].size
    blobs, t_enc = _timed(lambda: [d.astype("<f4").tobytes() for d in deltas])

    def add():
        acc = np.zeros(n, np.float32)
        for b in blobs:
            acc += np.frombuffer(b, "<f4")
        return acc
    acc, t_add = _timed(add)
    out, t_dec = _timed(lambda: acc.astype(np.float64))
    ideal = np.sum([d.astype(np.float64) for d in deltas], axis=0)
    return _row(len(blobs[0]), n, len(deltas), t_enc, t_add, t_dec, np.abs(out - ideal).max())


def bench_ckks_naive(deltas: list[np.ndarray]) -> dict:
    """TenSEAL CKKSVector as NVIDIA FLARE's HE filters use it: N=8192, [60,40,40], scale 2**40."""
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                     coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40
    n = deltas[0].size
    blobs, t_enc = _timed(lambda: [ts.ckks_vector(ctx, d.tolist()).serialize() for d in deltas])

    def add():
        acc = ts.ckks_vector_from(ctx, blobs[0])
        for b in blobs[1:]:
            acc.add_(ts.ckks_vector_from(ctx, b))
        return acc
    acc, t_add = _timed(add)
    out, t_dec = _timed(lambda: np.array(acc.decrypt()))
    ideal = np.sum([d.astype(np.float64) for d in deltas], axis=0)
    # the first update is only deserialized (no add): count it as one of len(deltas) updates
    return _row(len(blobs[0]), n, len(deltas), t_enc, t_add, t_dec, np.abs(out - ideal).max())


def bench_codec(deltas: list[np.ndarray], enc: Codec, dec: Codec) -> dict:
    n = deltas[0].size
    samples = [100 + 37 * i for i in range(len(deltas))]
    seeds = [update_seed(1, 1, f"agent-{i}") for i in range(len(deltas))]
    qsum = np.sum([enc.quantize_update(d, s, sd) for d, s, sd in zip(deltas, samples, seeds)],
                  axis=0)
    ups, t_enc = _timed(lambda: [enc.encode(d, s, sd)
                                 for d, s, sd in zip(deltas, samples, seeds)])

    def add():
        acc = enc.accumulator()
        for chunks in ups:
            acc.add_payloads(chunks)
        return acc.payloads()
    total, t_add = _timed(add)
    (out, w), t_dec = _timed(lambda: dec.decode(total))
    assert w == sum(enc.weight(s) for s in samples)
    row = _row(sum(map(len, ups[0])), n, len(deltas), t_enc, t_add, t_dec,
               float(np.abs(out - qsum).max()))
    row["exact"] = bool(np.array_equal(out, qsum))
    return row


def _row(nbytes, n, k, t_enc, t_add, t_dec, err) -> dict:
    return {"bytes_per_param": nbytes / n, "encode_mparams_s": n * k / t_enc / 1e6,
            "add_updates_s": k / t_add, "decode_mparams_s": n / t_dec / 1e6,
            "max_abs_error": float(err)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--summands", type=int, default=8, help="updates per scheme (default 8)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--max-summands", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep-updates", type=int, default=4, help="updates per sweep point")
    ap.add_argument("--no-sweep", action="store_true", help="skip the bits x summands sweep")
    ap.add_argument("--accuracy", type=Path, default=Path("bench/results/simulate.json"),
                    help="bench/simulate.py's JSON (accuracy cost per bit width)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.01, args.params).astype(np.float32) for _ in range(args.summands)]
    secret, public = generate_keys()
    sk, pk = HEContext.from_bytes(secret), HEContext.from_bytes(public)
    he = CodecParams(bits=args.bits, max_summands=args.max_summands)
    plain = CodecParams(bits=args.bits, max_summands=args.max_summands, encrypted=False)
    enc = Codec(he, args.params, pk)
    schemes = {
        "float32": bench_float32(deltas),
        "int8_zstd": bench_codec(deltas, Codec(plain, args.params), Codec(plain, args.params)),
        "ckks_naive": bench_ckks_naive(deltas),
        "fedstream": bench_codec(deltas, enc, Codec(he, args.params, sk)),
    }
    f, c = schemes["fedstream"], schemes["ckks_naive"]
    ratios = {
        "bytes_per_param": c["bytes_per_param"] / f["bytes_per_param"],
        "encode": f["encode_mparams_s"] / c["encode_mparams_s"],
        "add": f["add_updates_s"] / c["add_updates_s"],
        "decode": f["decode_mparams_s"] / c["decode_mparams_s"],
    }
    plan = enc.plan
    result = {
        "schemes": schemes, "ratios": ratios,
        "config": {"params": args.params, "summands_measured": args.summands,
                   "bits": args.bits, "max_summands": args.max_summands,
                   "fedstream_plan": {"lanes": plan.lanes, "lane_bits": plan.lane_bits,
                                      "values_per_ct": plan.values_per_ct,
                                      "cts_per_chunk": plan.cts_per_chunk,
                                      "num_chunks": plan.num_chunks,
                                      "he_scale_log2": float(np.log2(plan.he_scale))},
                   "ckks_naive": "poly 8192, coeff [60,40,40], scale 2^40, 1 float/slot",
                   "ratios": "fedstream / ckks_naive (bytes: ckks_naive / fedstream)"},
    }
    if not args.no_sweep:
        result["sweep"] = sweep(deltas[:args.sweep_updates], pk, sk)
        result["schemes"]["fedstream_min"] = smallest_within_goal(result["sweep"], args.accuracy)
        result["ct_size_options"] = ct_size_options(pk)
    _print(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        _plot(result, args.json.with_suffix(".png"))
        if "sweep" in result:
            _plot_sweep(result, args.json.with_name(args.json.stem + "_sweep.png"))
    return result


SWEEP_BITS = (2, 3, 4, 5, 6, 8)
SWEEP_SUMMANDS = (16, 64)
GOAL_POINTS = 1.0


def sweep(deltas: list[np.ndarray], pk: HEContext, sk: HEContext) -> list[dict]:
    """The encrypted codec at every (bits, max_summands): bytes, throughput, exactness."""
    from rich.progress import track
    n, rows = deltas[0].size, []
    grid = [(b, s) for b in SWEEP_BITS for s in SWEEP_SUMMANDS]
    for b, s in track(grid, description="bits x summands sweep"):
        p = CodecParams(bits=b, max_summands=s)
        enc = Codec(p, n, pk)
        row = bench_codec(deltas, enc, Codec(p, n, sk))
        rows.append({"bits": b, "max_summands": s, "lanes": enc.plan.lanes,
                     "lane_bits": enc.plan.lane_bits, **row})
    return rows


def smallest_within_goal(rows: list[dict], accuracy: Path) -> dict:
    """The sweep point with the fewest bytes among bit widths within the accuracy goal."""
    try:
        costs = json.loads(accuracy.read_text())["bits_sweep"]["rotated_cost_points"]
    except (OSError, KeyError, ValueError):
        print(f"warning: no bit-width accuracy in {accuracy}; choosing among bits >= 4")
        costs = {}
    ok = [r for r in rows if (costs[str(r["bits"])] <= GOAL_POINTS if costs else r["bits"] >= 4)]
    best = min(ok, key=lambda r: r["bytes_per_param"])
    cost = costs.get(str(best["bits"])) if costs else None
    return {**best, "accuracy_cost_points": cost}


def ct_size_options(pk: HEContext) -> list[dict]:
    """Bytes per parameter of the 4-bit / 16-summand plan: each ring, bit-packed (the wire
    format, ``schemas/he.py``) and in SEAL's own serialization (zstd-compressed 64-bit words)."""
    from schemas.plan import plan_ckks
    p = CodecParams(bits=4, max_summands=16)
    out = []
    for ring, he in (("N=4096 [60,49]", pk),
                     ("N=8192 [60,49]", HEContext.from_bytes(generate_keys(8192, (60, 49))[1]))):
        seal = he.seal
        plan = plan_ckks(p, 1_000_000, seal.q0, seal.slots)
        ct = seal.encrypt([0j] * seal.slots, plan.he_scale)
        ct.save(seal.file.path)                  # SEAL's own serialization, as it writes it
        seal_format = len(seal.file.read())
        sizes = {"bit-packed": len(seal.save(ct)), "SEAL format": seal_format}
        for fmt, size in sizes.items():
            used = " (used)" if he is pk and fmt == "bit-packed" else ""
            out.append({"option": f"{ring}, {fmt}{used}", "ct_bytes": size,
                        "reals_per_ct": plan.reals_per_ct, "lanes": plan.lanes,
                        "bytes_per_param": size / plan.reals_per_ct / plan.lanes})
    return out


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    cfg = result["config"]
    t = Table(title=f"update codec, {cfg['params']:,} params, {cfg['summands_measured']} updates "
                    f"per scheme, {cfg['bits']}-bit / {cfg['max_summands']} summands")
    cols = ["bytes_per_param", "encode_mparams_s", "add_updates_s", "decode_mparams_s",
            "max_abs_error"]
    t.add_column("scheme")
    for col in cols:
        t.add_column(col, justify="right")
    for name, row in result["schemes"].items():
        t.add_row(name, *(f"{row[c]:.4g}" for c in cols))
    r = result["ratios"]
    t.add_row("fedstream vs ckks_naive", f"{r['bytes_per_param']:.1f}x smaller",
              f"{r['encode']:.1f}x", f"{r['add']:.1f}x", f"{r['decode']:.1f}x", "exact" if
              result["schemes"]["fedstream"].get("exact") else "NOT EXACT")
    console = Console(width=150)
    console.print(t)
    if "sweep" in result:
        st = Table(title="fedstream plans: bits x max_summands (bytes/param, throughput, exact)")
        for col in ("bits", "summands", "lanes x bits", *cols[:4], "exact"):
            st.add_column(col, justify="right")
        for r in result["sweep"]:
            st.add_row(str(r["bits"]), str(r["max_summands"]), f"{r['lanes']} x {r['lane_bits']}",
                       *(f"{r[c]:.4g}" for c in cols[:4]), str(r["exact"]))
        console.print(st)
        m = result["schemes"]["fedstream_min"]
        console.print(f"fedstream_min: {m['bits']}-bit / {m['max_summands']} summands, "
                      f"{m['bytes_per_param']:.3f} bytes/param, accuracy cost "
                      f"{m['accuracy_cost_points']} points")
        ot = Table(title="one ciphertext, 4-bit / 16-summand plan")
        for col in ("option", "ct_bytes", "lanes", "bytes_per_param"):
            ot.add_column(col)
        for o in result["ct_size_options"]:
            ot.add_row(o["option"], f"{o['ct_bytes']:.0f}", str(o["lanes"]),
                       f"{o['bytes_per_param']:.3f}")
        console.print(ot)


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["schemes"])
    metrics = ["bytes_per_param", "encode_mparams_s", "add_updates_s", "decode_mparams_s"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 4))
    for ax, m in zip(axes, metrics):
        vals = [result["schemes"][n][m] for n in names]
        ax.bar(names, vals, color=["#888", "#6a6", "#c66", "#36c", "#1a8"])
        ax.set_yscale("log")
        ax.set_title(m)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"update codec, {result['config']['params']:,} params")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_sweep(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in SWEEP_SUMMANDS:
        rows = [r for r in result["sweep"] if r["max_summands"] == s]
        ax.plot([r["bits"] for r in rows], [r["bytes_per_param"] for r in rows], "o-",
                label=f"{s} summands")
    ax.axhline(4.0, color="k", lw=1, label="float32 (plaintext)")
    ax.axhline(3.0, color="r", lw=1, ls=":", label="goal: 3 bytes")
    m = result["schemes"]["fedstream_min"]
    ax.plot([m["bits"]], [m["bytes_per_param"]], "r*", ms=14, label="fedstream_min")
    ax.set_xlabel("bits per value")
    ax.set_ylabel("encrypted bytes per parameter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
