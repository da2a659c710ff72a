#!/usr/bin/env bash
# The postgres image runs this once, on an empty data volume (/docker-entrypoint-initdb.d/): it creates the SOFARE
# warehouse and MLflow databases and their owner, with the password from the environment (not from a file in git).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v sofare_password="${SOFARE_DB_PASSWORD:-sofare}" -f /sofare-init/postgres-init.sql
