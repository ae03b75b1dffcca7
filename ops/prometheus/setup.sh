#!/bin/sh
# Install what the ops tests need: Debian's `prometheus` package, which brings `prometheus`
# and `promtool` (check metrics, check rules, test rules). Does nothing when promtool is
# already on PATH. Never starts the service: tests run their own Prometheus on loopback.
set -eu

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# A package install starts services through invoke-rc.d; forbid that for this install only.
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
fi
cleanup() {
    if [ -n "$policy" ]; then $SUDO rm -f "$policy"; fi
}
trap cleanup EXIT

$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y prometheus

command -v promtool >/dev/null
command -v prometheus >/dev/null
echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
