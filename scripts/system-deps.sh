#!/usr/bin/env bash
# System packages the tests and benchmarks need: PostgreSQL server binaries (initdb, pg_ctl).
# Installs them with apt-get when they are missing and we are root; otherwise says what to install.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing PostgreSQL server binaries (apt-get install postgresql)…"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
else
  echo "PostgreSQL server binaries (initdb, pg_ctl) are required: install the 'postgresql' package" >&2
  exit 1
fi
