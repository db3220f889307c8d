"""``fedstream-models``: follow, list, inspect, compare, export and roll back model versions.

Without a subcommand it is the streaming consumer it always was (one JSON line per verified
version of the model topic, ``--follow`` to keep waiting, ``--save DIR`` for ``.npy`` files).
The subcommands read the model history (``<ns>.history``, every version ever published, see
:mod:`global_aggregator.history`), verifying each record against ``trust.json``:

    fedstream-models list                      every version: round, kind, accuracy, participants
    fedstream-models show 7                    one version's provenance in full
    fedstream-models diff 5 7 --project DIR    how far apart two versions are, per parameter
    fedstream-models export 7 --out m.npz      a file a serving stack loads + provenance JSON
    fedstream-models rollback --to 5           an operator-signed request: the global publishes
                                               a new version equal to v5 (rollback.py)

``--json`` gives machine-readable output everywhere. The Kafka flags are the operator tools'
(``--kafka``, ``--kafka-*-file``, ``FEDSTREAM_KAFKA``...), before or after the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from global_aggregator.consumer import VerifiedModel, model_versions
from global_aggregator.export import (
    FORMATS,
    diff_params,
    export_version,
    params_sha256,
    provenance_record,
)
from global_aggregator.history import kind_of, read_history
from global_aggregator.quarantine_cli import send_control
from global_aggregator.rollback import rollback_command
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.kafka import KafkaConn, add_kafka_args, kafka_conn_from_args
from schemas.keyring import OPERATOR_ID
from schemas.signing import TrustStore

SUBCOMMANDS = ("list", "show", "diff", "export", "rollback")


# ----------------------------------------------------------------------------------------------
# reading


async def _versions(conn: KafkaConn, trust: TrustStore, a: argparse.Namespace,
                    wanted: set[int] | None = None) -> dict[int, VerifiedModel]:
    return await read_history(conn, trust, namespace=a.namespace, model_name=a.model,
                              keep=None if wanted is None else wanted.__contains__,
                              service="consumer")


def _need(found: dict[int, VerifiedModel], *versions: int) -> list[VerifiedModel]:
    missing = [v for v in versions if v not in found]
    if missing:
        raise LookupError(f"no version {', '.join(f'v{v}' for v in missing)} in the model "
                          "history")
    return [found[v] for v in versions]


def _spec(project: Path | None, num_params: int) -> Any | None:
    if project is None:
        return None
    from edge_agent.models import project_spec
    from schemas.project import load_project

    spec = project_spec(load_project(project))
    if spec.num_params != num_params:
        raise ValueError(f"project {project} has {spec.num_params} parameters, the version "
                         f"{num_params}: not its model")
    return spec


# ----------------------------------------------------------------------------------------------
# presenting


def _when(unix: float) -> str:
    if not unix:
        return "-"
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def summary(v: VerifiedModel) -> dict[str, Any]:
    """One line of ``list``."""
    mv, m = v.message, v.metrics
    rb = mv.provenance.rollback if mv.provenance.HasField("rollback") else None
    return {
        "model": v.model_name, "version": v.version, "round": v.round, "kind": kind_of(mv),
        "parent": int(mv.provenance.parent_version) if v.version else None,
        "created": _when(mv.provenance.created_unix), "final": v.final,
        "participants": int(m.get("participants", 0)),
        "server_accuracy": m.get("server_accuracy"), "server_loss": m.get("server_loss"),
        "federated_accuracy": m.get("federated_accuracy"),
        "excluded_agents": int(m.get("excluded_agents", 0)),
        "rollback_to": int(rb.to_version) if rb is not None else None,
        "rollback_by": rb.requested_by if rb is not None else None,
        "canary_regions": list(mv.canary.regions) if mv.HasField("canary") else None,
        "canary_decision": mv.provenance.canary.decision
        if mv.provenance.HasField("canary") else None,
        "params_sha256": params_sha256(v.params)[:16],
        "epsilon": _epsilon(mv.provenance.privacy) if mv.provenance.HasField("privacy") else None,
        "budget_reached": mv.provenance.privacy.budget_reached,
    }


def _epsilon(pr: pb.Privacy) -> float | str:
    """Epsilon spent, ``"inf"`` when unbounded (JSON has no infinity)."""
    return pr.epsilon if math.isfinite(pr.epsilon) else "inf"


def privacy_line(pr: pb.Privacy) -> str:
    """One sentence of a version's privacy provenance (docs/privacy.md)."""
    eps = _epsilon(pr)
    eps = eps if isinstance(eps, str) else f"{eps:.4g}"
    line = (f"{pr.mode} DP: epsilon {eps} at delta {pr.delta:g} over {len(pr.rounds)} "
            f"round{'s' * (len(pr.rounds) != 1)}, composed without sampling amplification "
            f"(with it: {pr.epsilon_amplified:.4g})")
    if pr.budget:
        line += f"; budget {pr.budget:g}" + (" [yellow]reached: final[/]" if pr.budget_reached
                                             else "")
    if pr.sigma_device:
        line += (f"; noise std {pr.sigma_device:.4g} steps per device, "
                 f"sensitivity {pr.sensitivity:.4g}, n_min {pr.n_min}")
    return line


