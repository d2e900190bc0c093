#!/usr/bin/env bash
# Static checks CI runs before the tests: ruff's lint rules and formatting (line length 120) over
# the code, and mypy over the package (settings in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(memvirt tests bench scripts)
.venv/bin/ruff check "${paths[@]}"
.venv/bin/ruff format --check "${paths[@]}"
.venv/bin/mypy
