//! Named prepared statements in transaction mode.
//!
//! Drivers prepare a statement once per connection under a fixed name (`__asyncpg_stmt_1__`,
//! `S_1`, `P_0`, `s0` …) and execute it in later transactions, which pgmux may run on any
//! server. So pgmux keeps three views:
//!
//! * [`Registry`] (one per pool): every distinct (query text, parameter types) gets one
//!   [`Statement`] with a pool-wide server-side name `pgmux_<n>`. Two clients that prepare
//!   the same text share it; two clients that use the same name for different texts get
//!   different statements, so one can never run the other's.
//! * [`ClientStatements`] (one per client): the client's names → statements.
//! * [`ServerStatements`] (one per server connection): which statements that backend has
//!   prepared, a bounded LRU (`max_prepared_statements`); the least recently used is closed
//!   when a new one needs room.
//!
//! When a client's Bind or Describe reaches a server that lacks the statement, the session
//! injects the Parse first and swallows its ParseComplete (see `session`'s response queue).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

/// One distinct prepared statement, shared by every client that prepared the same text.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The name pgmux uses on servers.
    pub name: String,
    /// Query text (without the NUL).
    pub query: Bytes,
    /// The parameter-type part of the Parse body: i16 count + that many OIDs.
    pub param_types: Bytes,
    /// A server accepted this Parse at least once: a client's Parse of the same text can be
    /// answered without a server (see `session`'s local answers).
    valid: AtomicBool,
    /// Session state its text makes (see [`crate::sessionstate`]), checked at every Bind.
    pub session_state: Option<crate::sessionstate::Feature>,
}

impl Statement {
    pub fn mark_valid(&self) {
        self.valid.store(true, Ordering::Relaxed);
    }

    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Relaxed)
    }

    /// Appends a Parse message that prepares this statement under its server-side name.
    pub fn encode_parse(&self, out: &mut BytesMut) {
        let len = 4 + self.name.len() + 1 + self.query.len() + 1 + self.param_types.len();
        out.put_u8(b'P');
        out.put_i32(len as i32);
        out.put_slice(self.name.as_bytes());
        out.put_u8(0);
        out.put_slice(&self.query);
        out.put_u8(0);
        out.put_slice(&self.param_types);
    }
}

/// The server-side name of statement `id`.
pub fn server_name(id: u64) -> String {
    format!("pgmux_{id}")
}

/// Appends a Close (statement) message.
pub fn encode_close_statement(name: &str, out: &mut BytesMut) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

type Key = (Bytes, Bytes);

/// Per-pool map from statement text to [`Statement`]. Entries are weak: a statement lives
/// while a client or a server cache holds it.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Key, Weak<Statement>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// The statement for this text, if one is alive.
    pub fn get(&self, query: &[u8], param_types: &[u8]) -> Option<Arc<Statement>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(
            Bytes::copy_from_slice(query),
            Bytes::copy_from_slice(param_types),
        ))
        .and_then(Weak::upgrade)
    }

    pub fn get_or_create(&self, query: Bytes, param_types: Bytes) -> Arc<Statement> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (query, param_types);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let stmt = Arc::new(Statement {
            id,
            name: server_name(id),
            query: key.0.clone(),
            param_types: key.1.clone(),
            valid: AtomicBool::new(false),
            session_state: crate::sessionstate::detect(&key.0),
        });
        // Keep the map from growing without bound: drop dead entries when it doubles.
        if map.len() >= 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(key, Arc::downgrade(&stmt));
        stmt
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's statement names.
#[derive(Default, Debug)]
pub struct ClientStatements {
    // foldhash (randomly seeded per map) instead of SipHash: looked up at every Bind of
    // a named statement; the keys are one client's own names.
    map: foldhash::HashMap<String, Arc<Statement>>,
}

impl ClientStatements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.map.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn insert(&mut self, name: String, stmt: Arc<Statement>) {
        self.map.insert(name, stmt);
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        self.map.remove(name)
    }

    /// Removes `name` only if it still maps to statement `id` (rollback of a failed Parse).
    pub fn remove_if(&mut self, name: &str, id: u64) {
        if self.map.get(name).is_some_and(|s| s.id == id) {
            self.map.remove(name);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The statements one backend has prepared: an LRU bounded by `capacity`.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// By pgmux's statement id (foldhash: touched at every Bind; ids are pgmux's own).
    entries: foldhash::HashMap<u64, (Arc<Statement>, u64)>,
    tick: u64,
    /// Names the backend still holds but that must be re-prepared before use (their plan
    /// went stale after DDL): closed right before the next Parse of the same statement.
    stale: Vec<u64>,
}

/// What [`ServerStatements::prepare`] decided.
pub struct Prepare {
    /// Ids of statements to close first: the statement itself if its copy was stale.
    pub reprepare: Option<u64>,
    /// Ids evicted to make room (least recently used, or stale leftovers).
    pub evict: Vec<u64>,
}

impl ServerStatements {
    /// True (and marks it used) if the backend has `stmt` prepared.
    pub fn touch(&mut self, stmt: &Statement) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(&stmt.id) {
            Some(e) => {
                e.1 = tick;
                true
            }
            None => false,
        }
    }

    /// Records that `stmt` is being prepared on the backend; returns what must be closed
    /// before the Parse is sent.
    pub fn prepare(&mut self, stmt: &Arc<Statement>, capacity: usize) -> Prepare {
        self.tick += 1;
        let capacity = capacity.max(1);
        let mut reprepare = None;
        if let Some(i) = self.stale.iter().position(|id| *id == stmt.id) {
            self.stale.swap_remove(i);
            reprepare = Some(stmt.id);
        }
        let mut evict = Vec::new();
        while self.entries.len() >= capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(id, _)| *id)
                .expect("non-empty");
            self.entries.remove(&oldest);
            evict.push(oldest);
        }
        // Statements left over from an uncertain DISCARD also count against the limit.
        while self.stale.len() > capacity {
            evict.extend(self.stale.pop());
        }
        self.entries.insert(stmt.id, (stmt.clone(), self.tick));
        Prepare { reprepare, evict }
    }

    /// The Parse for `id` failed: the backend does not have it.
    pub fn forget(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// The backend's copy of `id` has a stale plan: re-prepare before next use.
    pub fn mark_stale(&mut self, id: u64) {
        if self.entries.remove(&id).is_some() {
            self.stale.push(id);
        }
    }

    /// An injected Close of `id` was skipped by the backend (after an error): it still
    /// has the statement, so close it before preparing it again.
    pub fn close_skipped(&mut self, id: u64) {
        if !self.entries.contains_key(&id) && !self.stale.contains(&id) {
            self.stale.push(id);
        }
    }

    /// A `DISCARD ALL` / `DEALLOCATE ALL` is on its way to the backend (and may fail):
    /// treat every statement as possibly present, closing it before any new Parse.
    pub fn all_uncertain(&mut self) {
        let ids: Vec<u64> = self.entries.drain().map(|(id, _)| id).collect();
        for id in ids {
            if !self.stale.contains(&id) {
                self.stale.push(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        Registry::default()
    }

    #[test]
    fn same_text_shares_a_statement_different_text_does_not() {
        let r = reg();
        let a = r.get_or_create(Bytes::from_static(b"select 1"), Bytes::from_static(&[0, 0]));
        let b = r.get_or_create(Bytes::from_static(b"select 1"), Bytes::from_static(&[0, 0]));
        let c = r.get_or_create(Bytes::from_static(b"select 2"), Bytes::from_static(&[0, 0]));
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.name, c.name);
        // Different parameter types are a different statement.
        let d = r.get_or_create(
            Bytes::from_static(b"select 1"),
            Bytes::from_static(&[0, 1, 0, 0, 0, 23]),
        );
        assert_ne!(a.id, d.id);
    }

    #[test]
    fn statements_die_with_their_last_holder() {
        let r = reg();
        let a = r.get_or_create(Bytes::from_static(b"select 1"), Bytes::new());
        let id = a.id;
        drop(a);
        let b = r.get_or_create(Bytes::from_static(b"select 1"), Bytes::new());
        assert_ne!(b.id, id);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let r = reg();
        let s: Vec<_> = (0..3)
            .map(|i| r.get_or_create(Bytes::from(format!("select {i}")), Bytes::new()))
            .collect();
        let mut cache = ServerStatements::default();
        assert!(cache.prepare(&s[0], 2).evict.is_empty());
        assert!(cache.prepare(&s[1], 2).evict.is_empty());
        assert!(cache.touch(&s[0]));
        let p = cache.prepare(&s[2], 2);
        assert_eq!(p.evict, vec![s[1].id]);
        assert_eq!(p.reprepare, None);
        assert!(!cache.touch(&s[1]));
        assert!(cache.touch(&s[0]) && cache.touch(&s[2]));
    }

    #[test]
    fn stale_statements_are_closed_before_re_preparing() {
        let r = reg();
        let s = r.get_or_create(Bytes::from_static(b"select * from t"), Bytes::new());
        let mut cache = ServerStatements::default();
        cache.prepare(&s, 10);
        cache.mark_stale(s.id);
        assert!(!cache.touch(&s));
        let p = cache.prepare(&s, 10);
        assert_eq!(p.reprepare, Some(s.id));
        assert!(p.evict.is_empty());
        assert!(cache.touch(&s));
    }

    #[test]
    fn parse_encoding() {
        let r = reg();
        let s = r.get_or_create(
            Bytes::from_static(b"select $1"),
            Bytes::from_static(&[0, 1, 0, 0, 0, 23]),
        );
        let mut out = BytesMut::new();
        s.encode_parse(&mut out);
        let f = crate::protocol::frame::split_frame(&mut out, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(f.tag, b'P');
        let mut want = format!("{}\0select $1\0", s.name).into_bytes();
        want.extend_from_slice(&[0, 1, 0, 0, 0, 23]);
        assert_eq!(&f.body[..], &want[..]);
    }
}
