#!/usr/bin/env bash
# Start the real servers the adapter integration tests talk to:
#   - `mlflow server` (SQLite backend, artifacts in a temp dir)
#   - `moto_server` (EC2 and S3 stand-in)
# both on 127.0.0.1 on free ports, from a venv cached under $HOME/.cache keyed
# by the pins (a cold venv is ~100 s / 1.1 GB, so it is reused between runs).
#
# Usage:
#   scripts/start-services.sh ENV_FILE     # start, then `source ENV_FILE`
#   scripts/stop-services.sh  ENV_FILE     # stop (or: start-services.sh stop ENV_FILE)
#
# ENV_FILE receives:
#   export RETRAIN_TEST_MLFLOW_URL=http://127.0.0.1:PORT
#   export RETRAIN_TEST_MOTO_URL=http://127.0.0.1:PORT
#   export RETRAIN_VENV=/path/to/venv
#   export RETRAIN_SERVICES_DIR=/tmp/...    (pid files, logs, data; removed by stop)
#
# Works non-interactively (CI=true, no stdin); needs only python3 with venv/pip.
set -euo pipefail

# The registry here serves mlflow 3.18.0 without the mlflow-skinny it needs,
# so an unpinned install backtracks or fails: pin what is known to work.
PINS=("mlflow==3.17.2" "moto[server]==5.2.5" "boto3")
PYTHON="${PYTHON:-python3}"

log() { echo "[services] $*" >&2; }

stop_services() {
    local env_file="${1:?usage: $0 stop ENV_FILE}"
    if [[ ! -f "$env_file" ]]; then
        log "no $env_file: nothing to stop"
        return 0
    fi
    # shellcheck disable=SC1090
    source "$env_file"
    local dir="${RETRAIN_SERVICES_DIR:-}"
    if [[ -n "$dir" && -d "$dir" ]]; then
        for pidfile in "$dir"/*.pid; do
            [[ -f "$pidfile" ]] || continue
            local pid
            pid="$(cat "$pidfile")"
            # Each server runs in its own process group (setsid), so the
            # group kill also ends mlflow's gunicorn/uvicorn workers.
            if kill -0 "$pid" 2>/dev/null; then
                kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
                for _ in $(seq 1 50); do
                    kill -0 "$pid" 2>/dev/null || break
                    sleep 0.1
                done
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
            log "stopped $(basename "$pidfile" .pid) (pid $pid)"
        done
        case "$dir" in
            /tmp/*|"${TMPDIR:-/tmp}"/*) rm -rf -- "$dir" ;;
            *) log "not removing $dir (outside the temp dir)" ;;
        esac
    fi
    rm -f -- "$env_file"
}

if [[ "${1:-}" == "stop" ]]; then
    shift
    stop_services "$@"
    exit 0
fi

ENV_FILE="${1:?usage: $0 ENV_FILE   (or: $0 stop ENV_FILE)}"

pins_hash="$(printf '%s\n' "${PINS[@]}" "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-12)"
VENV="${RETRAIN_VENV:-$HOME/.cache/retrain-venv-$pins_hash}"

create_venv() {
    if [[ -x "$VENV/bin/mlflow" && -x "$VENV/bin/moto_server" && -f "$VENV/.complete" ]]; then
        log "reusing venv $VENV"
        return 0
    fi
    log "creating venv $VENV (first run takes ~2 minutes)"
    rm -rf -- "$VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 without python3-venv: fall back to virtualenv.
        log "python3 -m venv failed; trying virtualenv"
        rm -rf -- "$VENV"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input --user virtualenv
        "$PYTHON" -m virtualenv --quiet "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}"
    touch "$VENV/.complete"
}

mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    # Two concurrent starts must not build the same venv at once.
    exec 9>"$VENV.lock"
    flock 9
    create_venv
    flock -u 9
    exec 9>&-
else
    create_venv
fi

free_port() {
    "$VENV/bin/python" - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

DIR="$(mktemp -d "${TMPDIR:-/tmp}/retrain-services.XXXXXX")"
mkdir -p "$DIR/mlflow-artifacts"
MLFLOW_PORT="$(free_port)"
MOTO_PORT="$(free_port)"
while [[ "$MOTO_PORT" == "$MLFLOW_PORT" ]]; do MOTO_PORT="$(free_port)"; done

# Write the env file first so `stop` can clean up even if a start fails.
cat >"$ENV_FILE" <<ENV
export RETRAIN_TEST_MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
export RETRAIN_TEST_MOTO_URL=http://127.0.0.1:$MOTO_PORT
export RETRAIN_VENV=$VENV
export RETRAIN_SERVICES_DIR=$DIR
ENV

cleanup_on_error() {
    log "start failed; logs follow"
    tail -n 40 "$DIR"/*.log >&2 || true
    stop_services "$ENV_FILE"
}
trap cleanup_on_error ERR

# mlflow 3.17 spawns ~8 background job workers unless job execution is off.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$VENV/bin/mlflow" server \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" \
    --artifacts-destination "$DIR/mlflow-artifacts" \
    </dev/null >"$DIR/mlflow.log" 2>&1 &
echo $! >"$DIR/mlflow.pid"

setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" \
    </dev/null >"$DIR/moto.log" 2>&1 &
echo $! >"$DIR/moto.pid"

wait_for() {
    local name="$1" url="$2" timeout="$3" pidfile="$4"
    local deadline=$((SECONDS + timeout))
    # python rather than curl: the only tool a fresh machine is assumed to have.
    until "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "$name exited early"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name did not answer $url within ${timeout}s"
            return 1
        fi
        sleep 0.5
    done
    log "$name is up at $url"
}

wait_for moto "http://127.0.0.1:$MOTO_PORT/moto-api/" 60 "$DIR/moto.pid"
wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 120 "$DIR/mlflow.pid"
trap - ERR
log "wrote $ENV_FILE"
