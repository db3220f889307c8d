"""A model version as files a serving stack loads, and as numbers an operator reads.

Pure functions, no broker: :mod:`global_aggregator.models_cli` reads the version, these turn it
into

- ``npz``: one array per named parameter (``conv1/kernel``, ``conv1/bias``, ...; the project's
  model spec gives names and shapes; without a project, one flat ``params`` vector), each float32
  and bit-identical to the version's parameters. ``numpy.load(path)`` in any stack;
- ``msgpack``: Flax's msgpack of the same nested ``{layer: {param: array}}`` dict
  (``flax.serialization.msgpack_restore(open(path, "rb").read())``; ``nnx.update(model,
  restored)`` loads it into the project's NNX module);
- ``npy``: the flat float32 vector in ``ravel_pytree`` order, as on the wire;

and a provenance JSON beside it (:func:`provenance_record`: version, round, parent, what made it,
participants, metrics, codec, the SHA-256 of the parameters), so a served model can always be
traced back to the rounds and devices that made it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from global_aggregator.history import kind_of
from schemas import fedstream_pb2 as pb

FORMATS = ("npz", "msgpack", "npy")


def params_sha256(params: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(params, "<f4").tobytes()).hexdigest()


def nested_params(spec: Any, flat: np.ndarray) -> dict[str, Any]:
    """The project's parameter tree for ``flat``: ``{layer: {param: float32 array}}`` (nested
    as the NNX module is), values bit-identical to ``flat``'s.

    Raises:
        ValueError: ``flat`` does not have the spec's number of parameters.
    """
    from flax import nnx

    from edge_agent.models import unflatten

    # the whole state, as the flat vector holds it (``edge_agent.models``: nnx.split's state)
    state = nnx.state(unflatten(spec, np.asarray(flat, np.float32)))
    pure = getattr(nnx, "to_pure_dict", None)  # flax >= 0.12; State.to_pure_dict before
    tree = pure(state) if pure is not None else state.to_pure_dict()

    def to_numpy(node: Any) -> Any:
        if isinstance(node, dict):
            return {str(k): to_numpy(v) for k, v in node.items()}
        return np.asarray(node, np.float32)

    out = to_numpy(tree)
    assert isinstance(out, dict)
    return out


def named_params(spec: Any | None, flat: np.ndarray) -> dict[str, np.ndarray]:
    """``{"layer/param": array}`` in the flat vector's order (without a spec: ``{"params":
    flat}``)."""
    flat = np.asarray(flat, np.float32)
    if spec is None:
        return {"params": flat}
    out: dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", nested_params(spec, flat))
    return out


def provenance_record(mv: pb.ModelVersion) -> dict[str, Any]:
    """What an operator (or a model registry) needs to know of a version, as JSON-ready data."""
    params = np.frombuffer(mv.params, "<f4")
    prov = json_format.MessageToDict(mv.provenance, preserving_proto_field_name=True)
    return {
        "model": mv.model_name,
        "version": int(mv.header.model_version),
        "round": int(mv.provenance.round),
        "kind": kind_of(mv),
        "final": bool(mv.final),
        "num_params": int(mv.num_params),
        "params_sha256": params_sha256(params),
        "signed_by": mv.header.sender,
        "he_fingerprint": mv.header.he_fingerprint,
        "quarantined_agents": list(mv.quarantine.agents),
        "next_round": int(mv.next_task.round) if mv.HasField("next_task") else None,
        "provenance": prov,
    }


def export_version(mv: pb.ModelVersion, out: Path, fmt: str = "npz", *, spec: Any | None = None,
                   provenance_path: Path | None = None) -> tuple[Path, Path]:
    """Write version ``mv`` to ``out`` in ``fmt`` and its provenance JSON (default: ``out`` with
    the suffix ``.provenance.json``). Returns both paths.

    Raises:
        ValueError: unknown format, msgpack without a spec, or a spec of another size.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    flat = np.frombuffer(mv.params, "<f4").astype(np.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, **named_params(spec, flat))  # type: ignore[arg-type]
        out.write_bytes(buf.getvalue())
    elif fmt == "msgpack":
        if spec is None:
            raise ValueError("msgpack needs the model's structure: pass --project")
        from flax import serialization

        out.write_bytes(serialization.msgpack_serialize(nested_params(spec, flat)))
    else:
        buf = io.BytesIO()
        np.save(buf, flat)
        out.write_bytes(buf.getvalue())
    record = provenance_record(mv)
    record["export"] = {"format": fmt, "file": out.name,
                        "arrays": list(named_params(spec, flat)) if fmt != "npy" else ["params"]}
    prov_path = Path(provenance_path) if provenance_path else out.with_suffix(".provenance.json")
    prov_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out, prov_path


def load_export(path: Path, fmt: str | None = None) -> np.ndarray:
    """The flat float32 vector of an exported file (the inverse of :func:`export_version`)."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "npz":
        with np.load(path) as z:
            return np.concatenate([z[k].ravel() for k in z.files]).astype(np.float32)
    if fmt == "msgpack":
        from flax import serialization

        tree = serialization.msgpack_restore(path.read_bytes())
        leaves: list[np.ndarray] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            else:
                leaves.append(np.asarray(node, np.float32).ravel())

        walk(tree)
        return np.concatenate(leaves)
    if fmt == "npy":
        return np.load(path).astype(np.float32)
    raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


def diff_params(a: np.ndarray, b: np.ndarray, spec: Any | None = None) -> dict[str, Any]:
    """How far apart two parameter vectors are: overall and per named parameter."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return {"comparable": False, "detail": f"{a.size} vs {b.size} parameters"}

    def stats(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        d = y.astype(np.float64) - x.astype(np.float64)
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        cos = min(1.0, float(np.dot(x.astype(np.float64), y.astype(np.float64)) / (nx * ny))) \
            if nx > 0 and ny > 0 else None
        return {"size": int(x.size), "changed": int(np.count_nonzero(x.view(np.uint32)
                                                                      != y.view(np.uint32))),
                "l2": float(np.linalg.norm(d)), "max_abs": float(np.abs(d).max(initial=0.0)),
                "rel_l2": float(np.linalg.norm(d) / nx) if nx > 0 else None, "cosine": cos}

    per = {}
    if spec is not None:
        na, nb = named_params(spec, a), named_params(spec, b)
        per = {k: stats(na[k].ravel(), nb[k].ravel()) for k in na}
    return {"comparable": True, "identical": a.tobytes() == b.tobytes(), **stats(a, b),
            "per_param": per}
