#!/bin/sh
# Install what the console's browser tests need: Debian's `chromium` (headless Chromium that
# Playwright drives through `executable_path`; Playwright's own browser download is never
# used). Does nothing when chromium is already on PATH. The Python side (playwright from
# PyPI) is in tests/python/requirements.txt.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core

command -v chromium >/dev/null
echo "chromium: $(chromium --version 2>&1 | head -n 1)"
