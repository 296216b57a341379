//! Fuzz entry point for the SQL console (see `proxy::fuzzing` for the others). Called by
//! the `console_command` cargo-fuzz target under `fuzz/` and by the replay-and-mutate
//! test `admin/tests/fuzz_replay.rs`. Not part of pgmux's API.

use std::collections::BTreeMap;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::console::{self, Access, Reply};
use crate::{
    AdminAuth, BoxFuture, ClientCounts, ClientInfo, ConfigItem, Control, ControlError,
    DatabaseInfo, PoolInfo, PoolLimits, PoolPatch, PoolTotals, Readiness, ReplicaInfo, Role,
    RouteCounts, ServerCounts, ServerInfo, Totals,
};

/// The console's whole path for one Query message: the session hands the query text
/// (bytes up to the first NUL, invalid UTF-8 replaced) to [`console::execute`], which
/// lexes it (quotes, `;`), parses each command and runs it against a [`Control`] — here
/// a stand-in proxy with a pool, a client, a server and a database (odd addresses and
/// extreme numbers included) whose operations succeed or fail depending on the name
/// given. Run once as an admin user and once as a stats user.
///
/// Asserts: the answer is ready at once (the stand-in never waits), never empty, has at
/// most one error and nothing after it, every table row has one value per column, and
/// a stats user never reaches an operation that changes something.
pub fn console_command(data: &[u8]) {
    let text = data.split(|b| *b == 0).next().unwrap_or_default();
    let sql = String::from_utf8_lossy(text);
    for access in [Access::Admin, Access::Stats] {
        let control = Stand::default();
        let replies = run_now(console::execute(&control, access, &sql));
        assert!(!replies.is_empty(), "no answer to {sql:?}");
        let errors = replies
            .iter()
            .filter(|r| matches!(r, Reply::Error { .. }))
            .count();
        assert!(errors <= 1, "{errors} errors for {sql:?}");
        if errors == 1 {
            assert!(
                matches!(replies.last(), Some(Reply::Error { .. })),
                "answers after an error for {sql:?}"
            );
        }
        for r in &replies {
            match r {
                Reply::Table { columns, rows, .. } => {
                    for row in rows {
                        assert_eq!(row.len(), columns.len(), "ragged row for {sql:?}");
                    }
                }
                Reply::Error { code, .. } => {
                    assert!(code.len() == 5 && code.is_ascii(), "bad SQLSTATE {code:?}");
                }
                Reply::Empty => assert_eq!(replies.len(), 1),
                Reply::Done(_) | Reply::Notice { .. } => {}
            }
        }
        if access == Access::Stats {
            assert_eq!(
                control.changes.load(std::sync::atomic::Ordering::Relaxed),
                0,
                "a stats user changed something with {sql:?}"
            );
        }
    }
}

/// Polls `f` once: the stand-in control never waits.
fn run_now<T>(f: impl Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the console waited on a control that never waits"),
    }
}

/// A stand-in proxy: fixed rows with awkward values; operations fail for names starting
/// with `bad`/`gone`/`slow`.
#[derive(Default)]
struct Stand {
    changes: std::sync::atomic::AtomicUsize,
}

impl Stand {
    fn change(&self, name: Option<&str>) -> Result<(), ControlError> {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match name {
            Some(n) if n.starts_with("bad") => Err(ControlError::invalid(n, "invalid")),
            Some(n) if n.starts_with("gone") => Err(ControlError::NotFound(n.into())),
            Some(n) if n.starts_with("slow") => Err(ControlError::Failed(n.into())),
            _ => Ok(()),
        }
    }
}

