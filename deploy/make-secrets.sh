#!/bin/sh
# Once, before the first `docker compose -f deploy/compose.prod.yaml up`: random secrets in deploy/secrets/
# (never overwritten), a self-signed certificate in deploy/certs/ if there is none (replace it with a real
# one for PUBLIC_HOSTNAME), and Mosquitto's dynamic-security state with the admin account. Run it again after
# replacing the certificate: it sets the modes the containers need.
#
# Who reads what (the containers run as their own users, not as you):
#   secrets/   0700, files 0644: private to this host's other users; each container gets its files bind-mounted
#              (compose secrets) and reads them as its own user (telemetra 10001, grafana 472, postgres).
#   certs/     0755, server.crt and ca.crt 0644, server.key 0640 group 1883: Mosquitto 2.0 loads its TLS files
#              after dropping to its user (uid/gid 1883) and nginx as root; nobody else can read the key.
#   backups/   0700, owned by uid 10001 (the backup service runs as the image's telemetra user).
set -eu
cd "$(dirname "$0")"
host=${PUBLIC_HOSTNAME:-localhost}
MOSQUITTO_GID=1883
TELEMETRA_UID=10001
umask 077
mkdir -p secrets certs mosquitto/data backups
# As root, chown/chgrp here; otherwise through a throw-away container (docker can, you may not).
as_root() {  # as_root DIR COMMAND ARGS… (ARGS' paths relative to DIR)
    dir=$1; shift
    if [ "$(id -u)" = 0 ]; then (cd "$dir" && "$@"); else
        docker run --rm -v "$PWD/$dir:/work" -w /work eclipse-mosquitto:2.0 "$@"; fi
}
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
chmod 0644 secrets/*   # the containers' own users read them (the directory keeps this host's users out)
chmod 0700 secrets

if [ ! -s certs/server.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
        -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
        -keyout certs/server.key -out certs/server.crt 2>/dev/null
    cp certs/server.crt certs/ca.crt   # self-signed: it is its own CA (devices pin it)
    echo "self-signed certificate for $host in deploy/certs/ (replace server.crt/server.key/ca.crt with real ones)"
fi
chmod 0755 certs
chmod 0644 certs/server.crt certs/ca.crt
chmod 0640 certs/server.key
as_root certs chgrp "$MOSQUITTO_GID" server.key

if [ "$(stat -c %u backups)" != "$TELEMETRA_UID" ]; then   # (a BACKUP_DIR elsewhere: the same, by hand)
    chmod 0700 backups
    as_root backups chown "$TELEMETRA_UID" .
fi

if [ ! -s mosquitto/data/dynamic-security.json ]; then
    docker run --rm -v "$PWD/mosquitto/data:/mosquitto/data" eclipse-mosquitto:2.0 \
        mosquitto_ctrl dynsec init /mosquitto/data/dynamic-security.json admin "$(cat secrets/mqtt_dynsec_password)"
    docker run --rm -v "$PWD/mosquitto/data:/mosquitto/data" eclipse-mosquitto:2.0 chown -R 1883:1883 /mosquitto/data
fi
echo "secrets in deploy/secrets/; the admin key: cat deploy/secrets/admin_key"
