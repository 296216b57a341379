//! Throwaway PostgreSQL clusters from the installed server binaries: a primary plus any
//! number of streaming replicas, on free ports of 127.0.0.1, in one temporary directory.
//! Used by `pgmux demo` and by pgmux's integration tests.
//!
//! * [`PgCluster`]: the cluster. Dropping it stops every server (`-m immediate`) and
//!   removes the directory (data, sockets, logs), also when unwinding from a panic.
//! * [`PgNode`]: one server: its port, unix socket directory, `psql` as superuser.
//! * [`pg_bindir`] / [`try_pg_bindir`]: where `initdb`, `pg_ctl` and `postgres` are
//!   (`$PG_BINDIR`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`).
//!
//! The servers are made for trying and testing, not for keeping data: `fsync = off`,
//! trust for the `postgres` superuser on the unix socket and on 127.0.0.1, SCRAM for
//! every other role over TCP. When a cargo target directory is found above the running
//! executable (a `CACHEDIR.TAG` next to `debug/`), the `initdb` result is cached in its
//! `tmp/` and copied for every cluster; otherwise each cluster runs `initdb`.
//!
//! When the process runs as root (euid 0), every PostgreSQL server binary is run as the
//! `postgres` OS user via `runuser`, because PostgreSQL refuses to run as root.
//!
//! Failures (a server that does not start, SQL that fails) panic with the command's
//! output and the server log: a cluster that cannot be built is not recoverable.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// OS user that runs the PostgreSQL server binaries when we are root.
const PG_OS_USER: &str = "postgres";

/// Settings appended to the template's postgresql.conf. Part of the template
/// cache key, so editing them invalidates cached templates automatically.
const POSTGRESQL_CONF: &str = "
# --- pgmux test settings ---
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 10
# Keep WAL for replicas made one after another (1 MB segments recycle fast).
wal_keep_size = 64MB
hot_standby = on
max_connections = 300
shared_buffers = 32MB
log_min_messages = warning
";

/// initdb options for the template (after `-D DIR`). Part of the cache key.
const INITDB_ARGS: &[&str] = &[
    "-A",
    "trust",
    "--auth-local=trust",
    "-U",
    "postgres",
    "-N",
    // 1 MB WAL segments keep the template (and every per-test copy of it)
    // small.
    "--wal-segsize=1",
    "-E",
    "UTF8",
    "--locale=C",
];

/// The template's complete pg_hba.conf. Also part of the cache key.
const PG_HBA_CONF: &str = "\
local   all           all                     trust
local   replication   all                     trust
host    replication   all       127.0.0.1/32  trust
host    all           postgres  127.0.0.1/32  trust
host    all           all       127.0.0.1/32  scram-sha-256
";

/// Environment variables that would leak into PostgreSQL client tools and
/// drivers (psql, pg_basebackup, pgbench, psycopg) and change where/how they
/// connect.
pub const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGREQUIRESSL",
    "PGCONNECT_TIMEOUT",
    "PGTARGETSESSIONATTRS",
    "PGAPPNAME",
    "PGCLIENTENCODING",
    "PGTZ",
    "PGDATESTYLE",
    "PGDATA",
];

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A process-unique, monotonically increasing number (used for names).
fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Locating PostgreSQL and running its binaries
// ---------------------------------------------------------------------------

