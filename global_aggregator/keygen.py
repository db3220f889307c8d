"""``fedstream-keygen``: HE contexts and Ed25519 identities for a deployment.

Writes the key directory described in :mod:`schemas.keyring`: the public HE context (no secret
key) for edge agents and regional aggregators, the secret context for the global aggregator only,
one Ed25519 keypair per identity with a ``trust.json`` of their public keys, and the TLS side:
the CAs (one for Kafka, one per region, :mod:`schemas.pki`) and a certificate per identity and
broker connection. With ``--ca-dir`` the CAs of an existing deployment (or of the local stack)
issue the certificates instead of new ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.he import fingerprint, generate_keys
from schemas.keyring import GLOBAL_ID, OPERATOR_ID, tls_files
from schemas.pki import KAFKA_CA, Pki, ca_file_name
from schemas.project import check_device_id, contiguous_fleet, load_project
from schemas.signing import Identity, TrustStore, save_private_key


def agent_name(i: int) -> str:
    return f"agent-{i:03d}"


def region_name(r: int) -> str:
    return f"region-{r}"


def fleet(num_agents: int, num_regions: int) -> dict[str, list[str]]:
    """Region -> its agents ``agent-000``..., with the assignment the simulation uses."""
    return contiguous_fleet([agent_name(i) for i in range(num_agents)], num_regions)


#: Identities that are not devices; no device may take one of these names.
CONSUMER_ID = "consumer"
RESERVED = frozenset({GLOBAL_ID, OPERATOR_ID, CONSUMER_ID, "admin", "probe", "kafka-broker"})


def write_keys(out: Path, num_agents: int = 0, num_regions: int = 1,
               secret_out: Path | None = None,
               devices: dict[str, list[str]] | None = None,
               pki: Pki | None = None) -> dict[str, str]:
    """Create every key of a deployment under ``out`` (the secret HE context under
    ``secret_out`` if given); return a summary. The fleet is ``devices`` (region -> device ids,
    any spelling ``[A-Za-z0-9._-]{1,64}``) or else ``agent-000``... in ``num_regions``.
    Certificates come from ``pki``'s CAs (default: new CAs under ``out/ca``)."""
    devices = devices if devices is not None else fleet(num_agents, num_regions)
    for members in devices.values():
        for d in members:
            check_device_id(d)
            if d in RESERVED or d in devices:
                raise ValueError(f"device id {d!r} is the name of a service identity")
    out = Path(out)
    (out / "he").mkdir(parents=True, exist_ok=True)
    (out / "identities").mkdir(parents=True, exist_ok=True)
    secret, public = generate_keys()
    secret_dir = Path(secret_out) if secret_out is not None else out / "he"
    secret_dir.mkdir(parents=True, exist_ok=True)
    (secret_dir / "secret.ctx").write_bytes(secret)
    (secret_dir / "secret.ctx").chmod(0o600)
    (out / "he" / "public.ctx").write_bytes(public)

    ids: dict[str, Identity] = {}

    def make(name: str, role: str, region: str) -> None:
        key = Ed25519PrivateKey.generate()
        save_private_key(key, out / "identities" / f"{name}.pem")
        ids[name] = Identity(name, role, region, key.public_key())

    make(GLOBAL_ID, "global", "")
    make(OPERATOR_ID, "operator", "")
    for region, agents in devices.items():
        make(region, "region", region)
        for agent in agents:
            make(agent, "agent", region)
    (out / "trust.json").write_text(json.dumps(TrustStore(ids).dump(), indent=2))
    write_certificates(out, devices, pki)
    return {"dir": str(out), "identities": str(len(ids)), "he_fingerprint": fingerprint(public)}


def write_certificates(out: Path, devices: dict[str, list[str]], pki: Pki | None = None) -> None:
    """Every identity's TLS key and certificates (layout in :mod:`schemas.keyring`): Kafka
    client certificates for the global, the operator, a streaming consumer and each region;
    MQTT client certificates from each region's CA for the region and its devices."""
    tls = out / "tls"
    pki = pki if pki is not None else Pki(out / "ca", tls)

    def issue(ca: str, name: str, role: str, kind: str) -> None:
        files = tls_files(out, name, kind, ca)
        pki.issue_files(ca, name, role, files.key, files.cert)

    for name, role in ((GLOBAL_ID, "global"), (OPERATOR_ID, "operator"),
                       (CONSUMER_ID, "consumer")):
        issue(KAFKA_CA, name, role, "kafka")
    for region, agents in devices.items():
        issue(KAFKA_CA, region, "region", "kafka")
        issue(region, region, "region", "mqtt")
        for agent in agents:
            issue(region, agent, "agent", "mqtt")
    if pki.public_dir.resolve() != tls.resolve():  # another deployment's CAs: copy their certs
        for ca in (KAFKA_CA, *devices):
            (tls / ca_file_name(ca)).write_bytes(pki.ca_cert(ca).read_bytes())


