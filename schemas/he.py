"""CKKS contexts for addition-only aggregation, on TenSEAL's ``sealapi``.

Idea: the update codec never multiplies ciphertexts, so the CKKS parameters only need room for
sums (Cheon, Kim, Kim, Song, "Homomorphic encryption for arithmetic of approximate numbers",
2017). Poly degree 4096 with coefficient moduli ``[60, 49]`` gives one 60-bit data prime (the 49-bit
prime is SEAL's special prime: public-key encryption runs at the key level and is then divided by
it, which leaves only rounding noise). No relinearisation or Galois keys are generated or shipped.

Keys travel as TenSEAL context serializations. The secret context holds the secret key (global
aggregator only); the public context holds the public key only (edge agents, regional
aggregators). Both carry the same :func:`fingerprint`: hex SHA-256 of the public serialization.

Ciphertexts travel bit-packed: the 2 x N coefficients of a fresh-level, 2-part ciphertext, each
in 60 bits (every fedstream ring has one 60-bit data prime q0), two coefficients in 15 bytes,
little-endian, and nothing else. That is 61,440 bytes for the default ring, 6.4 % less than
SEAL's own serialization (65,659 bytes: SEAL's zstd does not shrink uniform residues mod a 60-bit
prime stored in 64-bit words). Everything else SEAL writes (parms_id, size, degree, scale, its
headers) is the same for every ciphertext of a plan, so the receiver rebuilds it from its own
context and the plan's scale. A hostile sender controls only coefficients: a packed ciphertext of
the wrong length or with a coefficient >= q0 is refused as ``corrupt`` before SEAL sees it, and
SEAL never parses a header or a compressed stream that came off the wire.

The ``sealapi`` bindings only offer ``Ciphertext.save(path)`` / ``load(ctx, path)``; no bytes or
buffer API exists (``data()`` and ``DynArray.at`` read single coefficients, pickling is
unsupported). The fastest route measured (TenSEAL 0.3.18, 2 cores) is an anonymous in-memory
file (``os.memfd_create``) reused through ``/proc/self/fd/N``, with a ``tempfile`` fallback
where memfd is unavailable; (un)packing is a few numpy shifts, ~40 us per ciphertext.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import zstandard

from schemas.errors import InvalidMessage

POLY_MODULUS_DEGREE = 4096
COEFF_MOD_BIT_SIZES = (60, 49)
#: SEAL's serialization header: magic, header size, version major/minor, compression mode,
#: reserved, total size (``seal/serialization.h``).
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
#: Bits of the one data prime q0 of every fedstream ring (SEAL's largest prime size).
Q0_BITS = 60
_MASK60 = np.uint64((1 << Q0_BITS) - 1)


def packed_ct_bytes(poly_degree: int) -> int:
    """Bytes of one packed 2-part ciphertext: ``2 * poly_degree`` coefficients of 60 bits."""
    return 2 * poly_degree * Q0_BITS // 8


def pack_coefficients(coeffs: np.ndarray) -> bytes:
    """Pack an even number of coefficients ``< 2^60``: each pair ``(a, b)`` becomes the 15
    little-endian bytes of the 120-bit integer ``a + b * 2^60``."""
    a, b = coeffs[0::2], coeffs[1::2]
    words = np.stack([a | (b << np.uint64(60)), b >> np.uint64(4)], axis=1).astype("<u8")
    return words.view(np.uint8).reshape(-1, 16)[:, :15].tobytes()


def unpack_coefficients(data: bytes) -> np.ndarray:
    """Inverse of :func:`pack_coefficients`; ``len(data)`` must be a multiple of 15."""
    pairs = np.zeros((len(data) // 15, 16), np.uint8)
    pairs[:, :15] = np.frombuffer(data, np.uint8).reshape(-1, 15)
    words = pairs.view("<u8")
    out = np.empty(2 * len(words), np.uint64)
    out[0::2] = words[:, 0] & _MASK60
    out[1::2] = (words[:, 0] >> np.uint64(60)) | (words[:, 1] << np.uint64(4))
    return out


def _serialize(ctx: ts.Context, secret: bool) -> bytes:
    return ctx.serialize(save_public_key=True, save_secret_key=secret,
                         save_galois_keys=False, save_relin_keys=False)


def generate_keys(poly_modulus_degree: int = POLY_MODULUS_DEGREE,
                  coeff_mod_bit_sizes: tuple[int, ...] = COEFF_MOD_BIT_SIZES,
                  ) -> tuple[bytes, bytes]:
    """Make a fresh addition-only CKKS keypair.

    Returns:
        ``(secret_context_bytes, public_context_bytes)``; the public one has no secret key, and
        neither carries relinearisation or Galois keys.
    """
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree,
                     coeff_mod_bit_sizes=list(coeff_mod_bit_sizes))
    secret = _serialize(ctx, secret=True)
    pub = ctx.copy()
    pub.make_context_public()
    return secret, _serialize(pub, secret=False)


def fingerprint(public_context_bytes: bytes) -> str:
    """Hex SHA-256 of a public context serialization: the name of a keypair."""
    return hashlib.sha256(public_context_bytes).hexdigest()


class _CtFile:
    """A reusable in-memory file through which ``sealapi`` saves and loads ciphertexts."""

    def __init__(self) -> None:
        try:
            self.fd = os.memfd_create("fedstream-ct", 0)
            self.path = f"/proc/self/fd/{self.fd}"
            if not os.path.exists(self.path):
                raise OSError("no /proc")
        except (AttributeError, OSError):
            f = tempfile.NamedTemporaryFile(prefix="fedstream-ct-", delete=False)
            self.fd = os.dup(f.fileno())
            self.path = f.name
            f.close()

    def write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)


@dataclass
class HEContext:
    """A loaded TenSEAL CKKS context plus the ``sealapi`` objects the codec uses.

    Build with :meth:`from_bytes`. ``is_private`` tells whether it can decrypt.
    """

    ts_context: ts.Context
    public_serialization: bytes
    is_private: bool
    fingerprint: str
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> HEContext:
        """Load a secret or public context; raises InvalidMessage("bad_context") on garbage."""
        try:
            ctx = ts.context_from(bytes(data))
            if not ctx.has_public_key():
                raise ValueError("context has no public key")
            private = bool(ctx.has_secret_key())
            pub = ctx.copy()
            if private:
                pub.make_context_public()
            pub_bytes = _serialize(pub, secret=False)
            parms = ctx.seal_context().data.key_context_data().parms()
            if parms.scheme().name != "CKKS":
                raise ValueError("not a CKKS context")
            data_moduli = ctx.seal_context().data.first_context_data().parms().coeff_modulus()
            if len(data_moduli) != 1 or data_moduli[0].bit_count() != Q0_BITS:
                raise ValueError(f"data primes of {[m.bit_count() for m in data_moduli]} bits: "
                                 f"fedstream rings have one of {Q0_BITS} (generate_keys)")
        except InvalidMessage:
            raise
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises many types on garbage
            raise InvalidMessage("bad_context", f"cannot load HE context: {exc}") from None
        return cls(ctx, pub_bytes, private, fingerprint(pub_bytes))

    def public_bytes(self) -> bytes:
        """The public serialization (no secret key) of this context."""
        return self.public_serialization

    # --- sealapi objects (lazily built, one set per thread: SEAL objects are not thread-safe) ---

    @property
    def seal(self) -> _Seal:
        s = getattr(self._local, "seal", None)
        if s is None:
            s = _Seal(self)
            self._local.seal = s
        return s


class _Seal:
    """Encoder, encryptor, evaluator, decryptor and the ciphertext file for one thread."""

    def __init__(self, he: HEContext) -> None:
        ctx = he.ts_context
        self.context = ctx.seal_context().data
        data_level = self.context.first_context_data()
        self.parms_id = list(data_level.parms_id())
        self.q0 = data_level.parms().coeff_modulus()[0].value()
        self.poly_degree = data_level.parms().poly_modulus_degree()
        self.slots = self.poly_degree // 2
        self.ct_bytes = packed_ct_bytes(self.poly_degree)
        self._coeffs = 2 * self.poly_degree
        self._prefix: dict[float, bytes] = {}   # scale -> SEAL's bytes before the coefficients
        self._unzstd = zstandard.ZstdDecompressor()  # SEAL's own compression, on every save
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.encryptor = sealapi.Encryptor(self.context, ctx.public_key().data)
        self.evaluator = sealapi.Evaluator(self.context)
        self.decryptor = (sealapi.Decryptor(self.context, ctx.secret_key().data)
                          if he.is_private else None)
        self.file = _CtFile()

    def encrypt(self, values: list[complex], scale: float) -> sealapi.Ciphertext:
        """Encode ``slots`` complex values at ``scale`` and encrypt them with the public key."""
        pt = sealapi.Plaintext()
        self.encoder.encode(values, scale, pt)
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(pt, ct)
        return ct

    def decrypt(self, ct: sealapi.Ciphertext) -> list[complex]:
        decryptor = self.decryptor
        if decryptor is None:
            raise InvalidMessage("no_secret_key", "this HE context cannot decrypt")
        pt = sealapi.Plaintext()
        decryptor.decrypt(ct, pt)
        return self.encoder.decode_complex(pt)

    def _seal_bytes(self, ct: sealapi.Ciphertext) -> bytes:
        """SEAL's serialization of ``ct``, uncompressed (SEAL compresses with zstd by default)."""
        ct.save(self.file.path)
        data = self.file.read()
        magic, _hs, _vmaj, _vmin, mode, _res, size = _SEAL_HEADER.unpack_from(data)
        if magic != _SEAL_MAGIC or size != len(data):
            raise RuntimeError("SEAL wrote an unexpected serialization header")
        body = data[_SEAL_HEADER.size:]
        if mode == _COMPR_ZSTD:
            body = self._unzstd.decompress(body, max_output_size=1 << 24)
        elif mode == _COMPR_ZLIB:
            body = zlib.decompress(body)
        elif mode != _COMPR_NONE:
            raise RuntimeError(f"SEAL compression mode {mode} is unknown")
        head = _SEAL_HEADER.pack(magic, _SEAL_HEADER.size, _vmaj, _vmin, _COMPR_NONE, 0,
                                 _SEAL_HEADER.size + len(body))
        return head + body

    def _prefix_for(self, scale: float) -> bytes:
        """SEAL's uncompressed bytes before the coefficients of a fresh ciphertext at ``scale``."""
        prefix = self._prefix.get(scale)
        if prefix is None:
            raw = self._seal_bytes(self.encrypt([0j] * self.slots, scale))
            prefix = raw[:-8 * self._coeffs]
            self._prefix[scale] = prefix
        return prefix

    def save(self, ct: sealapi.Ciphertext) -> bytes:
        """Pack a fresh-level 2-part ciphertext into ``ct_bytes`` bytes (module docstring)."""
        raw = self._seal_bytes(ct)
        split = len(raw) - 8 * self._coeffs
        if raw[:split] != self._prefix_for(ct.scale):
            raise RuntimeError("ciphertext is not a fresh-level 2-part ciphertext of this context")
        return pack_coefficients(np.frombuffer(raw, "<u8", self._coeffs, split))

    def load(self, data: bytes, scale: float) -> sealapi.Ciphertext:
        """Unpack and load one ciphertext of this context at ``scale``.

        Raises:
            InvalidMessage("corrupt"): wrong length, a coefficient >= q0, or a ciphertext SEAL
            refuses.
        """
        if len(data) != self.ct_bytes:
            raise InvalidMessage("corrupt", f"ciphertext of {len(data)} bytes, this ring's are "
                                 f"{self.ct_bytes}")
        coeffs = unpack_coefficients(data)
        if int(coeffs.max()) >= self.q0:
            raise InvalidMessage("corrupt", "ciphertext coefficient beyond the modulus q0")
        self.file.write(self._prefix_for(scale) + coeffs.astype("<u8").tobytes())
        ct = sealapi.Ciphertext(self.context)
        try:
            ct.load(self.context, self.file.path)
        except Exception as exc:  # noqa: BLE001 - SEAL raises on malformed or out-of-range data
            raise InvalidMessage("corrupt", f"ciphertext does not load: {exc}") from None
        if ct.size() != 2 or list(ct.parms_id()) != self.parms_id or ct.scale != scale:
            raise InvalidMessage("corrupt", "ciphertext has the wrong size, level or scale")
        return ct
