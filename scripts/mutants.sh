#!/usr/bin/env bash
# Mutation testing of retrain-core: every viable mutant of the core files
# must be caught by core's own tests, or be listed as equivalent (with the
# reason) in docs/RELIABILITY.md.
#
#   scripts/mutants.sh                 # machine, gate, engine
#   scripts/mutants.sh crates/core/src/gate.rs
#
# Needs `cargo install --locked cargo-mutants`. Results in mutants.out/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    files=(crates/core/src/machine.rs crates/core/src/gate.rs crates/core/src/engine/*.rs)
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
exec cargo mutants "${args[@]}" --test-package retrain-core --no-shuffle -o "${MUTANTS_OUT:-target/mutants}"
