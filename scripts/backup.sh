#!/bin/sh
# Nightly backup with rotation, for cron: keeps the newest $TELEMETRA_BACKUP_KEEP archives (default 14).
#   0 3 * * *  cd /srv/telemetra && scripts/backup.sh /var/backups/telemetra >> /var/log/telemetra-backup.log 2>&1
# Settings (database, data directory) are the server's own: the environment, or .env in the current directory.
# Works while the server runs (SQLite online backup API / pg_dump).
set -eu
dir=${1:-${TELEMETRA_BACKUP_DIR:-./backups}}
keep=${TELEMETRA_BACKUP_KEEP:-14}
telemetra=${TELEMETRA_BIN:-$(dirname "$0")/../.venv/bin/telemetra}
[ -x "$telemetra" ] || telemetra=telemetra
case $keep in ''|*[!0-9]*|0) echo "TELEMETRA_BACKUP_KEEP must be a positive number, not '$keep'" >&2; exit 2 ;; esac

mkdir -p "$dir"
umask 077
file="$dir/telemetra-$(date -u +%Y%m%dT%H%M%SZ).tar.gz"
"$telemetra" backup "$file"
# Newest first; everything past the first $keep goes (names sort by time).
ls -1 "$dir"/telemetra-*.tar.gz | sort -r | tail -n +"$((keep + 1))" | while read -r old; do
    rm -f -- "$old"
    echo "removed $old"
done
