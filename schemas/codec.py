"""The update codec: clip -> weight -> quantize -> pack -> CKKS -> chunks -> zstd, and back.

Idea: every agent of a round quantizes with the same scale, so the integers it sends can be
summed exactly; lanes of integers are packed into the real *and* imaginary halves of CKKS slots
(one 4096-degree ciphertext = 2048 complex slots = 4096 reals x 3 lanes = 12,288 parameters at
8-bit / 64 summands) and added homomorphically without ever being decrypted. Only sums are
decrypted, rounded, unpacked and dequantized. See ``docs/codec.md`` for the derivation of the
limits and the byte layout.

The pieces live in small modules: :mod:`schemas.plan` (parameters, lane plan, bounds),
:mod:`schemas.framing` (the chunk byte layout), :mod:`schemas.verify` (what both tiers check
before a chunk changes any state, and the bounds of a decoded sum) and
:mod:`schemas.accumulator` (running sums). This module encodes and decodes.

CKKS value stream: reals ``r[0..R)`` with ``r[0]`` = weight (the coarse, capped sample count,
:func:`schemas.plan.coarse_weight`) and ``r[1 + j]`` = packed lanes ``j*L .. j*L+L-1``;
ciphertext ``t`` of the whole update holds reals ``4096 t .. 4096 t + 4095``, slot ``s`` =
``r[2s] + i r[2s+1]``; chunk ``c`` holds ciphertexts ``c*cts_per_chunk ..``. So the weight is the
real part of slot 0 of ciphertext 0 of chunk 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas import packing, quantize
from schemas.accumulator import Accumulator
from schemas.errors import BoundsExceeded, InvalidMessage, Reason
from schemas.framing import DTYPES, MODE_CKKS, MODE_PLAIN, VERSION, Framer
from schemas.he import HEContext
from schemas.plan import (  # noqa: F401 - re-exported: the codec's public names
    NOISE_REDRAW_PROB,
    CodecParams,
    Plan,
    coarse_weight,
    ct_l2_bound,
    dp_l2_bound,
    plan_ckks,
    plan_plain,
    update_seed,
)
from schemas.rotation import Rotation

if TYPE_CHECKING:
    from schemas.dp import NoiseSource


class Codec:
    """Encode, add and decode the updates of one round (see module docstring)."""

    def __init__(self, params: CodecParams, num_params: int,
                 context: HEContext | None = None) -> None:
        if not isinstance(params, CodecParams):
            raise InvalidMessage(Reason.BAD_PARAMS, "params must be a CodecParams")
        if isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer)) \
                or not 1 <= num_params < 2**40:
            raise InvalidMessage(Reason.BAD_PARAMS,
                                 f"num_params must be in 1..2**40, got {num_params}")
        self.params = params
        self.num_params = int(num_params)
        self.context = context
        if params.encrypted:
            if context is None:
                raise InvalidMessage(Reason.BAD_PARAMS, "encrypted codec needs an HE context")
            seal = context.seal
            self.plan = plan_ckks(params, self.num_params, seal.q0, seal.slots)
            fp = bytes.fromhex(context.fingerprint)[:16]
            self.mode = MODE_CKKS
        else:
            self.plan = plan_plain(params, self.num_params)
            fp = bytes(16)
            self.mode = MODE_PLAIN
        self.num_chunks = self.plan.num_chunks
        self.scale = params.scale
        digest_src = repr((VERSION, params.bits, float(params.clip_l2), float(params.clip_coord),
                           params.max_summands, params.weight_cap, params.encrypted,
                           params.chunk_bytes, self.num_params)
                          + ((params.rotation_seed,) if params.rotate else ())
                          + ((float(params.dp_sigma), params.dp_bound) if params.noisy else ())
                          ).encode()
        self.rotation = Rotation(self.num_params, params.rotation_seed) if params.rotate else None
        self.framer = Framer(mode=self.mode, plan=self.plan, num_params=self.num_params,
                             max_summands=params.max_summands,
                             digest=hashlib.sha256(digest_src).digest()[:8], fingerprint=fp)

    def he(self) -> HEContext:
        """The HE context; only CKKS codecs have one (the constructor guarantees it)."""
        if self.context is None:
            raise InvalidMessage(Reason.BAD_PARAMS, "encrypted codec needs an HE context")
        return self.context

    # ------------------------------------------------------------------ quantization

    def weight(self, num_samples: int) -> int:
        """The weight a device with ``num_samples`` examples declares (coarse and capped)."""
        return coarse_weight(num_samples, self.params.weight_cap)

    def quantize_update(self, delta: np.ndarray, num_samples: int, seed: int,
                        noise: NoiseSource | None = None) -> np.ndarray:
        """``clip(rotate(clip_l2(delta))) * weight / cap``, stochastically quantized (int64).

        With distributed DP (``params.noisy``) the device then adds discrete Gaussian noise
        drawn from ``noise``, its own secret randomness, to :meth:`round_update`'s integers;
        without ``noise`` it refuses (``bad_params``) rather than send an update with less
        privacy than the round promises.
        """
        p = self.params
        if p.noisy and noise is None:
            raise InvalidMessage(Reason.BAD_PARAMS, "this round adds distributed-DP noise: "
                                 "the device must give its own NoiseSource")
        q = self.round_update(delta, num_samples, seed)
        if not p.noisy:
            return q
        from schemas import dp

        assert noise is not None
        z = dp.device_noise(noise, p.dp_sigma, q.shape[0], NOISE_REDRAW_PROB)
        if int(np.abs(z).max(initial=0)) > p.dp_bound:
            raise InvalidMessage(Reason.BAD_PARAMS, f"the round's noise bound {p.dp_bound} is "
                                 f"below this device's, for sigma {p.dp_sigma:.3g}")
        return q + z

    def round_update(self, delta: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
        """The integers of :meth:`quantize_update` before any noise.

        The L2 clip comes before the rotation (which keeps norms), the per-coordinate clip
        after it, on the spread-out values. With distributed DP the rounding is conditioned on
        the rounded vector's norm (:func:`schemas.dp.rounded_l2_bound`: the sensitivity the
        accountant uses).
        """
        p = self.params
        x = quantize.check_finite(delta)
        if x.shape[0] != self.num_params:
            raise InvalidMessage(Reason.WRONG_NUM_PARAMS,
                                 f"delta has {x.shape[0]} values, codec has {self.num_params}")
        w = self.weight(num_samples)
        if self.rotation is not None:
            x = self.rotation.forward(quantize.clip(x, p.clip_l2, np.inf))
        x = quantize.clip(x, p.clip_l2, p.clip_coord)
        if w != p.weight_cap:
            x *= w / p.weight_cap
        l2_max = dp_l2_bound(p, self.num_params) if p.noisy else None
        return quantize.quantize(x, self.scale, p.bits, seed, l2_max=l2_max)

    def average(self, qsum: np.ndarray, weight_sum: int) -> np.ndarray:
        """Weighted FedAvg delta (float32): ``qsum * scale * weight_cap / weight_sum``, rotated
        back when the round rotates."""
        if weight_sum <= 0:
            raise InvalidMessage(Reason.ZERO_WEIGHT,
                                 f"weight sum must be positive, got {weight_sum}")
        factor = self.scale * self.params.weight_cap / float(weight_sum)
        avg = np.asarray(qsum, dtype=np.float64) * factor
        if self.rotation is not None:
            avg = self.rotation.inverse(avg)
        return avg.astype(np.float32)

    # ------------------------------------------------------------------ encode

    def encode(self, delta: np.ndarray, num_samples: int, seed: int,
               noise: NoiseSource | None = None) -> list[bytes]:
        """Quantize (and noise: :meth:`quantize_update`) one update into ``num_chunks``
        payloads."""
        q = self.quantize_update(delta, num_samples, seed, noise)
        return self._encode(q, self.weight(num_samples))

    def encode_quantized(self, q: np.ndarray, weight: int) -> list[bytes]:
        """Encode already-quantized (and noised) integers (``|q| <= params.value_bound``) with
        weight ``<= cap``."""
        q = np.asarray(q)
        if q.ndim != 1 or q.shape[0] != self.num_params:
            raise InvalidMessage(Reason.WRONG_NUM_PARAMS, f"q has shape {q.shape}")
        if q.dtype.kind not in "iu":
            raise InvalidMessage(Reason.OUT_OF_RANGE, f"q must be integers, got {q.dtype}")
        bound = self.params.value_bound
        if q.size and (int(q.max()) > bound or int(q.min()) < -bound):
            raise InvalidMessage(Reason.OUT_OF_RANGE, f"q exceeds +-{bound}")
        if self.mode == MODE_CKKS:
            vpc = self.plan.values_per_ct
            qf = np.zeros(-(-(q.shape[0] + self.plan.lanes) // vpc) * vpc)
            qf[self.plan.lanes:self.plan.lanes + q.shape[0]] = q
            norms = np.sqrt(np.einsum("ij,ij->i", qf.reshape(-1, vpc), qf.reshape(-1, vpc)))
            if float(norms.max()) > ct_l2_bound(self.params, vpc):
                raise InvalidMessage(Reason.OUT_OF_RANGE,
                                     "q exceeds the L2 clip bound of the plan")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) \
                or not 1 <= weight <= self.params.weight_cap:
            raise InvalidMessage(Reason.BAD_WEIGHT,
                                 f"weight must be in 1..{self.params.weight_cap}")
        return self._encode(q.astype(np.int64), int(weight))

    def encode_raw(self, reals: np.ndarray) -> list[bytes]:
        """Encrypt an arbitrary CKKS value stream (weight real first, then packed lanes), with
        no checks at all: what a stolen device can send. For adversarial tests and benchmarks."""
        return self._encrypt_reals(np.asarray(reals, np.float64))

    def pack(self, q: np.ndarray, weight: int) -> np.ndarray:
        """The CKKS value stream of an update: ``[weight, packed lanes...]``."""
        reals = np.empty(self.plan.num_reals, np.float64)
        reals[0] = weight
        reals[1:] = packing.pack(q, self.plan.lanes, self.plan.lane_bits)
        return reals

    def _encode(self, q: np.ndarray, weight: int) -> list[bytes]:
        if self.mode == MODE_PLAIN:
            vb = self.params.value_bound
            dtype = np.dtype("<i1") if vb <= 127 else np.dtype("<i2") if vb <= 32767 \
                else np.dtype("<i8")
            per = self.plan.params_per_chunk
            return [self.framer.frame_plain(c, 1, weight if c == 0 else 0,
                                            q[c * per:(c + 1) * per].astype(dtype))
                    for c in range(self.num_chunks)]
        return self._encrypt_reals(self.pack(q, weight))

    def _encrypt_reals(self, reals: np.ndarray) -> list[bytes]:
        plan, seal = self.plan, self.he().seal
        rpc = plan.cts_per_chunk * plan.reals_per_ct
        out = []
        for c in range(self.num_chunks):
            part = reals[c * rpc:(c + 1) * rpc]
            n_ct = -(-part.shape[0] // plan.reals_per_ct)
            buf = np.zeros(n_ct * plan.reals_per_ct, np.float64)
            buf[:part.shape[0]] = part
            z = buf.view(np.complex128).reshape(n_ct, -1)
            items = [seal.save(seal.encrypt(z[t].tolist(), plan.he_scale)) for t in range(n_ct)]
            out.append(self.framer.frame_cts(c, 1, items))
        return out

    # ------------------------------------------------------------------ framing shortcuts

    def max_payload_bytes(self) -> int:
        """Largest payload this codec accepts (bigger ones are refused as "oversized")."""
        return self.framer.max_payload_bytes()

    def chunk_index(self, payload: bytes) -> int:
        """Chunk index from the header alone (verification checks the rest)."""
        return self.framer.chunk_index(payload)

    # ------------------------------------------------------------------ add

    def accumulator(self) -> Accumulator:
        """A running sum that keeps chunks deserialized (memory bounded by one model)."""
        return Accumulator(self)

    def add(self, a: bytes, b: bytes) -> bytes:
        """Sum two payloads of the same chunk index (public context suffices)."""
        from schemas.verify import verify_parsed

        pa, pb_ = self.framer.parse(a), self.framer.parse(b)
        if pa.index != pb_.index:
            raise InvalidMessage(Reason.CHUNK_MISMATCH,
                                 f"cannot add chunk {pa.index} to chunk {pb_.index}")
        ca = verify_parsed(self, pa, index=pa.index, summands=pa.summands)
        cb = verify_parsed(self, pb_, index=pb_.index, summands=pb_.summands)
        n = ca.summands + cb.summands
        if n > self.params.max_summands:
            raise InvalidMessage(Reason.TOO_MANY_SUMMANDS, f"sum would hold {n} updates, limit "
                                 f"{self.params.max_summands}")
        if self.mode == MODE_PLAIN:
            vals = ca.ints().astype(np.int64) + cb.ints().astype(np.int64)
            return self.framer.frame_plain(ca.index, n, ca.weight + cb.weight, vals.astype("<i8"))
        seal = self.he().seal
        assert ca.cts is not None and cb.cts is not None
        for x, y in zip(ca.cts, cb.cts):
            seal.evaluator.add_inplace(x, y)
        return self.framer.frame_cts(ca.index, n, [seal.save(ct) for ct in ca.cts])

    # ------------------------------------------------------------------ decode

    def decode(self, chunks: Sequence[bytes]) -> tuple[np.ndarray, int]:
        """Exact int64 sums of the quantized updates and the sum of weights.

        Raises:
            InvalidMessage: "no_secret_key" with a public context, "chunk_mismatch" when chunks
                are missing, repeated or hold different numbers of summands, plus every reason
                of payload parsing.
            BoundsExceeded: "inexact_sum" when the decrypted values are not integers (overflow
                or garbage), "lane_bound" when a lane or the weight sum is impossible for the
                number of summands.
        """
        from schemas.verify import verify_parsed

        if self.mode == MODE_CKKS and not self.he().is_private:
            raise InvalidMessage(Reason.NO_SECRET_KEY, "this HE context cannot decrypt")
        if len(chunks) != self.num_chunks:
            raise InvalidMessage(Reason.CHUNK_MISMATCH,
                                 f"{len(chunks)} chunks given, {self.num_chunks} expected")
        parsed = {}
        for p in chunks:
            head = self.framer.parse(p)
            if head.index in parsed:
                raise InvalidMessage(Reason.CHUNK_MISMATCH, f"chunk {head.index} given twice")
            parsed[head.index] = verify_parsed(self, head, index=head.index,
                                               summands=head.summands)
        counts = {ch.summands for ch in parsed.values()}
        if len(counts) != 1:
            raise InvalidMessage(Reason.CHUNK_MISMATCH, f"chunks sum different counts {counts}")
        acc = Accumulator(self)
        acc.add([parsed[i] for i in range(self.num_chunks)])
        return acc.decode()

    def decode_sums(self, sums: list[Any], plain_weight: int,
                    count: int) -> tuple[np.ndarray, int]:
        """Decode per-chunk sums (an :class:`Accumulator`'s) of ``count`` updates."""
        if self.mode == MODE_PLAIN:
            qsum, weight = np.concatenate(sums), int(plain_weight)
        else:
            qsum, weight = self._decrypt(sums, count)
        if not count <= weight <= count * self.params.weight_cap:
            raise BoundsExceeded(Reason.LANE_BOUND,
                                 f"weight sum {weight} impossible for {count} updates")
        bound = self.params.lane_max(count)
        if qsum.size and int(np.abs(qsum).max()) > bound:
            raise BoundsExceeded(Reason.LANE_BOUND, f"a sum of {count} exceeds its lane bound "
                                 f"{bound}")
        return qsum, weight

    def _decrypt(self, sums: list[Any], count: int) -> tuple[np.ndarray, int]:
        plan, seal = self.plan, self.he().seal
        if seal.decryptor is None:
            raise InvalidMessage(Reason.NO_SECRET_KEY, "this HE context cannot decrypt")
        reals = np.empty(sum(len(row) for row in sums) * plan.reals_per_ct)
        pos = 0
        for row in sums:
            for ct in row:
                z = np.array(seal.decrypt(ct), np.complex128)
                reals[pos:pos + plan.reals_per_ct] = z.view(np.float64)
                pos += plan.reals_per_ct
        reals = reals[:plan.num_reals]
        rounded = np.rint(reals)
        if not float(np.abs(reals - rounded).max()) <= 0.375:
            raise BoundsExceeded(Reason.INEXACT_SUM, "decrypted values are not integers: wrong "
                                 "key, overflow or a damaged or crafted ciphertext")
        if float(np.abs(rounded).max()) >= 2.0**62:
            raise BoundsExceeded(Reason.INEXACT_SUM, "decrypted values beyond int64")
        ints = rounded.astype(np.int64)
        vmax = packing.packed_max(self.params.lane_max(count), plan.lanes, plan.lane_bits)
        if int(np.abs(ints[1:]).max(initial=0)) > vmax:
            raise BoundsExceeded(Reason.LANE_BOUND, "a packed sum exceeds its lane bound")
        return packing.unpack(ints[1:], plan.lanes, plan.lane_bits, self.num_params), int(ints[0])


__all__ = ["DTYPES", "Accumulator", "Codec", "CodecParams", "Plan", "coarse_weight",
           "plan_ckks", "plan_plain", "update_seed"]
