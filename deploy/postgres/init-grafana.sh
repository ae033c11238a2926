#!/bin/sh
# First start of the PostgreSQL volume only: a read-only role for Grafana on the tables Telemetra creates.
set -eu
password=$(cat "$GRAFANA_DB_PASSWORD_FILE")
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -v pw="$password" <<'SQL'
CREATE ROLE grafana LOGIN PASSWORD :'pw';
GRANT CONNECT ON DATABASE telemetra TO grafana;
GRANT USAGE ON SCHEMA public TO grafana;
ALTER DEFAULT PRIVILEGES FOR ROLE telemetra IN SCHEMA public GRANT SELECT ON TABLES TO grafana;
SQL
