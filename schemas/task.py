"""Conversions between the wire's round task and the in-process settings objects."""

from __future__ import annotations

from schemas import fedstream_pb2 as pb
from schemas.codec import CodecParams


def codec_spec(p: CodecParams) -> pb.CodecSpec:
    return pb.CodecSpec(bits=p.bits, clip_l2=p.clip_l2, clip_coord=p.clip_coord,
                        max_summands=p.max_summands, weight_cap=p.weight_cap,
                        encrypted=p.encrypted, chunk_bytes=p.chunk_bytes, rotate=p.rotate,
                        rotation_seed=p.rotation_seed, dp_sigma=p.dp_sigma, dp_bound=p.dp_bound)


def codec_params(spec: pb.CodecSpec) -> CodecParams:
    """The round's codec parameters; raises InvalidMessage("bad_params") on nonsense."""
    return CodecParams(bits=spec.bits, clip_l2=spec.clip_l2, clip_coord=spec.clip_coord,
                       max_summands=spec.max_summands, weight_cap=spec.weight_cap,
                       encrypted=spec.encrypted, chunk_bytes=spec.chunk_bytes,
                       rotate=spec.rotate, rotation_seed=spec.rotation_seed,
                       dp_sigma=spec.dp_sigma, dp_bound=spec.dp_bound)
