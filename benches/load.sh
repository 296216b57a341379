#!/usr/bin/env bash
# Load benchmark: pgbench select-only through pgmux vs PgBouncer vs direct.
#
# Usage: benches/load.sh [--duration SECONDS] [--clients "50 1000"] [--pool-size 20]
#                        [--modes "simple extended prepared"] [--logins 1000] [--csv FILE]
#
# Builds pgmux (release), starts a throwaway PostgreSQL on 127.0.0.1, loads
# `pgbench -i -s 10`, starts pgmux and PgBouncer (transaction pooling, same
# pool size), then for every query mode and client count runs
#   pgbench -n -S -T DURATION -c N -j 2 -M MODE
# (PgBouncer before 1.21 cannot run -M prepared in transaction mode: skipped).
# With --logins N it also connects N SCRAM clients at once to each pooler
# (benches/scram_logins.py) and reports the time until all are ready.
# against PostgreSQL directly (only N <= 100, max_connections is 200), pgmux
# and PgBouncer, and prints TPS, average latency, pooler CPU per transaction
# and pooler peak RSS. Everything is cleaned up on exit.
set -euo pipefail

DURATION=30
CLIENTS="50 1000"
POOL_SIZE=20
SCALE=10
DIRECT_MAX_CLIENTS=100
MODES="simple"
LOGINS=0
CSV=""

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --clients=*) CLIENTS="${1#*=}"; shift ;;
        --pool-size) POOL_SIZE="$2"; shift 2 ;;
        --pool-size=*) POOL_SIZE="${1#*=}"; shift ;;
        --modes) MODES="$2"; shift 2 ;;
        --logins) LOGINS="$2"; shift 2 ;;
        --csv) CSV="$2"; shift 2 ;;
        --logins=*) LOGINS="${1#*=}"; shift ;;
        --modes=*) MODES="${1#*=}"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
for m in $MODES; do
    case "$m" in simple|extended|prepared) ;; *) echo "unknown mode: $m" >&2; exit 2 ;; esac
done
for v in "$DURATION" "$POOL_SIZE" "$LOGINS" $CLIENTS; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "not a number: $v" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
log() { printf '==> %s\n' "$*" >&2; }

# --- tools ---------------------------------------------------------------------
find_pg_bindir() {
    local d
    if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ]; then echo "$PG_BINDIR"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    done
    return 1
}
PG_BIN="$(find_pg_bindir)" || {
    echo "PostgreSQL server binaries not found; install with: apt-get install -y postgresql" >&2
    exit 1
}
[ -x "$PG_BIN/pgbench" ] || { echo "pgbench not found in $PG_BIN" >&2; exit 1; }

PGBOUNCER="${PGBOUNCER:-$(command -v pgbouncer || true)}"
if [ -z "$PGBOUNCER" ] && [ -x /usr/sbin/pgbouncer ]; then PGBOUNCER=/usr/sbin/pgbouncer; fi
if [ -z "$PGBOUNCER" ]; then
    echo "NOTE: pgbouncer not found; install it with: apt-get install -y pgbouncer" >&2
    echo "      continuing without PgBouncer." >&2
fi

# PostgreSQL and PgBouncer refuse to run as root.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# 1000 clients need 1000+ fds in pgbench and the poolers (inherited).
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"

CLK_TCK="$(getconf CLK_TCK)"

# --- cleanup ---------------------------------------------------------------
TMP=""
PGMUX_PID=""
PGB_PIDFILE=""
PG_STARTED=0
cleanup() {
    set +e
    if [ -n "$PGMUX_PID" ] && kill -0 "$PGMUX_PID" 2>/dev/null; then
        kill "$PGMUX_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PGMUX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$PGMUX_PID" 2>/dev/null
    fi
    if [ -n "$PGB_PIDFILE" ] && [ -s "$PGB_PIDFILE" ]; then
        local p
        p="$(cat "$PGB_PIDFILE")"
        kill "$p" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    fi
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 40000))
        if ! port_in_use "$p"; then echo "$p"; return 0; fi
    done
    echo "no free port found" >&2
    return 1
}
wait_port() { # port seconds
    local _i
    for _i in $(seq $(($2 * 10))); do
        port_in_use "$1" && return 0
        sleep 0.1
    done
    return 1
}

