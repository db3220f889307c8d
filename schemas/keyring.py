"""The key directory that ``fedstream-keygen`` writes and every service reads.

Layout (one directory per deployment; each process is given only what it needs)::

    trust.json                 public Ed25519 keys of every identity, with role and region
    he/public.ctx              TenSEAL context WITHOUT the secret key (edge agents, regional)
    he/secret.ctx              TenSEAL context WITH the secret key (global aggregator only; with
                               ``fedstream-keygen --secret-out DIR`` it is written to DIR instead)
    identities/<name>.pem      one Ed25519 private key per identity (PKCS#8 PEM, mode 0600)

In a real fleet each agent generates ``identities/<agent>.pem`` on the device and registers
only its public key; keygen makes them all at once for the demo, tests and compose stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.he import HEContext
from schemas.signing import TrustStore, load_private_key

GLOBAL_ID = "global"
#: The operator's identity: signs control commands (lift a quarantine), nothing else.
OPERATOR_ID = "operator"


@dataclass(frozen=True)
class Keyring:
    """What one process holds: its identity, the trust store and an HE context."""

    name: str
    private_key: Ed25519PrivateKey
    trust: TrustStore
    he: HEContext

    @classmethod
    def load(cls, keys_dir: Path, name: str, *, secret: bool = False,
             secret_path: Path | None = None) -> Keyring:
        """Load ``name``'s key; the secret HE context only when ``secret`` (global tier), from
        ``secret_path`` if given (a deployment keeps it off the volume the other tiers mount)."""
        keys_dir = Path(keys_dir)
        pem = keys_dir / "identities" / f"{name}.pem"
        if not pem.exists():
            raise FileNotFoundError(f"no private key for {name!r} at {pem} (run fedstream-keygen)")
        ctx_file = keys_dir / "he" / ("secret.ctx" if secret else "public.ctx")
        if secret and secret_path is not None:
            ctx_file = Path(secret_path)
        return cls(
            name=name,
            private_key=load_private_key(pem),
            trust=TrustStore.load(keys_dir / "trust.json"),
            he=HEContext.from_bytes(ctx_file.read_bytes()),
        )
