#!/usr/bin/env bash
# CI only: the stand-in's entry point (see Dockerfile beside it). As the official image's does: on a first start
# with an empty PGDATA it creates the cluster, the superuser POSTGRES_USER (default postgres) with
# POSTGRES_PASSWORD, the database POSTGRES_DB (default: the user's name), runs /docker-entrypoint-initdb.d/*.sh
# and *.sql against a server that listens on no TCP port meanwhile, and then starts the real server, which other
# containers reach with a password. Arguments that start with a dash go to postgres.
set -Eeuo pipefail

if [[ ${1:-} == -* ]]; then
    set -- postgres "$@"
fi

if [[ ${1:-} == postgres && $(id -u) == 0 ]]; then
    # A named volume mounted over PGDATA starts owned by root: hand it over, then run as postgres.
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [[ ${1:-} == postgres && ! -s $PGDATA/PG_VERSION ]]; then
    if [[ -z ${POSTGRES_PASSWORD:-} ]]; then
        echo "stand-in postgres: POSTGRES_PASSWORD is not set; the official image refuses to start, and so does this" >&2
        exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    database=${POSTGRES_DB:-$user}
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8
    # Any address with a password, as the official image allows (its POSTGRES_HOST_AUTH_METHOD default).
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"

    # Until the set-up is done, no TCP port: a healthcheck (pg_isready --host) cannot call this server ready.
    pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses=''" --wait start
    if [[ $database != postgres ]]; then
        # On standard input, not --command: psql quotes the name for us (:"database") only in what it reads.
        echo 'CREATE DATABASE :"database";' |
            psql --username="$user" --dbname=postgres --set=ON_ERROR_STOP=1 --set=database="$database" --quiet
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case $script in
            *.sh) echo "stand-in postgres: running $script"; . "$script" ;;
            *.sql) echo "stand-in postgres: running $script"
                psql --username="$user" --dbname="$database" --set=ON_ERROR_STOP=1 --file="$script" ;;
            *) ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" --mode=fast --wait stop
    echo "stand-in postgres: cluster ready in $PGDATA for user $user, database $database"
fi

exec "$@"
