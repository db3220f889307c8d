"""CKKS contexts for addition-only aggregation, on TenSEAL's ``sealapi``.

Idea: the update codec never multiplies ciphertexts, so the CKKS parameters only need room for
sums (Cheon, Kim, Kim, Song, "Homomorphic encryption for arithmetic of approximate numbers",
2017). Poly degree 4096 with coefficient moduli ``[60, 49]`` gives one 60-bit data prime (the 49-bit
prime is SEAL's special prime: public-key encryption runs at the key level and is then divided by
it, which leaves only rounding noise). No relinearisation or Galois keys are generated or shipped.

Keys travel as TenSEAL context serializations. The secret context holds the secret key (global
aggregator only); the public context holds the public key only (edge agents, regional
aggregators). Both carry the same :func:`fingerprint`: hex SHA-256 of the public serialization.

Ciphertexts are (de)serialized with SEAL's own format. The ``sealapi`` bindings only offer
``Ciphertext.save(path)`` / ``load(ctx, path)``; no bytes or buffer API exists (``data()`` and
``DynArray.at`` read single coefficients, pickling is unsupported). The fastest route measured
(TenSEAL 0.3.18, 2 cores) is an anonymous in-memory file (``os.memfd_create``) reused through
``/proc/self/fd/N``: about 160 us to save and 75 us to load one 64 KiB ciphertext, with a
``tempfile`` fallback where memfd is unavailable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field

import tenseal as ts
import tenseal.sealapi as sealapi

from schemas.errors import InvalidMessage

POLY_MODULUS_DEGREE = 4096
COEFF_MOD_BIT_SIZES = (60, 49)
#: Maximum size accepted for one serialized ciphertext (bytes). A fresh or summed ciphertext of
#: the default parameters is 65,659 bytes (SEAL header + zstd frame of 2 x 4096 uint64).
MAX_CT_BYTES = 2 * POLY_MODULUS_DEGREE * 8 + 1024


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

    def save(self, ct: sealapi.Ciphertext) -> bytes:
        ct.save(self.file.path)
        return self.file.read()

    def load(self, data: bytes, scale: float) -> sealapi.Ciphertext:
        """Load one SEAL ciphertext and check it is a fresh-level 2-part ciphertext at ``scale``."""
        if len(data) > MAX_CT_BYTES:
            raise InvalidMessage("oversized", f"ciphertext of {len(data)} bytes")
        self.file.write(data)
        ct = sealapi.Ciphertext(self.context)
        try:
            ct.load(self.context, self.file.path)
        except Exception as exc:  # noqa: BLE001 - SEAL raises on malformed or out-of-range data
            raise InvalidMessage("corrupt", f"ciphertext does not load: {exc}") from None
        if ct.size() != 2 or list(ct.parms_id()) != self.parms_id:
            raise InvalidMessage("corrupt", "ciphertext has the wrong size or level")
        if ct.scale != scale:
            raise InvalidMessage("corrupt", f"ciphertext scale {ct.scale} != plan scale {scale}")
        return ct
