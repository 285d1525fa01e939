#!/usr/bin/env bash
# The local stack (Ray head, MLflow server, S3 endpoint on 127.0.0.1): start | stop | env | status.
#   eval "$(bash infra/local/stack.sh start)"   # export lines on stdout, progress on stderr
#   bash infra/local/stack.sh stop
# Details: infra/local/stack.py and docs/cluster.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
exec "$ROOT/.venv/bin/python" "$ROOT/infra/local/stack.py" "$@"
