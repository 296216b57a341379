#!/usr/bin/env bash
# shellcheck disable=SC2059  # the table format is a variable on purpose
# Read-routing benchmark: where pgmux sends the transactions of a read-only and of a
# 90/10 read/write pgbench load when it has streaming replicas, and what that costs.
#
# Usage: benches/replicas.sh [--duration SECONDS] [--replicas N] [--pool-size 20]
#                            [--idle SECONDS] [--scenarios "NAME ..."|all] [--no-build]
#                            [--mode simple|extended|prepared]
#
# Builds pgmux (release; --no-build uses target/release/pgmux as it is), initdb's a
# throwaway primary on 127.0.0.1 (fsync off, synchronous_commit off, wal_level replica,
# max_connections 200, SCRAM passwords), creates role bench/benchpw and database bench,
# loads `pgbench -i -s 10`, then clones N (default 1) streaming replicas with
# `pg_basebackup -R -X stream -c fast` over the primary's unix socket, each on its own port,
# and waits until they have replayed the primary's current position.
#
# Every scenario starts its own pgmux (PGMUX_LOG=warn, --pool-size, --read-database-url =
# every replica) and runs `pgbench -n -j 2 -c 50 -T DURATION -M MODE` (default 15 s, simple
# protocol: every query text carries its literal aid, so pgmux's classification cache
# never hits and each read is parsed) through it:
#   ro_auto           -S                                     read_routing auto
#   ro_primary_only   -S                                     read_routing primary_only
#   mix_user          -b select-only@9 -b simple-update@1   read_your_writes user (default)
#   mix_client        same                                   read_your_writes client
#   mix_off           same                                   read_your_writes off
#   mix_primary_only  same                                   read_routing primary_only
#
# Where the transactions went is measured on the PostgreSQL side: the delta of
# xact_commit + xact_rollback of database bench in pg_stat_database on the primary and on
# every replica, read before pgmux starts and after it has exited (SIGTERM; its server
# connections close, their backends flush their statistics on exit, and we wait until they
# are gone, plus 1 s), minus one start-up transaction per session opened (every new
# session commits one; delta of pg_stat_database.sessions). pgmux's health checks (one
# query per node every 100 ms, only when replicas are in use, i.e. not with primary_only)
# are measured first, over an idle period of --idle seconds (default: the duration) with
# pgmux running, and subtracted from each scenario as rate x the time pgmux ran.
# Reported per scenario: TPS and average latency (pgbench's, without connection time),
# primary and replica transactions, the replica share of all transactions and of the reads
# (reads = primary + replica - writes, writes = the simple-update transactions pgbench
# reports for its second script), "extra" = primary + replica - pgbench's transactions
# (e.g. pgmux's parameter SETs on a fresh server connection, autovacuum; small, and counted
# as reads in the read share) and pgmux CPU per transaction ((utime + stime) during the
# run / pgbench transactions, the 50 SCRAM logins included).
# Everything is cleaned up on exit; a failing scenario prints FAILED and the rest continue.
set -euo pipefail

DURATION=15
REPLICAS=1
POOL_SIZE=20
IDLE=""
SCALE=10
CLIENTS=50
JOBS=2
BUILD=1
SCENARIOS="all"
MODE=simple
ALL_SCENARIOS="ro_auto ro_primary_only mix_user mix_client mix_off mix_primary_only"

usage() {
    awk 'NR == 1 || /^# shellcheck/ { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        --replicas) REPLICAS="${2:?--replicas needs a value}"; shift 2 ;;
        --replicas=*) REPLICAS="${1#*=}"; shift ;;
        --pool-size) POOL_SIZE="${2:?--pool-size needs a value}"; shift 2 ;;
        --pool-size=*) POOL_SIZE="${1#*=}"; shift ;;
        --idle) IDLE="${2:?--idle needs a value}"; shift 2 ;;
        --idle=*) IDLE="${1#*=}"; shift ;;
        --scenarios) SCENARIOS="${2:?--scenarios needs a value}"; shift 2 ;;
        --scenarios=*) SCENARIOS="${1#*=}"; shift ;;
        --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
        --mode=*) MODE="${1#*=}"; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done
