#!/bin/sh
# The official postgres image's contract, for the Debian-made stand-in: on the first
# start (an empty PGDATA) create the cluster with POSTGRES_USER (default postgres) and
# POSTGRES_PASSWORD (required), and the database POSTGRES_DB (default: the user's name);
# then run the server as the postgres user, listening on every interface, passwords
# checked on every TCP connection.
set -eu

if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: POSTGRES_PASSWORD is not set; set it (docker/server.env) before the first start" >&2
        exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    database=${POSTGRES_DB:-$user}
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --username="$user" --pwfile="$password_file" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 -D "$PGDATA" >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        # A server on the Unix socket only, so that no client (and no health check over
        # TCP) takes it for the real one while the database is being created.
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        # psql quotes the name itself (:"var"), which it does for input, not for -c.
        echo 'CREATE DATABASE :"database";' | psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres \
            --quiet --set=database="$database"
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "postgres: created the cluster in $PGDATA with user $user and database $database"
fi

if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
