"""``fedstream-keygen``: HE contexts and Ed25519 identities for a deployment.

Writes the key directory described in :mod:`schemas.keyring`: the public HE context (no secret
key) for edge agents and regional aggregators, the secret context for the global aggregator only,
and one Ed25519 keypair per identity with a ``trust.json`` of their public keys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.he import fingerprint, generate_keys
from schemas.keyring import GLOBAL_ID, OPERATOR_ID
from schemas.project import check_device_id, contiguous_fleet, load_project
from schemas.signing import Identity, TrustStore, save_private_key


def agent_name(i: int) -> str:
    return f"agent-{i:03d}"


def region_name(r: int) -> str:
    return f"region-{r}"


def fleet(num_agents: int, num_regions: int) -> dict[str, list[str]]:
    """Region -> its agents ``agent-000``..., with the assignment the simulation uses."""
    return contiguous_fleet([agent_name(i) for i in range(num_agents)], num_regions)


def write_keys(out: Path, num_agents: int = 0, num_regions: int = 1,
               secret_out: Path | None = None,
               devices: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Create every key of a deployment under ``out`` (the secret HE context under
    ``secret_out`` if given); return a summary. The fleet is ``devices`` (region -> device ids,
    any spelling ``[A-Za-z0-9._-]{1,64}``) or else ``agent-000``... in ``num_regions``."""
    devices = devices if devices is not None else fleet(num_agents, num_regions)
    for members in devices.values():
        for d in members:
            check_device_id(d)
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
    return {"dir": str(out), "identities": str(len(ids)), "he_fingerprint": fingerprint(public)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedstream-keygen",
        description="Generate the HE contexts (public for edge/regional, secret for the global "
        "aggregator) and Ed25519 identities (global, operator, one per region, one per agent).",
    )
    ap.add_argument("--out", type=Path, required=True, help="key directory to write")
    ap.add_argument("--agents", type=int, default=12, help="number of edge agents agent-000... "
                    "(default 12)")
    ap.add_argument("--regions", type=int, default=3, help="number of regions (default 3)")
    ap.add_argument("--project", type=Path, default=None,
                    help="take the fleet (device ids and regions) from this project's "
                    "[tool.fedstream.simulation] table instead")
    ap.add_argument("--fleet", type=Path, default=None,
                    help="take the fleet from a JSON file {region: [device ids]} instead")
    ap.add_argument("--secret-out", type=Path, default=None,
                    help="write the secret HE context here instead of OUT/he/ (keep it off the "
                    "volume that edge agents and regional aggregators mount)")
    args = ap.parse_args(argv)
    if args.agents < 1 or args.regions < 1:
        ap.error("--agents and --regions must be at least 1")
    try:
        devices = (load_project(args.project).table.simulation.fleet() if args.project
                   else json.loads(args.fleet.read_text()) if args.fleet else None)
        summary = write_keys(args.out, args.agents, args.regions, args.secret_out, devices)
    except (ValueError, OSError) as exc:
        ap.error(str(exc))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
