#!/usr/bin/env bash
# The whole check a change must pass: lint, types, then the tests against real services.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
mypy
exec pytest "$@"
