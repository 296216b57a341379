//! Prometheus metrics.
//!
//! One [`PrometheusRecorder`] per process, owned here and never installed as the global
//! recorder (no globals: tests run several proxies in one process). Two kinds of data
//! reach it:
//!
//! * **Histograms** are recorded by the proxy as things happen, through the handles of
//!   [`PoolHistograms`] it takes once per pool (a handle records without a lookup).
//!   They are real Prometheus histograms: every `*_seconds` metric has buckets.
//! * **Counters and gauges** already live in the proxy as atomics; [`Metrics::render`]
//!   copies a [`Control`] snapshot into the recorder just before rendering, so there is
//!   one source of truth and nothing is counted twice.
//!
//! Recorded samples wait in the recorder until they are folded into buckets:
//! [`Metrics::run_upkeep`] does that, and must run periodically.
//!
//! Labels stay bounded: database, user, role, and small fixed sets (state, reason,
//! SQLSTATE class, replica address from the configuration).

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::{Control, Role};

/// Bucket bounds (seconds) of every duration histogram: 50µs to 60s.
pub const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram names.
pub const CLIENT_WAIT: &str = "pgmux_client_wait_seconds";
pub const TRANSACTION_DURATION: &str = "pgmux_transaction_duration_seconds";
pub const QUERY_DURATION: &str = "pgmux_query_duration_seconds";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The recorder and its renderer.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// A pool's histogram handles.
#[derive(Clone)]
pub struct PoolHistograms {
    /// Time a client waited for a server, per checkout.
    pub wait: Histogram,
    /// Time from checkout to release, per transaction.
    pub transaction: Histogram,
    /// Time from a request to its ReadyForQuery, per query.
    pub query: Histogram,
}