IDLE="${IDLE:-$DURATION}"
case "$MODE" in simple|extended|prepared) ;; *) echo "unknown --mode: $MODE" >&2; exit 2 ;; esac
for v in "$DURATION" "$REPLICAS" "$POOL_SIZE" "$IDLE"; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "not a number: $v" >&2; exit 2; }
done
[ "$DURATION" -gt 0 ] || { echo "--duration must be > 0" >&2; exit 2; }
if [ "$REPLICAS" -lt 1 ] || [ "$REPLICAS" -gt 8 ]; then echo "--replicas must be 1..8" >&2; exit 2; fi
[ "$POOL_SIZE" -ge 1 ] || { echo "--pool-size must be >= 1" >&2; exit 2; }
[ "$IDLE" -ge 1 ] || { echo "--idle must be >= 1" >&2; exit 2; }

SCEN_LIST=""
for s in $SCENARIOS; do
    if [ "$s" = all ]; then
        SCEN_LIST="$ALL_SCENARIOS"
    elif [[ " $ALL_SCENARIOS " == *" $s "* ]]; then
        [[ " $SCEN_LIST " == *" $s "* ]] || SCEN_LIST="$SCEN_LIST $s"
    else
        echo "unknown scenario: $s (known: $ALL_SCENARIOS all)" >&2
        exit 2
    fi
done
SCEN_LIST="${SCEN_LIST# }"
[ -n "$SCEN_LIST" ] || { echo "no scenarios selected" >&2; exit 2; }

# scenario -> "kind routing read_your_writes"
scenario_def() {
    case "$1" in
        ro_auto) echo "ro auto user" ;;
        ro_primary_only) echo "ro primary_only user" ;;
        mix_user) echo "mix auto user" ;;
        mix_client) echo "mix auto client" ;;
        mix_off) echo "mix auto off" ;;
        mix_primary_only) echo "mix primary_only user" ;;
    esac
}
kind_flags() { # kind -> pgbench script flags
    case "$1" in
        ro) echo "-S" ;;
        mix) echo "-b select-only@9 -b simple-update@1" ;;
    esac
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"

# Nothing from the caller's environment may change pgmux's configuration or where the
# PostgreSQL tools connect.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PGMUX_' || true)
unset DATABASE_URL READ_DATABASE_URL PGHOST PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE \
    PGSSLMODE PGCONNECT_TIMEOUT PGPASSFILE PGHOSTADDR || true

# --- tools ---------------------------------------------------------------------
PG_BIN="$(find_pg_bindir)" || {
    echo "PostgreSQL server binaries not found; install with: apt-get install -y postgresql" >&2
    exit 1
}
for t in pgbench pg_basebackup psql pg_ctl; do
    [ -x "$PG_BIN/$t" ] || { echo "$t not found in $PG_BIN" >&2; exit 1; }
done


CLK_TCK="$(getconf CLK_TCK)"

# --- processes and cleanup ---------------------------------------------------
TMP=""
MUX_PIDS=()   # pgmux instances started by this run (children of this shell)
PG_DATADIRS=() # started clusters (replicas first at cleanup)

