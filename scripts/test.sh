#!/usr/bin/env bash
# Run every test of the workspace, with the real servers the adapter tests
# need: a throwaway PostgreSQL cluster, `mlflow server` and `moto_server`
# (installed into a cached venv on first use), all on 127.0.0.1.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -p retrain-core # extra args go to `cargo test`
#   scripts/test.sh -p retrain-cli -p retrain-tests
#                                   # the end-to-end scenarios of tests/ (with
#                                   # -p retrain-cli, so that cargo builds the
#                                   # `retrain` binary they run)
#
# Under CI=true a service that fails to start fails the run (tests that need
# it would otherwise be skipped); locally the run continues and those tests
# print that they were skipped.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/retrain-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
ci="${CI:-false}"

envdir="$(mktemp -d "${TMPDIR:-/tmp}/retrain-test-env.XXXXXX")"
cleanup() {
    [ -f "$envdir/postgres.env" ] && bash scripts/stop-postgres.sh "$envdir/postgres.env" >/dev/null 2>&1 || true
    [ -f "$envdir/services.env" ] && bash scripts/stop-services.sh "$envdir/services.env" >/dev/null 2>&1 || true
    rm -rf "$envdir"
}
trap cleanup EXIT

start() {
    local name="$1" script="$2" envfile="$3"
    echo "== starting $name"
    if bash "$script" "$envfile"; then
        # shellcheck disable=SC1090
        source "$envfile"
    elif [ "$ci" = "true" ]; then
        echo "error: could not start $name under CI=true" >&2
        exit 1
    else
        echo "warning: could not start $name; tests that need it will be skipped" >&2
    fi
}

if [ "${RETRAIN_TEST_NO_SERVICES:-}" != "1" ]; then
    start postgres scripts/start-postgres.sh "$envdir/postgres.env"
    start "mlflow + moto" scripts/start-services.sh "$envdir/services.env"
fi

echo "== cargo test"
cargo test --workspace --all-targets --locked --no-fail-fast "$@"
# `--all-targets` leaves doc tests out (the Engine wiring example lives there).
echo "== cargo test --doc"
cargo test --workspace --doc --locked "$@"