def print_list(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, header_style="bold")
    for col, just in (("version", "right"), ("kind", "left"), ("round", "right"),
                      ("parent", "right"), ("created (UTC)", "left"), ("devices", "right"),
                      ("server acc", "right"), ("fed. acc", "right"), ("epsilon", "right"),
                      ("note", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        note = []
        if r["rollback_to"] is not None:
            note.append(f"[yellow]rollback to v{r['rollback_to']}[/]"
                        + (" (canary)" if r["rollback_by"] == "canary" else ""))
        if r["canary_regions"]:
            note.append(f"canary in {', '.join(r['canary_regions'])}")
        if r["canary_decision"] == "promoted":
            note.append(f"[green]promoted v{r['parent']}[/]")
        if r["excluded_agents"]:
            note.append(f"[red]{r['excluded_agents']} excluded[/]")
        if r["budget_reached"]:
            note.append("[yellow]privacy budget reached[/]")
        if r["final"]:
            note.append("[green]final[/]")
        kind = {"rollback": "[yellow]rollback[/]", "candidate": "[cyan]candidate[/]"}.get(
            r["kind"], r["kind"])
        table.add_row(str(r["version"]), kind, str(r["round"]),
                      "-" if r["parent"] is None else str(r["parent"]), r["created"],
                      str(r["participants"]), _num(r["server_accuracy"]),
                      _num(r["federated_accuracy"]),
                      r["epsilon"] if isinstance(r["epsilon"], str) else _num(r["epsilon"], ".3g"),
                      ", ".join(note))
    console.print(table)


def print_show(console: Console, v: VerifiedModel) -> None:
    mv = v.message
    prov = mv.provenance
    rec = provenance_record(mv)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    kind = kind_of(mv)
    head.add_row("model", f"{v.model_name} v{v.version}" + ("  [green](final)[/]" if v.final else ""))
    head.add_row("made by", kind + (f" of round {v.round}" if kind == "round" else ""))
    if prov.HasField("rollback"):
        rb = prov.rollback
        head.add_row("rollback", f"[yellow]rollback of v{rb.to_version}[/]: params and optimizer "
                     f"state of v{rb.to_version}; round {rb.discarded_round} discarded"
                     + (" (automatic: its canary round)" if rb.requested_by == "canary" else ""))
        head.add_row("requested", f"by {rb.requested_by}, request {rb.request_id}"
                     + (f": {rb.reason}" if rb.reason else ""))
    if mv.HasField("canary"):
        c = mv.canary
        head.add_row("canary", f"[cyan]candidate for {', '.join(c.regions)} only[/] (the others "
                     f"keep v{c.stable_version}); baseline accuracy "
                     + (f"{c.baseline_accuracy:.4f}" if c.has_baseline else "none")
                     + f", max drop {c.max_drop:g}")
    if prov.HasField("canary"):
        d = prov.canary
        head.add_row("canary round", f"{d.decision.replace('_', ' ')} candidate "
                     f"v{d.candidate_version}: {d.reason}")
    head.add_row("parent", "-" if v.version == 0 else f"v{prov.parent_version}")
    head.add_row("created", _when(prov.created_unix) + " UTC")
    head.add_row("strategy", prov.strategy or "-")
    if prov.HasField("codec"):
        c = prov.codec
        head.add_row("codec", f"{c.bits} bits, clip L2 {c.clip_l2:g}, "
                     f"{'CKKS-encrypted' if c.encrypted else 'plaintext'}"
                     + (", rotated" if c.rotate else ""))
    if prov.HasField("privacy"):
        head.add_row("privacy", privacy_line(prov.privacy))
    head.add_row("parameters", f"{v.params.size:,} float32, L2 norm "
                 f"{float(np.linalg.norm(v.params.astype(np.float64))):.4f}, sha256 "
                 f"{rec['params_sha256'][:16]}…")
    head.add_row("signed by", f"{mv.header.sender} (HE context {mv.header.he_fingerprint[:12]}…)")
    if mv.HasField("next_task"):
        head.add_row("next round", str(mv.next_task.round))
    if mv.quarantine.agents:
        head.add_row("quarantined", ", ".join(mv.quarantine.agents))
    console.print(Panel(head, title=f"{v.model_name} v{v.version}", expand=False))
    if prov.metrics:
        mt = Table(title="metrics", header_style="bold")
        mt.add_column("name")
        mt.add_column("value", justify="right")
        for k, x in sorted(prov.metrics.items()):
            mt.add_row(k, f"{x:.6g}")
        console.print(mt)
    if prov.participants:
        pt = Table(title="participants", header_style="bold")
        pt.add_column("region")
        pt.add_column("devices", justify="right")
        pt.add_column("agents")
        for p in prov.participants:
            pt.add_row(p.region, str(len(p.agents)), ", ".join(p.agents))
        console.print(pt)
    for e in prov.excluded:
        console.print(f"[red]excluded[/] {e.region} {', '.join(e.agents)}: {e.reason} "
                      f"({e.detail})")


def print_diff(console: Console, a: VerifiedModel, b: VerifiedModel, d: dict[str, Any]) -> None:
    if not d["comparable"]:
        console.print(f"[red]v{a.version} and v{b.version} are not comparable:[/] {d['detail']}")
        return
    verdict = "[green]identical parameters[/]" if d["identical"] else \
        f"{d['changed']:,} of {d['size']:,} parameters differ"
    console.print(f"v{a.version} ({kind_of(a.message)}, round {a.round}) -> v{b.version} "
                  f"({kind_of(b.message)}, round {b.round}): {verdict}")
    t = Table(header_style="bold")
    for col in ("parameter", "size", "changed", "L2 of difference", "max |difference|",
                "relative L2", "cosine"):
        t.add_column(col, justify="left" if col == "parameter" else "right")
    rows = [("[bold]all[/]", d), *d["per_param"].items()]
    for name, s in rows:
        t.add_row(name, f"{s['size']:,}", f"{s['changed']:,}", f"{s['l2']:.6g}",
                  f"{s['max_abs']:.6g}", _num(s["rel_l2"], ".4g"), _num(s["cosine"], ".6f"))
    console.print(t)
    keys = sorted(set(a.metrics) | set(b.metrics))
    if keys:
        mt = Table(title="metrics", header_style="bold")
        mt.add_column("name")
        mt.add_column(f"v{a.version}", justify="right")
        mt.add_column(f"v{b.version}", justify="right")
        mt.add_column("change", justify="right")
        for k in keys:
            x, y = a.metrics.get(k), b.metrics.get(k)
            mt.add_row(k, _num(x, ".6g"), _num(y, ".6g"),
                       _num(y - x, "+.4g") if x is not None and y is not None else "-")
        console.print(mt)


# ----------------------------------------------------------------------------------------------
# rollback (the operator's side; the global's is global_aggregator/rollback.py)


async def request_rollback(conn: KafkaConn, keys_dir: Path, trust: TrustStore, namespace: str,
                           to_version: int, *, reason: str = "", request_id: str | None = None,
                           model_name: str | None = None, identity: str = OPERATOR_ID,
                           check: bool = True) -> pb.Control:
    """Append one operator-signed rollback request to ``<ns>.control``; returns it.

    With ``check`` (the default) it first reads the history and refuses (``LookupError`` /
    ``ValueError``) a version that does not exist, is the newest, or a federation whose newest
    version is final (no global aggregator is running to apply it). The global checks again
    (and counts what it refuses): this is for the operator's benefit, not the defence.
    """
    if check:
        found = await read_history(conn, trust, namespace=namespace, model_name=model_name,
                                   keep=lambda _v: True, service="operator")
        if not found:
            raise LookupError("the model history is empty: nothing to roll back to")
        newest = found[max(found)]
        if to_version not in found:
            raise LookupError(f"no version {to_version} in the model history (versions "
                              f"{min(found)}..{newest.version})")
        if to_version >= newest.version:
            raise ValueError(f"v{to_version} is the newest version: nothing to roll back")
        if newest.final:
            raise ValueError(f"v{newest.version} is final: the federation is over and no global "
                             "aggregator will apply a rollback")
    cmd = rollback_command(to_version, identity=identity, request_id=request_id, reason=reason)
    await send_control(conn, Path(keys_dir), namespace, cmd, identity)
    return cmd


async def wait_for_rollback(conn: KafkaConn, trust: TrustStore, namespace: str,
                            request_id: str, timeout_s: float) -> VerifiedModel | None:
    """The version the global published for rollback request ``request_id`` (None: not within
    ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = await read_history(conn, trust, namespace=namespace, service="operator")
        for v in found.values():
            prov = v.message.provenance
            if prov.HasField("rollback") and prov.rollback.request_id == request_id:
                return v
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(1.0)


# ----------------------------------------------------------------------------------------------
# the command line


def _common(ap: argparse.ArgumentParser, *, sub: bool) -> None:
    """The flags every form takes. In a subcommand they default to SUPPRESS, so that one given
    before the subcommand is not overwritten."""
    g = ap.add_argument_group("Kafka and trust")
    add_kafka_args(g, "this consumer")
    g.add_argument("--trust", type=Path, default=None,
                   help="trust.json from fedstream-keygen (rollback: default KEYS/trust.json)")
    g.add_argument("--identity", default=None,
                   help="this client's identity, the CN of its Kafka certificate (its TLS files "
                   "default to tls/<identity>.* beside the trust file; default consumer, "
                   "rollback: operator)")
    g.add_argument("--namespace", default="fedstream", help="topic namespace")
    g.add_argument("--model", default=None, help="only this model name")
    for action in g._group_actions:
        action.required = False
        if sub:
            action.default = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedstream-models",
        description="Print verified model versions from the Kafka model topic, one JSON line "
        "each (version, round, metrics, participants); unverifiable records are skipped. With a "
        "subcommand: list, show, diff or export versions from the model history (every version "
        "ever published, with its provenance), or ask the global aggregator to roll back.",
        epilog="subcommands: list | show V | diff V1 V2 | export V --out FILE | rollback --to V "
        "(fedstream-models SUBCOMMAND --help)",
    )
    _common(ap, sub=False)
    ap.add_argument("--follow", action="store_true", help="keep waiting for new versions")
    ap.add_argument("--save", type=Path, default=None,
                    help="write each version's parameters to DIR/<model>-v<version>.npy")
    sub = ap.add_subparsers(dest="command", metavar="SUBCOMMAND")

    def cmd(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        _common(p, sub=True)
        return p

    p = cmd("list", "every version in the model history, one row each",
            "Every model version ever published (the history topic survives the model topic's "
            "compaction): version, what made it (initial, round, rollback, reissue), round, "
            "parent, time, devices, server and federated accuracy, notes.")
    p.add_argument("--last", type=int, default=None, metavar="N", help="only the newest N")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = cmd("show", "one version's provenance in full",
            "One version: what made it (round, rollback of which version, by whom and why), "
            "parent, strategy, codec, metrics, participating devices per region, excluded "
            "groups, quarantine, parameter checksum.")
    p.add_argument("version", type=int, help="version number (as in list)")
    p.add_argument("--json", action="store_true", help="the provenance record as JSON")
    p = cmd("diff", "how two versions differ",
            "Parameter distance between two versions (overall and, with --project, per named "
            "parameter: changed count, L2 of the difference, max absolute difference, relative "
            "L2, cosine) and their metrics side by side.")
    p.add_argument("version_a", type=int, help="the older version")
    p.add_argument("version_b", type=int, help="the newer version")
    p.add_argument("--project", type=Path, default=None,
                   help="the federation's project directory: per-parameter rows")
    p.add_argument("--json", action="store_true", help="the comparison as JSON")
    p = cmd("export", "write a version to a file a serving stack loads",
            "Write one version's parameters to --out (npz: one float32 array per named "
            "parameter, needs --project for the names, else one flat 'params' array; msgpack: "
            "Flax's msgpack of the parameter tree, needs --project; npy: the flat vector) and "
            "its provenance to a JSON file beside it. Values are bit-identical to the version's.")
    p.add_argument("version", type=int, help="version number (as in list)")
    p.add_argument("--out", type=Path, required=True, help="output file")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="file format (default: from --out's suffix, else npz)")
    p.add_argument("--project", type=Path, default=None,
                   help="the federation's project directory (parameter names and shapes)")
    p.add_argument("--provenance", type=Path, default=None,
                   help="provenance JSON file (default: --out with suffix .provenance.json)")
    p = cmd("rollback", "make the global publish a new version equal to an earlier one",
            "Send an operator-signed rollback request to the global aggregator (the control "
            "topic). At once it ends the open round (its result is discarded) and publishes a "
            "NEW version whose parameters and server-optimizer state are those of --to, with "
            "provenance saying 'rollback of V'; rounds continue from it, and edges and "
            "streaming consumers follow it like any version. Exactly once (consumed in the "
            "transaction of the version it makes; a request id is applied at most once). Needs "
            "the operator's key (KEYS/identities/operator.pem).")
    p.add_argument("--to", type=int, required=True, metavar="V", dest="to_version",
                   help="the version to bring back")
    p.add_argument("--reason", default="", help="why (recorded in the new version's provenance)")
    p.add_argument("--request-id", default=None,
                   help="idempotency key, [A-Za-z0-9._-]{1,64} (default: random); re-sending "
                   "the same id never rolls back twice")
    p.add_argument("--keys", type=Path, default=None,
                   help="key directory with identities/operator.pem and trust.json (default: "
                   "the trust file's directory)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the rollback version and print it (default: don't)")
    p.add_argument("--no-check", action="store_true",
                   help="send without first checking the version against the history")
    p.add_argument("--json", action="store_true", help="JSON output")
    return ap


def _stream(a: argparse.Namespace, conn: KafkaConn, trust: TrustStore) -> None:
    """The original fedstream-models: one JSON line per verified version."""

    async def run() -> None:
        async for v in model_versions(conn, trust, namespace=a.namespace, model_name=a.model,
                                      follow=a.follow):
            if a.save:
                a.save.mkdir(parents=True, exist_ok=True)
                np.save(a.save / f"{v.model_name}-v{v.version}.npy", v.params)
            print(json.dumps({"model": v.model_name, "version": v.version, "round": v.round,
                              "final": v.final, "num_params": int(v.params.size),
                              "metrics": v.metrics, "participants": v.participants}), flush=True)

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.kafka:
        ap.error("the following arguments are required: --kafka (or FEDSTREAM_KAFKA)")
    command = a.command
    keys = getattr(a, "keys", None)
    if a.trust is None:
        if command == "rollback" and keys is not None:
            a.trust = keys / "trust.json"
        else:
            ap.error("the following arguments are required: --trust")
    if not a.trust.exists():
        ap.error(f"no trust file {a.trust}")
    trust = TrustStore.load(a.trust)
    identity = a.identity or (OPERATOR_ID if command == "rollback" else "consumer")
    keys = keys or a.trust.parent
    try:
        conn = kafka_conn_from_args(a, keys, identity,
                                    "operator" if command == "rollback" else "consumer")
    except ValueError as exc:
        ap.error(str(exc))
    if command is None:
        _stream(a, conn, trust)
        return
    # piped or captured output: wide enough for every column (rich assumes 80 otherwise)
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    try:
        asyncio.run(_run(command, a, conn, trust, keys, identity, console))
    except (LookupError, ValueError, InvalidMessage) as exc:
        print(f"fedstream-models {command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


async def _run(command: str, a: argparse.Namespace, conn: KafkaConn, trust: TrustStore,
               keys: Path, identity: str, console: Console) -> None:
    if command == "list":
        found = await _versions(conn, trust, a)
        rows = [summary(v) for v in found.values()]
        if a.last is not None:
            rows = rows[-a.last:] if a.last > 0 else []
        if a.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            name = rows[0]["model"] if rows else (a.model or "no model")
            print_list(console, rows, f"{name}: {len(found)} versions in {a.namespace}")
    elif command == "show":
        (v,) = _need(await _versions(conn, trust, a, {a.version}), a.version)
        if a.json:
            print(json.dumps(provenance_record(v.message), indent=2, sort_keys=True))
        else:
            print_show(console, v)
    elif command == "diff":
        va, vb = _need(await _versions(conn, trust, a, {a.version_a, a.version_b}),
                       a.version_a, a.version_b)
        d = diff_params(va.params, vb.params, _spec(a.project, va.params.size))
        if a.json:
            print(json.dumps({"a": a.version_a, "b": a.version_b, **d,
                              "metrics": {k: [va.metrics.get(k), vb.metrics.get(k)]
                                          for k in sorted(set(va.metrics) | set(vb.metrics))}}))
        else:
            print_diff(console, va, vb, d)
    elif command == "export":
        (v,) = _need(await _versions(conn, trust, a, {a.version}), a.version)
        fmt = a.format or (a.out.suffix.lstrip(".") if a.out.suffix.lstrip(".") in FORMATS
                           else "npz")
        out, prov = export_version(v.message, a.out, fmt, spec=_spec(a.project, v.params.size),
                                   provenance_path=a.provenance)
        print(json.dumps({"version": v.version, "format": fmt, "file": str(out),
                          "provenance": str(prov), "params_sha256": params_sha256(v.params)}))
    elif command == "rollback":
        cmd = await request_rollback(conn, keys, trust, a.namespace, a.to_version,
                                     reason=a.reason, request_id=a.request_id,
                                     model_name=a.model, identity=identity,
                                     check=not a.no_check)
        sent = {"requested": True, "to_version": a.to_version, "request_id": cmd.request_id}
        done = None
        if a.wait > 0:
            done = await wait_for_rollback(conn, trust, a.namespace, cmd.request_id, a.wait)
            if done is None:
                raise LookupError(f"request {cmd.request_id} sent, but no rollback version "
                                  f"within {a.wait:g} s (is the global aggregator running?)")
            sent["version"] = done.version
        if a.json:
            print(json.dumps(sent))
        elif done is not None:
            console.print(f"[yellow]rolled back[/]: v{done.version} = v{a.to_version} "
                          f"(request {cmd.request_id})")
            print_show(console, done)
        else:
            console.print(f"rollback to v{a.to_version} requested (request {cmd.request_id}); "
                          "the global aggregator applies it in the open round")
