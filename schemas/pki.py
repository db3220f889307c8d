"""The federation's TLS certificates: small internal CAs (``cryptography``), one per trust domain.

Two kinds of CA, so that a broker trusts exactly the clients it should:

- ``kafka``: the services' CA. Issues the Kafka broker's server certificate and the Kafka client
  certificates of the global aggregator, the regional aggregators, the operator and streaming
  consumers. Kafka maps a client certificate's CN to its principal (``User:<CN>``); the ACLs
  are written for those names.
- ``<region>`` (one per region): the region's own CA. Issues its Mosquitto's server certificate,
  its devices' certificates and its regional aggregator's MQTT certificate. A region's broker
  trusts only its own CA, so a device of another region (or a certificate from any other CA)
  fails the TLS handshake there; Mosquitto takes the CN as the user name.

Every certificate names its holder in the CN and its role in the OU, so a service can check at
start-up that the files it was given are its own (:func:`check_identity`). TLS keys are ECDSA
P-256 (what every TLS stack speaks); they are separate from the Ed25519 keys that sign
messages, so one key never serves two protocols.

A device never sends its private key anywhere: ``fedstream-device init`` makes its keys and a
certificate signing request (:func:`make_csr`); the operator's ``fedstream-fleet enroll`` checks
the request and signs it (:meth:`CertAuthority.sign_csr`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KAFKA_CA = "kafka"
#: Roles a certificate can carry (the OU).
ROLES = ("global", "region", "agent", "operator", "consumer", "admin", "broker")
VALID_DAYS = 825  # the CA/Browser Forum's former ceiling for leaf certificates
CA_VALID_DAYS = 3650


class PkiError(ValueError):
    """A certificate, request or key that fedstream refuses, with the reason."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an ECDSA TLS key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate ({exc})") from None


