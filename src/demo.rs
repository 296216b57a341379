//! `pgmux demo`: a local try without Docker. Starts a throwaway PostgreSQL primary and
//! streaming replicas from the installed server binaries (the `pgcluster` crate, which
//! the integration tests use too), creates a role and database `demo` with a small
//! table, and serves pgmux in front of them exactly as `pgmux` does with DATABASE_URL
//! and READ_DATABASE_URL set. On exit (Ctrl-C / SIGTERM, after pgmux has drained) the
//! servers are stopped and their directory removed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pgcluster::PgCluster;
use pgmux_config::Flags;

/// Arguments of `pgmux demo` (besides the global --listen, --admin-listen, --pool-size).
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Streaming replicas to start next to the primary (read-only work goes there).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub replicas: usize,
}

/// Client listen address unless --listen or PGMUX_LISTEN says otherwise: loopback
/// only (the demo role's password is printed, and PostgreSQL trusts `postgres`).
const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
/// The demo's role and database.
const DEMO_USER: &str = "demo";
const DEMO_DB: &str = "demo";

/// The running cluster, here so that every way out stops it: the end of [`run`]
/// (also when unwinding) and [`cleanup`] before `std::process::exit`.
static CLUSTER: Mutex<Option<PgCluster>> = Mutex::new(None);
/// SIGINT or SIGTERM arrived while the cluster was being set up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Stops the demo's PostgreSQL servers and removes their directory (no-op when there
/// are none). For paths that leave with `std::process::exit`, which runs no destructors.
pub fn cleanup() {
    let cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(cluster) = cluster {
        let root = cluster.root().to_path_buf();
        drop(cluster);
        eprintln!("pgmux demo: PostgreSQL stopped, {} removed", root.display());
    }
}

/// Runs [`cleanup`] when dropped: when `run` returns or unwinds.
struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup();
    }
}

pub fn run(args: &DemoArgs, mut flags: Flags) -> ExitCode {
    if flags.database_url.is_some() || flags.read_database_url.is_some() {
        eprintln!(
            "pgmux demo: starts its own PostgreSQL; --database-url and --read-database-url \
             do not apply (run `pgmux` without `demo` for your own database)"
        );
        return ExitCode::from(2);
    }
    // The servers are the demo's own, whatever the environment says; the serve path
    // reloads (SIGHUP) from flags and environment, so the variables go, not just
    // their values here. Still single-threaded.
    std::env::remove_var("DATABASE_URL");
    std::env::remove_var("READ_DATABASE_URL");
    let env: BTreeMap<String, String> = std::env::vars().collect();
    if flags.listen.is_none() && !env.contains_key("PGMUX_LISTEN") {
        flags.listen = Some(DEFAULT_LISTEN.to_string());
    }

    // Everything that can be wrong without PostgreSQL, before starting it: the
    // configuration (with stand-in URLs), the two listen addresses, the binaries.
    let mut probe = flags.clone();
    probe.database_url = Some(format!("postgres://{DEMO_USER}:x@127.0.0.1:5432/{DEMO_DB}"));
    if args.replicas > 0 {
        probe.read_database_url =
            Some(format!("postgres://{DEMO_USER}:x@127.0.0.1:5433/{DEMO_DB}"));
    }
    let probe = match pgmux_config::load(&probe, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgmux: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    for (addr, what) in [
        (probe.listen, "listen"),
        (probe.admin.listen, "admin.listen"),
    ] {
        if let Err(e) = TcpListener::bind(addr) {
            eprintln!("pgmux demo: cannot listen on {addr} ({what}): {e}");
            return ExitCode::FAILURE;
        }
    }
    let bindir = match pgcluster::try_pg_bindir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("pgmux demo: {e}");
            return ExitCode::FAILURE;
        }
    };

    watch_signals_during_setup();
    let _guard = CleanupGuard;
    let password = random_password();
    eprintln!(
        "pgmux demo: starting a PostgreSQL primary and {} streaming replica{} ({})",
        args.replicas,
        if args.replicas == 1 { "" } else { "s" },
        bindir.display()
    );
    let replicas = args.replicas;
    let pw = password.clone();
    // A failed step panics (with the command's output); unwinding stops what runs.
    match std::panic::catch_unwind(move || set_up(replicas, &pw)) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("pgmux demo: interrupted");
            return ExitCode::from(130);
        }
        Err(_) => {
            eprintln!("pgmux demo: could not set up PostgreSQL (see above)");
            return ExitCode::FAILURE;
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("pgmux demo: interrupted");
        return ExitCode::from(130);
    }

    let (root, primary_port, replica_ports) = {
        let guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        let cluster = guard.as_ref().expect("set up");
        flags.database_url = Some(cluster.primary().url(DEMO_USER, &password, DEMO_DB));
        flags.read_database_url =
            (replicas > 0).then(|| cluster.replica_urls(DEMO_USER, &password, DEMO_DB));
        (
            cluster.root().to_path_buf(),
            cluster.primary().port,
            cluster.replica_ports(),
        )
    };
    let config = match pgmux_config::load(&flags, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgmux: configuration error: {e}");
            return ExitCode::from(2);
        }
    };

    let url_for = |db: &str| {
        pgcluster::pg_url(config.listen.port(), DEMO_USER, &password, db).replacen(
            "@127.0.0.1:",
            &format!("@{}:", connect_host(config.listen)),
            1,
        )
    };
    let url = url_for(DEMO_DB);
    let console = url_for("pgbouncer");
    let admin = format!(
        "http://{}:{}",
        connect_host(config.admin.listen),
        config.admin.listen.port()
    );
    let replicas_text = if replica_ports.is_empty() {
        "no replicas".to_string()
    } else {
        let ports: Vec<String> = replica_ports.iter().map(|p| p.to_string()).collect();
        match ports.len() {
            1 => format!("replica on port {}", ports[0]),
            _ => format!("replicas on ports {}", ports.join(", ")),
        }
    };
    let console_ok = config.stats_users.iter().any(|u| u == DEMO_USER)
        || config.admin_users.iter().any(|u| u == DEMO_USER);
    let mut text = format!(
        "\n\
         pgmux demo: PostgreSQL primary on port {primary_port}, {replicas_text}; data in {root}\n\
         \n\
         \x20 DATABASE_URL={url}\n\
         \n\
         \x20 psql {url}\n\
         \x20   SELECT count(*) FROM items;                   -- read-only: a replica serves it\n\
         \x20   INSERT INTO items (name, price) VALUES ('new', 1.50) RETURNING id;  -- the primary\n\
         \n\
         \x20 Admin API:  {admin}/api/v1/pools\n\
         \x20 Metrics:    {admin}/metrics\n",
        root = root.display(),
    );
    if console_ok {
        text.push_str(&format!(
            "\x20 Console:    psql {console} -c 'SHOW POOLS'\n"
        ));
    }
    text.push_str(&format!(
        "\x20 Live view:  pgmux top --admin {admin}\n\
         \n\
         Ctrl-C to stop (pgmux drains, then PostgreSQL is stopped and {} removed).\n",
        root.display()
    ));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    drop(stdout);

    crate::serve(config, flags)
    // _guard: the cluster stops here, after pgmux has drained.
}

