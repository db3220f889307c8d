"""The key directory that ``fedstream-keygen`` writes and every service reads.

Layout (one directory per deployment; each process is given only what it needs)::

    trust.json                 public Ed25519 keys of every identity, with role and region
    he/public.ctx              TenSEAL context WITHOUT the secret key (edge agents, regional)
    he/secret.ctx              TenSEAL context WITH the secret key (global aggregator only; with
                               ``fedstream-keygen --secret-out DIR`` it is written to DIR instead)
    identities/<name>.pem      one Ed25519 private key per identity (PKCS#8 PEM, mode 0600):
                               signs its messages
    tls/<name>.key             the identity's TLS key (ECDSA P-256, mode 0600)
    tls/<name>.mqtt.crt        its MQTT client certificate, from its region's CA (devices, regions)
    tls/<name>.kafka.crt       its Kafka client certificate, from the Kafka CA (global, regions,
                               operator, streaming consumers)
    tls/ca-<ca>.crt            the CA certificates (``ca-kafka.crt``, ``ca-<region>.crt``)
    ca/<ca>.key                the CAs' private keys: the operator's, never mounted in a service

A deployment gives each service only its own ``identities/<name>.pem`` and ``tls/<name>.*``
beside the public files (see docs/security.md). In a real fleet a device makes its own keys
(``fedstream-device init``) and only its public key and certificate request leave it; keygen
makes them all at once for the demo, tests and compose stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.he import HEContext
from schemas.pki import KAFKA_CA, TlsFiles, ca_file_name, tls_paths
from schemas.signing import ALL_AGENTS, AgentScope, TrustStore, load_private_key

GLOBAL_ID = "global"
#: The operator's identity: signs control commands (lift a quarantine), nothing else.
OPERATOR_ID = "operator"


def tls_files(keys_dir: Path, name: str, kind: str, ca: str) -> TlsFiles:
    """``name``'s TLS files in a key directory: ``kind`` "mqtt" (``ca`` = its region) or
    "kafka" (``ca`` = :data:`~schemas.pki.KAFKA_CA`)."""
    return tls_paths(Path(keys_dir) / "tls", name, kind, ca)


def kafka_tls(keys_dir: Path, name: str) -> TlsFiles:
    return tls_files(keys_dir, name, "kafka", KAFKA_CA)


def identity_files(name: str, role: str, region: str) -> list[str]:
    """The files of a key directory that the service ``name`` needs, relative to it: its own
    secrets and the public files, nothing of any other identity. This is what a deployment
    mounts into that one service (docker-compose and the Kubernetes example mount the same)."""
    files = ["trust.json", f"tls/{name}.key"]
    if role != "consumer":  # a streaming consumer only reads: it signs nothing
        files.append(f"identities/{name}.pem")
    if role == "global":
        files += ["he/secret.ctx", f"tls/{name}.kafka.crt", f"tls/{ca_file_name(KAFKA_CA)}"]
    elif role == "region":
        files += ["he/public.ctx", f"tls/{name}.kafka.crt", f"tls/{ca_file_name(KAFKA_CA)}",
                  f"tls/{name}.mqtt.crt", f"tls/{ca_file_name(region)}"]
    elif role == "agent":
        files += ["he/public.ctx", f"tls/{name}.mqtt.crt", f"tls/{ca_file_name(region)}"]
    else:  # operator, streaming consumer: Kafka only
        files += [f"tls/{name}.kafka.crt", f"tls/{ca_file_name(KAFKA_CA)}"]
    return files


def export_identity(keys_dir: Path, name: str, out: Path, role: str | None = None) -> Path:
    """Copy ``name``'s files (:func:`identity_files`) to a key directory of its own, ``out``;
    private keys stay mode 0600. ``role``: for an identity that signs nothing (a streaming
    consumer) and so is not in the trust store."""
    import shutil

    ident = TrustStore.load(Path(keys_dir) / "trust.json", scope=AgentScope.only(name)).get(name)
    if ident is None and role is None:
        raise ValueError(f"{name!r} is not in {keys_dir}/trust.json")
    role, region = (ident.role, ident.region) if ident is not None else (role or "", "")
    for rel in identity_files(name, role, region):
        dst = Path(out) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(keys_dir) / rel, dst)
    return Path(out)


@dataclass(frozen=True)
class Keyring:
    """What one process holds: its identity, the trust store and an HE context."""

    name: str
    private_key: Ed25519PrivateKey
    trust: TrustStore
    he: HEContext

    @classmethod
    def load(cls, keys_dir: Path, name: str, *, secret: bool = False,
             secret_path: Path | None = None, scope: AgentScope = ALL_AGENTS) -> Keyring:
        """Load ``name``'s key; the secret HE context only when ``secret`` (global tier), from
        ``secret_path`` if given (a deployment keeps it off the volume the other tiers mount);
        of the agents in ``trust.json``, only those in ``scope``."""
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
            trust=TrustStore.load(keys_dir / "trust.json", scope=scope),
            he=HEContext.from_bytes(ctx_file.read_bytes()),
        )
