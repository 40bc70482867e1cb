#!/usr/bin/env bash
# Run a command with mlflow + moto started (scripts/start-services.sh) and
# their RETRAIN_TEST_* variables exported; the servers are stopped on exit,
# whatever the command's outcome. Exit status is the command's.
#
#   scripts/with-services.sh cargo test -p retrain-adapters --test it
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
env_file="$(mktemp "${TMPDIR:-/tmp}/retrain-services-env.XXXXXX")"
trap '"$here/stop-services.sh" "$env_file" || true' EXIT
"$here/start-services.sh" "$env_file"
# shellcheck disable=SC1090
source "$env_file"
"$@"