impl PoolHistograms {
    /// Handles that record nothing (a pool made without a recorder, e.g. in unit tests).
    pub fn noop() -> Self {
        PoolHistograms {
            wait: Histogram::noop(),
            transaction: Histogram::noop(),
            query: Histogram::noop(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect()
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }

    fn histogram(&self, name: &'static str, l: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, l), &METADATA)
    }

    fn counter(&self, name: &'static str, l: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, l), &METADATA)
    }

    fn gauge(&self, name: &'static str, l: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, l), &METADATA)
    }

    /// Folds the samples recorded since the last call into the histograms' buckets. The
    /// recorder keeps every sample until then, so this must run periodically (the proxy's
    /// maintenance task calls it every second), not only when Prometheus scrapes: without
    /// a scrape, memory would grow with every transaction.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The histogram handles of one pool.
    pub fn pool_histograms(&self, database: &str, user: &str, role: Role) -> PoolHistograms {
        let l = || {
            labels(&[
                ("database", database),
                ("user", user),
                ("role", role.as_str()),
            ])
        };
        PoolHistograms {
            wait: self.histogram(CLIENT_WAIT, l()),
            transaction: self.histogram(TRANSACTION_DURATION, l()),
            query: self.histogram(QUERY_DURATION, l()),
        }
    }

    /// Prometheus text exposition of everything, after copying `control`'s snapshot in.
    pub fn render(&self, control: &dyn Control) -> String {
        self.describe();
        for p in control.pools() {
            let base = [
                ("database", p.database.as_str()),
                ("user", p.user.as_str()),
                ("role", p.role.as_str()),
            ];
            let with = |k: &'static str, v: &str| {
                let mut l = labels(&base);
                l.push(Label::new(k, v.to_string()));
                l
            };
            let g = |name, v: f64| self.gauge(name, labels(&base)).set(v);
            let c = |name, v: u64| self.counter(name, labels(&base)).absolute(v);
            self.gauge("pgmux_pool_clients", with("state", "active"))
                .set(p.clients.active as f64);
            self.gauge("pgmux_pool_clients", with("state", "waiting"))
                .set(p.clients.waiting as f64);
            self.gauge("pgmux_pool_servers", with("state", "active"))
                .set(p.servers.active as f64);
            self.gauge("pgmux_pool_servers", with("state", "idle"))
                .set(p.servers.idle as f64);
            self.gauge("pgmux_pool_servers", with("state", "connecting"))
                .set(p.servers.connecting as f64);
            g("pgmux_pool_size", p.limits.pool_size as f64);
            g("pgmux_pool_min_size", p.limits.min_pool_size as f64);
            g("pgmux_pool_paused", if p.paused { 1.0 } else { 0.0 });
            g("pgmux_pool_max_wait_seconds", p.max_wait_us as f64 / 1e6);
            let t = &p.totals;
            c("pgmux_transactions_total", t.transactions);
            c("pgmux_queries_total", t.queries);
            c("pgmux_bytes_received_total", t.bytes_received);
            c("pgmux_bytes_sent_total", t.bytes_sent);
            c("pgmux_server_connections_opened_total", t.servers_opened);
            c("pgmux_server_connections_closed_total", t.servers_closed);
            c("pgmux_server_connect_errors_total", t.connect_errors);
            c("pgmux_wait_timeouts_total", t.wait_timeouts);
            c("pgmux_units_retried_total", t.units_retried);
            c("pgmux_query_timeouts_total", t.query_timeouts);
            c(
                "pgmux_prepared_statements_prepared_total",
                t.statements_prepared,
            );
            c(
                "pgmux_prepared_statements_cache_hits_total",
                t.statement_cache_hits,
            );
            c(
                "pgmux_prepared_statements_evicted_total",
                t.statement_evictions,
            );
            g("pgmux_pool_servers_pinned", p.servers.pinned as f64);
            for (action, n) in [
                ("pin", t.session_pins),
                ("warn", t.session_state_warned),
                ("reject", t.session_state_rejected),
            ] {
                self.counter("pgmux_session_state_total", with("action", action))
                    .absolute(n);
            }
            for src in &t.session_state_sources {
                let mut l = with("application_name", &src.application_name);
                l.push(Label::new("feature", src.feature.clone()));
                self.counter("pgmux_session_state_statements_total", l)
                    .absolute(src.count);
            }
            for (class, n) in &t.errors_by_class {
                self.counter("pgmux_errors_total", with("class", class))
                    .absolute(*n);
            }
        }
        let totals = control.totals();
        self.gauge("pgmux_clients_connected", vec![])
            .set(totals.clients as f64);
        self.gauge("pgmux_max_client_conn", vec![])
            .set(totals.max_client_conn as f64);
        self.gauge("pgmux_draining", vec![])
            .set(if totals.draining { 1.0 } else { 0.0 });
        self.gauge("pgmux_uptime_seconds", vec![])
            .set(totals.uptime_ms as f64 / 1e3);
        for (reason, n) in &totals.disconnects {
            self.counter(
                "pgmux_client_disconnects_total",
                labels(&[("reason", reason)]),
            )
            .absolute(*n);
        }
        for (reason, n) in &totals.server_closes {
            self.counter("pgmux_server_closes_total", labels(&[("reason", reason)]))
                .absolute(*n);
        }
        for r in &totals.routing {
            let db = r.database.as_str();
            self.counter(
                "pgmux_routed_transactions_total",
                labels(&[("database", db), ("target", "primary")]),
            )
            .absolute(r.primary);
            self.counter(
                "pgmux_routed_transactions_total",
                labels(&[("database", db), ("target", "replica")]),
            )
            .absolute(r.replica);
            for (reason, n) in &r.kept {
                self.counter(
                    "pgmux_kept_on_primary_total",
                    labels(&[("database", db), ("reason", reason)]),
                )
                .absolute(*n);
            }
            self.counter("pgmux_replica_retries_total", labels(&[("database", db)]))
                .absolute(r.retried);
        }
        for r in control.replicas() {
            let l = || {
                labels(&[
                    ("database", r.database.as_str()),
                    ("replica", r.addr.as_str()),
                ])
            };
            self.gauge("pgmux_replica_healthy", l())
                .set(if r.healthy { 1.0 } else { 0.0 });
            if let Some(ms) = r.lag_ms {
                self.gauge("pgmux_replica_lag_seconds", l())
                    .set(ms as f64 / 1e3);
            }
            if let Some(b) = r.lag_bytes {
                self.gauge("pgmux_replica_lag_bytes", l()).set(b as f64);
            }
            self.gauge("pgmux_replica_outstanding_transactions", l())
                .set(r.outstanding as f64);
            self.counter("pgmux_replica_transactions_total", l())
                .absolute(r.transactions);
        }
        self.handle.render()
    }

    fn describe(&self) {
        use metrics::Unit;
        let d = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            self.recorder
                .describe_histogram(name.into(), unit, help.into());
        };
        d(
            CLIENT_WAIT,
            Some(Unit::Seconds),
            "Time a client waited for a server connection, per checkout.",
        );
        d(
            TRANSACTION_DURATION,
            Some(Unit::Seconds),
            "Time a server was linked to a client, per transaction.",
        );
        d(
            QUERY_DURATION,
            Some(Unit::Seconds),
            "Time from a request to its ReadyForQuery, per query.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let m = Metrics::new();
        let h = m.pool_histograms("app", "u", Role::Primary);
        h.wait.record(0.003);
        h.wait.record(0.2);
        let text = m.handle.render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("pgmux_client_wait_seconds_bucket{")
                    && l.contains("le=\"0.005\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("pgmux_client_wait_seconds_count{") && l.ends_with(" 2")),
            "{text}"
        );
        assert!(!text.contains("quantile="), "summaries rendered: {text}");
    }
}
