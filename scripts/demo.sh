#!/usr/bin/env bash
# The demo (README's first command): brings up PostgreSQL if needed, builds graphdesk, then runs
# the demo driver: graph-sim with three tenants of two mailboxes, the api, two workers and the
# scheduler; every mailbox connected through the real OAuth flow; live mail and agent replies
# with progress lines; the dashboard URL with an ops token. Ctrl-C stops everything.
# Options go to the driver (`scripts/demo.sh --help`), e.g. --duration 120 --port 8081 --exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg-bootstrap.sh
cargo build --release --bins
# Not `exec`: a throwaway PostgreSQL started by pg-bootstrap is stopped by this shell's EXIT
# trap once the driver returns.
status=0
"${CARGO_TARGET_DIR:-target}/release/demo" "$@" || status=$?
exit "$status"
