#!/usr/bin/env bash
# shellcheck disable=SC2059  # the table formats are variables on purpose
# Load benchmark: pgmux vs PgBouncer vs PostgreSQL direct, every scenario of the
# performance targets (issue 4) in one run, ending with a PASS/MISS "Targets" table.
#
# Usage: benches/load.sh [--duration SECONDS] [--scenarios "NAME ..."|all] [--pool-size 20]
#                        [--logins 1000] [--idle-clients 10000] [--csv FILE] [--no-build]
#                        [--clients "50 1000"] [--modes "simple extended prepared"] [--floor]
#                        [--rounds N]
#
# Builds pgmux (release), starts a throwaway PostgreSQL on 127.0.0.1 (max_connections 200),
# loads `pgbench -i -s 10`, starts pgmux and PgBouncer (transaction pooling, same pool size,
# SCRAM clients), then runs the scenarios (default: all), each against direct (only when
# clients <= 100), pgmux and PgBouncer; pgbench always gets -n -T DURATION(+clients/40 s
# for connecting) -l (per-transaction log, for p99):
#   select50    pgbench -S -M simple   -c 50   -j 2
#   select1000  pgbench -S -M simple   -c 1000 -j 2   (no direct; peak RSS of the poolers)
#   extended50  pgbench -S -M extended -c 50   -j 2
#   prepared50  pgbench -S -M prepared -c 50   -j 2   (PgBouncer < 1.21: unsupported)
#   tpcb50      pgbench    -M simple   -c 50   -j 2   (default TPC-B-like script)
#   churn       pgbench -S -C -M simple -c 20  -j 2   (new connection + SCRAM login per tx)
#   single      pgbench -S -M simple   -c 1    -j 1   (latency overhead over direct)
#   idle10k     --idle-clients N idle clients (benches/idle_clients.py) on a second, trust
#               pgmux and PgBouncer: RSS growth per client over the RSS before they connect
#   logins      --logins N SCRAM clients at once (benches/scram_logins.py): time until all
#               are ready, refused logins, pooler CPU per login
# Reported per pgbench run: TPS (without initial connection time; with -C including
# reconnections), average latency (pgbench's), p99 latency (from the -l log), connection
# time, pooler CPU per transaction ((utime+stime) / transactions, logins included) and the
# pooler's peak RSS during the run (VmHWM, reset before each run through
# /proc/PID/clear_refs; where that is refused, the peak so far).
#
# --clients/--modes additionally run the old sweep, pgbench -S -j 2 -M MODE -c N for every
# mode and client count (what benches/plot.sh plots from --csv). When either is given
# without --scenarios, only the sweep runs (plus logins if --logins is given).
# --logins 0 drops the logins scenario. --no-build uses target/release/pgmux as it is.
# --floor adds a "relay" target wherever direct runs: proxy/examples/relay_floor, a relay
# that only copies bytes (one upstream connection per client, no parsing, no pooling, one
# current-thread runtime, in a session of its own), the cost of one extra process hop on
# the machine, which no proxy can go below (built with pgmux unless --no-build).
# --rounds N runs every pgbench scenario N times, the targets taking turns (direct, relay,
# pgmux, PgBouncer, then again), and reports each figure's median over the rounds, plus
# the pgmux/PgBouncer TPS ratio of every round: on a small shared machine one run's ratio
# moves by about 5%, and alternating rounds put the same drift on both poolers.
# --csv appends one row per pgbench run (with --rounds, one row of medians): target,mode,clients,tps,lat_avg_ms,connect_ms,
# pooler_cpu_us_per_tx,peak_rss_mb,p99_ms,scenario (scenario "sweep" for sweep rows; mode is
# "tpcb" for tpcb50 and "simple-connect" for churn). Everything is cleaned up on exit;
# a failing run prints FAILED and the rest continue.
set -euo pipefail

DURATION=30
CLIENTS="50 1000"
MODES="simple"
POOL_SIZE=20
SCALE=10
DIRECT_MAX_CLIENTS=100
CONNECT_ALLOWANCE_DIV=40 # -T gets +clients/40 s for connecting
LOGINS=1000
IDLE_CLIENTS=10000
CSV=""
BUILD=1
FLOOR=0
ROUNDS=1
SCENARIOS=""
SCENARIOS_SET=0
SWEEP_SET=0
LOGINS_SET=0
ALL_SCENARIOS="select50 select1000 extended50 prepared50 tpcb50 churn single idle10k logins"

usage() {
    awk 'NR == 1 || /^# shellcheck/ { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        --clients) CLIENTS="$2"; SWEEP_SET=1; shift 2 ;;
        --clients=*) CLIENTS="${1#*=}"; SWEEP_SET=1; shift ;;
        --modes) MODES="$2"; SWEEP_SET=1; shift 2 ;;
        --modes=*) MODES="${1#*=}"; SWEEP_SET=1; shift ;;
        --pool-size) POOL_SIZE="$2"; shift 2 ;;
        --pool-size=*) POOL_SIZE="${1#*=}"; shift ;;
        --logins) LOGINS="$2"; LOGINS_SET=1; shift 2 ;;
        --logins=*) LOGINS="${1#*=}"; LOGINS_SET=1; shift ;;
        --idle-clients) IDLE_CLIENTS="$2"; shift 2 ;;
        --idle-clients=*) IDLE_CLIENTS="${1#*=}"; shift ;;
        --scenarios) SCENARIOS="$2"; SCENARIOS_SET=1; shift 2 ;;
        --scenarios=*) SCENARIOS="${1#*=}"; SCENARIOS_SET=1; shift ;;
        --csv) CSV="$2"; shift 2 ;;
        --csv=*) CSV="${1#*=}"; shift ;;
        --no-build) BUILD=0; shift ;;
        --floor) FLOOR=1; shift ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --rounds=*) ROUNDS="${1#*=}"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
for m in $MODES; do
    case "$m" in simple|extended|prepared) ;; *) echo "unknown mode: $m" >&2; exit 2 ;; esac
done
# shellcheck disable=SC2086
for v in "$DURATION" "$POOL_SIZE" "$LOGINS" "$IDLE_CLIENTS" "$ROUNDS" $CLIENTS; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "not a number: $v" >&2; exit 2; }
done
[ "$DURATION" -gt 0 ] || { echo "--duration must be > 0" >&2; exit 2; }
[ "$ROUNDS" -gt 0 ] || { echo "--rounds must be > 0" >&2; exit 2; }
[ "$IDLE_CLIENTS" -gt 0 ] || { echo "--idle-clients must be > 0" >&2; exit 2; }

if [ "$SCENARIOS_SET" -eq 0 ]; then
    if [ "$SWEEP_SET" -eq 1 ]; then
        SCENARIOS=""
        if [ "$LOGINS_SET" -eq 1 ]; then SCENARIOS="logins"; fi
    else
        SCENARIOS="all"
    fi
fi
RUN_SWEEP="$SWEEP_SET"
declare -A SCEN_ON=()
for s in $SCENARIOS; do
    if [ "$s" = all ]; then
        for a in $ALL_SCENARIOS; do SCEN_ON[$a]=1; done
    elif [[ " $ALL_SCENARIOS " == *" $s "* ]]; then
        SCEN_ON[$s]=1
    else
        echo "unknown scenario: $s (known: $ALL_SCENARIOS all)" >&2
        exit 2
    fi
done
if [ "$LOGINS" -eq 0 ]; then unset 'SCEN_ON[logins]'; fi
scen_on() { [ -n "${SCEN_ON[$1]:-}" ]; }
SCEN_LIST=""
for s in $ALL_SCENARIOS; do
    if scen_on "$s"; then SCEN_LIST="$SCEN_LIST $s"; fi
done
SCEN_LIST="${SCEN_LIST# }"
PGBENCH_SCENARIOS=""
for s in $SCEN_LIST; do
    case "$s" in idle10k|logins) ;; *) PGBENCH_SCENARIOS="$PGBENCH_SCENARIOS $s" ;; esac
done
if [ -z "$SCEN_LIST" ] && [ "$RUN_SWEEP" -eq 0 ]; then
    echo "nothing to run: no scenarios selected and no --clients/--modes sweep" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
log "scenarios: ${SCEN_LIST:-none}$([ "$RUN_SWEEP" -eq 1 ] && echo "; sweep: modes '$MODES' x clients '$CLIENTS'")"

# --- tools ---------------------------------------------------------------------
PG_BIN="$(find_pg_bindir)" || {
    echo "PostgreSQL server binaries not found; install with: apt-get install -y postgresql" >&2
    exit 1
}
[ -x "$PG_BIN/pgbench" ] || { echo "pgbench not found in $PG_BIN" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }

PGBOUNCER="${PGBOUNCER:-$(command -v pgbouncer || true)}"
if [ -z "$PGBOUNCER" ] && [ -x /usr/sbin/pgbouncer ]; then PGBOUNCER=/usr/sbin/pgbouncer; fi
if [ -z "$PGBOUNCER" ]; then
    echo "NOTE: pgbouncer not found; install it with: apt-get install -y pgbouncer" >&2
    echo "      continuing without PgBouncer." >&2
fi
PGB_VERSION_STR=""
PGB_PREPARED=0
if [ -n "$PGBOUNCER" ]; then
    PGB_VERSION_STR="$("$PGBOUNCER" --version 2>/dev/null | head -n1 || true)"
    read -r PGB_MAJOR PGB_MINOR <<<"$(sed -n 's/^PgBouncer \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' <<<"$PGB_VERSION_STR" | head -n1)" || true
    PGB_MAJOR="${PGB_MAJOR:-0}"
    PGB_MINOR="${PGB_MINOR:-0}"
    if [ "$PGB_MAJOR" -gt 1 ] || { [ "$PGB_MAJOR" -eq 1 ] && [ "$PGB_MINOR" -ge 21 ]; }; then
        PGB_PREPARED=1
    fi
fi


# 1000 active / 10,000 idle clients need that many fds in pgbench, the Python clients and
# the poolers (inherited; PgBouncer's is raised again after runuser, see start_pgbouncer).
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"
if scen_on idle10k && [ "$(ulimit -n)" -lt $((IDLE_CLIENTS + 1000)) ]; then
    log "WARNING: open files limit $(ulimit -n) is too low for $IDLE_CLIENTS idle clients"
fi

CLK_TCK="$(getconf CLK_TCK)"

# --- processes and cleanup ---------------------------------------------------
TMP=""
MUX_PIDS=()      # pgmux instances started by this run (children of this shell)
PGB_PIDFILES=()  # PgBouncer instances started by this run (daemonized, by pidfile)
PG_STARTED=0

stop_pid() { # pid: SIGTERM, up to 5 s, then SIGKILL
    local p="$1"
    alive "$p" || return 0
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do alive "$p" || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    for _ in $(seq 20); do alive "$p" || return 0; sleep 0.1; done
}
stop_pgmux() { # pid
    local p="$1" keep=() q
    stop_pid "$p"
    wait "$p" 2>/dev/null || true
    for q in "${MUX_PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    MUX_PIDS=("${keep[@]}")
}
stop_pgbouncer() { # pidfile
    local p
    if [ -s "$1" ]; then
        p="$(cat "$1")"
        stop_pid "$p"
    fi
    rm -f "$1"
}
cleanup() {
    set +e
    local p f
    for p in "${MUX_PIDS[@]}"; do stop_pid "$p"; wait "$p" 2>/dev/null; done
    for f in "${PGB_PIDFILES[@]}"; do
        if [ -s "$f" ]; then stop_pid "$(cat "$f")"; fi
    done
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -m immediate -w -t 30 stop >/dev/null 2>&1
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port seconds
    local _i
    for _i in $(seq $(($2 * 10))); do
        port_in_use "$1" && return 0
        sleep 0.1
    done
    return 1
}

# --- build pgmux -------------------------------------------------------------
build_pgmux
RELAY_BIN="$ROOT/target/release/examples/relay_floor"
if [ "$FLOOR" -eq 1 ]; then
    if [ "$BUILD" -eq 1 ]; then
        log "building relay_floor (release)"
        (cd "$ROOT" && cargo build --release -p pgmux-proxy --example relay_floor)
    fi
    [ -x "$RELAY_BIN" ] || { echo "$RELAY_BIN not found (build it, or drop --no-build)" >&2; exit 1; }
fi

# --- PostgreSQL --------------------------------------------------------------
make_tmp pgmux-bench

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
PG_STARTED=1
as_pg "$PG_BIN/pg_ctl" -D "$TMP/pgdata" -l "$TMP/postgres.log" -w -t 60 start >/dev/null ||
    { tail -n 20 "$TMP/postgres.log" >&2; exit 1; }

psql_su() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP/sock" -p "$PG_PORT" -U postgres "$@"; }
psql_su -d postgres -c "CREATE ROLE bench LOGIN PASSWORD 'benchpw'"
psql_su -d postgres -c "CREATE DATABASE bench OWNER bench"

export PGPASSWORD=benchpw
unset PGHOST PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGSSLMODE PGCONNECT_TIMEOUT || true
log "pgbench -i -s $SCALE"
timeout 600 "$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench \
    >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; exit 1; }

# --- poolers -----------------------------------------------------------------
STARTED_PID=""
start_pgmux() { # port auth_type("" = default SCRAM) max_client_conn logfile -> STARTED_PID
    local auth=() admin
    if [ -n "$2" ]; then auth=(PGMUX_AUTH_TYPE="$2"); fi
    admin="$(free_port)" || return 1
    env -u DATABASE_URL -u READ_DATABASE_URL -u PGMUX_CONFIG -u PGMUX_LISTEN \
        -u PGMUX_POOL_SIZE -u PGMUX_MAX_CLIENT_CONN -u PGMUX_AUTH_TYPE -u PGMUX_ADMIN_LISTEN \
        PGMUX_LOG="${PGMUX_LOG:-warn}" "${auth[@]}" \
        "${OWN_SESSION[@]}" "$PGMUX_BIN" --listen "127.0.0.1:$1" --admin-listen "127.0.0.1:$admin" \
        --database-url "postgres://bench:benchpw@127.0.0.1:$PG_PORT/bench" \
        --pool-size "$POOL_SIZE" --max-client-conn "$3" >"$4" 2>&1 &
    STARTED_PID=$!
    MUX_PIDS+=("$STARTED_PID")
    for _ in $(seq 100); do
        alive "$STARTED_PID" || break
        if port_in_use "$1"; then return 0; fi
        sleep 0.1
    done
    echo "WARNING: pgmux did not start listening on $1. Log:" >&2
    sed 's/^/    /' "$4" >&2
    stop_pgmux "$STARTED_PID"
    return 1
}
start_pgbouncer() { # dir port auth_type max_client_conn -> STARTED_PID
    local dir="$1" port="$2" extra=""
    as_pg mkdir -p "$dir"
    as_pg tee "$dir/userlist.txt" >/dev/null <<'EOF'
"bench" "benchpw"
EOF
    if [ "$PGB_PREPARED" -eq 1 ]; then extra="max_prepared_statements = 200"; fi
    as_pg tee "$dir/pgbouncer.ini" >/dev/null <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $3
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $4
max_db_connections = 0
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
server_tls_sslmode = disable
$extra
EOF
    PGB_PIDFILES+=("$dir/pgbouncer.pid")
    # runuser resets the soft open-files limit to 1024 (PAM): raise it again in the
    # child, or PgBouncer stalls at about 1000 clients.
    # shellcheck disable=SC2016
    if timeout 30 "${AS_PG[@]}" bash -c 'ulimit -n "$1" && shift && exec "$@"' _ "$(ulimit -n)" \
        "$PGBOUNCER" -d "$dir/pgbouncer.ini" && wait_port "$port" 10; then
        for _ in $(seq 20); do [ -s "$dir/pgbouncer.pid" ] && break; sleep 0.1; done
        STARTED_PID="$(cat "$dir/pgbouncer.pid" 2>/dev/null || true)"
        if [ -n "$STARTED_PID" ] && alive "$STARTED_PID"; then return 0; fi
    fi
    echo "WARNING: PgBouncer did not start on $port. Log:" >&2
    sed 's/^/    /' "$dir/pgbouncer.log" >&2 2>/dev/null || true
    stop_pgbouncer "$dir/pgbouncer.pid"
    return 1
}

# A port can be taken between free_port and bind: up to 3 ports are tried.
STARTED_PORT=""
start_pgmux_any() { # what auth_type max_client_conn logfile -> STARTED_PID STARTED_PORT
    local p
    for _ in 1 2 3; do
        p="$(free_port)" || return 1
        log "starting $1 on 127.0.0.1:$p"
        if start_pgmux "$p" "$2" "$3" "$4"; then STARTED_PORT="$p"; return 0; fi
        grep -q 'in use' "$4" 2>/dev/null || return 1
    done
    return 1
}
start_pgbouncer_any() { # what dir auth_type max_client_conn -> STARTED_PID STARTED_PORT
    local p
    for _ in 1 2 3; do
        p="$(free_port)" || return 1
        log "starting $1 on 127.0.0.1:$p ($PGB_VERSION_STR)"
        if start_pgbouncer "$2" "$p" "$3" "$4"; then STARTED_PORT="$p"; return 0; fi
        grep -q 'in use' "$2/pgbouncer.log" 2>/dev/null || return 1
        as_pg rm -f "$2/pgbouncer.log"
    done
    return 1
}

PGMUX_PORT=""
PGMUX_PID=""
PGMUX_OK=0
if start_pgmux_any pgmux "" 5000 "$TMP/pgmux.log"; then
    PGMUX_OK=1
    PGMUX_PID="$STARTED_PID"
    PGMUX_PORT="$STARTED_PORT"
else
    echo "WARNING: skipping pgmux" >&2
fi

RELAY_PORT=""
RELAY_PID=""
RELAY_OK=0
start_relay() { # port -> STARTED_PID; listening, and still alive a moment later (a bind
    # that failed because another process has the port ends the relay at once)
    "${OWN_SESSION[@]}" "$RELAY_BIN" "127.0.0.1:$1" "127.0.0.1:$PG_PORT" >"$TMP/relay.log" 2>&1 &
    STARTED_PID=$!
    MUX_PIDS+=("$STARTED_PID")
    for _ in $(seq 100); do
        alive "$STARTED_PID" || break
        if port_in_use "$1"; then
            sleep 0.2
            alive "$STARTED_PID" && return 0
            break
        fi
        sleep 0.1
    done
    stop_pgmux "$STARTED_PID"
    return 1
}
start_relay_any() { # -> STARTED_PID STARTED_PORT
    local p
    for _ in 1 2 3; do
        p="$(free_port)" || return 1
        log "starting relay_floor on 127.0.0.1:$p"
        if start_relay "$p"; then STARTED_PORT="$p"; return 0; fi
        grep -q 'in use' "$TMP/relay.log" 2>/dev/null || return 1
    done
    return 1
}
if [ "$FLOOR" -eq 1 ]; then
    if start_relay_any; then
        RELAY_OK=1
        RELAY_PID="$STARTED_PID"
        RELAY_PORT="$STARTED_PORT"
    else
        echo "WARNING: relay_floor did not start; skipping it. Log:" >&2
        sed 's/^/    /' "$TMP/relay.log" >&2
    fi
