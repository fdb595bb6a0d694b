#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers and exports DATABASE_URL for it. Source it:
#   . scripts/pg-bootstrap.sh
# 1. DATABASE_URL already set and answering: use it.
# 2. A server on 127.0.0.1:5432 that accepts user postgres: use it.
# 3. Else start a throwaway cluster (initdb + pg_ctl, as the postgres user, in a temp dir),
#    installing PostgreSQL with apt-get first if it is missing. It is stopped when the shell
#    that sourced this exits.

_gd_log() { echo "[pg-bootstrap] $*" >&2; }

_gd_answers() { # url
  if command -v psql >/dev/null 2>&1; then
    # -w: a server that wants a password must not stop an unattended run at a prompt.
    PGCONNECT_TIMEOUT=5 psql -w "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
  else
    local hostport=${1#*@}; hostport=${hostport%%/*}
    (exec 3<>"/dev/tcp/${hostport%%:*}/${hostport##*:}") 2>/dev/null
  fi
}

_gd_bootstrap() {
  # GRAPHDESK_PG_THROWAWAY=1 skips looking for a running server (to exercise step 3).
  if [ "${GRAPHDESK_PG_THROWAWAY:-0}" = 1 ]; then
    _gd_start_cluster
    return
  fi
  if [ -n "${DATABASE_URL:-}" ]; then
    if _gd_answers "$DATABASE_URL"; then
      _gd_log "using DATABASE_URL"
      return 0
    fi
    _gd_log "DATABASE_URL does not answer (or wants a password); looking for another server"
  fi
  local local_url="postgres://postgres@127.0.0.1:5432/postgres"
  if _gd_answers "$local_url"; then
    export DATABASE_URL="$local_url"
    _gd_log "using the server on 127.0.0.1:5432"
    return 0
  fi
  _gd_start_cluster
}

_gd_start_cluster() {
  local initdb
  # `|| true`: sourced under `set -euo pipefail`, a failed ls (nothing installed yet) would
  # end the calling script here, silently, before the install below.
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$initdb" ]; then
    _gd_log "PostgreSQL is not installed; installing it with apt-get"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$initdb" ] || { _gd_log "could not install PostgreSQL"; return 1; }
  fi
  local bindir port dir runas
  bindir=$(dirname "$initdb")
  # A free port unless one is asked for: a demo's cluster (or one a killed run left behind)
  # may hold any fixed one.
  port=${GRAPHDESK_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  dir=$(mktemp -d /tmp/graphdesk-pg.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$dir'" EXIT
  runas=""
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home "$dir" postgres
    chown -R postgres "$dir"
    runas="runuser -u postgres --"
  fi
  _gd_log "starting a throwaway cluster in $dir on port $port"
  $runas "$bindir/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
  $runas "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export GRAPHDESK_PG_DIR="$dir"
  # Kept in a variable so that a script with its own EXIT trap can run it from there
  # (a second `trap … EXIT` replaces this one).
  _gd_cluster_stop="$runas '$bindir/pg_ctl' -D '$dir/data' -m fast stop >/dev/null 2>&1; rm -rf '$dir'"
  # shellcheck disable=SC2064
  trap "$_gd_cluster_stop" EXIT
}

_gd_bootstrap
