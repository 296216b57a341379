//! `pgmux top`: a live, refreshing table of the pools of a running pgmux, read from its
//! admin HTTP API, for an operator watching a load test.
//!
//! Every interval it reads `GET /api/v1/pools` (occupancy, limits, totals) and
//! `GET /metrics` (the `pgmux_client_wait_seconds` histogram), and prints a header line
//! and one row per pool. Rates (TPS, QPS) and the wait p99 come from the difference
//! between this frame's snapshot and the previous one, so the first frame shows `-`.
//!
//! Live mode (the default) clears the screen before each frame and runs until Ctrl-C;
//! an unreachable admin listener is shown on screen and retried. `--frames N` prints N
//! plain frames separated by a blank line and exits, non-zero on the first error: for
//! scripts and tests.
//!
//! Everything that computes or renders is a pure function over [`Snapshot`]s; only
//! [`run`] and [`fetch`] touch the network, the clock and the terminal.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

/// Arguments of `pgmux top`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// Admin listener URL, e.g. http://127.0.0.1:9930
    #[arg(long, env = "PGMUX_ADMIN_URL", default_value = "http://127.0.0.1:9930")]
    pub admin: String,
    /// Bearer token (when the admin API protects reads)
    #[arg(long, env = "PGMUX_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// Refresh interval
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// Print N frames (plain, no screen clearing) and exit; for scripts and tests
    #[arg(long)]
    pub frames: Option<u64>,
}

/// The histogram of client waits for a server, per (database, user, role).
const WAIT_HISTOGRAM: &str = "pgmux_client_wait_seconds";
/// The quantile shown in the WAIT_P99 column.
const WAIT_QUANTILE: f64 = 0.99;
/// Longest an HTTP request may take, connect to last byte.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (a `/metrics` page of many pools is a few MiB at most).
const MAX_BODY: u64 = 64 << 20;
/// Clears the screen and homes the cursor.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Runs `pgmux top`. Returns 0 after `--frames N` frames (live mode runs until killed),
/// 1 when a frame fails in `--frames` mode, 2 on unusable arguments.
pub fn run(args: &TopArgs) -> ExitCode {
    let base = match normalize_base_url(&args.admin) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pgmux top: {e}");
            return ExitCode::from(2);
        }
    };
    if args.interval.is_zero() {
        eprintln!("pgmux top: --interval must be more than 0");
        return ExitCode::from(2);
    }
    let token = args.token.as_deref().filter(|t| !t.is_empty());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .http_status_as_error(false)
        .user_agent(concat!("pgmux-top/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let client = Client {
        agent,
        base,
        token: token.map(str::to_owned),
    };
    match args.frames {
        Some(n) => run_frames(&client, args.interval, n),
        None => run_live(&client, args.interval),
    }
}

/// `--frames N`: N plain frames separated by a blank line; the first error ends it.
fn run_frames(client: &Client, interval: Duration, frames: u64) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut prev: Option<Snapshot> = None;
    let mut next = Instant::now();
    for i in 0..frames {
        if i > 0 {
            sleep_until(next);
        }
        next = Instant::now() + interval;
        let cur = match fetch(client) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pgmux top: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut text = render_frame(&client.base, interval, prev.as_ref(), &cur);
        if i + 1 < frames {
            text.push('\n');
        }
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`| head`): nothing more to say to anyone.
            return ExitCode::SUCCESS;
        }
        prev = Some(cur);
    }
    ExitCode::SUCCESS
}

