#!/bin/bash
# Containers on a machine with no Docker engine and no container registry (CI here):
# installs podman, starts its Docker-compatible API (for the docker SDK), and builds
#   localhost/dlq-redis:7, localhost/dlq-postgres:15  - servers for the test bed and the e2e test
#   localhost/dlq-python:3.11                         - a base for the project's Dockerfile
# from Debian packages with debootstrap. Idempotent: re-running skips finished steps.
# FORCE=1 rebuilds the images; MIRROR=... overrides the Debian mirror. Needs root, Debian 12.
# Prints `export DOCKER_HOST=...` on its last line, and nothing else on stdout (it is eval'ed):
# every other output goes to stderr.
set -euo pipefail

WORK="${WORK:-/var/tmp/dlq-images}"
SOCK="${SOCK:-/run/podman/podman.sock}"
SUITE=bookworm
REDIS_IMG=localhost/dlq-redis:7
PG_IMG=localhost/dlq-postgres:15
PY_IMG=localhost/dlq-python:3.11
FORCE="${FORCE:-0}"
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---- 1. packages + containers.conf -------------------------------------------------------
if [ "$(dpkg-query -W -f='${Status}\n' podman runc debootstrap 2>/dev/null | grep -c 'install ok installed')" = 3 ]; then
    log "podman, runc, debootstrap already installed"
else
    log "installing podman runc debootstrap"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc debootstrap >&2
fi

CONF_WANT='[containers]
default_ulimits = []
[engine]
runtime = "runc"'
if [ "$(cat /etc/containers/containers.conf 2>/dev/null)" != "$CONF_WANT" ]; then
    log "writing /etc/containers/containers.conf"
    mkdir -p /etc/containers
    printf '%s\n' "$CONF_WANT" > /etc/containers/containers.conf
fi

# ---- 2. Docker-compatible API socket ------------------------------------------------------
if curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; then
    log "podman API already answering on $SOCK"
else
    log "starting podman system service on $SOCK"
    mkdir -p "$(dirname "$SOCK")"
    rm -f "$SOCK"
    # From /, not from this clone: containers inherit the service's working directory, and
    # a clone deleted later would break every container start ("Failed to get working
    # directory").
    (cd / && exec setsid nohup podman system service --time=0 "unix://$SOCK" \
        >/tmp/podman-service.log 2>&1 < /dev/null) &
    echo $! > /tmp/podman-service.pid
    for _ in $(seq 50); do
        curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null || { cat /tmp/podman-service.log; exit 1; }
fi

# ---- 3. images ----------------------------------------------------------------------------
mirror() {  # first Debian archive URI serving the plain suite (not -security/-updates)
    local m
    m=$(awk -v s="$SUITE" '
        /^[[:space:]]*#/ {next}
        /^deb[[:space:]]/ { u=""; for(i=2;i<=NF;i++){ if($i ~ /^\[/){while($i !~ /\]$/)i++; continue} u=$i; break }
                            if ($(i+1)==s && u ~ /debian\/?$/) {print u; exit} next }
        /^URIs:/   {u=$2}
        /^Suites:/ {for(i=2;i<=NF;i++) if($i==s && u ~ /debian\/?$/) {print u; exit}}
        /^[[:space:]]*$/ {u=""}
    ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR="${MIRROR:-$(mirror)}"
CACHE="$WORK/deb-cache"
mkdir -p "$WORK" "$CACHE"

bootstrap() {  # bootstrap ROOTFS PACKAGES
    local rootfs=$1 pkgs=$2
    rm -rf "$rootfs"
    log "debootstrap $SUITE ($pkgs) from $MIRROR -> $rootfs"
    debootstrap --variant=minbase --cache-dir="$CACHE" --include="$pkgs" \
        "$SUITE" "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 || { tail -30 "$rootfs.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
}

write_pg_entrypoint() {
cat <<'ENTRYPOINT_EOF'
#!/bin/sh
# Entrypoint for localhost/dlq-postgres:15 (Debian bookworm postgresql-15, trust auth).
# Args: none -> run postgres; "postgres ..." or "-c ..." -> extra postgres args; anything else -> exec it.
set -eu

PGBIN=/usr/lib/postgresql/15/bin
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

if [ "$#" -gt 0 ] && [ "$1" = "postgres" ]; then shift; fi
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then exec "$@"; fi

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -d /usr/lib/locale/C.utf8 ]; then LOC="--locale=C.UTF-8"; else LOC="--no-locale"; fi
    runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 $LOC >/dev/null
    {
        echo "host all all 0.0.0.0/0 trust"
        echo "host all all ::/0 trust"
    } >> "$PGDATA/pg_hba.conf"
    if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != "postgres" ]; then
        db=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
        # single-user backend: no network, no readiness race
        printf 'CREATE DATABASE "%s";\n' "$db" \
            | runuser -u postgres -- "$PGBIN/postgres" --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "pg-entrypoint: initialised $PGDATA${POSTGRES_DB:+ (database $POSTGRES_DB)}"
fi

# setpriv execs in place, so postgres is PID 1 and gets podman's stop signal directly; with
# runuser as PID 1 the signal never reached postgres and stop() ended in SIGKILL after 10 s.
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c fsync=off "$@"
ENTRYPOINT_EOF
}

