#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole CPU test suite; Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TRITON_INTERPRET=1 exec .venv/bin/python -m pytest -q --durations=15 "$@"
