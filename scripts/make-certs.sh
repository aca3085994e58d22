#!/usr/bin/env bash
# Write a test PKI for a fedsec consortium: CA, SuperLink TLS certificate, SuperNode
# key pairs (ECDSA P-384, OpenSSH format) and SuperExec shared secrets.
#
#   scripts/make-certs.sh OUT_DIR [--nodes hospital-0 hospital-1 ...] [--hostname superlink]
#                         [--ip 127.0.0.1 ...] [--secrets superlink hospital-0 ...] [--days 365] [--force]
#
# Default (no options): the files docker/compose.yaml expects for two hospitals, i.e.
#   --nodes hospital-0 hospital-1 --hostname superlink --secrets superlink hospital-0 hospital-1
# See `python -m fedsec.federation.certs --help` and docker/README.md (who keeps which file).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUT_DIR [options]   (options: python -m fedsec.federation.certs --help)" >&2
  exit 2
fi
out="$1"; shift
if [[ $# -eq 0 ]]; then
  set -- --nodes hospital-0 hospital-1 --hostname superlink --secrets superlink hospital-0 hospital-1
fi
umask 077
exec "$PYTHON" -m fedsec.federation.certs "$out" "$@"
