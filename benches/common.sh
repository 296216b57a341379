# shellcheck shell=bash
# Shared helpers for the benchmark scripts (sourced by benches/load.sh and
# benches/replicas.sh after they set ROOT and TMP="").

log() { printf '==> %s\n' "$*" >&2; }

find_pg_bindir() {
    local d
    if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ]; then echo "$PG_BINDIR"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    fi
    for d in $(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    done
    return 1
}

# PostgreSQL and PgBouncer refuse to run as root.
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then AS_PG=(runuser -u postgres --); fi
as_pg() { "${AS_PG[@]}" "$@"; }

# pgmux runs in a session of its own, as PgBouncer (-d) and PostgreSQL (pg_ctl) do. With
# the kernel's autogroup scheduling (kernel.sched_autogroup_enabled = 1, the default of
# most distributions) each session is one scheduling group that gets a fair share of the
# CPUs: left in the script's session, pgmux would share one group's share with pgbench
# and be preempted half again as often as PgBouncer (measured: 0.30-0.35 involuntary
# switches per transaction against 0.17-0.21; 0.17-0.21 for both in their own sessions).
# setsid keeps the PID ($!): a background job of a script is no process group leader,
# so setsid does not fork.
# shellcheck disable=SC2034 # used by the scripts that source this file
if command -v setsid >/dev/null 2>&1; then OWN_SESSION=(setsid); else OWN_SESSION=(); fi

alive() { # pid: running and not a zombie
    local s
    s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    s="${s##*) }"
    [ "${s%% *}" != Z ]
}

# Listening ports are drawn below the kernel's ephemeral range: a port that is the local
# end of some outgoing connection (ours, or another benchmark's) is free for connect()
# but bind() fails with "Address already in use".
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
read -r EPH_LO _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || EPH_LO=32768
if [ "${EPH_LO:-0}" -gt 12000 ]; then PORT_LO=10000; PORT_N=$((EPH_LO - 10000)); else PORT_LO=20000; PORT_N=40000; fi
USED_PORTS=" "
port_bound() { # port: any TCP socket (listening or connected) uses it locally
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
    else
        port_in_use "$1"
    fi
}
free_port() {
    local p
    for _ in $(seq 100); do
        p=$((PORT_LO + RANDOM % PORT_N))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if ! port_bound "$p" && ! port_in_use "$p" && [ ! -e "$TMP/sock/.s.PGSQL.$p" ]; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}


cpu_ticks() { # pid -> utime+stime (clock ticks, all threads)
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
    stat="${stat##*) }" # strip "pid (comm) " (comm may contain spaces)
    # shellcheck disable=SC2086
    set -- $stat
    # After stripping, field 1 is state (overall field 3): utime=14 -> 12, stime=15 -> 13.
    echo $(("${12}" + "${13}"))
}

# Builds pgmux in release unless BUILD=0 (--no-build); sets PGMUX_BIN.
build_pgmux() {
    PGMUX_BIN="$ROOT/target/release/pgmux"
    if [ "$BUILD" -eq 1 ]; then
        log "building pgmux (release)"
        (cd "$ROOT" && cargo build --release)
    fi
    [ -x "$PGMUX_BIN" ] || { echo "$PGMUX_BIN not found (build it, or drop --no-build)" >&2; exit 1; }
}

# Creates the run's directory (with a socket dir PostgreSQL can use); sets TMP, which
# the caller's cleanup trap removes.
make_tmp() { # prefix
    TMP="$(mktemp -d "/tmp/$1.XXXXXX")"
    chmod 755 "$TMP"
    mkdir -p "$TMP/sock"
    if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$TMP"; fi
}
