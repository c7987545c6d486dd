#!/usr/bin/env bash
# Prints the path of a Chromium the console's tests drive headless over the
# DevTools protocol. Uses $CHROMIUM_BIN or PATH (chromium, chromium-browser);
# when neither has one, installs Debian's `chromium` package with apt-get,
# as root. No browser is downloaded by a test tool. Everything else goes to
# stderr.
set -euo pipefail
if [ -n "${CHROMIUM_BIN:-}" ] && [ -x "$CHROMIUM_BIN" ]; then
  echo "$CHROMIUM_BIN"
  exit 0
fi
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    exit 0
  fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Chromium (Debian package chromium)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core >&2; }
  command -v chromium
  exit 0
fi
echo "Chromium is needed for the console's browser tests: install it \
(Debian: apt-get install chromium), or set CHROMIUM_BIN to its path" >&2
exit 1