/// Live mode: clear, draw, sleep, forever. Errors are drawn and retried.
fn run_live(client: &Client, interval: Duration) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut prev: Option<Snapshot> = None;
    loop {
        let next = Instant::now() + interval;
        let text = match fetch(client) {
            Ok(cur) => {
                let text = render_frame(&client.base, interval, prev.as_ref(), &cur);
                prev = Some(cur);
                text
            }
            Err(e) => {
                // The server may come back as a new process with counters from zero:
                // start the rates afresh rather than difference across the gap.
                prev = None;
                render_error(&client.base, interval, SystemTime::now(), &e)
            }
        };
        let screen = format!("{CLEAR_SCREEN}{text}");
        if out
            .write_all(screen.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        sleep_until(next);
    }
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

struct Client {
    agent: ureq::Agent,
    /// `http://host:port`, without a trailing slash.
    base: String,
    token: Option<String>,
}

/// The JSON of `GET /api/v1/pools`: only the fields `top` shows.
#[derive(Debug, Clone, Deserialize)]
struct PoolsAnswer {
    pools: Vec<Pool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Pool {
    database: String,
    user: String,
    role: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    paused: bool,
    limits: Limits,
    servers: ServerCounts,
    clients: ClientCounts,
    #[serde(default)]
    max_wait_us: u64,
    totals: Totals,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Limits {
    pool_size: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ServerCounts {
    active: u64,
    idle: u64,
    connecting: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ClientCounts {
    active: u64,
    waiting: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Totals {
    transactions: u64,
    queries: u64,
}

/// The labels that name a pool's histogram: database, user, role.
type HistKey = (String, String, String);

/// One cumulative histogram bucket: `count` observations were `<= le` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    le: f64,
    count: f64,
}

/// Everything one frame knows.
#[derive(Debug, Clone)]
struct Snapshot {
    /// When the pools answer arrived (for rates).
    at: Instant,
    /// The same moment on the wall clock (for the header).
    time: SystemTime,
    pools: Vec<Pool>,
    /// Wait histograms by pool labels, or why `/metrics` could not be read.
    waits: Result<HashMap<HistKey, Vec<Bucket>>, String>,
}

/// Why a frame could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FetchError {
    /// No HTTP answer: refused, timed out, unknown host …
    Unreachable { url: String, reason: String },
    /// 401/403: a token is needed, or the one given was refused.
    Unauthorized {
        url: String,
        status: u16,
        token_given: bool,
    },
    /// Any other non-2xx answer.
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// An answer that is not what pgmux sends.
    BadAnswer { url: String, reason: String },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Unreachable { url, reason } => write!(f, "cannot reach {url}: {reason}"),
            FetchError::Unauthorized {
                url,
                status,
                token_given: false,
            } => write!(
                f,
                "{url} answered {status}: the admin API protects reads; \
                 pass --token TOKEN (or set PGMUX_ADMIN_TOKEN)"
            ),
            FetchError::Unauthorized {
                url,
                status,
                token_given: true,
            } => write!(
                f,
                "{url} answered {status}: the token was refused; \
                 check --token (or PGMUX_ADMIN_TOKEN) against admin.token"
            ),
            FetchError::Status { url, status, body } if body.is_empty() => {
                write!(f, "{url} answered HTTP {status}")
            }
            FetchError::Status { url, status, body } => {
                write!(f, "{url} answered HTTP {status}: {body}")
            }
            FetchError::BadAnswer { url, reason } => {
                write!(f, "unexpected answer from {url}: {reason}")
            }
        }
    }
}

/// Reads both endpoints. A failing `/metrics` only costs the WAIT_P99 column; a failing
/// pools list fails the frame.
fn fetch(client: &Client) -> Result<Snapshot, FetchError> {
    let pools_url = format!("{}/api/v1/pools", client.base);
    let body = get(client, &pools_url)?;
    let at = Instant::now();
    let time = SystemTime::now();
    let pools = parse_pools(&body).map_err(|reason| FetchError::BadAnswer {
        url: pools_url.clone(),
        reason,
    })?;
    let metrics_url = format!("{}/metrics", client.base);
    let waits = get(client, &metrics_url)
        .map_err(|e| e.to_string())
        .and_then(|text| parse_wait_histograms(&text).map_err(|e| format!("{metrics_url}: {e}")));
    Ok(Snapshot {
        at,
        time,
        pools,
        waits,
    })
}

/// One GET, answered 2xx, as text.
fn get(client: &Client, url: &str) -> Result<String, FetchError> {
    let mut request = client.agent.get(url);
    if let Some(token) = &client.token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().map_err(|e| FetchError::Unreachable {
        url: url.to_owned(),
        reason: describe_ureq_error(&e),
    })?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| FetchError::BadAnswer {
            url: url.to_owned(),
            reason: describe_ureq_error(&e),
        })?;
    check_status(url, status, client.token.is_some(), &body)?;
    Ok(body)
}

/// Maps a non-2xx status to its error.
fn check_status(url: &str, status: u16, token_given: bool, body: &str) -> Result<(), FetchError> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(FetchError::Unauthorized {
            url: url.to_owned(),
            status,
            token_given,
        }),
        _ => Err(FetchError::Status {
            url: url.to_owned(),
            status,
            body: error_summary(body),
        }),
    }
}

/// The gist of an error body: the JSON `error` field when there is one, else its first
/// line, kept short.
fn error_summary(body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let text = match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => body.lines().next().unwrap_or("").trim().to_owned(),
    };
    truncate(&text, 200)
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max_chars).collect();
        t.push('…');
        t
    }
}

