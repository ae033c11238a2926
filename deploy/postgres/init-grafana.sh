#!/bin/sh
# First start of the PostgreSQL volume only: a read-only role for Grafana on the tables Telemetra creates
# (now and later: default privileges of the owner role, POSTGRES_USER, which runs Telemetra's migrations).
set -eu
password=$(cat "$GRAFANA_DB_PASSWORD_FILE")
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -v pw="$password" \
    -v db="$POSTGRES_DB" -v owner="$POSTGRES_USER" -v reader="${GRAFANA_DB_USER:-grafana}" <<'SQL'
CREATE ROLE :"reader" LOGIN PASSWORD :'pw';
GRANT CONNECT ON DATABASE :"db" TO :"reader";
GRANT USAGE ON SCHEMA public TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
SQL
