#!/usr/bin/env bash
# The quickstart in one command. Usage:
#   examples/quickstart/run.sh            # seed feedback (first time) and run a cycle
#   examples/quickstart/run.sh plan       # what a run would do, changing nothing
#   examples/quickstart/run.sh status     # per-label state
#   examples/quickstart/run.sh add 120    # 120 new reviews arrive (then run again)
#   examples/quickstart/run.sh reset      # delete everything the quickstart created
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"
# Build once (progress shows the first time), then run the binary directly.
target="${CARGO_TARGET_DIR:-$root/target}"
retrain() {
    cargo build --manifest-path "$root/Cargo.toml" -p retrain-cli --bin retrain >&2
    "$target/debug/retrain" "$@"
}
[ $# -gt 0 ] || set -- run
case "$1" in
  reset)
    rm -rf .retrain feedback.db datasets models registry.json registry.json.lock
    echo "quickstart reset" ;;
  add)
    python3 seed_feedback.py --add "${2:-120}" ;;
  run|plan|status|runs|config)
    [ -f feedback.db ] || python3 seed_feedback.py
    retrain "$@" ;;
  *)
    retrain "$@" ;;
esac