ENV_PATH='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

if [ "$FORCE" != 1 ] && podman image exists "$REDIS_IMG"; then
    log "$REDIS_IMG exists"
else
    t0=$SECONDS
    R="$WORK/rootfs-redis"
    bootstrap "$R" redis-server
    mkdir -p "$R/data"
    tar -C "$R" -c . | podman import \
        --change "$ENV_PATH" \
        --change 'WORKDIR /data' \
        --change 'EXPOSE 6379' \
        --change 'CMD ["redis-server","--bind","0.0.0.0","--protected-mode","no","--port","6379"]' \
        - "$REDIS_IMG" >&2
    rm -rf "$R"
    log "$REDIS_IMG built in $((SECONDS - t0)) s"
fi

if [ "$FORCE" != 1 ] && podman image exists "$PG_IMG"; then
    log "$PG_IMG exists"
else
    t0=$SECONDS
    P="$WORK/rootfs-postgres"
    bootstrap "$P" postgresql-15
    # drop the packaged "main" cluster; the entrypoint makes its own in /var/lib/postgresql/data
    rm -rf "$P/var/lib/postgresql/15" "$P/etc/postgresql/15"
    write_pg_entrypoint > "$P/usr/local/bin/pg-entrypoint.sh"
    chmod 0755 "$P/usr/local/bin/pg-entrypoint.sh"
    mkdir -p "$P/var/lib/postgresql/data" "$P/var/run/postgresql"
    chroot "$P" chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
    chmod 700 "$P/var/lib/postgresql/data"
    tar -C "$P" -c . | podman import \
        --change "$ENV_PATH" \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'EXPOSE 5432' \
        --change 'STOPSIGNAL SIGINT' \
        --change 'ENTRYPOINT ["/usr/local/bin/pg-entrypoint.sh"]' \
        - "$PG_IMG" >&2
    rm -rf "$P"
    log "$PG_IMG built in $((SECONDS - t0)) s"
fi

if [ "$FORCE" != 1 ] && podman image exists "$PY_IMG"; then
    log "$PY_IMG exists"
else
    t0=$SECONDS
    Y="$WORK/rootfs-python"
    bootstrap "$Y" python3,python3-venv,python3-pip,ca-certificates,passwd
    tar -C "$Y" -c . | podman import \
        --change "$ENV_PATH" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$PY_IMG" >&2
    rm -rf "$Y"
    log "$PY_IMG built in $((SECONDS - t0)) s"
fi

podman images --filter reference='localhost/dlq-*' >&2
echo "export DOCKER_HOST=unix://$SOCK"
