#!/usr/bin/env bash
# Make sure what the test suite talks to is installed and running: PostgreSQL (the tests create and
# drop their own databases), the mosquitto binary (tests start their own brokers on free ports) and
# Debian's chromium (the dashboard's browser tests drive it through Playwright, which never downloads one)
# docker-compose (to validate deploy/'s compose files) and nginx (deploy/'s proxy, tested in front of Mosquitto).
# On a fresh Debian/Ubuntu machine this installs them with apt (needs root or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
[ -x "${TELEMETRA_TEST_CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
# tests/test_deploy.py validates the compose files with `docker-compose config` (no Docker engine needed).
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
# tests/test_deploy.py puts deploy/'s nginx config in front of Mosquitto (wss://…/mqtt); openssl makes its certs.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  # Only the binary is wanted: RUNLEVEL=1 keeps the package from starting a server on port 80.
  echo "installing: nginx-light"
  $SUDO apt-get update -qq
  RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light >/dev/null \
    || echo "nginx-light did not install cleanly; tests/test_deploy.py needs /usr/sbin/nginx" >&2
fi

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! pg_up; then
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  echo "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || $SUDO pg_ctlcluster "$version" main start
  for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
fi
pg_up || { echo "PostgreSQL is not accepting connections on 127.0.0.1:5432" >&2; exit 1; }

# The suite connects as the 'postgres' role over TCP (TELEMETRA_TEST_PG_URL overrides); make sure it may.
if ! psql "${TELEMETRA_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}" -qtAc 'select 1' >/dev/null 2>&1; then
  echo "cannot connect as postgres over TCP; set TELEMETRA_TEST_PG_URL to a superuser URL" >&2
  exit 1
fi
echo "services ready: PostgreSQL on 127.0.0.1:5432, mosquitto $(mosquitto -h 2>/dev/null | head -n1 | awk '{print $3}'), $("${TELEMETRA_TEST_CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null | head -n1)"
