#!/usr/bin/env bash
# Stop and delete a cluster made by scripts/start-postgres.sh.
#
#   scripts/stop-postgres.sh [ENV_FILE]
#
# The cluster dir comes from ENV_FILE's RETRAIN_TEST_POSTGRES_DIR, else from
# the RETRAIN_TEST_POSTGRES_DIR environment variable.
set -euo pipefail

if [ -n "${1:-}" ]; then
    # shellcheck disable=SC1090
    . "$1"
fi
dir="${RETRAIN_TEST_POSTGRES_DIR:-}"
case "$dir" in
    */retrain-pg.*) ;;
    *) echo "stop-postgres: RETRAIN_TEST_POSTGRES_DIR is unset or not a start-postgres.sh dir: '$dir'" >&2; exit 1 ;;
esac
[ -d "$dir" ] || { echo "stop-postgres: $dir does not exist (already stopped?)" >&2; exit 0; }

pg_ctl=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && pg_ctl="$d/pg_ctl"; done
[ -z "$pg_ctl" ] && pg_ctl="$(command -v pg_ctl || true)"

if [ -n "$pg_ctl" ] && [ -f "$dir/data/postmaster.pid" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$dir" && runuser -u postgres -- "$pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null) || true
    else
        "$pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    fi
fi
rm -rf "$dir"
[ -n "${1:-}" ] && rm -f "$1"
echo "stop-postgres: stopped and removed $dir" >&2
