#!/usr/bin/env bash
# Prints the directory of Postgres's binaries (initdb, postgres, psql), for
# the real Postgres servers the tests start (choreo_testkit::PostgresServer).
# Uses $POSTGRES_BIN_DIR, then pg_config, then Debian's
# /usr/lib/postgresql/<version>/bin; when none has them, installs Debian's
# postgresql package with apt-get, as root, without its default cluster (the
# tests make their own). Everything else goes to stderr.
set -euo pipefail
complete() { [ -x "$1/initdb" ] && [ -x "$1/postgres" ] && [ -x "$1/psql" ]; }
if [ -n "${POSTGRES_BIN_DIR:-}" ]; then
  if complete "$POSTGRES_BIN_DIR"; then
    echo "$POSTGRES_BIN_DIR"
    exit 0
  fi
  echo "POSTGRES_BIN_DIR=$POSTGRES_BIN_DIR lacks initdb, postgres or psql" >&2
  exit 1
fi
find_dir() {
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [ -n "$d" ] && complete "$d"; then
      echo "$d"
      return 0
    fi
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if complete "$d"; then
      echo "$d"
      return 0
    fi
  done
  return 1
}
if find_dir; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Postgres (Debian package postgresql)" >&2
  # No system cluster: the tests start their own servers.
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  fi
  # Keep that file without asking (it is one of the package's conffiles).
  install=(apt-get install -y --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql)
  DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2; }
  find_dir && exit 0
fi
echo "Postgres is needed for the Postgres tests: install it (Debian: apt-get install postgresql; \
or pip install pgserver, whose wheel carries the binaries) and set POSTGRES_BIN_DIR to the \
directory with initdb, postgres and psql" >&2
exit 1
