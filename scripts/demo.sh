#!/usr/bin/env bash
# The demo (README's first command): brings up PostgreSQL if needed, builds graphdesk, then runs
# the demo driver, which starts the api and workers, pushes work through them and prints the
# URLs. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg-bootstrap.sh
cargo build --release --bins
exec ./target/release/demo "$@"
