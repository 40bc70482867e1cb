#!/usr/bin/env bash
# Stop the servers started by scripts/start-services.sh and remove their temp dir.
# Usage: scripts/stop-services.sh ENV_FILE
set -euo pipefail
exec "$(dirname "$0")/start-services.sh" stop "$@"