def rotate_global(keys: Path, effective_round: int, *, signing: bool = True,
                  he: bool = True, secret_dir: Path | None = None) -> dict[str, str]:
    """Rotate the global aggregator's signing key and/or the HE context of the deployment in
    ``keys``, at a round boundary (docs/security.md: stop the services after a model version,
    rotate, give every service its new public files, restart).

    The new signing key signs the versions of rounds >= ``effective_round``; ``trust.json``
    keeps the old key for the rounds before, so every earlier version stays verifiable. The
    old secrets are kept beside the new ones as ``*.prev`` (mode 0600) until the operator
    deletes them. On restart the global reissues the open round's task under the new HE
    context. Returns a summary."""
    keys = Path(keys)
    out: dict[str, str] = {}
    if signing:
        trust = TrustStore.load(keys / "trust.json")
        pem = keys / "identities" / f"{GLOBAL_ID}.pem"
        new = Ed25519PrivateKey.generate()
        trust.rotate(GLOBAL_ID, new.public_key(), effective_round, any_role=True)
        pem.replace(pem.with_name(pem.name + ".prev"))
        save_private_key(new, pem)
        (keys / "trust.json").write_text(json.dumps(trust.dump(), indent=2))
        out["global_key_from_round"] = str(effective_round)
    if he:
        secret, public = generate_keys()
        sdir = Path(secret_dir) if secret_dir is not None else keys / "he"
        for path, data in ((sdir / "secret.ctx", secret), (keys / "he" / "public.ctx", public)):
            if path.exists():
                path.replace(path.with_name(path.name + ".prev"))
            path.write_bytes(data)
        for secret_file in (sdir / "secret.ctx", sdir / "secret.ctx.prev"):
            if secret_file.exists():
                secret_file.chmod(0o600)
        out["he_fingerprint"] = fingerprint(public)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedstream-keygen",
        description="Generate the HE contexts (public for edge/regional, secret for the global "
        "aggregator) and Ed25519 identities (global, operator, one per region, one per agent).",
    )
    ap.add_argument("--out", type=Path, help="key directory to write")
    ap.add_argument("--rotate", type=Path, default=None, metavar="KEYS",
                    help="instead: rotate the global's signing key and the HE context of the "
                    "existing key directory KEYS at a round boundary (docs/security.md)")
    ap.add_argument("--effective-round", type=int, default=None,
                    help="with --rotate: the first round whose model version the new global "
                    "key signs (the next round to run)")
    ap.add_argument("--only", choices=("signing-key", "he"), default=None,
                    help="with --rotate: rotate only this")
    ap.add_argument("--agents", type=int, default=12, help="number of edge agents agent-000... "
                    "(default 12)")
    ap.add_argument("--regions", type=int, default=3, help="number of regions (default 3)")
    ap.add_argument("--project", type=Path, default=None,
                    help="take the fleet (device ids and regions) from this project's "
                    "[tool.fedstream.simulation] table instead")
    ap.add_argument("--fleet", type=Path, default=None,
                    help="take the fleet from a JSON file {region: [device ids]} instead")
    ap.add_argument("--ca-dir", type=Path, default=None,
                    help="issue the certificates from the CAs in this directory (their keys "
                    "in CA_DIR/ca, certificates in CA_DIR/tls) instead of making new CAs")
    ap.add_argument("--secret-out", type=Path, default=None,
                    help="write the secret HE context here instead of OUT/he/ (keep it off the "
                    "volume that edge agents and regional aggregators mount)")
    args = ap.parse_args(argv)
    if args.rotate is not None:
        if args.effective_round is None or args.effective_round < 1:
            ap.error("--rotate needs --effective-round N (N >= 1: the next round to run)")
        try:
            summary = rotate_global(args.rotate, args.effective_round,
                                    signing=args.only in (None, "signing-key"),
                                    he=args.only in (None, "he"), secret_dir=args.secret_out)
        except (ValueError, OSError) as exc:
            ap.error(str(exc))
        print(json.dumps(summary, indent=2))
        return
    if args.out is None:
        ap.error("--out is required (or --rotate KEYS)")
    if args.agents < 1 or args.regions < 1:
        ap.error("--agents and --regions must be at least 1")
    try:
        devices = (load_project(args.project).table.simulation.fleet() if args.project
                   else json.loads(args.fleet.read_text()) if args.fleet else None)
        pki = Pki(args.ca_dir / "ca", args.ca_dir / "tls") if args.ca_dir else None
        summary = write_keys(args.out, args.agents, args.regions, args.secret_out, devices, pki)
    except (ValueError, OSError) as exc:
        ap.error(str(exc))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
