#!/usr/bin/env bash
# The test command (README's second command; .ci/run runs exactly this): formatting, lints and
# the whole test suite against a real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg-bootstrap.sh

# The dashboard tests drive Debian's headless Chromium through chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "== installing chromium and chromium-driver"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build binaries used by the tests"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace
echo "== schemathesis against the committed OpenAPI spec"
bash scripts/schemathesis.sh
