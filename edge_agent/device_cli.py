"""``fedstream-device``: a device's own keys, made on the device.

``fedstream-device init --keys DIR --device-id ID --region R`` writes, in the device's key
directory (layout in :mod:`schemas.keyring`)::

    identities/<id>.pem   the Ed25519 key that signs the device's updates (mode 0600)
    tls/<id>.key          its TLS key, ECDSA P-256 (mode 0600)
    enrol-<id>.json       the enrolment request: device id, region, the Ed25519 PUBLIC key and a
                          certificate signing request for the TLS key. No private key.

Only the request leaves the device. The operator checks it and enrols the device with
``fedstream-fleet enrol --request enrol-<id>.json``, which publishes the device's key to the
federation (no service restarts) and returns its MQTT certificate ``<id>.mqtt.crt``, to be put in
``DIR/tls/`` with the public files (``trust.json``, ``he/public.ctx``, ``tls/ca-<region>.crt``).

To rotate the keys, run ``init --force``: the old keys are kept as ``*.prev`` (the running agent
still signs with the old key until the rotation's effective round), and the new request goes to
the operator's ``fedstream-fleet rotate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.fleet import EnrolRequest, key_fingerprint, raw_public_key
from schemas.pki import key_pem, make_csr, new_key, write_private
from schemas.project import check_device_id

PROG = "fedstream-device"


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def request_path(keys_dir: Path, device_id: str) -> Path:
    return Path(keys_dir) / f"enrol-{device_id}.json"


def init_device(keys_dir: Path, device_id: str, region: str, *, force: bool = False) -> Path:
    """Make the device's Ed25519 and TLS keys under ``keys_dir`` and write its enrolment
    request; returns the request's path.

    Raises:
        ValueError: a bad device id or region.
        FileExistsError: keys exist already and ``force`` is not set.
    """
    check_device_id(device_id)
    try:
        check_device_id(region)
    except ValueError:
        raise ValueError(f"region {region!r} must match [A-Za-z0-9._-]{{1,64}}") from None
    keys_dir = Path(keys_dir)
    ident = keys_dir / "identities" / f"{device_id}.pem"
    tls_key = keys_dir / "tls" / f"{device_id}.key"
    existing = [p for p in (ident, tls_key) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist already: this device has "
                              "keys (use --force to make new ones, e.g. for a key rotation)")
    for p in existing:  # a rotation: the old key signs until the new one takes effect
        write_private(p.with_name(p.name + ".prev"), p.read_bytes())
    signing = Ed25519PrivateKey.generate()
    write_private(ident, signing.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    tls = new_key()
    write_private(tls_key, key_pem(tls))
    csr = make_csr(device_id, "agent", tls)
    req = EnrolRequest(device_id, region, raw_public_key(signing).hex(),
                       csr.public_bytes(serialization.Encoding.PEM).decode())
    out = request_path(keys_dir, device_id)
    out.write_text(json.dumps(req.to_json(), indent=2) + "\n")
    out.chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Make this device's keys on the device and the enrolment request to send "
        "to the operator (it holds only public keys). Private keys never leave the device.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ip = sub.add_parser(
        "init", help="make the device's signing and TLS keys and its enrolment request",
        description="Write DIR/identities/ID.pem (Ed25519, signs updates) and DIR/tls/ID.key "
        "(ECDSA P-256, for MQTT TLS), both mode 0600, and DIR/enrol-ID.json: the request to "
        "send to the operator (`fedstream-fleet enrol`, or `fedstream-fleet rotate` after "
        "--force).")
    ip.add_argument("--keys", type=Path, required=True, metavar="DIR",
                    help="the device's key directory (created if missing)")
    ip.add_argument("--device-id", required=True, metavar="ID",
                    help="this device's id, [A-Za-z0-9._-]{1,64} (e.g. its serial number)")
    ip.add_argument("--region", required=True, metavar="R",
                    help="the region the device belongs to (its MQTT broker's region)")
    ip.add_argument("--force", action="store_true",
                    help="replace existing keys (key rotation); the old ones are kept as "
                    "*.prev until the rotation takes effect")
    a = ap.parse_args(argv)
    try:
        out = init_device(a.keys, a.device_id, a.region, force=a.force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    req = json.loads(out.read_text())
    rotate = a.force
    cmd = (f"fedstream-fleet rotate --request {out.name} --effective-round N" if rotate
           else f"fedstream-fleet enrol --request {out.name}")
    print(f"Keys for {a.device_id} written under {a.keys} (private, mode 0600: they stay here).")
    print(f"Send {out} to the operator: it holds only public material.")
    print(f"  key fingerprint (confirm with the operator out of band): "
          f"{key_fingerprint(bytes.fromhex(req['public_key']))}")
    print(f"The operator runs: {cmd} --keys OPERATOR_KEYS --kafka HOST:PORT")
    print(f"and sends back {a.device_id}.mqtt.crt: put it in {a.keys / 'tls'}, with trust.json, "
          f"he/public.ctx and tls/ca-{a.region}.crt.")
    if rotate:
        print("The old keys are kept as *.prev: the running agent signs with the old key until "
              "the rotation's effective round; delete them after that.")


if __name__ == "__main__":
    main()