# --- build pgmux -------------------------------------------------------------
log "building pgmux (release)"
(cd "$ROOT" && cargo build --release)
PGMUX_BIN="$ROOT/target/release/pgmux"

# --- PostgreSQL --------------------------------------------------------------
TMP="$(mktemp -d /tmp/pgmux-bench.XXXXXX)"
chmod 755 "$TMP"
mkdir -p "$TMP/sock" "$TMP/pgbouncer"
if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$TMP"; fi

PG_PORT="$(free_port)"
log "initdb + start PostgreSQL on 127.0.0.1:$PG_PORT ($TMP)"
as_pg "$PG_BIN/initdb" -D "$TMP/pgdata" -U postgres -A trust --auth-local=trust -N \
    -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; exit 1; }
as_pg tee -a "$TMP/pgdata/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/sock'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = 'scram-sha-256'
log_min_messages = warning
EOF
as_pg tee "$TMP/pgdata/pg_hba.conf" >/dev/null <<'EOF'
local all all                    trust
host  all postgres 127.0.0.1/32  trust
host  all all      127.0.0.1/32  scram-sha-256
EOF
as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -l "$TMP/postgres.log" -w start >/dev/null
PG_STARTED=1

psql_su() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP/sock" -p "$PG_PORT" -U postgres "$@"; }
psql_su -d postgres -c "CREATE ROLE bench LOGIN PASSWORD 'benchpw'"
psql_su -d postgres -c "CREATE DATABASE bench OWNER bench"

export PGPASSWORD=benchpw
unset PGHOST PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGSSLMODE || true
log "pgbench -i -s $SCALE"
"$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$TMP/pgbench-init.log" 2>&1 ||
    { cat "$TMP/pgbench-init.log" >&2; exit 1; }

# --- pgmux -------------------------------------------------------------------
PGMUX_PORT="$(free_port)"
PGMUX_OK=0
log "starting pgmux on 127.0.0.1:$PGMUX_PORT"
env -u DATABASE_URL -u READ_DATABASE_URL -u PGMUX_CONFIG -u PGMUX_LISTEN \
    -u PGMUX_POOL_SIZE -u PGMUX_MAX_CLIENT_CONN PGMUX_LOG="${PGMUX_LOG:-warn}" \
    "$PGMUX_BIN" --listen "127.0.0.1:$PGMUX_PORT" \
    --database-url "postgres://bench:benchpw@127.0.0.1:$PG_PORT/bench" \
    --pool-size "$POOL_SIZE" --max-client-conn 5000 >"$TMP/pgmux.log" 2>&1 &
PGMUX_PID=$!
if wait_port "$PGMUX_PORT" 10 && kill -0 "$PGMUX_PID" 2>/dev/null; then
    PGMUX_OK=1
else
    echo "WARNING: pgmux did not start listening; skipping it. Log:" >&2
    sed 's/^/    /' "$TMP/pgmux.log" >&2
fi

# --- PgBouncer ---------------------------------------------------------------
PGB_PORT=""
PGB_OK=0
if [ -n "$PGBOUNCER" ]; then
    PGB_PORT="$(free_port)"
    PGB_DIR="$TMP/pgbouncer"
    PGB_PIDFILE="$PGB_DIR/pgbouncer.pid"
    as_pg tee "$PGB_DIR/userlist.txt" >/dev/null <<'EOF'
"bench" "benchpw"
EOF
    as_pg tee "$PGB_DIR/pgbouncer.ini" >/dev/null <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $PGB_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 5000
max_db_connections = 0
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_PIDFILE
log_connections = 0
log_disconnections = 0
server_tls_sslmode = disable
EOF
    log "starting PgBouncer on 127.0.0.1:$PGB_PORT"
    # runuser resets the soft open-files limit to 1024 (PAM): raise it again in the
    # child, or PgBouncer stalls at about 1000 clients.
    if as_pg bash -c 'ulimit -n "$1" && shift && exec "$@"' _ "$(ulimit -n)" \
        "$PGBOUNCER" -d "$PGB_DIR/pgbouncer.ini" && wait_port "$PGB_PORT" 10; then
        PGB_OK=1
    else
        echo "WARNING: PgBouncer did not start; skipping it. Log:" >&2
        sed 's/^/    /' "$PGB_DIR/pgbouncer.log" >&2 2>/dev/null || true
    fi
