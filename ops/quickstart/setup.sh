#!/usr/bin/env bash
# Installs what README's quick start (and tests/tests/quickstart.rs, which runs it) uses,
# when missing: curl (the sender), python3 (the example receiver, standard library only).
# Non-interactive; runs `apt-get update` only when something is missing.
set -euo pipefail

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)

if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
fi
echo "quick-start tools ready: $(curl --version | head -1 | cut -d' ' -f1-2), $(python3 --version)"
