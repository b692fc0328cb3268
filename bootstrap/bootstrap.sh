#!/usr/bin/env bash
# Install a MIaaS cluster on many hosts over SSH, from one cluster file (see cluster.env.example).
#   usage: bootstrap/bootstrap.sh CLUSTER_ENV [--check] [--host NAME] [--state DIR]
#          bootstrap/bootstrap.sh CLUSTER_ENV uninstall [--purge] [--host NAME]
# Runs on the operator's machine (not on the hosts): it needs this repository, python3 (3.11+) with venv, ssh and
# tar. The hosts need an SSH server that takes the operator's key, and python3; everything else it installs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
command -v ssh >/dev/null || { echo "error: ssh is missing here (apt-get install -y openssh-client)" >&2; exit 1; }
command -v tar >/dev/null || { echo "error: tar is missing here" >&2; exit 1; }
# The installer runs from the repository's virtualenv (make's), else from one of its own under ~/.cache.
python=${MIAAS_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ] && "$here/.venv/bin/python" -c 'import miaas.installer' 2>/dev/null; then
    python=$here/.venv/bin/python
  else
    venv=${XDG_CACHE_HOME:-$HOME/.cache}/miaas/installer-venv
    if ! "$venv/bin/python" -c 'import miaas.installer' 2>/dev/null; then
      command -v python3 >/dev/null || { echo "error: python3 is missing here" >&2; exit 1; }
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet -e "$here"
    fi
    python=$venv/bin/python
  fi
fi
exec "$python" -m miaas.installer "$@"