def _name(cn: str, role: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstream"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def identity_of(cert: x509.Certificate) -> tuple[str, str]:
    """(CN, role) of a certificate fedstream issued."""
    return identity_of_name(cert.subject)


def make_csr(cn: str, role: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A certificate signing request for ``cn`` (made on the device; only this leaves it)."""
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(cn, role))
            .sign(key, hashes.SHA256()))


@dataclass(frozen=True)
class CertAuthority:
    """One CA: its name, key and self-signed certificate."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> CertAuthority:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstream"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"fedstream {name} CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(self, cn: str, role: str, public_key: ec.EllipticCurvePublicKey, *,
              hosts: tuple[str, ...] = (), days: int = VALID_DAYS) -> x509.Certificate:
        """A leaf certificate for ``cn`` in ``role``; with ``hosts`` a server certificate for
        those names / IP addresses (brokers), else a client certificate."""
        if role not in ROLES:
            raise PkiError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        now = dt.datetime.now(dt.UTC)
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        b = (
            x509.CertificateBuilder().subject_name(_name(cn, role)).issuer_name(self.cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if hosts:
            usage.append(ExtendedKeyUsageOID.SERVER_AUTH)
            alt: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def sign_csr(self, csr: x509.CertificateSigningRequest, *, cn: str, role: str) -> x509.Certificate:
        """Sign a device's request after checking that it is self-consistent and asks for
        exactly ``cn`` in ``role`` (never a server certificate, never another name)."""
        if not csr.is_signature_valid:
            raise PkiError("certificate request: its signature does not verify")
        got = identity_of_name(csr.subject)
        if got != (cn, role):
            raise PkiError(f"certificate request is for {got[0]!r} as {got[1]!r}, "
                           f"expected {cn!r} as {role!r}")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise PkiError("certificate request: expected an ECDSA P-256 key")
        return self.issue(cn, role, pub)

    def save(self, ca_dir: Path, public_dir: Path) -> None:
        write_private(ca_dir / f"{self.name}.key", key_pem(self.key))
        public_dir.mkdir(parents=True, exist_ok=True)
        (public_dir / ca_file_name(self.name)).write_bytes(cert_pem(self.cert))

    @classmethod
    def load(cls, ca_dir: Path, public_dir: Path, name: str) -> CertAuthority:
        return cls(name, load_key(ca_dir / f"{name}.key"),
                   load_cert(public_dir / ca_file_name(name)))


def identity_of_name(name: x509.Name) -> tuple[str, str]:
    cn = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cn) != 1 or len(ou) != 1:
        raise PkiError(f"subject {name.rfc4514_string()} names no single holder and role")
    return str(cn[0].value), str(ou[0].value)


def ca_file_name(ca: str) -> str:
    return f"ca-{ca}.crt"


def tls_paths(tls_dir: Path, stem: str, kind: str, ca: str) -> TlsFiles:
    """Where one identity's TLS files live in a ``tls/`` directory, the one naming convention:
    ``<stem>.key`` (its key, shared by its certificates), ``<stem>.<kind>.crt`` (``kind``:
    "mqtt" or "kafka") and the CA's ``ca-<ca>.crt``."""
    tls_dir = Path(tls_dir)
    return TlsFiles(tls_dir / ca_file_name(ca), tls_dir / f"{stem}.{kind}.crt",
                    tls_dir / f"{stem}.key")


@dataclass(frozen=True)
class TlsFiles:
    """The three files of one TLS client or server: CA to trust, own certificate, own key."""

    ca: Path
    cert: Path
    key: Path

    def check(self, name: str, role: str | None = None) -> None:
        """Refuse to start with another identity's files: the certificate must name ``name``
        (and ``role``), chain to ``ca`` and belong to ``key``."""
        for p in (self.ca, self.cert, self.key):
            if not Path(p).exists():
                raise PkiError(f"TLS file {p} does not exist")
        cert, ca = load_cert(self.cert), load_cert(self.ca)
        cn, got_role = identity_of(cert)
        if cn != name or (role is not None and got_role != role):
            raise PkiError(f"{self.cert} is {cn!r}'s certificate ({got_role}), not {name!r}'s: "
                           "start each service with its own identity's files")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PkiError(f"{self.cert} was not issued by the CA in {self.ca} ({exc or 'bad signature'})") from None
        key = load_key(self.key)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiError(f"{self.key} is not the key of {self.cert}")


class Pki:
    """The CAs of one deployment, kept in two directories:

    ``ca_dir`` (the operator's, never mounted into a service): each CA's private key;
    ``public_dir``: each CA's certificate (``ca-kafka.crt``, ``ca-<region>.crt``), which every
    client and broker may read.
    """

    def __init__(self, ca_dir: Path, public_dir: Path) -> None:
        self.ca_dir, self.public_dir = Path(ca_dir), Path(public_dir)

    def ca(self, name: str) -> CertAuthority:
        """The CA ``name``, created on first use."""
        if (self.ca_dir / f"{name}.key").exists():
            return CertAuthority.load(self.ca_dir, self.public_dir, name)
        ca = CertAuthority.create(name)
        ca.save(self.ca_dir, self.public_dir)
        return ca

    def ca_cert(self, name: str) -> Path:
        return self.public_dir / ca_file_name(name)

    def issue(self, ca: str, cn: str, role: str, kind: str, *, stem: str = "",
              hosts: tuple[str, ...] = ()) -> TlsFiles:
        """Issue ``cn`` its ``kind`` certificate into :attr:`public_dir`, named as
        :func:`tls_paths` says (file stem ``stem``, default ``cn``)."""
        files = tls_paths(self.public_dir, stem or cn, kind, ca)
        return self.issue_files(ca, cn, role, files.key, files.cert, hosts=hosts)

    def issue_files(self, ca: str, cn: str, role: str, key_path: Path, cert_path: Path, *,
                    hosts: tuple[str, ...] = ()) -> TlsFiles:
        """Issue ``cn`` a certificate from CA ``ca`` for the key at ``key_path`` (made there
        first if missing: one key per identity, shared by its certificates)."""
        if key_path.exists():
            key = load_key(key_path)
        else:
            key = new_key()
            write_private(key_path, key_pem(key))
        cert = self.ca(ca).issue(cn, role, key.public_key(), hosts=hosts)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(cert_pem(cert))
        return TlsFiles(self.ca_cert(ca), cert_path, key_path)
