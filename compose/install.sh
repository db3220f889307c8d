#!/usr/bin/env bash
# Installs what fedstream needs on a fresh Debian machine, and nothing that is already there:
# Mosquitto, Prometheus and Alertmanager (Debian packages), Apache Kafka's jars (Maven Central,
# KRaft single node) and the Python environment (.venv, this package with its dev extras).
# Idempotent; safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_LIBS="${FEDSTREAM_KAFKA_LIBS:-$HOME/.cache/fedstream/kafka-$KAFKA_VERSION/libs}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "[install] mosquitto (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi

# Prometheus and Alertmanager (Debian packages; compose/monitoring.py runs the binaries as child
# processes with their own configs: the packages' system services are not needed)
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
    || ! { command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null 2>&1; then
  echo "[install] prometheus, prometheus-alertmanager (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
fi

POM_SHA=$(sha256sum compose/kafka/pom.xml | cut -c1-16)
if ! grep -qs "$POM_SHA" "$KAFKA_LIBS/.complete"; then
  echo "[install] Apache Kafka $KAFKA_VERSION jars (Maven Central) -> $KAFKA_LIBS"
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f compose/kafka/pom.xml -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS"
  echo "$POM_SHA" > "$KAFKA_LIBS/.complete"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SHA=$(cat pyproject.toml | sha256sum | cut -c1-16)
if ! grep -qs "$SHA" "$SITE/fedstream_installed.py"; then
  echo "[install] Python environment (.venv)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  # marker: the next run skips pip while pyproject.toml is unchanged
  echo "SHA = '$SHA'" > "$SITE/fedstream_installed.py"
fi
