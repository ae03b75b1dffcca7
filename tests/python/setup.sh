#!/usr/bin/env bash
# Creates the Python venv for tests/python (confluent-kafka, fastavro, playwright from PyPI) under
# ~/.cache/ketenbus/venv, once; reinstalls when requirements.txt changes.
# Prints the venv's python path on stdout.
#
# Environment: KETENBUS_CACHE (default ~/.cache/ketenbus), PYTHON (default python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KETENBUS_CACHE:-$HOME/.cache/ketenbus}
VENV=$CACHE/venv
REQ=$HERE/requirements.txt
STAMP=$VENV/.ketenbus-requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)

say() { echo "setup.sh: $*" >&2; }

mkdir -p "$CACHE"
exec 9>"$CACHE/venv.lock"
flock 9

if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$want" ]] \
    && "$VENV/bin/python" -c 'import confluent_kafka, fastavro, playwright' 2>/dev/null; then
    say "venv up to date at $VENV"
else
    say "installing $(grep -v '^#' "$REQ" | xargs) into $VENV"
    [[ -x $VENV/bin/python ]] || "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >&2
    "$VENV/bin/python" -c 'import confluent_kafka, fastavro, playwright' \
        || { say "installed packages do not import"; exit 1; }
    echo "$want" >"$STAMP"
    say "installed into $VENV"
fi
echo "$VENV/bin/python"
