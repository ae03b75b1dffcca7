#!/usr/bin/env bash
# Installs the npm FHIR validator into tests/node/node_modules when it is missing.
# Run by the Rust tests that validate emitted resources; safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f node_modules/fhir/package.json ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "npm is needed for the FHIR validator (apt-get install npm)" >&2; exit 1; }
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi
