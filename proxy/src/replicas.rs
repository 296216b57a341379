//! Read replicas of one database: health, replay positions, and the marks that keep a
//! client's reads on the primary until a replica has replayed its writes.
//!
//! A [`Topology`] per database with replicas holds:
//! * a [`WalClock`]: the primary's WAL insert position, sampled every
//!   `replica_check_interval` over a connection of its own;
//! * one [`Replica`] per replica: healthy or not, its replay position and lag, sampled
//!   on the same interval, plus the transactions in flight on it (for least-outstanding
//!   balancing);
//! * [`RouteStats`]: where transactions went and why reads were kept on the primary.
//!
//! Read-your-writes without a round trip per write: when a write transaction is released,
//! its scope (user or client) records [`WalClock::mark`], the number of the next primary
//! sample to *start*. That sample runs after the commit, so its position is at or past
//! the commit record. Until that sample exists, or while no healthy replica has replayed
//! past its position, the scope's reads go to the primary. Positions come from
//! `pg_current_wal_insert_lsn()`, which already counts asynchronously committed records.
//!
//! Lag in seconds is measured here, not from `pg_last_xact_replay_timestamp()` (which
//! grows while the primary is idle and depends on both clocks): a replica's lag is the
//! age of the oldest primary sample it has not replayed yet.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgmux_config::{Secret, ServerAddr, TcpSettings};
use tokio_util::sync::CancellationToken;

use crate::backend::Server;

/// Parses PostgreSQL's `pg_lsn` text form, `X/Y` in hex.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Formats a position as PostgreSQL does.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// One completed sample of the primary's WAL position.
#[derive(Debug, Clone, Copy)]
struct Sample {
    id: u64,
    lsn: u64,
    at: Instant,
}