fi

# --- measurement helpers ------------------------------------------------------
cpu_ticks() { # pid -> utime+stime (clock ticks, all threads)
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
    stat="${stat##*) }" # strip "pid (comm) " (comm may contain spaces)
    # shellcheck disable=SC2086
    set -- $stat
    # After stripping, field 1 is state (overall field 3): utime=14 -> 12, stime=15 -> 13.
    echo $(("${12}" + "${13}"))
}
peak_rss_mb() { # pid -> VmHWM in MB
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "-"
}

RESULTS=()
ROW_FMT='%-10s %-9s %8s %12s %11s %11s %17s %12s'
declare -A TPS

run_one() { # target port pid mode clients
    local target="$1" port="$2" pid="$3" mode="$4" clients="$5" out before after tps lat conn txns cpu rss
    # pgbench's -T clock starts before the clients connect, and 1000 SCRAM
    # logins take several seconds on a small machine; extend the run by a
    # connection allowance (the reported tps excludes connection time).
    local t=$((DURATION + clients / 100))
    log "pgbench $target: -M $mode -c $clients -T $t"
    before=0
    if [ -n "$pid" ]; then before="$(cpu_ticks "$pid")"; fi
    # A pooler that stops answering must not hang the whole run.
    if ! out="$(timeout --signal=KILL $((t * 2 + 60)) "$PG_BIN/pgbench" -n -S -T "$t" -c "$clients" -j 2 -M "$mode" \
        -h 127.0.0.1 -p "$port" -U bench bench 2>&1)"; then
        echo "pgbench against $target failed:" >&2
        echo "$out" | tail -n 5 | sed 's/^/    /' >&2
        RESULTS+=("$(printf "$ROW_FMT" "$target" "$mode" "$clients" FAILED - - - -)")
        return 0
    fi
    after=0
    if [ -n "$pid" ]; then after="$(cpu_ticks "$pid")"; fi
    printf '%s\n' "$out" >"$TMP/pgbench-$target-$mode-$clients.log"
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' <<<"$out")"
    lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out")"
    conn="$(sed -n 's/^initial connection time = \([0-9.]*\) ms.*/\1/p' <<<"$out")"
    txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")"
    if [ -z "$tps" ]; then
        if [ "${txns:-0}" = 0 ]; then
            echo "no transactions completed for $target -c $clients: connecting $clients clients" \
                "(SCRAM) took longer than the ${t}s run; use a larger --duration" >&2
        else
            echo "could not parse pgbench output for $target -c $clients:" >&2
            printf '%s\n' "$out" | tail -n 15 | sed 's/^/    /' >&2
        fi
    fi
    cpu="-"
    rss="-"
    if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        cpu="$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$txns" \
            'BEGIN { printf "%.2f", t / hz * 1e6 / n }')"
        rss="$(peak_rss_mb "$pid")"
    fi
    TPS["$target,$mode,$clients"]="${tps:-0}"
    if [ -n "$CSV" ]; then
        [ -s "$CSV" ] || echo "target,mode,clients,tps,lat_avg_ms,connect_ms,pooler_cpu_us_per_tx,peak_rss_mb" >"$CSV"
        echo "$target,$mode,$clients,${tps:-},${lat:-},${conn:-},${cpu/-/},${rss/-/}" >>"$CSV"
    fi
    RESULTS+=("$(printf "$ROW_FMT" "$target" "$mode" "$clients" "${tps:-?}" "${lat:-?}" "${conn:--}" "$cpu" "$rss")")
}

PGB_PID=""
if [ "$PGB_OK" -eq 1 ]; then PGB_PID="$(cat "$PGB_PIDFILE")"; fi