/// Directory holding the PostgreSQL server binaries (initdb, pg_ctl, ...).
///
/// Order: `$PG_BINDIR`, `pg_config --bindir`, newest `/usr/lib/postgresql/*/bin`.
/// Panics (never skips) when nothing usable is found; see [`try_pg_bindir`].
pub fn pg_bindir() -> &'static Path {
    match try_pg_bindir() {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`pg_bindir`], but returns the explanation (what was looked at, how to install
/// PostgreSQL) instead of panicking.
pub fn try_pg_bindir() -> Result<&'static Path, String> {
    static BINDIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINDIR
        .get_or_init(find_pg_bindir)
        .as_deref()
        .map_err(Clone::clone)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn find_pg_bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if !has_server_binaries(&dir) {
            return Err(format!(
                "PG_BINDIR={} does not contain initdb/pg_ctl/postgres",
                dir.display()
            ));
        }
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, dir)) = candidates.pop() {
        return Ok(dir);
    }
    Err(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found.\n\
         Looked at $PG_BINDIR, `pg_config --bindir` and /usr/lib/postgresql/*/bin.\n\
         Install them with `apt-get install -y postgresql` (Debian/Ubuntu), or point \
         PG_BINDIR at the directory containing initdb."
            .to_string(),
    )
}

fn pg_bin(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// A `Command` for a command line tool from the PostgreSQL bindir (psql,
/// pgbench, ...), with libpq environment variables (PGHOST, PGPORT, ...)
/// cleared so only explicit arguments/env decide where it connects.
/// Client tools run as the current user (also when root).
pub fn pg_tool(name: &str) -> Command {
    let mut cmd = Command::new(pg_bin(name));
    for var in LIBPQ_ENV {
        cmd.env_remove(var);
    }
    cmd
}

fn running_as_root() -> bool {
    // Effective uid is the second field of the "Uid:" line.
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// A command for a PostgreSQL *server* binary (initdb, pg_ctl,
/// pg_basebackup): run as the `postgres` OS user when we are root.
fn pg_server_cmd(name: &str) -> Command {
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(pg_bin(name));
        c
    } else {
        Command::new(pg_bin(name))
    };
    for var in LIBPQ_ENV {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd`, panicking with its output if it fails.
fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: failed to spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Gives `path` (recursively) to the postgres OS user when we are root, and
/// makes it traversable. No-op for non-root users.
fn hand_to_postgres(path: &Path) {
    if running_as_root() {
        run_ok(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_OS_USER}:"))
                .arg(path),
            "chown to postgres",
        );
    }
}

/// A temp dir under the system temp dir (short paths: unix socket paths are
/// limited to ~107 bytes) that the postgres OS user can use.
fn pg_tempdir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    set_mode(dir.path(), 0o755);
    hand_to_postgres(dir.path());
    dir
}

/// `root/name`, created for the postgres OS user (see [`pg_tempdir`]).
fn node_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    set_mode(&dir, 0o755);
    hand_to_postgres(&dir);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Major version reported by `postgres --version`, e.g. "15".
fn pg_major_version() -> String {
    let out = run_ok(
        Command::new(pg_bin("postgres")).arg("--version"),
        "postgres --version",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
    let version = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("unexpected `postgres --version` output: {text}"));
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or(version)
        .to_string()
}

/// A free TCP port on 127.0.0.1 for a listener, drawn below the kernel's ephemeral
/// range (32768 and up on Linux): a port from that range (what binding port 0 gives) can
/// be taken as the source port of some client's connection between this pick and the
/// listener's bind, and tests that open thousands of client sockets made that happen.
/// The pick is pseudo-random (process id, clock, a counter) so concurrent test processes
/// rarely try the same port, and it is checked to be bindable.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const LOW: u64 = 15000;
    const HIGH: u64 = 32000;
    for _ in 0..200 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let h = fnv1a(&[
            &std::process::id().to_le_bytes(),
            &nanos.to_le_bytes(),
            &n.to_le_bytes(),
        ]);
        let port = (LOW + h % (HIGH - LOW)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

// ---------------------------------------------------------------------------
// Template data directory
// ---------------------------------------------------------------------------

/// The cached, initdb'ed template data directory (built on first use), or None when
/// there is no cargo target directory to keep it in.
fn template_dir() -> Option<&'static Path> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| template_cache_root().map(|root| build_template(&root)))
        .as_deref()
}

/// `<cargo target dir>/tmp` when the running executable lives in a cargo target
/// directory (marked by the `CACHEDIR.TAG` cargo writes): test binaries in
/// `target/debug/deps/`, `target/debug/pgmux`. The same directory cargo passes to
/// integration tests as CARGO_TARGET_TMPDIR.
fn template_cache_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let target = exe
        .ancestors()
        .skip(1)
        .take(4)
        .find(|d| d.join("CACHEDIR.TAG").is_file())?;
    let root = target.join("tmp");
    fs::create_dir_all(&root).ok()?;
    Some(root)
}

/// initdb into `data` (which must not exist; its parent belongs to the postgres OS
/// user when we are root) and the settings this crate's servers run with.
fn init_data_dir(data: &Path) {
    run_ok(
        pg_server_cmd("initdb")
            .arg("-D")
            .arg(data)
            .args(INITDB_ARGS),
        "initdb",
    );
    let conf = data.join("postgresql.conf");
    let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
    text.push_str(POSTGRESQL_CONF);
    fs::write(&conf, text).expect("write postgresql.conf");
    fs::write(data.join("pg_hba.conf"), PG_HBA_CONF).expect("write pg_hba.conf");
}

fn build_template(cache_root: &Path) -> PathBuf {
    let version = pg_major_version();
    let bindir = pg_bindir();
    let key = fnv1a(&[
        bindir.as_os_str().as_encoded_bytes(),
        INITDB_ARGS.join(" ").as_bytes(),
        POSTGRESQL_CONF.as_bytes(),
        PG_HBA_CONF.as_bytes(),
        &[u8::from(running_as_root())],
    ]);
    let final_dir = cache_root.join(format!("pgmux-test-template-{version}-{key:016x}"));
    if final_dir.join("PG_VERSION").is_file() {
        return final_dir;
    }

    // initdb in /tmp (the postgres user may not be able to traverse the
    // target dir, e.g. under /root), then copy next to the final location
    // and rename it into place. rename(2) of a directory onto an existing
    // non-empty directory fails, so a concurrent builder that loses the race
    // just discards its copy: the first complete template wins.
    let work = pg_tempdir("pgmux-initdb-");
    let data = work.path().join("data");
    init_data_dir(&data);

    let staging = cache_root.join(format!(
        ".pgmux-test-template-{version}-{key:016x}.building-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    run_ok(
        Command::new("cp").arg("-a").arg(&data).arg(&staging),
        "copy template into the target dir",
    );
    if let Err(e) = fs::rename(&staging, &final_dir) {
        let _ = fs::remove_dir_all(&staging);
        assert!(
            final_dir.join("PG_VERSION").is_file(),
            "could not move template {} to {}: {e}",
            staging.display(),
            final_dir.display()
        );
    }
    final_dir
}

// ---------------------------------------------------------------------------
// PgNode / PgCluster
// ---------------------------------------------------------------------------

/// One PostgreSQL server (primary or replica).
pub struct PgNode {
    pub port: u16,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    /// The directory holding data_dir, socket_dir and the log file (inside the
    /// cluster's [`PgCluster::root`]).
    pub dir: PathBuf,
}

impl PgNode {
    /// Creates a node around an existing data dir inside `dir` and starts it
    /// on a free port (retrying with another port on failure, since another
    /// test process may grab the same port between our probe and the bind).
    fn launch(dir: PathBuf) -> PgNode {
        let socket_dir = dir.join("sock");
        if !socket_dir.exists() {
            fs::create_dir(&socket_dir).expect("create socket dir");
            set_mode(&socket_dir, 0o755);
            hand_to_postgres(&socket_dir);
        }
        let mut node = PgNode {
            port: 0,
            data_dir: dir.join("data"),
            log_file: dir.join("postgres.log"),
            socket_dir,
            dir,
        };
        let mut last_err = String::new();
        for _ in 0..8 {
            node.port = free_port();
            match node.try_start() {
                Ok(()) => return node,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start PostgreSQL: {last_err}");
    }

    fn try_start(&self) -> Result<(), String> {
        let out = pg_server_cmd("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data_dir)
            .arg("-o")
            .arg(format!(
                "-p {} -c unix_socket_directories={}",
                self.port,
                self.socket_dir.display()
            ))
            .arg("-l")
            .arg(&self.log_file)
            .arg("start")
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start (port {}) failed with {}\n{}{}\n--- server log ---\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ))
        }
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Output {
        pg_server_cmd("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data_dir)
            .args(["-m", mode, "stop"])
            .output()
            .expect("spawn pg_ctl stop")
    }

    /// `pg_ctl stop -m fast`; panics if that fails (e.g. already stopped).
    pub fn stop(&self) {
        let out = self.pg_ctl_stop("fast");
        assert!(
            out.status.success(),
            "pg_ctl stop -m fast failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl stop -m immediate` (crash-like); panics if that fails.
    pub fn kill(&self) {
        let out = self.pg_ctl_stop("immediate");
        assert!(
            out.status.success(),
            "pg_ctl stop -m immediate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// True if the postmaster is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        pg_server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs `sql` (may contain several statements, each its own transaction)
    /// with psql as superuser `postgres` over the unix socket and returns the
    /// trimmed, unaligned, tuples-only output. Panics with stderr on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(out) => out,
            Err(e) => panic!("psql on port {} db {db} failed: {e}\nSQL: {sql}", self.port),
        }
    }

    /// Like [`PgNode::psql`] but returns stderr as `Err` instead of panicking.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut child = pg_tool("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        child
            .stdin
            .take()
            .expect("psql stdin")
            .write_all(sql.as_bytes())
            .expect("write SQL to psql");
        let out = child.wait_with_output().expect("wait for psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `postgres://user:password@127.0.0.1:PORT/db` (user, password and db
    /// percent-encoded).
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        pg_url(self.port, user, password, db)
    }

    /// Number of client backends of `user` (from pg_stat_activity).
    pub fn backend_count(&self, user: &str) -> i64 {
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = {} AND backend_type = 'client backend';",
                quote_literal(user)
            ),
        );
        out.parse()
            .unwrap_or_else(|e| panic!("backend_count: bad psql output {out:?}: {e}"))
    }

    /// Current content of the server log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// A WAL position on the primary that covers every transaction
    /// committed so far. With synchronous_commit=off, commits (and other
    /// WAL) may sit unflushed for a while, and replicas only receive flushed
    /// WAL; so this runs a synchronous-commit transaction that writes WAL
    /// (a temp table; a bare xid would commit asynchronously), which flushes
    /// all earlier WAL, and returns `pg_current_wal_flush_lsn()`.
    pub fn current_wal_lsn(&self) -> String {
        let out = self.psql(
            "postgres",
            "SET synchronous_commit = on;\n\
             CREATE TEMP TABLE pgmux_wal_flush_marker();\n\
             SELECT pg_current_wal_flush_lsn();",
        );
        out.lines().last().unwrap_or_default().trim().to_string()
    }

    /// Waits (up to `timeout`) until this replica has replayed `lsn`.
    pub fn wait_replayed(&self, lsn: &str, timeout: Duration) {
        let sql = format!(
            "SELECT pg_is_in_recovery() AND \
             coalesce(pg_last_wal_replay_lsn() >= {}::pg_lsn, false);",
            quote_literal(lsn)
        );
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_psql("postgres", &sql).as_deref() == Ok("t") {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "replica on port {} did not replay {lsn} within {timeout:?}\n--- log ---\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A primary and any number of streaming replicas, in one temporary directory
/// ([`PgCluster::root`]). Dropping it stops every node (`-m immediate`) and removes the
/// directory, also when unwinding from a panic.
pub struct PgCluster {
    primary: PgNode,
    replicas: Vec<PgNode>,
    /// Declared last: removed after Drop has stopped the servers.
    root: TempDir,
}

impl PgCluster {
    /// Starts a fresh primary (from the cached template when there is one).
    pub fn start() -> PgCluster {
        let template = template_dir();
        let root = pg_tempdir("pgcluster-");
        let dir = node_dir(root.path(), "primary");
        let data = dir.join("data");
        match template {
            // cp -a preserves ownership (postgres when we are root) and the 0700
            // mode PostgreSQL insists on.
            Some(template) => {
                run_ok(
                    Command::new("cp").arg("-a").arg(template).arg(&data),
                    "copy template data dir",
                );
            }
            None => init_data_dir(&data),
        }
        PgCluster {
            primary: PgNode::launch(dir),
            replicas: Vec::new(),
            root,
        }
    }

    pub fn primary(&self) -> &PgNode {
        &self.primary
    }

    pub fn replicas(&self) -> &[PgNode] {
        &self.replicas
    }

    /// The directory holding every node's data, socket and log (`primary/`,
    /// `replica1/`, ...); removed when the cluster is dropped.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Adds a streaming replica (pg_basebackup -R -X stream over the
    /// primary's unix socket), starts it on its own port and waits until it
    /// is in recovery and has replayed the primary's current LSN.
    pub fn add_replica(&mut self) -> &PgNode {
        let dir = node_dir(
            self.root.path(),
            &format!("replica{}", self.replicas.len() + 1),
        );
        run_ok(
            pg_server_cmd("pg_basebackup")
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h"])
                .arg(&self.primary.socket_dir)
                .args(["-p", &self.primary.port.to_string(), "-U", "postgres"]),
            "pg_basebackup",
        );
        // In the list before waiting: stopped on drop if it never catches up.
        self.replicas.push(PgNode::launch(dir));
        let lsn = self.primary.current_wal_lsn();
        let node = self.replicas.last().expect("just pushed");
        node.wait_replayed(&lsn, Duration::from_secs(60));
        node
    }

    /// Waits until every replica has replayed the primary's current LSN
    /// (call after writes on the primary that a test reads on replicas).
    pub fn sync_replicas(&self) {
        let lsn = self.primary.current_wal_lsn();
        for r in &self.replicas {
            r.wait_replayed(&lsn, Duration::from_secs(60));
        }
    }

    /// Creates a LOGIN role with a SCRAM password and a database owned by
    /// it. Returns (user, password, dbname); names are unique per call.
    pub fn create_user_db(&self, prefix: &str) -> (String, String, String) {
        let n = unique();
        let base: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let user = format!("{base}_u{n}");
        let db = format!("{base}_db{n}");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let password = format!(
            "pw-{n}-{:08x}",
            fnv1a(&[user.as_bytes(), &nanos.to_le_bytes()]) as u32
        );
        self.create_role(&user, &password);
        self.create_database(&db, &user);
        (user, password, db)
    }

    /// CREATE ROLE … LOGIN PASSWORD … (stored as SCRAM-SHA-256).
    pub fn create_role(&self, name: &str, password: &str) {
        remember_password(password);
        self.primary.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';\n\
                 CREATE ROLE {} LOGIN PASSWORD {};",
                quote_ident(name),
                quote_literal(password)
            ),
        );
    }

    /// CREATE DATABASE name OWNER owner.
    pub fn create_database(&self, name: &str, owner: &str) {
        self.primary.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {} OWNER {};",
                quote_ident(name),
                quote_ident(owner)
            ),
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for node in self.replicas.iter().chain(std::iter::once(&self.primary)) {
            if panicking {
                eprintln!(
                    "--- PostgreSQL log (port {}, last 30 lines) ---\n{}",
                    node.port,
                    tail(&node.log(), 30)
                );
            }
            let _ = node.pg_ctl_stop("immediate");
        }
        // The TempDirs are removed when the fields drop.
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Passwords given to [`PgCluster::create_role`] in this process.
static PASSWORDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn remember_password(password: &str) {
    let mut v = PASSWORDS.lock().unwrap_or_else(|e| e.into_inner());
    if !v.iter().any(|p| p == password) {
        v.push(password.to_owned());
    }
}

/// Every password [`PgCluster::create_role`] has set in this process, for callers
/// that check logs for leaked secrets.
pub fn role_passwords() -> Vec<String> {
    PASSWORDS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// SQL identifier quoting.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings = on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `postgres://user:password@127.0.0.1:port/db`, percent-encoded.
pub fn pg_url(port: u16, user: &str, password: &str, db: &str) -> String {
    format!(
        "postgres://{}:{}@127.0.0.1:{port}/{}",
        percent_encode(user),
        percent_encode(password),
        percent_encode(db)
    )
}

// ---------------------------------------------------------------------------
// Replicas: clusters with streaming replicas, reloadable settings
// ---------------------------------------------------------------------------

impl PgNode {
    /// Appends `key = 'value'` to postgresql.auto.conf (read after
    /// postgresql.conf, so it wins) and reloads the server. Only for
    /// settings that take effect on reload (e.g. recovery_min_apply_delay);
    /// the reload is asynchronous, see [`PgNode::wait_setting`].
    pub fn set_conf(&self, key: &str, value: &str) {
        let path = self.data_dir.join("postgresql.auto.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(file, "{key} = {}", quote_literal(value))
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
        drop(file);
        self.reload();
    }

    /// `pg_ctl reload` (SIGHUP to the postmaster).
    pub fn reload(&self) {
        run_ok(
            pg_server_cmd("pg_ctl")
                .arg("-D")
                .arg(&self.data_dir)
                .arg("reload"),
            "pg_ctl reload",
        );
    }

    /// The value of `SHOW key` on this node (as superuser, database postgres).
    pub fn show(&self, key: &str) -> String {
        self.psql("postgres", &format!("SHOW {key};"))
    }

    /// Waits (up to `timeout`) until `SHOW key` on this node returns
    /// `expected` (new sessions see a reloaded setting once the postmaster
    /// has processed the SIGHUP).
    pub fn wait_setting(&self, key: &str, expected: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.try_psql("postgres", &format!("SHOW {key};"));
            if now.as_deref() == Ok(expected) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{key} on port {} is {now:?}, not {expected:?}, {timeout:?} after reload",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl PgCluster {
    /// A fresh primary with `n` streaming replicas, all caught up.
    pub fn with_replicas(n: usize) -> PgCluster {
        let mut cluster = PgCluster::start();
        cluster.keep_wal_for_replicas();
        for _ in 0..n {
            cluster.add_replica();
        }
        cluster
    }

    /// Sets `wal_keep_size = 64MB` on the primary. With the template's 1 MB
    /// WAL segments and no replication slots, the fast checkpoint of a
    /// second `pg_basebackup` can otherwise remove a segment the first
    /// replica has not streamed yet ("requested WAL segment … has already
    /// been removed"), and that replica never catches up again.
    pub fn keep_wal_for_replicas(&self) {
        self.primary.set_conf("wal_keep_size", "64MB");
        self.primary
            .wait_setting("wal_keep_size", "64MB", Duration::from_secs(10));
    }

    /// The replicas' ports, in order.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.port).collect()
    }

    /// Comma-separated replica URLs for `user`/`password`/`db` (the form
    /// READ_DATABASE_URL takes).
    pub fn replica_urls(&self, user: &str, password: &str, db: &str) -> String {
        self.replicas
            .iter()
            .map(|r| r.url(user, password, db))
            .collect::<Vec<_>>()
            .join(",")
    }
}
