#!/usr/bin/env bash
# Installs what the cluster tests need and is idempotent: quick when all is there.
#   Debian: slurmctld, slurmd, slurm-client (22.05), OpenMPI (mpirun, mpicc), shellcheck
#   venv:   mpi4py (its PyPI wheel loads the system libmpi at run time: Debian's OpenMPI here)
# Usage: tests/system_deps.sh [PYTHON]   (PYTHON defaults to .venv/bin/python)
set -euo pipefail

PY=${1:-.venv/bin/python}
PKGS=(slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev shellcheck)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "system_deps.sh: needs root to install: ${missing[*]}" >&2
        exit 1
    fi
    # Without systemd, package scripts would try to start slurmctld/munge from /etc/init.d before any
    # config exists, and fail the install; a policy-rc.d that says "no" stops that (removed afterwards).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! "$PY" -c "import mpi4py" 2>/dev/null; then
    "$PY" -m pip install -q "mpi4py>=4.1"
fi