/// The primary's WAL insert position over time.
pub struct WalClock {
    /// Samples started so far; sample ids count from 1.
    started: AtomicU64,
    /// Recent completed samples, oldest first.
    ring: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl WalClock {
    /// Keeps enough samples to measure lags up to `span` at `interval`.
    pub fn new(span: Duration, interval: Duration) -> WalClock {
        let per = interval.as_micros().max(1);
        let capacity = (span.as_micros() / per + 16).clamp(64, 100_000) as usize;
        WalClock {
            started: AtomicU64::new(0),
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of the first sample that starts after this call.
    pub fn mark(&self) -> u64 {
        self.started.load(Ordering::Acquire) + 1
    }

    /// Starts a sample: its id.
    fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn record(&self, id: u64, lsn: u64) {
        let mut ring = self.ring();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(Sample {
            id,
            lsn,
            at: Instant::now(),
        });
    }

    /// The position a replica must have replayed to show everything committed before
    /// `mark` was taken; `None` while no sample that started after the mark has finished.
    pub fn position_for(&self, mark: u64) -> Option<u64> {
        let ring = self.ring();
        // Ids grow along the ring; a failed sample leaves a gap, so take the first >= mark.
        ring.iter().find(|s| s.id >= mark).map(|s| s.lsn)
    }

    /// The newest sampled position.
    pub fn latest(&self) -> Option<u64> {
        self.ring().back().map(|s| s.lsn)
    }

    /// How long ago the primary first wrote past `replayed`: the replica's lag. Zero
    /// when it has replayed everything sampled; at least the ring's span when older.
    pub fn lag_behind(&self, replayed: u64) -> Duration {
        let ring = self.ring();
        match ring.iter().find(|s| s.lsn > replayed) {
            Some(s) => s.at.elapsed(),
            None => Duration::ZERO,
        }
    }
}

/// Where transactions went, and why reads stayed on the primary.
#[derive(Default)]
pub struct RouteStats {
    /// Transactions served by the primary / by any replica.
    pub primary: AtomicU64,
    pub replica: AtomicU64,
    /// Reads kept on the primary: a write of the same scope not yet replayed.
    pub kept_write_before: AtomicU64,
    /// Reads kept on the primary: every healthy replica lags past `max_replica_lag`.
    pub kept_lag: AtomicU64,
    /// Reads kept on the primary: no replica is up.
    pub kept_unhealthy: AtomicU64,
    /// Statements the parser could not classify (sent to the primary).
    pub kept_unparseable: AtomicU64,
    /// Transactions a `/* pgmux:primary */` hint sent to the primary.
    pub kept_hint: AtomicU64,
    /// Read-only units sent again elsewhere because their replica connection died
    /// before answering.
    pub retried: AtomicU64,
}

/// A replica's state as the health loop last saw it.
pub struct Replica {
    pub index: usize,
    pub addr: Arc<ServerAddr>,
    healthy: AtomicBool,
    /// Out of rotation because of replay lag (not because it is down).
    lagging: AtomicBool,
    replay_lsn: AtomicU64,
    lag_ms: AtomicU64,
    lag_bytes: AtomicU64,
    /// Transactions in flight on this replica (all users).
    pub outstanding: AtomicUsize,
    /// Transactions it served.
    pub transactions: AtomicU64,
    /// Times it was taken out of rotation.
    pub failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A snapshot of a replica for reports.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub addr: String,
    pub healthy: bool,
    pub replay_lsn: Option<String>,
    pub lag: Duration,
    pub lag_bytes: u64,
    pub outstanding: usize,
    pub transactions: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl Replica {
    fn new(index: usize, addr: ServerAddr) -> Replica {
        Replica {
            index,
            addr: Arc::new(addr),
            healthy: AtomicBool::new(false),
            lagging: AtomicBool::new(false),
            replay_lsn: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            transactions: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn is_lagging(&self) -> bool {
        self.lagging.load(Ordering::Acquire)
    }

    pub fn replay_lsn(&self) -> u64 {
        self.replay_lsn.load(Ordering::Acquire)
    }

    /// Takes the replica out of rotation (the health loop puts it back).
    pub fn mark_down(&self, why: &str) {
        self.lagging.store(false, Ordering::Release);
        if self.healthy.swap(false, Ordering::AcqRel) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(replica = %crate::backend::display_addr(&self.addr), reason = why, "replica out of rotation");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
    }

    fn mark_up(&self, replay: u64, lag: Duration, lag_bytes: u64) {
        self.replay_lsn.store(replay, Ordering::Release);
        self.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        self.lag_bytes.store(lag_bytes, Ordering::Relaxed);
        self.lagging.store(false, Ordering::Release);
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!(replica = %crate::backend::display_addr(&self.addr), "replica in rotation");
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn status(&self) -> ReplicaStatus {
        let replay = self.replay_lsn();
        ReplicaStatus {
            addr: crate::backend::display_addr(&self.addr),
            healthy: self.is_healthy(),
            replay_lsn: (replay > 0).then(|| format_lsn(replay)),
            lag: Duration::from_millis(self.lag_ms.load(Ordering::Relaxed)),
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// How the health loop logs in and how strict it is.
#[derive(Clone, PartialEq)]
pub struct HealthSettings {
    pub user: String,
    pub password: Option<Secret>,
    pub interval: Duration,
    pub max_lag: Duration,
    pub connect_timeout: Duration,
    pub tcp: TcpSettings,
}

/// A database's primary WAL clock and replicas.
///
/// A topology never changes its servers: a reload that changes them (or the health
/// loops' settings) [stops](Topology::stop) it and starts a
/// [successor](Topology::succeed).
pub struct Topology {
    pub database: String,
    /// Shared with a successor on the same primary, so that read-your-writes marks
    /// taken on this topology stay valid on the next.
    pub wal: Arc<WalClock>,
    pub replicas: Vec<Arc<Replica>>,
    pub stats: RouteStats,
    max_lag: Duration,
    primary: ServerAddr,
    settings: HealthSettings,
    /// Ends this topology's health loops (a child of the proxy-wide stop).
    stop: CancellationToken,
}

impl Topology {
    /// Creates the topology and starts its health loops (until `stop`).
    pub fn start(
        database: &str,
        primary: &ServerAddr,
        replicas: &[ServerAddr],
        settings: HealthSettings,
        stop: CancellationToken,
    ) -> Arc<Topology> {
        let wal = WalClock::new(settings.max_lag * 2, settings.interval);
        Self::launch(database, primary, replicas, settings, stop, Arc::new(wal))
    }

    /// The topology that replaces this stopped one after a reload. On the same primary
    /// it keeps the WAL clock; on another one it starts a new clock whose sample ids
    /// continue this one's, so a mark taken here resolves to a sample of the new
    /// primary taken after the change rather than waiting for the ids to catch up.
    pub fn succeed(
        &self,
        primary: &ServerAddr,
        replicas: &[ServerAddr],
        settings: HealthSettings,
        stop: CancellationToken,
    ) -> Arc<Topology> {
        let wal = if *primary == self.primary {
            self.wal.clone()
        } else {
            let wal = WalClock::new(settings.max_lag * 2, settings.interval);
            wal.started
                .store(self.wal.started.load(Ordering::Acquire), Ordering::Release);
            Arc::new(wal)
        };
        Self::launch(&self.database, primary, replicas, settings, stop, wal)
    }

    fn launch(
        database: &str,
        primary: &ServerAddr,
        replicas: &[ServerAddr],
        settings: HealthSettings,
        stop: CancellationToken,
        wal: Arc<WalClock>,
    ) -> Arc<Topology> {
        let topo = Arc::new(Topology {
            database: database.to_owned(),
            wal,
            replicas: replicas
                .iter()
                .enumerate()
                .map(|(i, a)| Arc::new(Replica::new(i, a.clone())))
                .collect(),
            stats: RouteStats::default(),
            max_lag: settings.max_lag,
            primary: primary.clone(),
            settings: settings.clone(),
            stop: stop.clone(),
        });
        let primary = Arc::new(primary.clone());
        tokio::spawn(primary_loop(
            topo.clone(),
            primary,
            settings.clone(),
            stop.clone(),
        ));
        for r in &topo.replicas {
            tokio::spawn(replica_loop(
                topo.clone(),
                r.clone(),
                settings.clone(),
                stop.clone(),
            ));
        }
        topo
    }

    /// Whether a replica may serve a read that needs `needed` replayed (0: nothing).
    pub fn usable(&self, r: &Replica, needed: u64) -> bool {
        r.is_healthy() && r.replay_lsn() >= needed && !self.stop.is_cancelled()
    }

    /// A replica connection died before answering a unit that is now sent elsewhere: the
    /// replica leaves the rotation until the health loop sees it again.
    pub fn lost_before_answer(&self, r: &Replica) {
        r.mark_down("connection lost");
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// The user the health loops log in as.
    pub fn health_user(&self) -> &str {
        &self.settings.user
    }

    /// Whether this topology already watches these servers with these settings.
    pub fn is_for(
        &self,
        primary: &ServerAddr,
        replicas: &[ServerAddr],
        settings: &HealthSettings,
    ) -> bool {
        self.primary == *primary
            && self.settings == *settings
            && self.replicas.len() == replicas.len()
            && self
                .replicas
                .iter()
                .zip(replicas)
                .all(|(r, a)| *r.addr == *a)
    }

    /// A reload replaced or removed the topology: the health loops end, and every
    /// replica leaves the rotation for good, so a session still holding this topology
    /// sends its reads to the primary until it picks up the current one.
    pub fn stop(&self) {
        self.stop.cancel();
        for r in &self.replicas {
            r.lagging.store(false, Ordering::Release);
            r.healthy.store(false, Ordering::Release);
            *r.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some("removed by a configuration reload".to_owned());
        }
    }

    pub fn max_lag(&self) -> Duration {
        self.max_lag
    }
}

/// A read-your-writes scope's last write: the [`WalClock::mark`] taken when it was
/// released (0: none yet).
#[derive(Default)]
pub struct WriteMark(AtomicU64);

impl WriteMark {
    pub fn record(&self, mark: u64) {
        self.0.fetch_max(mark, Ordering::AcqRel);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Forgets a mark once a replica is known to have replayed it, so later reads need
    /// no ring lookup. Only clears the exact mark seen (a newer write keeps its own).
    pub fn settle(&self, mark: u64) {
        let _ = self
            .0
            .compare_exchange(mark, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Time allowed for one health query (connect has its own timeout).
fn query_timeout(s: &HealthSettings) -> Duration {
    (s.interval * 10).clamp(Duration::from_secs(3), Duration::from_secs(10))
}

/// Health-query failures in a row (on an established connection) that take a replica
/// out of rotation: one slow answer on a busy machine is not an outage. A refused
/// connection counts at once.
const QUERY_FAILURES_TO_MARK_DOWN: u32 = 2;

/// Why a health sample failed.
enum SampleError {
    /// Could not connect or log in: the replica is not usable now.
    Connect(String),
    /// The query failed or timed out on an open connection (which is dropped).
    Query(String),
}

impl std::fmt::Display for SampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SampleError::Connect(e) | SampleError::Query(e) => f.write_str(e),
        }
    }
}

async fn connect(addr: &Arc<ServerAddr>, s: &HealthSettings) -> Result<Server, String> {
    let timeout = s.connect_timeout.min(Duration::from_secs(5));
    Server::connect(addr, &s.user, s.password.as_ref(), timeout, &s.tcp)
        .await
        .map_err(|e| e.to_string())
}

async fn sample(
    conn: &mut Option<Server>,
    addr: &Arc<ServerAddr>,
    s: &HealthSettings,
    sql: &str,
) -> Result<Vec<Option<String>>, SampleError> {
    if conn.is_none() {
        *conn = Some(connect(addr, s).await.map_err(SampleError::Connect)?);
    }
    let server = conn.as_mut().expect("set above");
    let r = tokio::time::timeout(query_timeout(s), server.first_row(sql)).await;
    match r {
        Ok(Ok(Ok(row))) => Ok(row),
        Ok(Ok(Err(e))) => {
            *conn = None;
            Err(SampleError::Query(format!("{}: {}", e.code(), e.message())))
        }
        Ok(Err(e)) => {
            *conn = None;
            Err(SampleError::Query(e.to_string()))
        }
        Err(_) => {
            *conn = None;
            Err(SampleError::Query("health check timed out".into()))
        }
    }
}

async fn primary_loop(
    topo: Arc<Topology>,
    addr: Arc<ServerAddr>,
    s: HealthSettings,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let id = topo.wal.start();
        let sampled = sample(&mut conn, &addr, &s, PRIMARY_SQL).await;
        if stop.is_cancelled() {
            break;
        }
        match sampled {
            Ok(row) => {
                logged = false;
                let col = |i: usize| row.get(i).cloned().flatten();
                let lsn = col(0).as_deref().and_then(parse_lsn);
                let block = col(1).and_then(|v| v.parse().ok()).unwrap_or(8192);
                let segment = col(2).and_then(|v| v.parse().ok()).unwrap_or(16 << 20);
                match lsn {
                    Some(lsn) => topo.wal.record(id, record_end(lsn, block, segment)),
                    None => tracing::warn!(db = %topo.database, "primary WAL position unreadable"),
                }
            }
            Err(e) if !logged => {
                logged = true;
                tracing::warn!(db = %topo.database, error = %e, "cannot sample the primary's WAL position");
            }
            Err(_) => {}
        }
    }
    if let Some(c) = conn {
        c.terminate().await;
    }
}

const PRIMARY_SQL: &str = "SELECT pg_current_wal_insert_lsn(), current_setting('wal_block_size'), \
     (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')";

/// `pg_current_wal_insert_lsn()` points past the page header when the last record ended
/// exactly at a page boundary, while a replica reports the end of the last record it
/// replayed: the boundary itself. No record can end right after a page header (it would
/// be an empty continuation), so such a position is moved back to the boundary; else an
/// idle primary would look forever ahead of its caught-up replicas.
pub fn record_end(lsn: u64, block: u64, segment: u64) -> u64 {
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    if segment > 0 && lsn % segment == LONG_HEADER {
        lsn - LONG_HEADER
    } else if block > 0 && lsn % block == SHORT_HEADER && lsn % segment.max(1) != SHORT_HEADER {
        lsn - SHORT_HEADER
    } else {
        lsn
    }
}

const REPLICA_SQL: &str = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()";

async fn replica_loop(
    topo: Arc<Topology>,
    r: Arc<Replica>,
    s: HealthSettings,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut failures = 0;
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let sampled = sample(&mut conn, &r.addr, &s, REPLICA_SQL).await;
        if stop.is_cancelled() {
            // Stopped by a reload while sampling: the replica stays out of rotation.
            break;
        }
        match sampled {
            Ok(row) => {
                failures = 0;
                let in_recovery = row.first().cloned().flatten().as_deref() == Some("t");
                let replay = row.get(1).cloned().flatten().as_deref().and_then(parse_lsn);
                match (in_recovery, replay) {
                    (false, _) => r.mark_down("not in recovery (promoted?)"),
                    (true, None) => r.mark_down("no replay position"),
                    (true, Some(replay)) => {
                        let lag = topo.wal.lag_behind(replay);
                        let lag_bytes = topo.wal.latest().unwrap_or(0).saturating_sub(replay);
                        if lag > s.max_lag {
                            r.replay_lsn.store(replay, Ordering::Release);
                            r.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
                            r.mark_down(&format!(
                                "replay lag {}ms exceeds max_replica_lag",
                                lag.as_millis()
                            ));
                            r.lagging.store(true, Ordering::Release);
                        } else {
                            r.mark_up(replay, lag, lag_bytes);
                        }
                    }
                }
            }
            Err(SampleError::Connect(e)) => {
                failures = 0;
                r.mark_down(&e);
            }
            Err(SampleError::Query(e)) => {
                failures += 1;
                if failures >= QUERY_FAILURES_TO_MARK_DOWN {
                    r.mark_down(&e);
                }
            }
        }
    }
    if let Some(c) = conn {
        c.terminate().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }

    #[test]
    fn positions_after_a_page_header_move_back_to_the_boundary() {
        let seg = 16 << 20;
        assert_eq!(record_end(3 * 8192 + 24, 8192, seg), 3 * 8192);
        assert_eq!(record_end(seg + 40, 8192, seg), seg);
        assert_eq!(record_end(3 * 8192 + 48, 8192, seg), 3 * 8192 + 48);
        // Offset 40 inside a segment is a real record end (after a continuation).
        assert_eq!(record_end(3 * 8192 + 40, 8192, seg), 3 * 8192 + 40);
    }

    #[test]
    fn marks_need_a_sample_started_after_them() {
        let w = WalClock::new(Duration::from_secs(1), Duration::from_millis(100));
        let a = w.start();
        let mark = w.mark(); // a write released while sample `a` is in flight
        w.record(a, 100);
        assert_eq!(
            w.position_for(mark),
            None,
            "sample a began before the write"
        );
        let b = w.start();
        w.record(b, 250);
        assert_eq!(w.position_for(mark), Some(250));
        // Older marks resolve to the first sample at or after them.
        assert_eq!(w.position_for(a), Some(100));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unreplayed_sample() {
        let w = WalClock::new(Duration::from_secs(1), Duration::from_millis(100));
        let id = w.start();
        w.record(id, 100);
        assert_eq!(w.lag_behind(100), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        let id = w.start();
        w.record(id, 200);
        assert!(w.lag_behind(150) < Duration::from_millis(20));
        assert!(w.lag_behind(50) >= Duration::from_millis(20));
    }

    #[test]
    fn ring_is_bounded() {
        let w = WalClock::new(Duration::from_secs(1), Duration::from_millis(100));
        for i in 0..1000 {
            let id = w.start();
            w.record(id, i);
        }
        assert_eq!(w.ring().len(), 64);
        assert_eq!(w.latest(), Some(999));
        // An evicted mark resolves to the oldest kept sample (a later, safe position).
        assert_eq!(w.position_for(1), Some(1000 - 64));
    }

    fn addr(port: u16) -> ServerAddr {
        ServerAddr {
            host: "127.0.0.1".into(),
            port,
            dbname: "db".into(),
            params: Default::default(),
            tls: Default::default(),
        }
    }

    fn settings() -> HealthSettings {
        HealthSettings {
            user: "u".into(),
            password: None,
            interval: Duration::from_secs(60),
            max_lag: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(100),
            tcp: TcpSettings::default(),
        }
    }

    #[tokio::test]
    async fn a_reloaded_topology_stops_and_its_successor_keeps_the_marks_valid() {
        // Nothing listens on port 1: the health loops fail to connect, which is fine here.
        let (p1, p2, r1, r2) = (addr(1), addr(2), addr(3), addr(4));
        let stop = CancellationToken::new();
        let one = [r1.clone()];
        let old = Topology::start("db", &p1, &one, settings(), stop.child_token());
        assert!(old.is_for(&p1, &one, &settings()));
        assert!(!old.is_for(&p1, &[r1.clone(), r2.clone()], &settings()));
        assert!(!old.is_for(&p2, &one, &settings()));
        let slower = HealthSettings {
            interval: Duration::from_secs(61),
            ..settings()
        };
        assert!(!old.is_for(&p1, &one, &slower));

        let id = old.wal.start();
        old.wal.record(id, 100);
        let mark = old.wal.mark();
        old.replicas[0].mark_up(100, Duration::ZERO, 0);
        assert!(old.usable(&old.replicas[0], 0));
        old.stop();
        assert!(!old.usable(&old.replicas[0], 0), "out of rotation for good");
        assert!(!old.replicas[0].is_healthy());
        // Even if a sample that was in flight put it back.
        old.replicas[0].mark_up(100, Duration::ZERO, 0);
        assert!(!old.usable(&old.replicas[0], 0));

        // Same primary: the clock is the same, so marks taken before still resolve.
        let next = old.succeed(&p1, &[r1.clone(), r2], settings(), stop.child_token());
        assert!(Arc::ptr_eq(&next.wal, &old.wal));
        assert_eq!(next.replicas.len(), 2);
        assert!(
            !next.replicas[0].is_healthy(),
            "new replicas wait for a health check"
        );
        // Another primary: a new clock whose ids continue, so an old mark waits for the
        // first sample of the new primary, not for the ids to catch up.
        let moved = old.succeed(&p2, &[r1], settings(), stop.child_token());
        assert!(!Arc::ptr_eq(&moved.wal, &old.wal));
        assert_eq!(moved.wal.position_for(mark), None);
        let id = moved.wal.start();
        assert!(id >= mark);
        moved.wal.record(id, 7);
        assert_eq!(moved.wal.position_for(mark), Some(7));
        stop.cancel();
    }

    #[test]
    fn write_marks_only_move_forward_and_settle_exactly() {
        let m = WriteMark::default();
        m.record(5);
        m.record(3);
        assert_eq!(m.get(), 5);
        m.settle(4);
        assert_eq!(m.get(), 5);
        m.settle(5);
        assert_eq!(m.get(), 0);
    }
}