fi

PGB_PORT=""
PGB_PID=""
PGB_OK=0
if [ -n "$PGBOUNCER" ]; then
    if start_pgbouncer_any PgBouncer "$TMP/pgbouncer" scram-sha-256 5000; then
        PGB_OK=1
        PGB_PID="$STARTED_PID"
        PGB_PORT="$STARTED_PORT"
    else
        echo "WARNING: skipping PgBouncer" >&2
    fi
fi

# --- measurement helpers ------------------------------------------------------
peak_rss_mb() { # pid -> VmHWM in MB
    local v
    v="$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || true)"
    echo "${v:--}"
}
# VmHWM only grows; where allowed, reset it before each run so the figure is that run's peak.
HWM_RESET=0
for p in $PGMUX_PID $PGB_PID; do
    if { echo 5 >"/proc/$p/clear_refs"; } 2>/dev/null; then HWM_RESET=1; fi
done
if [ "$HWM_RESET" -eq 1 ]; then HWM_NOTE="peak during the run (VmHWM, reset before each run)"
else HWM_NOTE="peak so far (VmHWM is monotonic: read right after each run)"; fi
reset_hwm() { # pid
    if [ "$HWM_RESET" -eq 1 ] && [ -n "$1" ]; then
        { echo 5 >"/proc/$1/clear_refs"; } 2>/dev/null || true
    fi
}

p99_ms() { # log prefix -> 99th percentile (nearest rank) of column 3 (latency, us), in ms
    local files=("$1".*) n k v
    [ -e "${files[0]}" ] || { echo "-"; return 0; }
    awk '$3 ~ /^[0-9]+$/ { print $3 }' "${files[@]}" >"$TMP/latencies"
    n="$(wc -l <"$TMP/latencies")"
    if [ "$n" -eq 0 ]; then rm -f "$TMP/latencies"; echo "-"; return 0; fi
    k=$(((n * 99 + 99) / 100))
    v="$(LC_ALL=C sort -n -S 64M -T "$TMP" "$TMP/latencies" | sed -n "${k}{p;q}")"
    rm -f "$TMP/latencies"
    awk -v v="$v" 'BEGIN { printf "%.3f", v / 1000 }'
}

fmt0() { if isnum "$1"; then awk -v v="$1" 'BEGIN { printf "%.0f", v }'; else printf '%s' "$1"; fi; }
isnum() { [[ "${1:-}" =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { # a b -> a/b, 2 decimals, or "-"
    if isnum "${1:-}" && isnum "${2:-}"; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'
    else
        printf -- "-"
    fi
}
pct_over() { # a b -> (a/b - 1) * 100 as "+1.2%", or "-"
    if isnum "${1:-}" && isnum "${2:-}"; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%+.1f%%", (a / b - 1) * 100; else printf "-" }'
    else
        printf -- "-"
    fi
}

# Results, keyed "KEY|TARGET" (KEY = scenario name, or sweep:MODE:CLIENTS).
declare -A R_TPS=() R_LAT=() R_P99=() R_CPU=() R_RSS=() R_STATUS=()
# Per round, space-separated, until finish_result: the figures of every run of a target.
declare -A ACC_TPS=() ACC_LAT=() ACC_P99=() ACC_CONN=() ACC_CPU=() ACC_RSS=() ACC_FAILED=()
SWEEP_ROWS=()
SCEN_ROWS=()
SWEEP_FMT='%-10s %-9s %8s %10s %11s %9s %11s %17s %12s'
SCEN_FMT='%-11s %-10s %10s %11s %9s %11s %17s %12s'

add_row() { # label target mode clients tps lat p99 conn cpu rss
    if [ "$1" = sweep ]; then
        SWEEP_ROWS+=("$(printf "$SWEEP_FMT" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}")")
    else
        SCEN_ROWS+=("$(printf "$SCEN_FMT" "$1" "$2" "$5" "$6" "$7" "$8" "$9" "${10}")")
    fi
}

run_pgbench() { # target port pid label mode clients jobs csvmode [pgbench flags...]
    local target="$1" port="$2" pid="$3" label="$4" mode="$5" clients="$6" jobs="$7" csvmode="$8"
    shift 8
    local flags=("$@") key out rc before after tps lat conn txns cpu rss p99 prefix
    if [ "$label" = sweep ]; then key="sweep:$mode:$clients"; else key="$label"; fi
    # pgbench's -T clock starts before the clients connect, and each pgbench thread
    # logs its clients in one after the other: 1000 SCRAM logins through PgBouncer
    # (PBKDF2 on both sides for every login) took over 13 s on a noisy 2-core machine.
    # Extend the run by a connection allowance (the reported tps excludes connection time).
    local t=$((DURATION + clients / CONNECT_ALLOWANCE_DIV))
    prefix="$TMP/pgblog-$target-${key//[^A-Za-z0-9]/_}"
    log "pgbench $target [$label]: ${flags[*]} -M $mode -c $clients -j $jobs -T $t"
    reset_hwm "$pid"
    before=0
    if [ -n "$pid" ]; then before="$(cpu_ticks "$pid")"; fi
    # A pooler that stops answering must not hang the whole run.
    rc=0
    out="$(timeout --signal=KILL $((t * 2 + 60)) "$PG_BIN/pgbench" -n "${flags[@]}" -T "$t" \
        -c "$clients" -j "$jobs" -M "$mode" -l --log-prefix="$prefix" \
        -h 127.0.0.1 -p "$port" -U bench bench 2>&1)" || rc=$?
    after=0
    if [ -n "$pid" ]; then after="$(cpu_ticks "$pid")"; fi
    rss="-"
    if [ -n "$pid" ]; then rss="$(peak_rss_mb "$pid")"; fi
    printf '%s\n' "$out" >"$TMP/pgbench-$target-${key//[^A-Za-z0-9]/_}.log"
    if [ "$rc" -ne 0 ]; then
        rm -f "$prefix".*
        echo "FAILED: pgbench against $target [$label] (exit $rc$([ "$rc" -eq 137 ] && echo ", killed by timeout")):" >&2
        { grep -m1 -i 'error\|abort' <<<"$out" || true; tail -n 4 <<<"$out"; } | sed 's/^/    /' >&2
        ACC_FAILED["$key|$target"]=1
        return 0
    fi
    tps="$(sed -n 's/^tps = \([0-9.]*\) (.*/\1/p' <<<"$out" | head -n1)"
    lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -n1)"
    conn="$(sed -n 's/^\(initial\|average\) connection time = \([0-9.]*\) ms.*/\2/p' <<<"$out" | head -n1)"
    txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out" | head -n1)"
    p99="$(p99_ms "$prefix")"
    rm -f "$prefix".*
    if [ -z "$tps" ]; then
        if [ "${txns:-0}" = 0 ]; then
            echo "no transactions completed for $target [$label]: connecting $clients clients" \
                "(SCRAM) took longer than the ${t}s run; use a larger --duration" >&2
        else
            echo "could not parse pgbench output for $target [$label]:" >&2
            printf '%s\n' "$out" | tail -n 15 | sed 's/^/    /' >&2
        fi
    fi
    cpu="-"
    if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        cpu="$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$txns" \
            'BEGIN { printf "%.2f", t / hz * 1e6 / n }')"
    fi
    # One round's figures; finish_result reports them (their medians, over rounds).
    ACC_TPS["$key|$target"]+="${tps:--} "
    ACC_LAT["$key|$target"]+="${lat:--} "
    ACC_P99["$key|$target"]+="$p99 "
    ACC_CONN["$key|$target"]+="${conn:--} "
    ACC_CPU["$key|$target"]+="$cpu "
    ACC_RSS["$key|$target"]+="$rss "
}

median() { # printf-format values... -> the median of the numeric values, or "-"
    local f="$1"
    shift
    printf '%s\n' "$@" | awk '/^[0-9]+(\.[0-9]+)?$/' | LC_ALL=C sort -g | awk -v f="$f" '
        { a[NR] = $1 }
        END {
            if (NR == 0) { printf "-"; exit }
            printf f, (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        }'
}

finish_result() { # target label mode clients csvmode: report the rounds of one target
    local target="$1" label="$2" mode="$3" clients="$4" csvmode="$5" key tps lat p99 conn cpu rss
    if [ "$label" = sweep ]; then key="sweep:$mode:$clients"; else key="$label"; fi
    if [ -n "${ACC_FAILED[$key|$target]:-}" ]; then
        R_STATUS["$key|$target"]=FAILED
        add_row "$label" "$target" "$mode" "$clients" FAILED - - - - -
        return 0
    fi
    # shellcheck disable=SC2086  # the accumulated lists split on spaces
    {
        tps="$(median '%.6f' ${ACC_TPS[$key|$target]})"
        lat="$(median '%.3f' ${ACC_LAT[$key|$target]})"
        p99="$(median '%.3f' ${ACC_P99[$key|$target]})"
        conn="$(median '%.3f' ${ACC_CONN[$key|$target]})"
        cpu="$(median '%.2f' ${ACC_CPU[$key|$target]})"
        rss="$(median '%.1f' ${ACC_RSS[$key|$target]})"
    }
    [ "$tps" = - ] && tps=""
    [ "$lat" = - ] && lat=""
    [ "$conn" = - ] && conn=""
    R_TPS["$key|$target"]="$tps"
    R_LAT["$key|$target"]="$lat"
    R_P99["$key|$target"]="$p99"
    R_CPU["$key|$target"]="$cpu"
    R_RSS["$key|$target"]="$rss"
    R_STATUS["$key|$target"]=ok
    if [ -n "$CSV" ]; then
        [ -s "$CSV" ] || echo "target,mode,clients,tps,lat_avg_ms,connect_ms,pooler_cpu_us_per_tx,peak_rss_mb,p99_ms,scenario" >"$CSV"
        echo "$target,$csvmode,$clients,$tps,$lat,$conn,${cpu/-/},${rss/-/},${p99/-/},$label" >>"$CSV"
    fi
    add_row "$label" "$target" "$mode" "$clients" "$(fmt0 "${tps:-?}")" "${lat:-?}" "$p99" "${conn:--}" "$cpu" "$rss"
}

pgb_unsupported() { # label mode clients
    local key
    if [ "$1" = sweep ]; then key="sweep:$2:$3"; else key="$1"; fi
    log "skipping PgBouncer -M $2 [$1]: $PGB_VERSION_STR has no prepared statements in transaction mode (1.21+)"
    R_STATUS["$key|pgbouncer"]=unsupported
    if [ "$1" = sweep ]; then
        SWEEP_ROWS+=("$(printf '%-10s %-9s %8s %s' pgbouncer "$2" "$3" "unsupported (PgBouncer < 1.21)")")
    else
        SCEN_ROWS+=("$(printf '%-11s %-10s %s' "$1" pgbouncer "unsupported (PgBouncer < 1.21)")")
    fi
}

run_all_targets() { # label mode clients jobs csvmode [pgbench flags...]
    local label="$1" mode="$2" clients="$3" jobs="$4" csvmode="$5" targets=() t round
    shift 5
    if [ "$clients" -le "$DIRECT_MAX_CLIENTS" ]; then
        targets+=(direct)
        if [ "$RELAY_OK" -eq 1 ]; then targets+=(relay); fi
    fi
    if [ "$PGMUX_OK" -eq 1 ]; then targets+=(pgmux); fi
    local pgb_unsupported=0
    if [ "$PGB_OK" -eq 1 ]; then
        if [ "$mode" = prepared ] && [ "$PGB_PREPARED" -eq 0 ]; then
            pgb_unsupported=1
        else
            targets+=(pgbouncer)
        fi
    fi
    for round in $(seq "$ROUNDS"); do
        [ "$ROUNDS" -eq 1 ] || log "round $round of $ROUNDS [$label]"
        for t in "${targets[@]}"; do
            case "$t" in
                direct) run_pgbench direct "$PG_PORT" "" "$label" "$mode" "$clients" "$jobs" "$csvmode" "$@" ;;
                relay) run_pgbench relay "$RELAY_PORT" "$RELAY_PID" "$label" "$mode" "$clients" "$jobs" "$csvmode" "$@" ;;
                pgmux) run_pgbench pgmux "$PGMUX_PORT" "$PGMUX_PID" "$label" "$mode" "$clients" "$jobs" "$csvmode" "$@" ;;
                pgbouncer) run_pgbench pgbouncer "$PGB_PORT" "$PGB_PID" "$label" "$mode" "$clients" "$jobs" "$csvmode" "$@" ;;
            esac
        done
    done
    for t in "${targets[@]}"; do finish_result "$t" "$label" "$mode" "$clients" "$csvmode"; done
    if [ "$pgb_unsupported" -eq 1 ]; then pgb_unsupported "$label" "$mode" "$clients"; fi
}

