#!/usr/bin/env bash
# No-Docker local brokers: one Mosquitto per region + single-node KRaft Kafka, on 127.0.0.1.
#   compose/local-stack.sh up [--regions N] [--workdir DIR] [--secure]
#                                                             start in the background, print ports
#                                                             (--secure: mutual TLS + ACLs, CAs in WORKDIR/pki)
#   compose/local-stack.sh status                              probe what `up` started
#   compose/local-stack.sh down [--keep-data]                  stop exactly those pids
# State (ports, pids, workdir): $FEDSTREAM_STACK_STATE (default: $TMPDIR/fedstream-stack.json).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
cmd="${1:-}"; shift || true
case "$cmd" in
  up|down|status) cd "$ROOT" && exec "$PY" -m compose.localstack "$cmd" "$@" ;;
  *) echo "usage: $0 up|down|status [options]" >&2; exit 2 ;;
esac