STOP_HOW=""
stop_pid() { # pid [seconds before SIGKILL]: SIGTERM, then SIGKILL -> STOP_HOW
    local p="$1" n=$((${2:-5} * 10))
    STOP_HOW="term"
    alive "$p" || { STOP_HOW="gone"; return 0; }
    kill "$p" 2>/dev/null || true
    for _ in $(seq "$n"); do alive "$p" || return 0; sleep 0.1; done
    STOP_HOW="kill"
    kill -9 "$p" 2>/dev/null || true
    for _ in $(seq 50); do alive "$p" || return 0; sleep 0.1; done
}
stop_pgmux() { # pid [seconds before SIGKILL] -> STOP_HOW
    local p="$1" keep=() q
    stop_pid "$p" "${2:-5}"
    wait "$p" 2>/dev/null || true
    for q in "${MUX_PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    MUX_PIDS=("${keep[@]}")
}
cleanup() {
    set +e
    local p i
    for p in "${MUX_PIDS[@]}"; do stop_pid "$p"; wait "$p" 2>/dev/null; done
    for ((i = ${#PG_DATADIRS[@]} - 1; i >= 0; i--)); do
        timeout 60 "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "${PG_DATADIRS[$i]}" -m immediate -w -t 30 stop \
            >/dev/null 2>&1
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

isnum() { [[ "${1:-}" =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; }
now() { date +%s.%N; }

# --- build pgmux -------------------------------------------------------------
build_pgmux

# --- PostgreSQL: primary -----------------------------------------------------------
make_tmp pgmux-replicas

PG_PORT="$(free_port)"
USED_PORTS="$USED_PORTS$PG_PORT "
log "initdb + start the primary on 127.0.0.1:$PG_PORT ($TMP)"
timeout 300 "${AS_PG[@]}" "$PG_BIN/initdb" -D "$TMP/primary" -U postgres -A trust --auth-local=trust \
    -N -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; exit 1; }
as_pg tee -a "$TMP/primary/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/sock'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB
hot_standby = on
log_min_messages = warning
EOF
as_pg tee "$TMP/primary/pg_hba.conf" >/dev/null <<'EOF'
local all         all                     trust
local replication postgres                trust
host  replication postgres  127.0.0.1/32  trust
host  all         postgres  127.0.0.1/32  trust
host  all         all       127.0.0.1/32  scram-sha-256
EOF
PG_DATADIRS+=("$TMP/primary")
timeout 120 "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$TMP/primary" -l "$TMP/primary.log" -w -t 60 start \
    >/dev/null || { tail -n 20 "$TMP/primary.log" >&2; exit 1; }

psql_at() { # port db sql -> unaligned tuples-only output (superuser, unix socket)
    PGCONNECT_TIMEOUT=10 timeout 60 "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 \
        -h "$TMP/sock" -p "$1" -U postgres -d "$2" -c "$3"
}
psql_at "$PG_PORT" postgres "CREATE ROLE bench LOGIN PASSWORD 'benchpw'" >/dev/null
psql_at "$PG_PORT" postgres "CREATE DATABASE bench OWNER bench" >/dev/null

export PGPASSWORD=benchpw
log "pgbench -i -s $SCALE"
timeout 600 "$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench \
    >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; exit 1; }
PREWARM=0
if psql_at "$PG_PORT" bench "CREATE EXTENSION IF NOT EXISTS pg_prewarm" >/dev/null 2>&1; then PREWARM=1; fi

# --- replicas --------------------------------------------------------------------
REPLICA_PORTS=()
wait_replayed() { # port lsn seconds: in recovery and replayed past lsn
    local v
    for _ in $(seq $(($3 * 10))); do
        v="$(psql_at "$1" postgres "SELECT pg_is_in_recovery() AND
            coalesce(pg_last_wal_replay_lsn() >= '$2'::pg_lsn, false)" 2>/dev/null || true)"
        [ "$v" = t ] && return 0
        sleep 0.1
    done
    return 1
}
sync_replicas() { # seconds: every replica has replayed the primary's current position
    local lsn p
    lsn="$(psql_at "$PG_PORT" postgres "SELECT pg_current_wal_lsn()")"
    for p in "${REPLICA_PORTS[@]}"; do
        wait_replayed "$p" "$lsn" "$1" || {
            echo "replica on port $p has not replayed $lsn within $1 s" >&2
            return 1
        }
    done
}
for i in $(seq "$REPLICAS"); do
    rport="$(free_port)"
    USED_PORTS="$USED_PORTS$rport "
    rdir="$TMP/replica$i"
    log "pg_basebackup replica $i -> 127.0.0.1:$rport"
    timeout 600 "${AS_PG[@]}" "$PG_BIN/pg_basebackup" -D "$rdir" -R -X stream -c fast --no-sync \
        -h "$TMP/sock" -p "$PG_PORT" -U postgres >"$TMP/basebackup$i.log" 2>&1 ||
        { cat "$TMP/basebackup$i.log" >&2; exit 1; }
    as_pg tee -a "$rdir/postgresql.conf" >/dev/null <<EOF
# --- replica $i ---
port = $rport
EOF
    PG_DATADIRS+=("$rdir")
    timeout 120 "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$rdir" -l "$TMP/replica$i.log" -w -t 60 start \
        >/dev/null || { tail -n 20 "$TMP/replica$i.log" >&2; exit 1; }
    REPLICA_PORTS+=("$rport")
done
sync_replicas 120
streaming="$(psql_at "$PG_PORT" postgres "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")"
log "replicas streaming: $streaming of $REPLICAS (ports ${REPLICA_PORTS[*]})"
[ "$streaming" = "$REPLICAS" ] || { echo "not every replica is streaming" >&2; exit 1; }
if [ "$PREWARM" -eq 1 ]; then
    for p in "$PG_PORT" "${REPLICA_PORTS[@]}"; do
        psql_at "$p" bench "SELECT pg_prewarm('pgbench_accounts'), pg_prewarm('pgbench_accounts_pkey'),
            pg_prewarm('pgbench_branches'), pg_prewarm('pgbench_tellers')" >/dev/null
    done
    log "prewarmed pgbench tables on every node (pg_prewarm)"
fi

READ_URLS=""
for p in "${REPLICA_PORTS[@]}"; do
    READ_URLS="${READ_URLS:+$READ_URLS,}postgres://bench:benchpw@127.0.0.1:$p/bench"
done
ALL_PORTS=("$PG_PORT" "${REPLICA_PORTS[@]}")

# --- measurement helpers ------------------------------------------------------
# Every session start-up runs (and counts) one transaction of its own: pgmux's server
# connections would show up as transactions. pg_stat_database.sessions counts them.
xacts() { # port -> "xact_commit + xact_rollback" "sessions" of database bench
    psql_at "$1" postgres "SELECT coalesce(sum(xact_commit + xact_rollback), 0) || ' ' ||
        coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = 'bench'"
}
read_xacts() { # xacts_array sessions_array -> one count per node (primary, replicas)
    local -n _dx="$1" _ds="$2"
    local p v x n
    _dx=()
    _ds=()
    for p in "${ALL_PORTS[@]}"; do
        v="$(xacts "$p" 2>&1)" || { log "WARNING: reading pg_stat_database on port $p: $v"; return 1; }
        read -r x n <<<"$v"
        if ! isnum "$x" || ! isnum "$n"; then log "WARNING: pg_stat_database on port $p: $v"; return 1; fi
        _dx+=("$x")
        _ds+=("$n")
    done
}
# A backend flushes its statistics when it exits; pg_stat_activity drops it after that.
wait_backends_gone() { # seconds: no client backend of database bench left on any node
    local p n
    for _ in $(seq $(($1 * 10))); do
        n=0
        for p in "${ALL_PORTS[@]}"; do
            n=$((n + $(psql_at "$p" postgres "SELECT count(*) FROM pg_stat_activity
                WHERE datname = 'bench' AND backend_type = 'client backend'" || echo 1)))
        done
        [ "$n" -eq 0 ] && return 0
        sleep 0.1
    done
    return 1
}
settle_stats() {
    wait_backends_gone 20 || log "WARNING: bench backends still connected after 20 s; counts may be short"
    sleep 1
}

STARTED_PID=""
STARTED_PORT=""
start_pgmux() { # routing read_your_writes logfile -> STARTED_PID STARTED_PORT
    local p admin
    for _ in 1 2 3; do
        p="$(free_port)" || return 1
        admin="$(free_port)" || return 1
        env PGMUX_LOG=warn PGMUX_READ_ROUTING="$1" PGMUX_READ_YOUR_WRITES="$2" \
            "${OWN_SESSION[@]}" "$PGMUX_BIN" --listen "127.0.0.1:$p" --admin-listen "127.0.0.1:$admin" \
            --database-url "postgres://bench:benchpw@127.0.0.1:$PG_PORT/bench" \
            --read-database-url "$READ_URLS" --pool-size "$POOL_SIZE" >"$3" 2>&1 &
        STARTED_PID=$!
        MUX_PIDS+=("$STARTED_PID")
        for _ in $(seq 100); do
            alive "$STARTED_PID" || break
            if port_in_use "$p"; then STARTED_PORT="$p"; return 0; fi
            sleep 0.1
        done
        stop_pgmux "$STARTED_PID"
        grep -q 'in use' "$3" 2>/dev/null || break
    done
    echo "WARNING: pgmux did not start. Log:" >&2
    sed 's/^/    /' "$3" >&2
    return 1
}

# --- health-check rate -------------------------------------------------------------
# The health loops start with the first client of the database (and not at all when
# routing is primary_only): one query per node per replica_check_interval.
declare -a HEALTH_RATE=()
for _ in "${ALL_PORTS[@]}"; do HEALTH_RATE+=(0); done
NEED_HEALTH=0
for s in $SCEN_LIST; do
    read -r _ routing _ <<<"$(scenario_def "$s")"
    [ "$routing" = primary_only ] || NEED_HEALTH=1
done
HEALTH_NOTE="no scenario uses replicas: nothing subtracted"
if [ "$NEED_HEALTH" -eq 1 ]; then
    log "measuring pgmux's health-check transactions over ${IDLE}s idle"
    sync_replicas 60
    settle_stats
    if read_xacts before sbefore && start_pgmux auto user "$TMP/pgmux-idle.log"; then
        pid="$STARTED_PID"
        t0="$(now)"
        # One transaction (hinted to the primary) makes pgmux start its health loops.
        if ! PGCONNECT_TIMEOUT=10 timeout 30 "$PG_BIN/psql" -X -q -At \
            "postgres://bench:benchpw@127.0.0.1:$STARTED_PORT/bench" \
            -c "/* pgmux:primary */ SELECT 1" >/dev/null; then
            log "WARNING: the trigger query through pgmux failed"
        fi
        sleep "$IDLE"
        stop_pgmux "$pid" 10
        t1="$(now)"
        settle_stats
        read_xacts after safter || { echo "cannot read pg_stat_database" >&2; exit 1; }
        HEALTH_NOTE="health checks measured over ${IDLE}s idle (pgmux running; session start-ups and 1 trigger transaction on the primary left out):"
        for i in "${!ALL_PORTS[@]}"; do
            # minus session start-ups, and the trigger transaction on the primary
            d=$((after[i] - before[i] - (safter[i] - sbefore[i])))
            [ "$i" -eq 0 ] && d=$((d - 1))
            HEALTH_RATE[i]="$(awk -v d="$d" -v t="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
                'BEGIN { printf "%.2f", (d > 0 ? d : 0) / t }')"
            if [ "$i" -eq 0 ]; then n=primary; else n="replica$i"; fi
            HEALTH_NOTE="$HEALTH_NOTE $n ${HEALTH_RATE[i]} tx/s"
        done
        HEALTH_NOTE="$HEALTH_NOTE; subtracted as rate x (pgbench start .. pgmux exit) in scenarios with replicas in use"
    else
        HEALTH_NOTE="WARNING: could not measure the health checks (pgmux or pg_stat_database); nothing subtracted"
        log "$HEALTH_NOTE"
    fi
fi
log "$HEALTH_NOTE"

# --- scenarios -------------------------------------------------------------------
ROWS=()
NOTES=()
FMT='%-17s %9s %8s %10s %10s %10s %7s %8s %8s %9s'
fmt_pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f%%", 100 * a / b; else printf "-" }'; }

run_scenario() { # name
    local name="$1" kind routing ryw flags out rc pid port cpu0 cpu1 t0 t1 active
    local tps lat txns writes cpu prim rep total reads share_all share_reads extra i d h
    local -a before after sbefore safter repl=() sess=()
    read -r kind routing ryw <<<"$(scenario_def "$name")"
    read -r -a flags <<<"$(kind_flags "$kind")"
    log "[$name] routing=$routing read_your_writes=$ryw: pgbench ${flags[*]} -M $MODE -c $CLIENTS -j $JOBS -T $DURATION"
    sync_replicas 60 || { ROWS+=("$(printf '%-17s %s' "$name" "FAILED: replicas behind")"); return 0; }
    settle_stats
    if ! read_xacts before sbefore; then
        ROWS+=("$(printf '%-17s %s' "$name" "FAILED: cannot read pg_stat_database")")
        return 0
    fi
    if ! start_pgmux "$routing" "$ryw" "$TMP/pgmux-$name.log"; then
        ROWS+=("$(printf '%-17s %s' "$name" "FAILED: pgmux did not start")")
        return 0
    fi
    pid="$STARTED_PID"
    port="$STARTED_PORT"
    cpu0="$(cpu_ticks "$pid")"
    t0="$(now)"
    rc=0
    out="$(timeout --signal=KILL $((DURATION * 2 + 60)) "$PG_BIN/pgbench" -n "${flags[@]}" -M "$MODE" \
        -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$port" -U bench bench 2>&1)" || rc=$?
    cpu1="$(cpu_ticks "$pid")"
    printf '%s\n' "$out" >"$TMP/pgbench-$name.log"
    stop_pgmux "$pid" 10
    t1="$(now)"
    if [ "$STOP_HOW" = kill ]; then NOTES+=("$name: pgmux did not exit within 10 s of SIGTERM (killed)"); fi
    if grep -qiE 'warn|error' "$TMP/pgmux-$name.log"; then
        NOTES+=("$name: pgmux logged $(grep -ciE 'warn|error' "$TMP/pgmux-$name.log") warning/error line(s), first: $(grep -m1 -iE 'warn|error' "$TMP/pgmux-$name.log" | cut -c1-200)")
    fi
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: pgbench [$name] (exit $rc$([ "$rc" -eq 137 ] && echo ", killed by timeout")):" >&2
        { grep -m1 -i 'error\|abort' <<<"$out" || true; tail -n 4 <<<"$out"; } | sed 's/^/    /' >&2
        ROWS+=("$(printf '%-17s %s' "$name" "FAILED (pgbench exit $rc)")")
        return 0
    fi
    settle_stats
    if ! read_xacts after safter; then
        ROWS+=("$(printf '%-17s %s' "$name" "FAILED: cannot read pg_stat_database")")
        return 0
    fi

    tps="$(sed -n 's/^tps = \([0-9.]*\) (.*/\1/p' <<<"$out" | head -n1)"
    lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -n1)"
    txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out" | head -n1)"
    writes=0
    if [ "$kind" = mix ]; then
        # SQL script 2: <builtin: simple update>
        #  - weight: 1 (targets 10.0% of total)
        #  - 12345 transactions (10.0% of total, tps = 823.000000)
        writes="$(awk '/^SQL script [0-9]+: / { upd = ($0 ~ /simple update/); next }
            upd && /^ - [0-9]+ transactions/ { print $2; exit }' <<<"$out")"
        isnum "$writes" || { NOTES+=("$name: could not parse the simple-update count"); writes=""; }
    fi
    if ! isnum "$txns" || ! isnum "$tps"; then
        echo "could not parse pgbench output [$name]:" >&2
        tail -n 15 <<<"$out" | sed 's/^/    /' >&2
        ROWS+=("$(printf '%-17s %s' "$name" "FAILED (pgbench output)")")
        return 0
    fi
    active="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
    prim=0
    rep=0
    for i in "${!ALL_PORTS[@]}"; do
        sess+=($((safter[i] - sbefore[i])))
        d=$((after[i] - before[i] - sess[i]))
        h=0
        if [ "$routing" != primary_only ]; then
            h="$(awk -v r="${HEALTH_RATE[i]}" -v t="$active" 'BEGIN { printf "%.0f", r * t }')"
        fi
        d=$((d - h))
        if [ "$i" -eq 0 ]; then prim="$d"; else rep=$((rep + d)); repl+=("$d"); fi
    done
    total=$((prim + rep))
    extra=$((total - txns))
    share_all="$(fmt_pct "$rep" "$total")"
    share_reads="-"
    if isnum "$writes"; then
        reads=$((total - writes))
        share_reads="$(fmt_pct "$rep" "$reads")"
        if [ "$routing" != primary_only ] && { [ "$name" = ro_auto ] || [ "$ryw" = off ]; } &&
            awk -v a="$rep" -v b="$reads" 'BEGIN { exit !(b <= 0 || a / b < 0.5) }'; then
            NOTES+=("$name: only $share_reads of the reads reached the replicas")
        fi
    fi
    cpu="$(awk -v t=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v n="$txns" \
        'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else printf "-" }')"
    if [ "${#repl[@]}" -gt 1 ]; then NOTES+=("$name: per replica: ${repl[*]}"); fi
    NOTES+=("$name: server sessions opened (start-up transactions not counted): primary ${sess[0]}, replicas ${sess[*]:1}")
    if [ "$kind" = mix ]; then NOTES+=("$name: pgbench ran $txns transactions, $writes of them simple-update (writes)"); fi
    ROWS+=("$(printf "$FMT" "$name" "$(awk -v v="$tps" 'BEGIN { printf "%.0f", v }')" "$lat" \
        "$prim" "$rep" "$txns" "$extra" "$share_all" "$share_reads" "$cpu")")
}

for s in $SCEN_LIST; do
    run_scenario "$s"
done

# --- report --------------------------------------------------------------------
echo
echo "pgmux read routing: pgbench -n -M $MODE -c $CLIENTS -j $JOBS -T $DURATION through pgmux (pool size $POOL_SIZE)," \
    "scale $SCALE, 1 primary + $REPLICAS streaming replica(s), $(nproc) CPUs, $("$PG_BIN/postgres" --version)"
for s in $SCEN_LIST; do
    read -r kind routing ryw <<<"$(scenario_def "$s")"
    printf '  %-17s pgbench %-36s read_routing=%-12s read_your_writes=%s\n' "$s" "$(kind_flags "$kind")" "$routing" "$ryw"
done
echo "primary/replica tx: delta of xact_commit + xact_rollback (pg_stat_database, db bench) per node," \
    "read after pgmux exited and its backends were gone, minus the start-up transaction of every" \
    "session (delta of pg_stat_database.sessions) and minus pgmux's health checks."
echo "$HEALTH_NOTE"
echo "pgbench tx: transactions pgbench ran; extra = primary + replica - pgbench tx;" \
    "replica share of reads = replica / (primary + replica - writes), writes = simple-update transactions;" \
    "pgmux cpu = (utime + stime) during pgbench / pgbench tx."
echo
printf "$FMT\n" scenario tps "lat ms" "primary tx" "replica tx" "pgbench tx" extra "rep/all" "rep/reads" "cpu us/tx"
printf '%s\n' "${ROWS[@]}"
if [ "${#NOTES[@]}" -gt 0 ]; then
    echo
    printf '%s\n' "${NOTES[@]}"
fi
