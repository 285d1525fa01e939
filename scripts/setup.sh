#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) from the pinned lock file.
# Re-running is cheap: nothing is installed when the pins have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.installed-pins

pins_hash() {
    cat pyproject.toml requirements/lock.txt requirements/build-constraints.txt requirements/no-deps.txt \
        | sha256sum | cut -d' ' -f1
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(pins_hash)" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing pinned dependencies into $VENV (first run takes several minutes)"
# pip >= 25 understands PIP_BUILD_CONSTRAINT, which keeps basicsr's isolated build on our torch.
"$VENV/bin/python" -m pip install --quiet --upgrade "pip==26.3"
PIP_BUILD_CONSTRAINT="$PWD/requirements/build-constraints.txt" \
    "$VENV/bin/python" -m pip install --quiet \
    -c requirements/lock.txt -e ".[dev]"
# pyiqa without its dependency list (which pulls transformers, datasets, bitsandbytes, ...):
# requirements/no-deps.txt says why; what its metrics import came with the project above.
"$VENV/bin/python" -m pip install --quiet --no-deps -c requirements/lock.txt -r requirements/no-deps.txt
pins_hash > "$STAMP"
echo "setup: done"
