#!/usr/bin/env bash
# README command (1): set up the environment, then run the main job on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/upsr demo "$@"
