#!/usr/bin/env bash
# Installs the pinned AsyncAPI parser (scripts/asyncapi/package-lock.json)
# into .tools/asyncapi with npm, if it is not there yet, and prints the path
# of the validation script the tests run with node. Everything else goes to
# stderr. Needs node and npm (Node.js 18 or newer).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.tools/asyncapi"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "node and npm are needed to validate AsyncAPI documents (Debian: apt install nodejs npm)" >&2
  exit 1
fi
if ! cmp -s "$root/scripts/asyncapi/package-lock.json" "$dir/package-lock.json" 2>/dev/null \
  || [ ! -d "$dir/node_modules/@asyncapi/parser" ]; then
  echo "installing the AsyncAPI parser into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$root/scripts/asyncapi/package.json" "$root/scripts/asyncapi/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts >&2)
fi
cp "$root/scripts/asyncapi/validate.mjs" "$dir/validate.mjs"
echo "$dir/validate.mjs"
