#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the adapter tests and benchmarks.
#
#   scripts/start-postgres.sh [ENV_FILE]
#
# Installs Debian's `postgresql` when no server binaries are found, creates a
# cluster in a fresh temp dir (trust auth, 127.0.0.1 only, unix socket inside
# the temp dir, a free port), waits until it accepts connections, then writes
#   export RETRAIN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/postgres
#   export RETRAIN_TEST_POSTGRES_DIR=/tmp/retrain-pg.XXXX
# to ENV_FILE (or prints it). `scripts/stop-postgres.sh ENV_FILE` removes it.
# Non-interactive: safe under CI=true with no stdin.
set -euo pipefail

env_file="${1:-}"
# Check where the env goes before starting anything: failing to write it
# after the server started would leave a cluster nobody can find to stop.
if [ -n "$env_file" ]; then
    mkdir -p "$(dirname "$env_file")"
    : >"$env_file" || { echo "start-postgres: cannot write $env_file" >&2; exit 1; }
fi

find_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            # Highest version wins: the glob sorts lexically, so keep the last.
            found="$d"
        fi
    done
    if [ -z "${found:-}" ] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        found="$(dirname "$(command -v initdb)")"
    fi
    [ -n "${found:-}" ] && echo "$found"
}

bindir="$(find_bindir || true)"
if [ -z "$bindir" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "start-postgres: no PostgreSQL server binaries found and not root: install Debian's 'postgresql' package" >&2
        exit 1
    fi
    echo "start-postgres: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >&2
    apt-get install -y -q --no-install-recommends postgresql </dev/null >&2
    bindir="$(find_bindir || true)"
    if [ -z "$bindir" ]; then
        echo "start-postgres: postgresql installed but initdb/pg_ctl not found" >&2
        exit 1
    fi
fi

# The server refuses to run as root: run it as the `postgres` user the
# package creates (or as ourselves when we are not root).
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
        fi
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su -s /bin/sh postgres -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

dir="$(mktemp -d "${TMPDIR:-/tmp}/retrain-pg.XXXXXX")"
chmod 755 "$dir"
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    chown postgres: "$dir"
fi

# The process' cwd must be readable by the postgres user.
cd "$dir"

as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
    echo "start-postgres: initdb failed:" >&2
    cat "$dir/initdb.log" >&2
    exit 1
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

started=""
for _ in $(seq 1 20); do
    port=$(( 20000 + RANDOM % 40000 ))
    port_in_use "$port" && continue
    if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null 2>&1; then
        started=1
        break
    fi
    # Lost a race for the port: try another one.
done
if [ -z "$started" ]; then
    echo "start-postgres: the server did not start; log:" >&2
    cat "$dir/server.log" >&2 || true
    exit 1
fi

for _ in $(seq 1 60); do
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 0.5
done
"$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" || {
    echo "start-postgres: the server does not accept connections; log:" >&2
    cat "$dir/server.log" >&2 || true
    exit 1
}

cat >"$dir/env" <<ENV
export RETRAIN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres
export RETRAIN_TEST_POSTGRES_DIR=$dir
ENV
if [ -n "$env_file" ]; then
    cp "$dir/env" "$env_file"
    echo "start-postgres: PostgreSQL on 127.0.0.1:$port (data in $dir); env written to $env_file" >&2
else
    cat "$dir/env"
fi
