#!/bin/sh
# One-shot credentials for the compose stack (run by the `credentials` service; idempotent).
#   usage: gen-credentials.sh KEYS_DIR [NUM_AGENTS] [NUM_REGIONS]
# Writes
#   KEYS_DIR/tls/ca.{crt,key}                 a private CA (10 years)
#   KEYS_DIR/tls/{mosquitto,kafka}.{crt,key}  server certs (SAN: service name + localhost)
#   KEYS_DIR/tls/kafka.pem                    key+cert in one PEM file (ssl.keystore.type=PEM)
#   KEYS_DIR/mqtt/passwd                      Mosquitto password file (PBKDF2-SHA512 via mosquitto_passwd)
#   KEYS_DIR/identities/<id>/mqtt_password    one random password per identity, readable by that service
# Identities: agent-000..agent-(N-1), regional-region-0..(R-1). Usernames match the ACL patterns.
set -eu
KEYS=${1:?keys dir}; AGENTS=${2:-12}; REGIONS=${3:-3}
umask 077
mkdir -p "$KEYS/tls" "$KEYS/mqtt" "$KEYS/identities"

if [ ! -f "$KEYS/tls/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=fedstream-ca" \
    -keyout "$KEYS/tls/ca.key" -out "$KEYS/tls/ca.crt" 2>/dev/null
fi
for svc in mosquitto kafka; do
  [ -f "$KEYS/tls/$svc.crt" ] && continue
  openssl req -newkey rsa:3072 -nodes -subj "/CN=$svc" \
    -keyout "$KEYS/tls/$svc.key" -out "$KEYS/tls/$svc.csr" 2>/dev/null
  printf "subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" "$svc" > "$KEYS/tls/$svc.ext"
  openssl x509 -req -in "$KEYS/tls/$svc.csr" -CA "$KEYS/tls/ca.crt" -CAkey "$KEYS/tls/ca.key" \
    -CAcreateserial -days 825 -extfile "$KEYS/tls/$svc.ext" -out "$KEYS/tls/$svc.crt" 2>/dev/null
  rm -f "$KEYS/tls/$svc.csr" "$KEYS/tls/$svc.ext"
done
cat "$KEYS/tls/kafka.key" "$KEYS/tls/kafka.crt" > "$KEYS/tls/kafka.pem"

ids=""
i=0; while [ "$i" -lt "$AGENTS" ]; do ids="$ids $(printf 'agent-%03d' "$i")"; i=$((i+1)); done
r=0; while [ "$r" -lt "$REGIONS" ]; do ids="$ids regional-region-$r"; r=$((r+1)); done
: > "$KEYS/mqtt/passwd.new"
for id in $ids; do
  mkdir -p "$KEYS/identities/$id"
  [ -f "$KEYS/identities/$id/mqtt_password" ] || \
    openssl rand -hex 24 > "$KEYS/identities/$id/mqtt_password"
  mosquitto_passwd -b "$KEYS/mqtt/passwd.new" "$id" "$(cat "$KEYS/identities/$id/mqtt_password")"
done
mv "$KEYS/mqtt/passwd.new" "$KEYS/mqtt/passwd"
# the broker runs as uid 1883 in eclipse-mosquitto; services run as uid 10001 (compose/Dockerfile)
chmod 0755 "$KEYS" "$KEYS/tls" "$KEYS/mqtt" "$KEYS/identities"
chmod 0644 "$KEYS/tls/"*.crt "$KEYS/mqtt/passwd"
chown 1883 "$KEYS/tls/mosquitto.key" 2>/dev/null || true
chown -R 10001 "$KEYS/identities" 2>/dev/null || true
echo "credentials for:$ids"
