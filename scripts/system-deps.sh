#!/usr/bin/env bash
# System packages the tests and benchmarks need:
#   - PostgreSQL server binaries (initdb, pg_ctl): the throw-away database server of the tests;
#   - nginx (Debian package nginx-light): the canary front door (sofare.deploy.frontdoor);
#   - promtool (Debian package prometheus): checks docker/prometheus/prometheus.yml (no server is started);
#   - docker-compose 1.29 (Debian package docker-compose): `config -q` checks docker-compose.airflow.yml (no engine);
#   - redis-server: the Celery broker of the end-to-end tier (tests/e2e, CeleryExecutor);
#   - chromium + chromium-driver: the headless browser the browser tier drives with Selenium (tests/e2e).
# Installs the missing ones with apt-get (one `apt-get update` for all) when we are root; otherwise says what to
# install and fails. To add one: a have_* check function and a "check package description" line in REQUIREMENTS.
set -euo pipefail

have_postgresql() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; }
have_nginx() { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }
have_promtool() { command -v promtool >/dev/null; }
have_compose() { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }
have_redis() { command -v redis-server >/dev/null; }
have_chromium() { command -v chromium >/dev/null; }
have_chromedriver() { command -v chromedriver >/dev/null; }

# "check-function package description", one a line.
REQUIREMENTS=(
  "have_postgresql postgresql PostgreSQL server binaries (initdb, pg_ctl)"
  "have_nginx nginx-light nginx (the canary front door)"
  "have_promtool prometheus promtool (the Prometheus config check)"
  "have_compose docker-compose docker-compose (the compose file check)"
  "have_redis redis-server Redis (the Celery broker of the e2e tier)"
  "have_chromium chromium Chromium (the browser tier)"
  "have_chromedriver chromium-driver ChromeDriver (Selenium's driver for Chromium)"
)

missing=()
descriptions=()
for requirement in "${REQUIREMENTS[@]}"; do
  read -r check package description <<<"$requirement"
  if ! "$check"; then
    missing+=("$package")
    descriptions+=("$description: package '$package'")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} (apt-get install)…"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  for description in "${descriptions[@]}"; do
    echo "required: $description" >&2
  done
  echo "install them (as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
