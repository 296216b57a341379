//! Prometheus metrics.
//!
//! One [`PrometheusRecorder`] per process, owned here and never installed as the global
//! recorder (no globals: tests run several proxies in one process). Two kinds of data
//! reach it:
//!
//! * **Histograms** are recorded by the proxy as things happen, through the handles of
//!   [`PoolHistograms`] it takes once per pool (a handle records without a lookup).
//!   They are real Prometheus histograms: every `*_seconds` metric has buckets. They are
//!   pgmux's own [`DurationHistogram`]s (a counter per bucket, two atomic adds per
//!   sample), rendered with the exporter's formatting functions: the recorder's
//!   histograms keep every sample in a lock-free list until upkeep folds them into
//!   buckets, which cost ~600 instructions per transaction on the hot path.
//! * **Counters and gauges** already live in the proxy as atomics; [`Metrics::render`]
//!   copies a [`Control`] snapshot into the recorder just before rendering, so there is
//!   one source of truth and nothing is counted twice. The recorder holds no histograms,
//!   so it needs no periodic upkeep.
//!
//! Labels stay bounded: database, user, role, and small fixed sets (state, reason,
//! SQLSTATE class, replica address from the configuration).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::formatting::{
    key_to_parts, write_help_line, write_metric_line, write_type_line,
};
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

/// Each histogram's help text.
const HISTOGRAM_HELP: &[(&str, &str)] = &[
    (
        CLIENT_WAIT,
        "Time a client waited for a server connection, per checkout.",
    ),
    (
        TRANSACTION_DURATION,
        "Time a server was linked to a client, per transaction.",
    ),
    (
        QUERY_DURATION,
        "Time from a request to its ReadyForQuery, per query.",
    ),
];

/// [`BUCKETS`] in nanoseconds.
const BOUNDS_NS: [u64; BUCKETS.len()] = {
    let mut b = [0u64; BUCKETS.len()];
    let mut i = 0;
    while i < b.len() {
        b[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    b
};

/// A Prometheus histogram of durations with the [`BUCKETS`] bounds: a counter per
/// bucket (plus one past the last bound) and the sum, updated with two relaxed atomic
/// adds per sample, read when `/metrics` is rendered.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// `counts[i]`: samples above bucket i-1 and at most bucket i; the last, above all.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Most samples are short: the first bound at or above them is found early.
        let i = BOUNDS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (Prometheus `le`), then the total.
    fn cumulative(&self) -> ([u64; BUCKETS.len()], u64) {
        let mut out = [0; BUCKETS.len()];
        let mut total = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            if let Some(o) = out.get_mut(i) {
                *o = total;
            }
        }
        (out, total)
    }
}

/// A registered histogram: its name, its labels as the exporter formats them, the data.
type Registered = (&'static str, Vec<String>, Arc<DurationHistogram>);

/// The recorder and its renderer.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// In registration order; a pool made again with the same labels (a reload) gets
    /// the same histograms back, so its series go on.
    histograms: Mutex<Vec<Registered>>,
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
    pub wait: Arc<DurationHistogram>,
    /// Time from checkout to release, per transaction.
    pub transaction: Arc<DurationHistogram>,
    /// Time from a request to its ReadyForQuery, per query.
    pub query: Arc<DurationHistogram>,
}

impl PoolHistograms {
    /// Histograms no renderer shows (a pool made without a recorder, e.g. in unit tests).
    pub fn noop() -> Self {
        PoolHistograms {
            wait: Arc::default(),
            transaction: Arc::default(),
            query: Arc::default(),
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
        // Bucket bounds are pgmux's own ([`BUCKETS`], in [`DurationHistogram`]).
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Metrics {
            recorder,
            handle,
            histograms: Mutex::new(Vec::new()),
        }
    }

    fn histogram(&self, name: &'static str, l: Vec<Label>) -> Arc<DurationHistogram> {
        let (_, labels) = key_to_parts(&Key::from_parts(name, l), None);
        let mut all = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, h)) = all.iter().find(|(n, l, _)| *n == name && *l == labels) {
            return h.clone();
        }
        let h = Arc::new(DurationHistogram::default());
        all.push((name, labels, h.clone()));
        h
    }

    fn counter(&self, name: &'static str, l: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, l), &METADATA)
    }

    fn gauge(&self, name: &'static str, l: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, l), &METADATA)
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
        let mut out = self.handle.render();
        self.render_histograms(&mut out);
        out
    }

    /// The histograms in the exposition format, as the exporter writes its own: help and
    /// type lines per name, then per label set the cumulative buckets, `+Inf`, sum and
    /// count.
    fn render_histograms(&self, out: &mut String) {
        let all = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        for (name, help) in HISTOGRAM_HELP {
            let mut series = all.iter().filter(|(n, _, _)| n == name).peekable();
            if series.peek().is_none() {
                continue;
            }
            write_help_line(out, name, help);
            write_type_line(out, name, "histogram");
            for (_, labels, h) in series {
                let (cumulative, total) = h.cumulative();
                for (le, n) in BUCKETS.iter().zip(cumulative) {
                    write_metric_line(out, name, Some("bucket"), labels, Some(("le", le)), n, None);
                }
                write_metric_line(
                    out,
                    name,
                    Some("bucket"),
                    labels,
                    Some(("le", "+Inf")),
                    total,
                    None,
                );
                let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
                write_metric_line::<&str, f64>(out, name, Some("sum"), labels, None, sum, None);
                write_metric_line::<&str, u64>(out, name, Some("count"), labels, None, total, None);
            }
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let m = Metrics::new();
        let h = m.pool_histograms("app", "u", Role::Primary);
        h.wait.record(Duration::from_millis(3));
        h.wait.record(Duration::from_millis(200));
        let mut text = String::new();
        m.render_histograms(&mut text);
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

    /// The hand-kept histograms render exactly as the exporter's own would, for the same
    /// samples: what dashboards and alerts already read does not change.
    #[test]
    fn histograms_render_as_the_exporter_does() {
        let samples_ms = [0u64, 1, 3, 3, 40, 200, 1_500, 90_000];
        let m = Metrics::new();
        let ours = m.pool_histograms("app \"x\"", "u", Role::Replica);
        let theirs = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .unwrap()
            .build_recorder();
        let (name, help) = HISTOGRAM_HELP[2];
        theirs.describe_histogram(name.into(), Some(metrics::Unit::Seconds), help.into());
        let key = Key::from_parts(
            name,
            labels(&[
                ("database", "app \"x\""),
                ("user", "u"),
                ("role", "replica"),
            ]),
        );
        let reference = theirs.register_histogram(&key, &METADATA);
        for ms in samples_ms {
            ours.query.record(Duration::from_millis(ms));
            reference.record(ms as f64 / 1e3);
        }
        let mut text = String::new();
        m.render_histograms(&mut text);
        let expected = theirs.handle().render();
        let section = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.contains(name))
                .map(String::from)
                .collect()
        };
        let (ours_lines, theirs_lines) = (section(&text), section(&expected));
        assert_eq!(
            ours_lines.len(),
            theirs_lines.len(),
            "{text}\n---\n{expected}"
        );
        for (a, b) in ours_lines.iter().zip(&theirs_lines) {
            if a.contains("_sum{") {
                // Summed in nanoseconds here, in f64 seconds there.
                let v = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
                assert!((v(a) - v(b)).abs() < 1e-9, "{a} / {b}");
                assert_eq!(a.rsplit_once(' ').unwrap().0, b.rsplit_once(' ').unwrap().0);
            } else {
                assert_eq!(a, b);
            }
        }
    }
}
