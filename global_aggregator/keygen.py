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

from edge_agent.partition import assign_regions
from schemas.he import fingerprint, generate_keys
from schemas.keyring import GLOBAL_ID, OPERATOR_ID
from schemas.signing import Identity, TrustStore, save_private_key


def agent_name(i: int) -> str:
    return f"agent-{i:03d}"


def region_name(r: int) -> str:
    return f"region-{r}"


def fleet(num_agents: int, num_regions: int) -> dict[str, list[str]]:
    """Region -> its agents, with the same assignment the simulation uses."""
    regions = assign_regions(num_agents, num_regions)
    out: dict[str, list[str]] = {region_name(r): [] for r in range(num_regions)}
    for i in range(num_agents):
        out[region_name(int(regions[i]))].append(agent_name(i))
    return out


def write_keys(out: Path, num_agents: int, num_regions: int,
               secret_out: Path | None = None) -> dict[str, str]:
    """Create every key of a deployment under ``out`` (the secret HE context under
    ``secret_out`` if given); return a summary."""
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
    for region, agents in fleet(num_agents, num_regions).items():
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
    ap.add_argument("--agents", type=int, default=12, help="number of edge agents (default 12)")
    ap.add_argument("--regions", type=int, default=3, help="number of regions (default 3)")
    ap.add_argument("--secret-out", type=Path, default=None,
                    help="write the secret HE context here instead of OUT/he/ (keep it off the "
                    "volume that edge agents and regional aggregators mount)")
    args = ap.parse_args(argv)
    if args.agents < 1 or args.regions < 1:
        ap.error("--agents and --regions must be at least 1")
    print(json.dumps(write_keys(args.out, args.agents, args.regions, args.secret_out), indent=2))


if __name__ == "__main__":
    main()
