//! pgmux binary: command line, runtime, signals, and wiring of config + proxy + admin.

mod demo;
mod top;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgmux_config::{Config, Flags};

/// A transaction-mode PostgreSQL connection pooler.
///
/// Configuration is layered, later wins: built-in defaults < TOML file (--config or
/// PGMUX_CONFIG) < environment (DATABASE_URL, READ_DATABASE_URL, PGMUX_LISTEN,
/// PGMUX_POOL_SIZE, PGMUX_MAX_CLIENT_CONN, PGMUX_AUTH_TYPE, PGMUX_QUERY_WAIT_TIMEOUT,
/// PGMUX_SERVER_CONNECT_TIMEOUT, PGMUX_CLIENT_LOGIN_TIMEOUT, PGMUX_SHUTDOWN_TIMEOUT,
/// PGMUX_SERVER_IDLE_TIMEOUT, PGMUX_MAX_MESSAGE_SIZE, PGMUX_WORKERS) < these flags.
/// `DATABASE_URL=postgres://app:secret@db-host:5432/app pgmux` alone is a working setup.
/// Log level: PGMUX_LOG (e.g. "info", "debug", "pgmux_proxy=trace"), default info.
#[derive(Parser, Debug)]
#[command(name = "pgmux", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (env: PGMUX_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept clients on, e.g. 0.0.0.0:6432 (env: PGMUX_LISTEN).
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Primary server, postgres://user:password@host:port/dbname (env: DATABASE_URL).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Read replicas, comma-separated URLs (env: READ_DATABASE_URL).
    #[arg(long, global = true, value_name = "URLS")]
    read_database_url: Option<String>,
    /// Server connections per (database, user) pool (env: PGMUX_POOL_SIZE, default 20).
    #[arg(long, global = true, value_name = "N")]
    pool_size: Option<String>,
    /// Most client connections accepted at once (env: PGMUX_MAX_CLIENT_CONN, default 5000).
    #[arg(long, global = true, value_name = "N")]
    max_client_conn: Option<String>,
    /// Admin HTTP listener (API, /metrics, probes), default 127.0.0.1:9930
    /// (env: PGMUX_ADMIN_LISTEN).
    #[arg(long, global = true, value_name = "ADDR")]
    admin_listen: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print the effective result with secrets redacted.
    CheckConfig,
    /// Live terminal view of a running pgmux's pools (from its admin API).
    Top(top::TopArgs),
    /// Try pgmux locally: starts a throwaway PostgreSQL primary and streaming replicas
    /// (installed server binaries), serves pgmux in front of them (listen default
    /// 127.0.0.1:6432) and prints the URL to connect to; Ctrl-C stops and removes all.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Top(args)) = &cli.command {
        return top::run(args);
    }
    let flags = Flags {
        config: cli.config.clone(),
        listen: cli.listen.clone(),
        database_url: cli.database_url.clone(),
        read_database_url: cli.read_database_url.clone(),
        pool_size: cli.pool_size.clone(),
        max_client_conn: cli.max_client_conn.clone(),
        admin_listen: cli.admin_listen.clone(),
    };
    if let Some(Command::Demo(args)) = &cli.command {
        return demo::run(args, flags);
    }
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let config = match pgmux_config::load(&flags, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgmux: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            // The certificate and key must parse and go together, as at start-up.
            if let Err(e) = pgmux_proxy::tls::ClientTls::default().refresh(&config.client_tls) {
                eprintln!("pgmux: configuration error: {e}");
                return ExitCode::from(2);
            }
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        // `top` and `demo` returned above.
        Some(Command::Top(_) | Command::Demo(_)) | None => serve(config, flags),
    }
}

fn serve(config: Config, flags: Flags) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGMUX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Every client and server connection is a file descriptor.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open files limit");
    }
    let workers = if config.workers == 0 {
        auto_workers(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    } else {
        config.workers
    };
    // One worker: a current-thread runtime (no work-stealing, no cross-thread wake-ups),
    // PgBouncer's single event loop in effect.
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            // SQL classification for read routing recurses with the parse tree's depth.
            .thread_stack_size(pgmux_proxy::router::CLASSIFY_STACK_BYTES)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgmux: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // The admin listener first: probes answer as soon as clients can connect.
        let admin_addr = config.admin.listen;
        let admin_listener = match tokio::net::TcpListener::bind(admin_addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pgmux: cannot listen on {admin_addr} (admin.listen): {e}");
                return ExitCode::FAILURE;
            }
        };
        let listen = config.listen;
        let proxy = match pgmux_proxy::Proxy::bind(config).await {
            Ok(p) => p,
            // A client TLS certificate or key that does not load.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                eprintln!("pgmux: configuration error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("pgmux: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shared = proxy.shared.clone();
        *shared.reloader.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(move || {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            pgmux_config::load(&flags, &env)
        }));
        let admin_stop = tokio_util::sync::CancellationToken::new();
        let admin = tokio::spawn(pgmux_admin::http::serve(
            admin_listener,
            shared.clone(),
            shared.metrics.clone(),
            admin_stop.clone(),
        ));
        tracing::info!(listen = %proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(), admin = %admin_addr, workers, "pgmux accepting connections");
        let signals = shared.clone();
        tokio::spawn(async move {
            use pgmux_admin::Control;
            use tokio::signal::unix::{signal, SignalKind};
            let shared = signals;
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
                    _ = int.recv() => {
                        tracing::info!("SIGINT: fast shutdown (running transactions are cancelled)");
                        shared.fast_shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        // Errors are logged by reload; the running configuration stays.
                        let _ = shared.reload();
                    }
                }
            }
            shared.shutdown.cancel();
            // A second signal means: stop now.
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::warn!("second signal: exiting without waiting");
            // `pgmux demo`: its PostgreSQL servers go too (exit runs no destructors).
            demo::cleanup();
            std::process::exit(1);
        });
        proxy.run().await;
        admin_stop.cancel();
        let _ = admin.await;
        tracing::info!("pgmux stopped");
        ExitCode::SUCCESS
    })
}

/// Runtime threads for `workers = 0`, from the CPUs this process may use (cgroup quota
/// and affinity included). Up to two CPUs, one thread: the pooler shares them with
/// PostgreSQL, the clients or the application, and on a 2-core box a second worker cost
/// 15-25% more CPU per transaction in cross-thread wake-ups than it gained (docs/benchmarks.md).
/// Beyond that, one per CPU.
fn auto_workers(cpus: usize) -> usize {
    if cpus <= 2 {
        1
    } else {
        cpus
    }
}