PGB_PREPARED=0
if [ "$PGB_OK" -eq 1 ]; then
    PGB_VERSION="$(pgbouncer --version 2>/dev/null | sed -n 's/^PgBouncer \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)"
    read -r PGB_MAJOR PGB_MINOR <<<"${PGB_VERSION:-0 0}"
    if [ "$PGB_MAJOR" -gt 1 ] || { [ "$PGB_MAJOR" -eq 1 ] && [ "$PGB_MINOR" -ge 21 ]; }; then
        PGB_PREPARED=1
    fi
fi
for mode in $MODES; do
    for c in $CLIENTS; do
        if [ "$c" -le "$DIRECT_MAX_CLIENTS" ]; then
            run_one direct "$PG_PORT" "" "$mode" "$c"
        fi
        if [ "$PGMUX_OK" -eq 1 ]; then run_one pgmux "$PGMUX_PORT" "$PGMUX_PID" "$mode" "$c"; fi
        if [ "$PGB_OK" -eq 1 ]; then
            if [ "$mode" = prepared ] && [ "$PGB_PREPARED" -eq 0 ]; then
                log "skipping PgBouncer -M prepared: $(pgbouncer --version | head -n1) has no prepared statements in transaction mode (1.21+)"
                RESULTS+=("$(printf "$ROW_FMT" pgbouncer "$mode" "$c" unsupported - - - -)")
            else
                run_one pgbouncer "$PGB_PORT" "$PGB_PID" "$mode" "$c"
            fi
        fi
    done
done

LOGIN_RESULTS=()
if [ "$LOGINS" -gt 0 ]; then
    for target in pgmux pgbouncer; do
        case "$target" in
            pgmux) ok="$PGMUX_OK"; port="${PGMUX_PORT:-}"; pid="${PGMUX_PID:-}" ;;
            pgbouncer) ok="$PGB_OK"; port="${PGB_PORT:-}"; pid="${PGB_PID:-}" ;;
        esac
        [ "$ok" -eq 1 ] || continue
        log "$LOGINS SCRAM logins at once: $target"
        if line="$(python3 "$ROOT/benches/scram_logins.py" --port "$port" --pid "$pid" \
            --user bench --password benchpw --db bench --clients "$LOGINS" 2>&1)"; then
            LOGIN_RESULTS+=("$(printf '%-10s %s' "$target" "$line")")
        else
            LOGIN_RESULTS+=("$(printf '%-10s FAILED: %s' "$target" "$(tail -n1 <<<"$line")")")
        fi
    done
fi

# --- report --------------------------------------------------------------------
ratio() { # a b
    awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'
}
echo
echo "pgbench -S -j 2, modes: $MODES, ${DURATION}s per run (+clients/100 s connection allowance)," \
    "pool size $POOL_SIZE, scale $SCALE, $(nproc) CPUs"
echo "tps excludes connection time; pooler cpu/tx includes the SCRAM logins of all clients."
printf "$ROW_FMT\n" target mode clients tps "lat avg ms" "connect ms" "pooler cpu us/tx" "peak rss MB"
printf '%s\n' "${RESULTS[@]}"
echo
printf '%-9s %8s %18s %16s\n' mode clients "pgmux/pgbouncer" "pgmux/direct"
for mode in $MODES; do
    for c in $CLIENTS; do
        printf '%-9s %8s %18s %16s\n' "$mode" "$c" \
            "$(ratio "${TPS[pgmux,$mode,$c]:-0}" "${TPS[pgbouncer,$mode,$c]:-0}")" \
            "$(ratio "${TPS[pgmux,$mode,$c]:-0}" "${TPS[direct,$mode,$c]:-0}")"
    done
done
if [ "$PGB_OK" -eq 1 ]; then
    echo
    printf '%-9s %8s %20s\n' mode clients "pgbouncer/direct"
    for mode in $MODES; do
        for c in $CLIENTS; do
            printf '%-9s %8s %20s\n' "$mode" "$c" "$(ratio "${TPS[pgbouncer,$mode,$c]:-0}" "${TPS[direct,$mode,$c]:-0}")"
        done
    done
fi
if [ "${#LOGIN_RESULTS[@]}" -gt 0 ]; then
    echo
    echo "SCRAM logins at once (client caches its PBKDF2 per salt; see benches/scram_logins.py):"
    printf '%s\n' "${LOGIN_RESULTS[@]}"
fi
