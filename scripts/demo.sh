#!/usr/bin/env bash
# The demo (README's first command): brings up PostgreSQL if needed, builds graphdesk, then runs
# the demo driver: graph-sim with three tenants of two mailboxes, the api, two workers and the
# scheduler; every mailbox connected through the real OAuth flow; live mail and agent replies
# with progress lines; the dashboard URL with an ops token. Ctrl-C stops everything.
# Options go to the driver (`scripts/demo.sh --help`), e.g. --duration 120 --port 8081 --exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# --help needs neither PostgreSQL nor the whole release build: only the driver, whose clap
# definition (tests/src/bin/demo.rs) is the one list of options.
for arg in "$@"; do
  case "$arg" in
    --) break ;;
    -h|--help) exec cargo run --release --quiet -p graphdesk-tests --bin demo -- --help ;;
  esac
done
. scripts/pg-bootstrap.sh
cargo build --release --bins
# Not `exec`: a throwaway PostgreSQL started by pg-bootstrap is stopped by this shell's EXIT
# trap once the driver returns.
status=0
"${CARGO_TARGET_DIR:-target}/release/demo" "$@" || status=$?
exit "$status"