/// Starts the cluster into [`CLUSTER`]: the primary, the demo role, database and
/// table, then the replicas (cloned with all of it). False when a signal arrived.
fn set_up(replicas: usize, password: &str) -> bool {
    *CLUSTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(PgCluster::start());
    let with = |f: &mut dyn FnMut(&mut PgCluster)| {
        let mut guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.as_mut().expect("started"));
    };
    if INTERRUPTED.load(Ordering::SeqCst) {
        return false;
    }
    with(&mut |c| {
        c.create_role(DEMO_USER, password);
        c.create_database(DEMO_DB, DEMO_USER);
        c.primary().psql(
            DEMO_DB,
            "SET ROLE demo;\n\
             CREATE TABLE items (\n\
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n\
                 name text NOT NULL,\n\
                 price numeric(10, 2) NOT NULL,\n\
                 created_at timestamptz NOT NULL DEFAULT now()\n\
             );\n\
             INSERT INTO items (name, price)\n\
                 SELECT 'item ' || i, round((random() * 100)::numeric, 2)\n\
                 FROM generate_series(1, 1000) AS i;\n\
             ANALYZE items;",
        );
        if replicas > 0 {
            c.keep_wal_for_replicas();
        }
    });
    for _ in 0..replicas {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return false;
        }
        with(&mut |c| {
            c.add_replica();
        });
    }
    true
}

/// Until pgmux installs its own handlers: SIGINT / SIGTERM set [`INTERRUPTED`]
/// instead of killing the process with the servers still running (set-up checks it
/// between steps). A terminal's Ctrl-C also reaches a running initdb or psql, whose
/// failure then unwinds the set-up.
fn watch_signals_during_setup() {
    let spawned = std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    INTERRUPTED.store(true, Ordering::SeqCst);
                }
            });
        });
    if spawned.is_err() {
        eprintln!("pgmux demo: cannot watch for signals during set-up");
    }
}

/// 128 random bits as hex (URL-safe, no quoting needed anywhere).
fn random_password() -> String {
    let mut bytes = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        // Randomly keyed SipHash (std seeds RandomState from the OS).
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default(),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The host to connect to for a listen address: loopback for a wildcard address.
fn connect_host(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("[{}]", Ipv6Addr::LOCALHOST),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}
