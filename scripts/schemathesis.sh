#!/usr/bin/env bash
# Property-based API testing with schemathesis (PyPI) against the committed OpenAPI spec:
# every operation must answer without a 5xx, and with responses that match the spec.
# Called by scripts/test.sh after the debug binaries are built; needs PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
# Not `[ … ] || . …`: inside a `||` list errexit is off for the whole bootstrap.
if [ -z "${DATABASE_URL:-}" ]; then
  . scripts/pg-bootstrap.sh
fi
bin="${CARGO_TARGET_DIR:-target}/debug"

venv=target/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian splits venv support out of python3.
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q 'schemathesis==4.32.5'
fi

server=${DATABASE_URL%/*}
export DATABASE_URL="$server/graphdesk_schemathesis_$$"
export JWT_SECRET="schemathesis-secret-schemathesis-secret-0000"
export OAUTH_CLIENT_ID=schemathesis OAUTH_CLIENT_SECRET=schemathesis
export TOKEN_ENCRYPTION_KEYS="st:$("$venv/bin/python" -c 'import base64,os;print(base64.b64encode(os.urandom(64)).decode())')"
# Microsoft is never reached: nothing listens here.
export GRAPH_BASE_URL=http://127.0.0.1:9/v1.0 IDENTITY_BASE_URL=http://127.0.0.1:9
export RUST_LOG=warn

"$bin/worker" migrate --create-database >/dev/null
tenant=$("$bin/worker" create-tenant --name "Schemathesis")
token=$("$bin/api" mint-token --tenant "$tenant" --role ops --subject schemathesis)
port=$("$venv/bin/python" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
BIND_ADDR="127.0.0.1:$port" "$bin/api" serve >/dev/null &
api_pid=$!
cleanup() {
  kill "$api_pid" 2>/dev/null || true
  wait "$api_pid" 2>/dev/null || true
  if command -v psql >/dev/null 2>&1; then
    psql "$server/postgres" -qc "DROP DATABASE IF EXISTS ${DATABASE_URL##*/} WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  # This trap replaced the bootstrap's: stop its throwaway cluster too, if it started one.
  if [ -n "${_gd_cluster_stop:-}" ]; then eval "$_gd_cluster_stop"; fi
}
trap cleanup EXIT
# Python rather than curl: a fresh Debian has python3 (a prerequisite) but not curl.
ready=0
for _ in $(seq 1 100); do
  kill -0 "$api_pid" 2>/dev/null || { echo "schemathesis: the api exited before answering" >&2; exit 1; }
  if "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.1
done
[ "$ready" = 1 ] || { echo "schemathesis: the api did not answer on port $port" >&2; exit 1; }

"$venv/bin/schemathesis" run api/openapi.yaml \
  --url "http://127.0.0.1:$port" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-25}" \
  --workers 2 \
  --suppress-health-check all \
  --warnings off
