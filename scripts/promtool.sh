#!/usr/bin/env bash
# Prints the path of Prometheus's promtool, which the shop's metrics test
# runs on a real scrape (`promtool check metrics`). Uses $PROMTOOL or PATH;
# when neither has it, installs Debian's `prometheus` package (which brings
# promtool) with apt-get, as root. Everything else goes to stderr.
set -euo pipefail
if [ -n "${PROMTOOL:-}" ] && [ -x "$PROMTOOL" ]; then
  echo "$PROMTOOL"
  exit 0
fi
if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2; }
  command -v promtool
  exit 0
fi
echo "promtool is needed to check the shop's metrics: install Prometheus's promtool \
(Debian: apt-get install prometheus), or set PROMTOOL to its path" >&2
exit 1