# --- pgbench scenarios -----------------------------------------------------------
scenario_cmd() { # name -> "mode clients jobs csvmode flags..."
    case "$1" in
        select50) echo "simple 50 2 simple -S" ;;
        select1000) echo "simple 1000 2 simple -S" ;;
        extended50) echo "extended 50 2 extended -S" ;;
        prepared50) echo "prepared 50 2 prepared -S" ;;
        tpcb50) echo "simple 50 2 tpcb" ;;
        churn) echo "simple 20 2 simple-connect -S -C" ;;
        single) echo "simple 1 1 simple -S" ;;
    esac
}
for s in $PGBENCH_SCENARIOS; do
    # shellcheck disable=SC2046
    run_all_targets "$s" $(scenario_cmd "$s")
done

if [ "$RUN_SWEEP" -eq 1 ]; then
    for mode in $MODES; do
        for c in $CLIENTS; do
            run_all_targets sweep "$mode" "$c" 2 "$mode" -S
        done
    done
fi

# --- idle clients --------------------------------------------------------------
declare -A I_LINE=() I_PER=() I_BEFORE=() I_OK=() I_FAILED=()
idle_parse() { # target line
    local kv k v
    I_LINE[$1]="$2"
    for kv in $2; do
        k="${kv%%=*}"; v="${kv#*=}"
        case "$k" in
            per_client_kib) I_PER[$1]="$v" ;;
            rss_before_kib) I_BEFORE[$1]="$v" ;;
            ok) I_OK[$1]="$v" ;;
            failed) I_FAILED[$1]="$v" ;;
        esac
    done
}
run_idle() { # target port pid
    local out
    log "$IDLE_CLIENTS idle clients: $1"
    if out="$(timeout --signal=KILL $((120 + IDLE_CLIENTS / 50)) python3 "$ROOT/benches/idle_clients.py" \
        --port "$2" --pid "$3" --clients "$IDLE_CLIENTS" --user bench --db bench 2>&1)"; then
        idle_parse "$1" "$(tail -n1 <<<"$out")"
    else
        echo "FAILED: idle clients against $1:" >&2
        tail -n 5 <<<"$out" | sed 's/^/    /' >&2
        I_LINE[$1]="FAILED: $(tail -n1 <<<"$out")"
    fi
}
if scen_on idle10k; then
    # Separate instances with trust logins (so the Python client does no SCRAM work) and
    # room for the clients; the baseline is their RSS before the clients connect.
    idle_max=$((IDLE_CLIENTS + 1000))
    if [ -x "$PGMUX_BIN" ]; then
        if start_pgmux_any "a trust pgmux for idle clients" trust "$idle_max" "$TMP/pgmux-idle.log"; then
            ipid="$STARTED_PID"
            run_idle pgmux "$STARTED_PORT" "$ipid"
            stop_pgmux "$ipid"
        else
            I_LINE[pgmux]="FAILED: could not start a trust pgmux"
        fi
    fi
    if [ -n "$PGBOUNCER" ]; then
        if start_pgbouncer_any "a trust PgBouncer for idle clients" "$TMP/pgbouncer-idle" trust "$idle_max"; then
            run_idle pgbouncer "$STARTED_PORT" "$STARTED_PID"
            stop_pgbouncer "$TMP/pgbouncer-idle/pgbouncer.pid"
        else
            I_LINE[pgbouncer]="FAILED: could not start a trust PgBouncer"
        fi
    fi
fi

# --- SCRAM logins at once ------------------------------------------------------
declare -A L_LINE=() L_READY=() L_OK=() L_FAILED=()
if scen_on logins; then
    for target in pgmux pgbouncer; do
        case "$target" in
            pgmux) ok="$PGMUX_OK"; port="$PGMUX_PORT"; pid="$PGMUX_PID" ;;
            pgbouncer) ok="$PGB_OK"; port="$PGB_PORT"; pid="$PGB_PID" ;;
        esac
        [ "$ok" -eq 1 ] || continue
        log "$LOGINS SCRAM logins at once: $target"
        if line="$(timeout --signal=KILL $((150 + LOGINS / 20)) python3 "$ROOT/benches/scram_logins.py" \
            --port "$port" --pid "$pid" --user bench --password benchpw --db bench \
            --clients "$LOGINS" --timeout 120 2>&1)"; then
            line="$(tail -n1 <<<"$line")"
            L_LINE[$target]="$line"
            for kv in $line; do
                case "${kv%%=*}" in
                    all_ready_s) L_READY[$target]="${kv#*=}" ;;
                    ok) L_OK[$target]="${kv#*=}" ;;
                    failed) L_FAILED[$target]="${kv#*=}" ;;
                esac
            done
        else
            echo "FAILED: SCRAM logins against $target:" >&2
            tail -n 5 <<<"$line" | sed 's/^/    /' >&2
            L_LINE[$target]="FAILED: $(tail -n1 <<<"$line")"
        fi
    done
fi

# --- report --------------------------------------------------------------------
echo
echo "pgmux vs PgBouncer ($PGB_VERSION_STR) vs direct: ${DURATION}s per pgbench run" \
    "(+clients/$CONNECT_ALLOWANCE_DIV s connection allowance), pool size $POOL_SIZE, scale $SCALE, $(nproc) CPUs"
if [ "$ROUNDS" -gt 1 ]; then
    echo "every pgbench figure is the median of $ROUNDS rounds, the targets taking turns in each"
fi
echo "tps excludes connection time (churn: includes reconnections); lat avg is pgbench's" \
    "(churn: includes connecting); p99 from the -l log (churn: a pgbench thread blocks while" \
    "one client connects, so the others' transactions wait too);"
echo "connect ms: initial connection time (churn: average per connection); pooler cpu/tx" \
    "includes the SCRAM logins of the run; peak rss: $HWM_NOTE."

if [ "${#SWEEP_ROWS[@]}" -gt 0 ]; then
    echo
    echo "Sweep: pgbench -S -j 2, modes: $MODES, clients: $CLIENTS"
    printf "$SWEEP_FMT\n" target mode clients tps "lat avg ms" "p99 ms" "connect ms" "pooler cpu us/tx" "peak rss MB"
    printf '%s\n' "${SWEEP_ROWS[@]}"
    echo
    printf '%-9s %8s %18s %16s %20s\n' mode clients "pgmux/pgbouncer" "pgmux/direct" "pgbouncer/direct"
    for mode in $MODES; do
        for c in $CLIENTS; do
            k="sweep:$mode:$c"
            printf '%-9s %8s %18s %16s %20s\n' "$mode" "$c" \
                "$(ratio "${R_TPS[$k|pgmux]:-}" "${R_TPS[$k|pgbouncer]:-}")" \
                "$(ratio "${R_TPS[$k|pgmux]:-}" "${R_TPS[$k|direct]:-}")" \
                "$(ratio "${R_TPS[$k|pgbouncer]:-}" "${R_TPS[$k|direct]:-}")"
        done
    done
