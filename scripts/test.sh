#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup (idempotent), lint, type check, then every test against the real
# llama-server and model. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
echo "[test] ansible-lint (production profile) and playbook syntax"
(cd ansible && export PATH="$PWD/../.venv/bin:$PATH" && ansible-lint -q && ansible-playbook --syntax-check -i inventories/example site.yml fleet.yml rolling_upgrade.yml lb-config.yml)
echo "[test] pytest"
# pytest exits 5 when it collected no test: that is a failure here too, and set -e makes it one.
.venv/bin/python -m pytest "$@"