/// An operator's words for a failed request.
fn describe_ureq_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => describe_io_error(io),
        ureq::Error::Timeout(_) => format!("timed out after {}", format_duration(HTTP_TIMEOUT)),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        other => other.to_string(),
    }
}

fn describe_io_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        ErrorKind::ConnectionReset => "connection reset".to_owned(),
        ErrorKind::TimedOut => "timed out".to_owned(),
        _ => e.to_string(),
    }
}

/// `http://host:port` without a trailing slash. A bare `host:port` gets `http://`;
/// HTTPS is refused up front (this client speaks plain HTTP only).
fn normalize_base_url(admin: &str) -> Result<String, String> {
    let admin = admin.trim();
    if admin.is_empty() {
        return Err("--admin is empty; give the admin listener, e.g. http://127.0.0.1:9930".into());
    }
    let lower = admin.to_ascii_lowercase();
    let url = if lower.starts_with("https://") {
        return Err(format!(
            "{admin}: https is not supported by pgmux top; reach the admin listener over http://"
        ));
    } else if lower.starts_with("http://") {
        admin.to_owned()
    } else if admin.contains("://") {
        return Err(format!("{admin}: expected an http:// URL"));
    } else {
        format!("http://{admin}")
    };
    Ok(url.trim_end_matches('/').to_owned())
}

fn parse_pools(body: &str) -> Result<Vec<Pool>, String> {
    serde_json::from_str::<PoolsAnswer>(body)
        .map(|a| a.pools)
        .map_err(|e| e.to_string())
}

/// The `pgmux_client_wait_seconds` buckets of every pool in a Prometheus text page,
/// sorted by bound.
fn parse_wait_histograms(text: &str) -> Result<HashMap<HistKey, Vec<Bucket>>, String> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for sample in scrape.samples {
        if sample.metric != WAIT_HISTOGRAM {
            continue;
        }
        let prometheus_parse::Value::Histogram(counts) = &sample.value else {
            continue;
        };
        let label = |name: &str| sample.labels.get(name).unwrap_or("").to_owned();
        let key = (label("database"), label("user"), label("role"));
        let mut buckets: Vec<Bucket> = counts
            .iter()
            .filter(|c| !c.less_than.is_nan())
            .map(|c| Bucket {
                le: c.less_than,
                count: c.count,
            })
            .collect();
        buckets.sort_by(|a, b| a.le.total_cmp(&b.le));
        out.insert(key, buckets);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------

/// A quantile read from a histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Quantile {
    /// About this many seconds.
    At(f64),
    /// Beyond the largest finite bucket bound (seconds): only `+Inf` holds it.
    Above(f64),
}

/// Events per second between two readings of a counter; `None` without elapsed time.
/// A counter that went down was reset (a restarted process, a re-created pool): its
/// current value is then the count since the reset.
fn rate(prev: u64, cur: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let delta = if cur >= prev { cur - prev } else { cur };
    Some(delta as f64 / secs)
}