fi

if [ "${#SCEN_ROWS[@]}" -gt 0 ]; then
    echo
    echo "Scenarios (pgbench -n -T, -l):"
    for s in $PGBENCH_SCENARIOS; do
        read -r m c j _ f <<<"$(scenario_cmd "$s")"
        printf '  %-11s pgbench %-5s -M %-8s -c %-4s -j %s\n' "$s" "${f:-}" "$m" "$c" "$j"
    done
    printf "$SCEN_FMT\n" scenario target tps "lat avg ms" "p99 ms" "connect ms" "pooler cpu us/tx" "peak rss MB"
    printf '%s\n' "${SCEN_ROWS[@]}"
    echo
    printf '%-11s %16s %13s %14s %15s %17s%s\n' scenario "pgmux/pgbouncer" "pgmux/direct" \
        "pgbouncer/dir" "p99 mux/pgb" "cpu/tx mux/pgb" "$([ "$FLOOR" -eq 1 ] && printf ' %13s %15s' relay/direct "cpu mux/relay")"
    for s in $PGBENCH_SCENARIOS; do
        printf '%-11s %16s %13s %14s %15s %17s%s\n' "$s" \
            "$(ratio "${R_TPS[$s|pgmux]:-}" "${R_TPS[$s|pgbouncer]:-}")" \
            "$(ratio "${R_TPS[$s|pgmux]:-}" "${R_TPS[$s|direct]:-}")" \
            "$(ratio "${R_TPS[$s|pgbouncer]:-}" "${R_TPS[$s|direct]:-}")" \
            "$(ratio "${R_P99[$s|pgmux]:-}" "${R_P99[$s|pgbouncer]:-}")" \
            "$(ratio "${R_CPU[$s|pgmux]:-}" "${R_CPU[$s|pgbouncer]:-}")" \
            "$([ "$FLOOR" -eq 1 ] && printf ' %13s %15s' "$(ratio "${R_TPS[$s|relay]:-}" "${R_TPS[$s|direct]:-}")" \
                "$(ratio "${R_CPU[$s|pgmux]:-}" "${R_CPU[$s|relay]:-}")")"
    done
    if [ "$ROUNDS" -gt 1 ]; then
        echo "pgmux/pgbouncer tps, round by round:"
        for s in $PGBENCH_SCENARIOS; do
            read -ra a <<<"${ACC_TPS[$s|pgmux]:-}"
            read -ra b <<<"${ACC_TPS[$s|pgbouncer]:-}"
            [ "${#b[@]}" -gt 0 ] || continue
            line=""
            for i in "${!a[@]}"; do line+=" $(ratio "${a[$i]}" "${b[$i]:-}")"; done
            printf '  %-11s%s\n' "$s" "${line:- -}"
        done
    fi
    if scen_on single; then
        echo "single: avg latency over direct: pgmux $(pct_over "${R_LAT[single|pgmux]:-}" "${R_LAT[single|direct]:-}")," \
            "PgBouncer $(pct_over "${R_LAT[single|pgbouncer]:-}" "${R_LAT[single|direct]:-}")$(
            [ "$FLOOR" -eq 1 ] && echo ", relay_floor $(pct_over "${R_LAT[single|relay]:-}" "${R_LAT[single|direct]:-}") (copies bytes only)")"
    fi
fi

if scen_on idle10k; then
    echo
    echo "$IDLE_CLIENTS idle clients (trust logins, separate pooler instances; benches/idle_clients.py):"
    for target in pgmux pgbouncer; do
        [ -n "${I_LINE[$target]:-}" ] || continue
        printf '%-10s %s\n' "$target" "${I_LINE[$target]}"
    done
fi
if scen_on logins; then
    echo
    echo "$LOGINS SCRAM logins at once (client caches its PBKDF2 per salt, 2 client processes; see benches/scram_logins.py):"
    for target in pgmux pgbouncer; do
        [ -n "${L_LINE[$target]:-}" ] || continue
        printf '%-10s %s\n' "$target" "${L_LINE[$target]}"
    done
fi

# --- targets -------------------------------------------------------------------
TARGET_ROWS=()
TFMT='%-48s %-70s %s'
trow() { TARGET_ROWS+=("$(printf "$TFMT" "$1" "$2" "$3")"); }
fcmp() { # a op b (op: ge, le, lt) -> exit status
    awk -v a="$1" -v b="$3" -v op="$2" \
        'BEGIN { exit !((op == "ge" && a >= b) || (op == "le" && a <= b) || (op == "lt" && a < b)) }'
}
pf() { if "$@"; then echo PASS; else echo MISS; fi; }
why_missing() { # key -> short reason for a missing result
    local st="${R_STATUS[$1|pgmux]:-}" sb="${R_STATUS[$1|pgbouncer]:-}"
    if [ "$st" = FAILED ] || [ "$sb" = FAILED ]; then echo "a run FAILED"; else echo "no result"; fi
}
t_tps() { # label scenario limit [pgbouncer scenario] [note]: pgmux tps >= limit x PgBouncer's
    local label="$1" s="$2" lim="$3" bs="${4:-$2}" note="${5:-}" a b r bl="PgBouncer"
    if [ "$bs" != "$s" ]; then bl="PgBouncer $bs"; fi
    if ! scen_on "$s"; then trow "$label" "not run (--scenarios)" "-"; return 0; fi
    if ! scen_on "$bs"; then trow "$label" "needs $bs too (--scenarios)" "-"; return 0; fi
    a="${R_TPS[$s|pgmux]:-}"; b="${R_TPS[$bs|pgbouncer]:-}"
    if ! isnum "$a" || ! isnum "$b"; then trow "$label" "$(why_missing "$s")" "n/a"; return 0; fi
    r="$(ratio "$a" "$b")"
    trow "$label" "${r}x (pgmux $(fmt0 "$a") / $bl $(fmt0 "$b") tps)$note" \
        "$(pf fcmp "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" ge "$lim")"
}

