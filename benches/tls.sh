#!/usr/bin/env bash
# TLS on both sides: pgmux against PgBouncer, side by side on one machine.
#
#   benches/tls.sh [--duration S] [--clients N] [--rounds R] [--no-build]
#
# A throwaway PostgreSQL with ssl = on (certificates made with the openssl CLI), pgmux
# (client_tls_cert_file/key_file, server sslmode=require) and PgBouncer
# (client_tls_sslmode = require, server_tls_sslmode = require), both pool 20, SCRAM.
# pgbench -S -M simple -c N with PGSSLMODE=require, alternating pgmux and PgBouncer R
# times; prints TPS, pooler CPU per transaction and peak RSS per run, and the ratios.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP=""
DURATION=15
CLIENTS=50
ROUNDS=2
BUILD=1
POOL_SIZE=20
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
PG_BIN="$(find_pg_bindir)" || { echo "PostgreSQL server binaries not found" >&2; exit 1; }
PGBOUNCER="$(command -v pgbouncer)" || { echo "pgbouncer not found: apt-get install -y pgbouncer" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl not found: apt-get install -y openssl" >&2; exit 1; }

MUX_PID=""
PG_STARTED=0
cleanup() {
    set +e
    if [ -n "$MUX_PID" ]; then kill "$MUX_PID" 2>/dev/null; wait "$MUX_PID" 2>/dev/null; fi
    if [ -n "$TMP" ] && [ -s "$TMP/pgb/pgbouncer.pid" ]; then kill "$(cat "$TMP/pgb/pgbouncer.pid")" 2>/dev/null; fi
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_pgmux
make_tmp pgmux-tls-bench

log "certificates (throwaway CA, server certificate for localhost/127.0.0.1)"
as_pg bash -c "cd '$TMP' && umask 077 &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.crt -subj /CN=bench-ca -days 2 &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key \
    -out server.csr -subj /CN=localhost &&
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > ext &&
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 2 -extfile ext" >/dev/null 2>&1
chmod 644 "$TMP/server.crt" "$TMP/ca.crt"

PG_PORT="$(free_port)"
log "initdb + start PostgreSQL (ssl = on) on 127.0.0.1:$PG_PORT"
as_pg "$PG_BIN/initdb" -D "$TMP/pgdata" -U postgres -A trust -N -E UTF8 --locale=C \
    >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; exit 1; }
as_pg cp "$TMP/server.key" "$TMP/pgdata/server.key"
as_pg chmod 600 "$TMP/pgdata/server.key"
as_pg tee -a "$TMP/pgdata/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/sock'
max_connections = 200
fsync = off
synchronous_commit = off
shared_buffers = 256MB
ssl = on
ssl_cert_file = '$TMP/server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
EOF
as_pg tee "$TMP/pgdata/pg_hba.conf" >/dev/null <<'EOF'
local all all                    trust
host  all all      127.0.0.1/32  scram-sha-256
EOF
PG_STARTED=1
as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -l "$TMP/postgres.log" -w -t 60 start >/dev/null
psql_su() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP/sock" -p "$PG_PORT" -U postgres "$@"; }
psql_su -d postgres -c "CREATE ROLE bench LOGIN PASSWORD 'benchpw'"
psql_su -d postgres -c "CREATE DATABASE bench OWNER bench"
export PGPASSWORD=benchpw
unset PGHOST PGPORT PGUSER PGDATABASE PGSSLMODE || true
"$PG_BIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$TMP/init.log" 2>&1

MUX_PORT="$(free_port)"
log "pgmux on $MUX_PORT (client TLS, server sslmode=require)"
env -u DATABASE_URL -u PGMUX_CONFIG PGMUX_LOG=warn \
    PGMUX_CLIENT_TLS_CERT_FILE="$TMP/server.crt" PGMUX_CLIENT_TLS_KEY_FILE="$TMP/server.key" \
    "${OWN_SESSION[@]}" "$PGMUX_BIN" --listen "127.0.0.1:$MUX_PORT" --admin-listen "127.0.0.1:$(free_port)" \
    --database-url "postgres://bench:benchpw@127.0.0.1:$PG_PORT/bench?sslmode=require" \
    --pool-size "$POOL_SIZE" --max-client-conn 2000 >"$TMP/pgmux.log" 2>&1 &
MUX_PID=$!

PGB_PORT="$(free_port)"
log "PgBouncer on $PGB_PORT (client_tls_sslmode = require, server_tls_sslmode = require)"
as_pg mkdir -p "$TMP/pgb"
as_pg cp "$TMP/server.key" "$TMP/pgb/server.key"
as_pg chmod 600 "$TMP/pgb/server.key"
as_pg tee "$TMP/pgb/userlist.txt" >/dev/null <<'EOF'
"bench" "benchpw"
EOF
as_pg tee "$TMP/pgb/pgbouncer.ini" >/dev/null <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/pgb/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 2000
client_tls_sslmode = require
client_tls_cert_file = $TMP/server.crt
client_tls_key_file = $TMP/pgb/server.key
server_tls_sslmode = require
logfile = $TMP/pgb/pgbouncer.log
pidfile = $TMP/pgb/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
as_pg "$PGBOUNCER" -d "$TMP/pgb/pgbouncer.ini"
for _ in $(seq 50); do port_in_use "$MUX_PORT" && port_in_use "$PGB_PORT" && break; sleep 0.1; done
PGB_PID="$(cat "$TMP/pgb/pgbouncer.pid")"

run() { # label port pid -> "tps cpu_us_per_tx hwm_kb"
    local out tx t0 t1
    echo 5 > "/proc/$3/clear_refs" 2>/dev/null || true
    t0="$(cpu_ticks "$3")"
    out="$(PGSSLMODE=require "$PG_BIN/pgbench" -n -S -M simple -c "$CLIENTS" -j 2 -T "$DURATION" \
        -h 127.0.0.1 -p "$2" -U bench bench 2>&1)"
    t1="$(cpu_ticks "$3")"
    tx="$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')"
    tps="$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)"
    hwm="$(awk '/VmHWM/ {print $2}' "/proc/$3/status")"
    awk -v l="$1" -v tps="$tps" -v tx="$tx" -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v hwm="$hwm" \
        'BEGIN { printf "%-10s %10.0f %12.1f %10.1f\n", l, tps, d / hz * 1e6 / tx, hwm / 1024 }'
}

echo
echo "TLS both sides, pgbench -S -M simple -c $CLIENTS -j 2 -T $DURATION, pool $POOL_SIZE, $(nproc) CPUs"
printf '%-10s %10s %12s %10s\n' target tps "cpu us/tx" "peak MB"
for r in $(seq "$ROUNDS"); do
    a="$(run pgmux "$MUX_PORT" "$MUX_PID")"
    b="$(run pgbouncer "$PGB_PORT" "$PGB_PID")"
    echo "$a"
    echo "$b"
    awk -v a="$a" -v b="$b" -v r="$r" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "round %d: pgmux/PgBouncer tps %.2fx, cpu/tx %.2fx\n", r, x[2] / y[2], x[3] / y[3] }'
done