/// The `q` quantile (0..1) of the observations made between two readings of a
/// cumulative histogram, or `None` when there were none.
///
/// `prev` is the earlier reading (empty: count from zero), `cur` the later one; both as
/// cumulative buckets, matched by bound. The answer is the smallest bound whose delta
/// count reaches `q` × the delta total, linearly interpolated inside that bucket (from
/// the previous bound, or 0 for the first). When only `+Inf` reaches it the answer is
/// [`Quantile::Above`] the largest finite bound. If any bucket went down the histogram
/// was reset, and `cur` alone is the interval's counts.
fn quantile_between(prev: &[Bucket], cur: &[Bucket], q: f64) -> Option<Quantile> {
    let mut cur: Vec<Bucket> = cur.iter().copied().filter(|b| !b.le.is_nan()).collect();
    cur.sort_by(|a, b| a.le.total_cmp(&b.le));
    let before = |le: f64| {
        prev.iter()
            .find(|p| p.le.total_cmp(&le).is_eq())
            .map_or(0.0, |p| p.count)
    };
    let mut delta: Vec<Bucket> = cur
        .iter()
        .map(|b| Bucket {
            le: b.le,
            count: b.count - before(b.le),
        })
        .collect();
    if delta.iter().any(|d| d.count < 0.0) {
        delta = cur.clone();
    }
    // Cumulative counts never go down with the bound; a scrape taken while a sample
    // was being recorded could show that for a moment. Smooth it out.
    let mut running: f64 = 0.0;
    for d in &mut delta {
        running = running.max(d.count);
        d.count = running;
    }
    let total = delta.last()?.count;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower_le = 0.0;
    let mut lower_count = 0.0;
    for d in &delta {
        if d.count >= rank && d.count > lower_count {
            if d.le.is_infinite() {
                return Some(Quantile::Above(lower_le));
            }
            let fraction = (rank - lower_count) / (d.count - lower_count);
            return Some(Quantile::At(lower_le + (d.le - lower_le) * fraction));
        }
        if d.le.is_finite() {
            lower_le = d.le;
        }
        lower_count = d.count;
    }
    // The largest bucket holds everything, so this is only reached without `+Inf`.
    Some(Quantile::Above(lower_le))
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

/// A duration in seconds, short: `0`, `0.05ms`, `0.5ms`, `2.5ms`, `12ms`, `1.2s`, `12s`,
/// `2m05s`, `1h02m`.
fn format_seconds(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".to_owned();
    }
    if secs <= 0.0 {
        return "0".to_owned();
    }
    let ms = secs * 1000.0;
    if round_to(ms, 2) < 1.0 {
        return format!("{}ms", trim_decimals(&format!("{ms:.2}")));
    }
    if round_to(ms, 1) < 10.0 {
        return format!("{}ms", trim_decimals(&format!("{ms:.1}")));
    }
    if ms.round() < 1000.0 {
        return format!("{ms:.0}ms");
    }
    if round_to(secs, 1) < 10.0 {
        return format!("{}s", trim_decimals(&format!("{secs:.1}")));
    }
    if secs.round() < 60.0 {
        return format!("{secs:.0}s");
    }
    let whole = secs.round() as u64;
    if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

fn format_duration(d: Duration) -> String {
    format_seconds(d.as_secs_f64())
}

fn format_micros(us: u64) -> String {
    format_seconds(us as f64 / 1_000_000.0)
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// `2.50` → `2.5`, `1.0` → `1`.
fn trim_decimals(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s.to_owned()
    }
}

fn format_quantile(q: Option<Quantile>) -> String {
    match q {
        None => "-".to_owned(),
        Some(Quantile::At(s)) => format_seconds(s),
        Some(Quantile::Above(s)) => format!(">{}", format_seconds(s)),
    }
}

/// A rate: `-` unknown, `0`, `0.5`, `12.3`, `1234`.
fn format_rate(r: Option<f64>) -> String {
    match r {
        None => "-".to_owned(),
        Some(r) if r <= 0.0 => "0".to_owned(),
        Some(r) if r < 100.0 => trim_decimals(&format!("{r:.1}")),
        Some(r) => format!("{r:.0}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table with a header row, columns two spaces apart, each padded to its widest cell;
/// no trailing spaces. Every line ends with a newline.
fn render_table(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(width(cell));
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i] - width(cell);
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const HEADERS: [&str; 15] = [
    "DATABASE", "USER", "ROLE", "CL_ACT", "CL_WAIT", "SV_ACT", "SV_IDLE", "SV_CONN", "POOL", "TPS",
    "QPS", "WAIT_P99", "MAXWAIT", "SERVER", "",
];

fn pool_order(p: &Pool) -> (&str, &str, u8, &str) {
    let role = if p.role == "primary" { 0 } else { 1 };
    (&p.database, &p.user, role, &p.server)
}

fn same_pool(a: &Pool, b: &Pool) -> bool {
    a.database == b.database && a.user == b.user && a.role == b.role && a.server == b.server
}

/// One frame: the header line and the pools table. `prev` is the previous successful
/// snapshot (`None` on the first frame: rates and p99 are `-`).
fn render_frame(base: &str, interval: Duration, prev: Option<&Snapshot>, cur: &Snapshot) -> String {
    let elapsed = prev.map(|p| cur.at.saturating_duration_since(p.at));
    let mut pools: Vec<&Pool> = cur.pools.iter().collect();
    pools.sort_by(|a, b| pool_order(a).cmp(&pool_order(b)));

    let mut rows = Vec::with_capacity(pools.len());
    let (mut tps_sum, mut qps_sum) = (None::<f64>, None::<f64>);
    for pool in &pools {
        let (tps, qps, p99) = match (prev, elapsed) {
            (Some(prev), Some(elapsed)) => {
                let before = prev.pools.iter().find(|p| same_pool(p, pool));
                let (tx0, q0) =
                    before.map_or((0, 0), |p| (p.totals.transactions, p.totals.queries));
                let tps = rate(tx0, pool.totals.transactions, elapsed);
                let qps = rate(q0, pool.totals.queries, elapsed);
                let key = (pool.database.clone(), pool.user.clone(), pool.role.clone());
                let p99 = match (&prev.waits, &cur.waits) {
                    (Ok(w0), Ok(w1)) => match w1.get(&key) {
                        Some(now) => {
                            let then = w0.get(&key).map_or(&[][..], Vec::as_slice);
                            format_quantile(quantile_between(then, now, WAIT_QUANTILE))
                        }
                        None => "-".to_owned(),
                    },
                    _ => "?".to_owned(),
                };
                (tps, qps, p99)
            }
            _ => {
                let p99 = if cur.waits.is_ok() { "-" } else { "?" };
                (None, None, p99.to_owned())
            }
        };
        if let Some(t) = tps {
            *tps_sum.get_or_insert(0.0) += t;
        }
        if let Some(q) = qps {
            *qps_sum.get_or_insert(0.0) += q;
        }
        rows.push(vec![
            pool.database.clone(),
            pool.user.clone(),
            pool.role.clone(),
            pool.clients.active.to_string(),
            pool.clients.waiting.to_string(),
            pool.servers.active.to_string(),
            pool.servers.idle.to_string(),
            pool.servers.connecting.to_string(),
            pool.limits.pool_size.to_string(),
            format_rate(tps),
            format_rate(qps),
            p99,
            format_micros(pool.max_wait_us),
            pool.server.clone(),
            if pool.paused { "PAUSED" } else { "" }.to_owned(),
        ]);
    }

    let clients_active: u64 = pools.iter().map(|p| p.clients.active).sum();
    let clients_waiting: u64 = pools.iter().map(|p| p.clients.waiting).sum();
    let servers: u64 = pools
        .iter()
        .map(|p| p.servers.active + p.servers.idle + p.servers.connecting)
        .sum();
    let mut out = format!(
        "pgmux top  {base}  {}  every {}  pools {}  clients {} ({} waiting)  servers {}  TPS {}  QPS {}\n",
        humantime::format_rfc3339_seconds(cur.time),
        format_duration(interval),
        pools.len(),
        clients_active + clients_waiting,
        clients_waiting,
        servers,
        format_rate(tps_sum.or(elapsed.and(Some(0.0)))),
        format_rate(qps_sum.or(elapsed.and(Some(0.0)))),
    );
    if let Err(e) = &cur.waits {
        out.push_str(&format!(
            "warning: no wait histogram (WAIT_P99 \"?\"): {e}\n"
        ));
    }
    out.push('\n');
    let mut align = [Align::Right; 15];
    for i in [0, 1, 2, 13, 14] {
        align[i] = Align::Left;
    }
    out.push_str(&render_table(&HEADERS, &align, &rows));
    if rows.is_empty() {
        out.push_str("(no pools yet: they appear with their first client)\n");
    }
    out
}

/// The live-mode screen when a frame failed.
fn render_error(base: &str, interval: Duration, time: SystemTime, e: &FetchError) -> String {
    format!(
        "pgmux top  {base}  {}  every {}\n\nerror: {e}\nretrying every {} (Ctrl-C to quit)\n",
        humantime::format_rfc3339_seconds(time),
        format_duration(interval),
        format_duration(interval),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(le: f64, count: f64) -> Bucket {
        Bucket { le, count }
    }

    /// Cumulative buckets from per-bucket counts over the given bounds plus `+Inf`.
    fn hist(bounds: &[f64], per_bucket: &[f64]) -> Vec<Bucket> {
        let mut running = 0.0;
        let mut out = Vec::new();
        for (i, le) in bounds.iter().chain([f64::INFINITY].iter()).enumerate() {
            running += per_bucket.get(i).copied().unwrap_or(0.0);
            out.push(b(*le, running));
        }
        out
    }

    const BOUNDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0];

    fn approx(q: Option<Quantile>, want: f64) {
        match q {
            Some(Quantile::At(v)) => assert!((v - want).abs() < 1e-9, "got {v}, want {want}"),
            other => panic!("got {other:?}, want At({want})"),
        }
    }

    #[test]
    fn quantile_none_without_checkouts() {
        let h = hist(BOUNDS, &[5.0, 3.0]);
        assert_eq!(quantile_between(&h, &h, 0.99), None);
        assert_eq!(quantile_between(&[], &[], 0.99), None);
        assert_eq!(quantile_between(&[], &hist(BOUNDS, &[]), 0.99), None);
    }

    #[test]
    fn quantile_uses_only_the_interval() {
        // Before: 1000 slow waits (in the 0.1..1s bucket). Since: 100 fast ones.
        let before = hist(BOUNDS, &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1000.0]);
        let after = hist(BOUNDS, &[100.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1000.0]);
        // rank 99 of 100, all in the first bucket (0..0.5ms): 0.0005 * 0.99.
        approx(quantile_between(&before, &after, 0.99), 0.0005 * 0.99);
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        // 90 in (..0.5ms], 10 in (5ms..10ms]: rank 99 is the 9th of 10 in that bucket.
        let cur = hist(BOUNDS, &[90.0, 0.0, 0.0, 0.0, 10.0]);
        approx(quantile_between(&[], &cur, 0.99), 0.005 + 0.005 * 0.9);
        // Exactly at a bound's cumulative count: that bound.
        let cur = hist(BOUNDS, &[99.0, 1.0]);
        approx(quantile_between(&[], &cur, 0.99), 0.0005);
        // p50 of 100 evenly split between two buckets.
        let cur = hist(BOUNDS, &[50.0, 50.0]);
        approx(quantile_between(&[], &cur, 0.5), 0.0005);
        approx(quantile_between(&[], &cur, 0.75), 0.00075);
    }

    #[test]
    fn quantile_skips_empty_buckets_below() {
        // Nothing in the low buckets: rank 1 of 1 lies in (25ms..50ms].
        let cur = hist(BOUNDS, &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        approx(quantile_between(&[], &cur, 0.99), 0.025 + 0.025 * 0.99);
    }

    #[test]
    fn quantile_in_inf_bucket_is_above_largest_bound() {
        let cur = hist(BOUNDS, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 99.0]);
        assert_eq!(
            quantile_between(&[], &cur, 0.99),
            Some(Quantile::Above(1.0))
        );
        assert_eq!(format_quantile(Some(Quantile::Above(1.0))), ">1s");
    }

    #[test]
    fn quantile_after_reset_uses_current_counts() {
        let before = hist(BOUNDS, &[1000.0]);
        let after = hist(BOUNDS, &[0.0, 10.0]);
        approx(
            quantile_between(&before, &after, 0.99),
            0.0005 + 0.0005 * 0.99,
        );
    }

    #[test]
    fn quantile_matches_buckets_by_bound_in_any_order() {
        let before = vec![b(f64::INFINITY, 10.0), b(0.001, 10.0)];
        let after = vec![b(0.001, 10.0), b(f64::INFINITY, 20.0)];
        assert_eq!(
            quantile_between(&before, &after, 0.99),
            Some(Quantile::Above(0.001))
        );
    }

    #[test]
    fn rates() {
        assert_eq!(rate(100, 300, Duration::from_secs(2)), Some(100.0));
        assert_eq!(rate(100, 100, Duration::from_secs(1)), Some(0.0));
        assert_eq!(rate(100, 300, Duration::ZERO), None);
        assert_eq!(rate(500, 40, Duration::from_millis(500)), Some(80.0)); // reset
        assert_eq!(format_rate(None), "-");
        assert_eq!(format_rate(Some(0.0)), "0");
        assert_eq!(format_rate(Some(0.5)), "0.5");
        assert_eq!(format_rate(Some(12.34)), "12.3");
        assert_eq!(format_rate(Some(7.0)), "7");
        assert_eq!(format_rate(Some(1234.4)), "1234");
    }

    #[test]
    fn seconds_formatting() {
        let cases = [
            (0.0, "0"),
            (0.00005, "0.05ms"),
            (0.0005, "0.5ms"),
            (0.00025, "0.25ms"),
            (0.000999, "1ms"),
            (0.001, "1ms"),
            (0.0025, "2.5ms"),
            (0.00347, "3.5ms"),
            (0.012, "12ms"),
            (0.250, "250ms"),
            (0.9996, "1s"),
            (1.2, "1.2s"),
            (2.5, "2.5s"),
            (12.3, "12s"),
            (59.6, "1m00s"),
            (125.0, "2m05s"),
            (3720.0, "1h02m"),
            (f64::NAN, "?"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_seconds(secs), want, "{secs}");
        }
        assert_eq!(format_micros(0), "0");
        assert_eq!(format_micros(12_000), "12ms");
        assert_eq!(format_micros(1_200_000), "1.2s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["app".to_owned(), "12".to_owned(), "x".to_owned()],
            vec!["analytics".to_owned(), "3".to_owned(), String::new()],
        ];
        let t = render_table(
            &["DATABASE", "N", "NOTE"],
            &[Align::Left, Align::Right, Align::Left],
            &rows,
        );
        assert_eq!(
            t,
            "DATABASE    N  NOTE\n\
             app        12  x\n\
             analytics   3\n"
        );
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            normalize_base_url("http://127.0.0.1:9930/").unwrap(),
            "http://127.0.0.1:9930"
        );
        assert_eq!(
            normalize_base_url("localhost:9930").unwrap(),
            "http://localhost:9930"
        );
        assert!(normalize_base_url("https://x:1")
            .unwrap_err()
            .contains("https"));
        assert!(normalize_base_url("ftp://x").is_err());
        assert!(normalize_base_url(" ").is_err());
    }

    #[test]
    fn status_errors() {
        let url = "http://127.0.0.1:9930/api/v1/pools";
        assert!(check_status(url, 200, false, "").is_ok());
        let e = check_status(url, 401, false, "").unwrap_err();
        assert!(e.to_string().contains("--token"), "{e}");
        let e = check_status(url, 401, true, "").unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        let e = check_status(url, 500, false, r#"{"error":"boom"}"#).unwrap_err();
        assert_eq!(e.to_string(), format!("{url} answered HTTP 500: boom"));
        let e = FetchError::Unreachable {
            url: "http://127.0.0.1:1/api/v1/pools".into(),
            reason: describe_io_error(&std::io::ErrorKind::ConnectionRefused.into()),
        };
        assert_eq!(
            e.to_string(),
            "cannot reach http://127.0.0.1:1/api/v1/pools: connection refused"
        );
    }

    const POOLS_JSON: &str = r#"{"pools":[
      {"database":"app","user":"app","role":"primary","server":"db:5432",
       "pool_mode":"transaction","paused":false,
       "limits":{"pool_size":20,"min_pool_size":0,"max_client_conn":5000,
                 "query_wait_timeout_ms":120000,"server_idle_timeout_ms":600000,
                 "max_prepared_statements":100},
       "servers":{"active":18,"idle":2,"connecting":0},
       "clients":{"active":180,"waiting":12},
       "max_wait_us":12000,
       "totals":{"transactions":1000,"queries":3000,"bytes_received":1,"bytes_sent":2,
                 "wait_time_us":5,"errors_by_class":{"57":1}}},
      {"database":"app","user":"app","role":"replica","server":"replica1:5432",
       "pool_mode":"transaction","paused":true,
       "limits":{"pool_size":10},
       "servers":{"active":0,"idle":1,"connecting":1},
       "clients":{"active":0,"waiting":0},
       "max_wait_us":0,
       "totals":{"transactions":0,"queries":0}}
    ]}"#;

    const METRICS: &str = r#"# HELP pgmux_client_wait_seconds time waited for a server
# TYPE pgmux_client_wait_seconds histogram
pgmux_client_wait_seconds_bucket{database="app",user="app",role="primary",le="0.0005"} 90
pgmux_client_wait_seconds_bucket{database="app",user="app",role="primary",le="0.001"} 95
pgmux_client_wait_seconds_bucket{database="app",user="app",role="primary",le="0.01"} 100
pgmux_client_wait_seconds_bucket{database="app",user="app",role="primary",le="+Inf"} 100
pgmux_client_wait_seconds_sum{database="app",user="app",role="primary"} 0.1
pgmux_client_wait_seconds_count{database="app",user="app",role="primary"} 100
# TYPE pgmux_pool_clients gauge
pgmux_pool_clients{database="app",user="app",role="primary",state="active"} 180
"#;

    #[test]
    fn parses_pools_json_ignoring_unknown_fields() {
        let pools = parse_pools(POOLS_JSON).unwrap();
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[0].clients.waiting, 12);
        assert_eq!(pools[0].totals.transactions, 1000);
        assert_eq!(pools[1].role, "replica");
        assert!(pools[1].paused);
        assert!(parse_pools("{}").is_err());
    }

    #[test]
    fn parses_wait_histograms() {
        let h = parse_wait_histograms(METRICS).unwrap();
        assert_eq!(h.len(), 1);
        let key = ("app".to_owned(), "app".to_owned(), "primary".to_owned());
        let buckets = &h[&key];
        assert_eq!(buckets.len(), 4);
        assert_eq!(buckets[0], b(0.0005, 90.0));
        assert_eq!(buckets[3], b(f64::INFINITY, 100.0));
    }

    fn snapshot(at: Instant, pools: &str, metrics: &str) -> Snapshot {
        Snapshot {
            at,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            pools: parse_pools(pools).unwrap(),
            waits: parse_wait_histograms(metrics),
        }
    }

    #[test]
    fn frames_show_rates_and_p99_from_the_second_on() {
        let t0 = Instant::now();
        let first = snapshot(t0, POOLS_JSON, METRICS);
        let pools2 = POOLS_JSON
            .replace(r#""transactions":1000"#, r#""transactions":1500"#)
            .replace(r#""queries":3000"#, r#""queries":4000"#);
        // 100 more waits: 50 fast, 50 in (1ms..10ms].
        let metrics2 = METRICS
            .replace(r#"le="0.0005"} 90"#, r#"le="0.0005"} 140"#)
            .replace(r#"le="0.001"} 95"#, r#"le="0.001"} 145"#)
            .replace(r#"le="0.01"} 100"#, r#"le="0.01"} 200"#)
            .replace(r#"le="+Inf"} 100"#, r#"le="+Inf"} 200"#);
        let second = snapshot(t0 + Duration::from_secs(2), &pools2, &metrics2);

        let base = "http://127.0.0.1:9930";
        let f1 = render_frame(base, Duration::from_secs(1), None, &first);
        let lines: Vec<&str> = f1.lines().collect();
        assert!(lines[0].starts_with("pgmux top  http://127.0.0.1:9930  2023-11-14T22:13:20Z"));
        assert!(
            lines[0].contains("clients 192 (12 waiting)"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("TPS -"), "{}", lines[0]);
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("DATABASE  USER  ROLE     CL_ACT  CL_WAIT"));
        let cells: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "app", "app", "primary", "180", "12", "18", "2", "0", "20", "-", "-", "-", "12ms",
                "db:5432"
            ]
        );
        let cells: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(cells[2], "replica");
        assert_eq!(cells.last(), Some(&"PAUSED"));

        let f2 = render_frame(base, Duration::from_secs(1), Some(&first), &second);
        let lines: Vec<&str> = f2.lines().collect();
        assert!(lines[0].contains("TPS 250  QPS 500"), "{}", lines[0]);
        let cells: Vec<&str> = lines[3].split_whitespace().collect();
        // 500 tx / 2 s, 1000 queries / 2 s; p99: rank 99 of 100, 50 below 1ms, the
        // other 50 in (1ms..10ms]: 1ms + 9ms × 49/50 = 9.82ms.
        assert_eq!(&cells[9..13], ["250", "500", "9.8ms", "12ms"]);
        // No checkouts on the replica pool: no p99, rates 0.
        let cells: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(&cells[9..13], ["0", "0", "-", "0"]);
        // Columns line up: every row as long as the header up to the last column.
        let col = lines[2].find("MAXWAIT").unwrap() + "MAXWAIT".len();
        assert_eq!(&lines[3][col - 4..col], "12ms");
    }

    #[test]
    fn frame_without_metrics_warns_and_shows_question_marks() {
        let t0 = Instant::now();
        let mut first = snapshot(t0, POOLS_JSON, METRICS);
        first.waits = Err("http://x/metrics answered HTTP 404".into());
        let f = render_frame("http://x", Duration::from_secs(1), None, &first);
        assert!(f.contains("warning: no wait histogram"), "{f}");
        let row = f.lines().find(|l| l.starts_with("app")).unwrap();
        assert_eq!(row.split_whitespace().nth(11), Some("?"));
    }

    #[test]
    fn frame_without_pools() {
        let s = snapshot(Instant::now(), r#"{"pools":[]}"#, "");
        let f = render_frame("http://x", Duration::from_secs(1), None, &s);
        assert!(f.contains("pools 0  clients 0 (0 waiting)"), "{f}");
        assert!(f.contains("no pools yet"), "{f}");
    }

    #[test]
    fn error_screen() {
        let e = FetchError::Unreachable {
            url: "http://x/api/v1/pools".into(),
            reason: "connection refused".into(),
        };
        let s = render_error(
            "http://x",
            Duration::from_secs(1),
            SystemTime::UNIX_EPOCH,
            &e,
        );
        assert!(s.contains("error: cannot reach http://x/api/v1/pools: connection refused"));
        assert!(s.contains("retrying every 1s"));
    }
}
