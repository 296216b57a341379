#!/usr/bin/env bash
# Installs the client drivers that tests/drivers.rs runs through pgmux:
#   * Python packages from requirements.txt into tests/drivers/.venv
#   * node modules from package-lock.json into tests/drivers/node_modules
# Idempotent: a stamp file records what was installed, so a second run that
# finds everything in place returns at once. Needs python3 (with the venv
# module; Debian: apt-get install python3-venv) and node + npm (Debian:
# apt-get install nodejs npm). Reaches PyPI and the npm registry only when
# something must be installed.
set -euo pipefail

cd "$(dirname "$0")"

die() {
    echo "tests/drivers/setup.sh: error: $*" >&2
    exit 1
}

hash_of() {
    # Content hash of the given files plus the interpreter version, so a
    # changed pin or a new Python/Node triggers a reinstall.
    cat "$@" | sha256sum | cut -d' ' -f1
}

# --- Python ---------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 not found (Debian: apt-get install python3 python3-venv)"
py_version="$(python3 -c 'import sys; print(sys.version)')"
want_py="$(printf '%s\n%s\n' "$py_version" "$(hash_of requirements.txt)" | sha256sum | cut -d' ' -f1)"
py_stamp=".venv/.pgmux-installed"
if [ -x .venv/bin/python ] && [ -f "$py_stamp" ] && [ "$(cat "$py_stamp")" = "$want_py" ]; then
    echo "python drivers: up to date (.venv)"
else
    echo "python drivers: installing into tests/drivers/.venv"
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' >/dev/null 2>&1 \
        || [ "$(.venv/bin/python -c 'import sys; print(sys.version)')" != "$py_version" ]; then
        rm -rf .venv
        python3 -m venv .venv \
            || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    fi
    .venv/bin/python -m pip install --disable-pip-version-check --quiet -r requirements.txt \
        || die "pip install -r tests/drivers/requirements.txt failed"
    .venv/bin/python -c 'import asyncpg, sqlalchemy, greenlet, psycopg, botocore' \
        || die "python drivers installed but do not import"
    echo "$want_py" >"$py_stamp"
fi

# --- Node -------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node not found (Debian: apt-get install nodejs npm)"
command -v npm >/dev/null 2>&1 || die "npm not found (Debian: apt-get install npm)"
want_node="$(printf '%s\n%s\n' "$(node --version)" "$(hash_of package.json package-lock.json)" | sha256sum | cut -d' ' -f1)"
node_stamp="node_modules/.pgmux-installed"
if [ -f "$node_stamp" ] && [ "$(cat "$node_stamp")" = "$want_node" ]; then
    echo "node drivers: up to date (node_modules)"
else
    echo "node drivers: npm ci in tests/drivers"
    npm ci --no-audit --no-fund --loglevel=error || die "npm ci in tests/drivers failed"
    node -e 'require("pg")' || die "node modules installed but pg does not load"
    echo "$want_node" >"$node_stamp"
fi
