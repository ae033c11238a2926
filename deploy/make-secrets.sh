#!/bin/sh
# Once, before the first `docker compose -f deploy/compose.prod.yaml up`: random secrets in deploy/secrets/
# (mode 0600, never overwritten), a self-signed certificate in deploy/certs/ if there is none (replace it
# with a real one for PUBLIC_HOSTNAME), and Mosquitto's dynamic-security state with the admin account.
set -eu
cd "$(dirname "$0")"
host=${PUBLIC_HOSTNAME:-localhost}
umask 077
mkdir -p secrets certs mosquitto/data backups
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
keep() { [ -s "secrets/$1" ] || printf '%s\n' "$2" > "secrets/$1"; }

keep postgres_password "$(random)"
keep admin_key "$(random)"
keep mqtt_dynsec_password "$(random)"
keep mqtt_service_password "$(random)"
keep grafana_db_password "$(random)"
keep grafana_admin_password "$(random)"
keep database_url "postgresql://telemetra:$(cat secrets/postgres_password)@postgres:5432/telemetra"
keep mqtt_url "mqtt://telemetra-svc:$(cat secrets/mqtt_service_password)@mosquitto:1883"
chmod 0644 secrets/*   # the containers' own users read them (the directory stays 0700 to this host's users)
chmod 0711 secrets

if [ ! -s certs/server.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
        -keyout certs/server.key -out certs/server.crt 2>/dev/null
    cp certs/server.crt certs/ca.crt   # self-signed: it is its own CA (devices pin it)
    chmod 0644 certs/*
    echo "self-signed certificate for $host in deploy/certs/ (replace server.crt/server.key/ca.crt with real ones)"
fi

if [ ! -s mosquitto/data/dynamic-security.json ]; then
    docker run --rm -v "$PWD/mosquitto/data:/mosquitto/data" eclipse-mosquitto:2.0 \
        mosquitto_ctrl dynsec init /mosquitto/data/dynamic-security.json admin "$(cat secrets/mqtt_dynsec_password)"
    docker run --rm -v "$PWD/mosquitto/data:/mosquitto/data" eclipse-mosquitto:2.0 chown -R 1883:1883 /mosquitto/data
fi
echo "secrets in deploy/secrets/; the admin key: cat deploy/secrets/admin_key"