t_tps "select50 TPS >= 1.25x PgBouncer" select50 1.25
if ! scen_on select50; then trow "select50 TPS >= 0.85x direct" "not run (--scenarios)" "-"
elif isnum "${R_TPS[select50|pgmux]:-}" && isnum "${R_TPS[select50|direct]:-}"; then
    a="${R_TPS[select50|pgmux]}"; b="${R_TPS[select50|direct]}"
    trow "select50 TPS >= 0.85x direct" "$(ratio "$a" "$b")x (pgmux $(fmt0 "$a") / direct $(fmt0 "$b") tps)" \
        "$(pf fcmp "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" ge 0.85)"
else trow "select50 TPS >= 0.85x direct" "no result" "n/a"; fi

t_tps "select1000 TPS >= 1.25x PgBouncer" select1000 1.25
if ! scen_on select1000; then trow "select1000 p99 <= PgBouncer's" "not run (--scenarios)" "-"
elif isnum "${R_P99[select1000|pgmux]:-}" && isnum "${R_P99[select1000|pgbouncer]:-}"; then
    a="${R_P99[select1000|pgmux]}"; b="${R_P99[select1000|pgbouncer]}"
    trow "select1000 p99 <= PgBouncer's" "pgmux $a ms / PgBouncer $b ms" "$(pf fcmp "$a" le "$b")"
else trow "select1000 p99 <= PgBouncer's" "$(why_missing select1000)" "n/a"; fi

t_tps "extended50 TPS >= 1.0x PgBouncer" extended50 1.0
if [ "$PGB_PREPARED" -eq 1 ]; then
    t_tps "prepared50 TPS >= 1.0x PgBouncer (best mode)" prepared50 1.0
else
    t_tps "prepared50 TPS >= 1.0x PgBouncer (best mode)" prepared50 1.0 extended50 \
        "; ${PGB_MAJOR:-?}.${PGB_MINOR:-?} has no prepared"
fi
t_tps "tpcb50 TPS >= 1.0x PgBouncer" tpcb50 1.0
t_tps "churn TPS (with reconnects) >= 1.0x PgBouncer" churn 1.0

if ! scen_on select50; then trow "select50 pooler CPU/tx <= 0.8x PgBouncer's" "not run (--scenarios)" "-"
elif isnum "${R_CPU[select50|pgmux]:-}" && isnum "${R_CPU[select50|pgbouncer]:-}"; then
    a="${R_CPU[select50|pgmux]}"; b="${R_CPU[select50|pgbouncer]}"
    trow "select50 pooler CPU/tx <= 0.8x PgBouncer's" "$(ratio "$a" "$b")x (pgmux $a / PgBouncer $b us/tx)" \
        "$(pf fcmp "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')" le 0.8)"
else trow "select50 pooler CPU/tx <= 0.8x PgBouncer's" "$(why_missing select50)" "n/a"; fi

if ! scen_on single; then trow "single: latency overhead over direct <= 15%" "not run (--scenarios)" "-"
elif isnum "${R_LAT[single|pgmux]:-}" && isnum "${R_LAT[single|direct]:-}"; then
    a="${R_LAT[single|pgmux]}"; b="${R_LAT[single|direct]}"
    o="$(pct_over "$a" "$b")"
    trow "single: latency overhead over direct <= 15%" "${o} (pgmux $a ms / direct $b ms avg)" \
        "$(pf fcmp "$(awk -v a="$a" -v b="$b" 'BEGIN { print (a / b - 1) * 100 }')" le 15)"
else trow "single: latency overhead over direct <= 15%" "$(why_missing single)" "n/a"; fi

if ! scen_on idle10k; then trow "idle10k: <= 4 KiB per idle client" "not run (--scenarios)" "-"
elif isnum "${I_PER[pgmux]:-}" && [ "${I_FAILED[pgmux]:-1}" = 0 ] && [ "${I_OK[pgmux]:-}" = "$IDLE_CLIENTS" ]; then
    v="${I_PER[pgmux]} KiB/client over $(awk -v k="${I_BEFORE[pgmux]}" 'BEGIN { printf "%.1f", k / 1024 }') MB"
    v="$v (PgBouncer ${I_PER[pgbouncer]:-?})"
    [ "$IDLE_CLIENTS" -eq 10000 ] || v="$v, $IDLE_CLIENTS clients"
    trow "idle10k: <= 4 KiB per idle client" "$v" "$(pf fcmp "${I_PER[pgmux]}" le 4)"
elif isnum "${I_PER[pgmux]:-}"; then
    trow "idle10k: <= 4 KiB per idle client" "${I_PER[pgmux]} KiB/client but ${I_FAILED[pgmux]:-?} clients failed" MISS
else trow "idle10k: <= 4 KiB per idle client" "no result" "n/a"; fi

if ! scen_on select1000; then trow "select1000: peak RSS <= 20 MB" "not run (--scenarios)" "-"
elif isnum "${R_RSS[select1000|pgmux]:-}"; then
    a="${R_RSS[select1000|pgmux]}"
    if [ "$HWM_RESET" -eq 1 ]; then w="peak of the run"; else w="peak so far"; fi
    trow "select1000: peak RSS <= 20 MB" "pgmux $a MB, $w (PgBouncer ${R_RSS[select1000|pgbouncer]:--} MB)" \
        "$(pf fcmp "$a" le 20)"
else trow "select1000: peak RSS <= 20 MB" "$(why_missing select1000)" "n/a"; fi

if ! scen_on logins; then trow "logins: 1000 SCRAM all ready < 0.5 s, 0 refused" "not run (--scenarios / --logins 0)" "-"
elif isnum "${L_READY[pgmux]:-}"; then
    a="${L_READY[pgmux]}"
    v="$a s, ${L_FAILED[pgmux]:-?} refused (PgBouncer ${L_READY[pgbouncer]:-?} s, ${L_FAILED[pgbouncer]:-?} refused)"
    if fcmp "$a" lt 0.5 && [ "${L_FAILED[pgmux]:-1}" = 0 ] && [ "${L_OK[pgmux]:-}" = "$LOGINS" ]; then st=PASS; else st=MISS; fi
    if [ "$LOGINS" -ne 1000 ]; then v="$v, with $LOGINS clients"; st="n/a (--logins $LOGINS)"; fi
    trow "logins: 1000 SCRAM all ready < 0.5 s, 0 refused" "$v" "$st"
else trow "logins: 1000 SCRAM all ready < 0.5 s, 0 refused" "no result" "n/a"; fi

if [ -n "$SCEN_LIST" ]; then
    echo
    echo "Targets (issue 4) - pgmux, measured in this run:"
    printf "$TFMT\n" target measured result
    printf '%s\n' "${TARGET_ROWS[@]}"
fi