impl Control for Stand {
    fn pools(&self) -> Vec<PoolInfo> {
        [Role::Primary, Role::Replica]
            .into_iter()
            .map(|role| PoolInfo {
                database: "app".into(),
                user: "u\"ser".into(),
                role,
                server: "[::1]:5432".into(),
                pool_mode: "transaction",
                paused: role == Role::Replica,
                limits: PoolLimits {
                    pool_size: usize::MAX,
                    min_pool_size: 0,
                    max_client_conn: 1,
                    query_wait_timeout_ms: u64::MAX,
                    server_idle_timeout_ms: 0,
                    max_prepared_statements: 100,
                },
                servers: ServerCounts {
                    active: usize::MAX,
                    idle: 1,
                    connecting: 0,
                    pinned: 0,
                },
                clients: ClientCounts {
                    active: 3,
                    waiting: usize::MAX,
                },
                max_wait_us: u64::MAX,
                totals: PoolTotals {
                    transactions: u64::MAX,
                    errors_by_class: BTreeMap::from([("08".into(), 1)]),
                    ..PoolTotals::default()
                },
            })
            .collect()
    }
    fn clients(&self) -> Vec<ClientInfo> {
        ["10.0.0.1:5000", "[::1]:1", "/tmp:notaport", ""]
            .into_iter()
            .enumerate()
            .map(|(i, addr)| ClientInfo {
                id: i as u64,
                addr: addr.into(),
                local_addr: "[::1".into(),
                user: "u".into(),
                database: "app".into(),
                application_name: "é\u{0}'".into(),
                state: "active",
                connect_time: u64::MAX,
                age_ms: 0,
                wait_us: u64::MAX,
                server_id: Some(u64::MAX),
                server_pid: Some(i32::MIN),
                cancel_pid: -1,
                tls: i % 2 == 0,
            })
            .collect()
    }
    fn servers(&self) -> Vec<ServerInfo> {
        vec![ServerInfo {
            id: u64::MAX,
            database: "app".into(),
            user: "u".into(),
            role: Role::Replica,
            addr: "::1".into(),
            state: "idle",
            connect_time: 0,
            age_ms: u64::MAX,
            idle_ms: u64::MAX,
            backend_pid: None,
            client_id: None,
            prepared_statements: usize::MAX,
            application_name: String::new(),
            tls: true,
        }]
    }
    fn databases(&self) -> Vec<DatabaseInfo> {
        vec![DatabaseInfo {
            name: "app".into(),
            host: "/var/run/postgresql".into(),
            port: u16::MAX,
            dbname: "app".into(),
            replicas: vec!["r1:5432".into()],
            pool_size: usize::MAX,
            min_pool_size: 0,
            max_client_conn: usize::MAX,
            current_connections: 0,
            max_connections: 0,
            paused: true,
        }]
    }
    fn replicas(&self) -> Vec<ReplicaInfo> {
        Vec::new()
    }
    fn totals(&self) -> Totals {
        Totals {
            version: "pgmux fuzz".into(),
            uptime_ms: 0,
            clients: usize::MAX,
            max_client_conn: 0,
            routing: vec![RouteCounts::default()],
            ..Totals::default()
        }
    }
    fn config(&self) -> Vec<ConfigItem> {
        vec![ConfigItem {
            key: "pool_size".into(),
            value: "20".into(),
            default: String::new(),
            changeable: true,
        }]
    }
    fn set_pool_limits(&self, database: &str, _: &str, _: &PoolPatch) -> Result<(), ControlError> {
        self.change(Some(database))
    }
    fn set_config(&self, changes: &[(String, String)]) -> Result<(), ControlError> {
        for (key, _) in changes {
            self.change(Some(key))?;
        }
        Ok(())
    }
    fn pause(
        &self,
        database: Option<&str>,
        _: Duration,
    ) -> BoxFuture<'_, Result<(), ControlError>> {
        let result = self.change(database);
        Box::pin(async move { result })
    }
    fn resume(&self, database: Option<&str>) -> Result<(), ControlError> {
        self.change(database)
    }
    fn reload(&self) -> Result<(), ControlError> {
        self.change(None)
    }
    fn reconnect(&self, database: Option<&str>) -> Result<(), ControlError> {
        self.change(database)
    }
    fn kill(&self, database: &str) -> Result<(), ControlError> {
        self.change(Some(database))
    }
    fn ready(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async {
            Readiness {
                ready: true,
                reasons: Vec::new(),
            }
        })
    }
    fn version(&self) -> String {
        "pgmux fuzz".into()
    }
    fn auth(&self) -> AdminAuth {
        AdminAuth::default()
    }
}
