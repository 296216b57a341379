//! Choosing the primary or a replica for a client's next transaction.
//!
//! When a client at a transaction boundary sends work, [`next_unit`] reads from its
//! buffered messages what that work executes: the text of a simple Query, or for the
//! extended protocol the statements a batch up to Sync parses or binds (named statements
//! through the client's statement map). Anything it cannot see whole — no Sync yet, a
//! FunctionCall, COPY data — is [`Unit::Unknown`] and goes to the primary.
//!
//! [`ReplicaSet::choose`] then applies, in order: the `read_routing` mode, a query hint,
//! the [`Router`]'s classification, read-your-writes, replica health, and least
//! outstanding transactions (ties broken at random). A transaction on a replica is fed
//! one unit (Query or batch up to Sync) at a time, so pipelined work behind it is routed
//! on its own once the replica's transaction has ended.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pgmux_config::{ReadRouting, ReadYourWrites};
use rand::Rng;

use crate::pool::Pool;
use crate::prepared::ClientStatements;
use crate::protocol::frame::complete_frame_len;
use crate::protocol::messages::cstr;
use crate::protocol::ProtocolError;
use crate::replicas::{Topology, WriteMark};
use crate::router::{Class, Decision, Hint, Router, WhyPrimary};

/// At most this many messages are looked at to find the end of a batch.
const MAX_BATCH_MESSAGES: usize = 256;

/// What the client's next unit of work executes.
#[derive(Debug, PartialEq, Eq)]
pub enum Unit {
    /// A simple Query.
    Query(Bytes),
    /// An extended-protocol batch up to Sync: the texts it parses or binds.
    Batch(Vec<Bytes>),
    /// Cannot be judged from what has arrived.
    Unknown,
}

/// The next unit and where it ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Next {
    pub unit: Unit,
    /// Bytes of `rbuf` the unit spans (0 for [`Unit::Unknown`]).
    pub len: usize,
}

/// The length of the unit at the front of `rbuf` if it can be sent again, whole, to
/// another server: one Query, or extended-protocol messages up to a Sync that need
/// nothing from an earlier batch's server and change no client state pgmux tracks (no
/// named Parse, no Close; a Bind names a statement parsed in the batch or one pgmux
/// tracks and can prepare anywhere). `None` also for an incomplete unit.
pub fn replayable_len(rbuf: &[u8], statements: &ClientStatements, max: usize) -> Option<usize> {
    let mut pos = 0;
    // Unnamed statement parsed in this batch.
    let mut unnamed = false;
    for i in 0..MAX_BATCH_MESSAGES {
        let (tag, len) = complete_frame_len(&rbuf[pos..], max).ok()??;
        let body = &rbuf[pos + 5..pos + len];
        pos += len;
        match tag {
            b'Q' if i == 0 => return Some(pos),
            b'P' => {
                let (name, _) = cstr(body)?;
                if !name.is_empty() {
                    return None;
                }
                unnamed = true;
            }
            b'B' => {
                let (_portal, rest) = cstr(body)?;
                let (name, _) = cstr(rest)?;
                let known = if name.is_empty() {
                    unnamed
                } else {
                    std::str::from_utf8(name)
                        .ok()
                        .is_some_and(|n| statements.get(n).is_some())
                };
                if !known {
                    return None;
                }
            }
            b'D' | b'E' | b'H' => {}
            b'S' => return Some(pos),
            _ => return None,
        }
    }
    None
}

/// Reads the next unit from the front of `rbuf` without consuming it.
pub fn next_unit(
    rbuf: &[u8],
    statements: &ClientStatements,
    max: usize,
) -> Result<Next, ProtocolError> {
    let unknown = Next {
        unit: Unit::Unknown,
        len: 0,
    };
    let mut pos = 0;
    let mut texts: Vec<Bytes> = Vec::new();
    // Statements parsed earlier in this batch, by client name.
    let mut parsed: Vec<(&[u8], usize)> = Vec::new();
    for i in 0..MAX_BATCH_MESSAGES {
        let Some((tag, len)) = complete_frame_len(&rbuf[pos..], max)? else {
            return Ok(unknown);
        };
        let body = &rbuf[pos + 5..pos + len];
        pos += len;
        let bad = |what| ProtocolError::Malformed(what);
        match tag {
            b'Q' if i == 0 => {
                let (text, _) = cstr(body).ok_or(bad("Query"))?;
                return Ok(Next {
                    unit: Unit::Query(Bytes::copy_from_slice(text)),
                    len: pos,
                });
            }
            b'P' => {
                let (name, rest) = cstr(body).ok_or(bad("Parse"))?;
                let (text, _) = cstr(rest).ok_or(bad("Parse"))?;
                parsed.retain(|(n, _)| *n != name);
                parsed.push((name, texts.len()));
                texts.push(Bytes::copy_from_slice(text));
            }
            b'B' => {
                let (_portal, rest) = cstr(body).ok_or(bad("Bind"))?;
                let (name, _) = cstr(rest).ok_or(bad("Bind"))?;
                if parsed.iter().any(|(n, _)| *n == name) {
                    continue; // its text is in `texts` already
                }
                if name.is_empty() {
                    return Ok(unknown); // unnamed statement from an earlier batch
                }
                let Some(stmt) = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| statements.get(n))
                else {
                    return Ok(unknown); // the server will report it
                };
                texts.push(stmt.query.clone());
            }
            b'C' | b'D' | b'E' | b'H' => {}
            b'S' => {
                return Ok(Next {
                    unit: Unit::Batch(texts),
                    len: pos,
                })
            }
            _ => return Ok(unknown),
        }
    }
    Ok(unknown)
}

/// Classifies a unit: every statement must be a read for the unit to be one.
pub fn classify(router: &Router, unit: &Unit) -> Decision {
    let primary = |why| Decision {
        hint: None,
        class: Class::Primary(why),
    };
    match unit {
        Unit::Query(text) => match std::str::from_utf8(text) {
            Ok(t) => router.classify(t),
            Err(_) => primary(WhyPrimary::Unparseable),
        },
        Unit::Batch(texts) if texts.is_empty() => primary(WhyPrimary::Other),
        Unit::Batch(texts) => {
            let mut out: Option<Decision> = None;
            for t in texts {
                let d = match std::str::from_utf8(t) {
                    Ok(t) => router.classify(t),
                    Err(_) => primary(WhyPrimary::Unparseable),
                };
                match &mut out {
                    None => out = Some(d),
                    Some(o) => {
                        if matches!(o.class, Class::Primary(_)) {
                            continue;
                        }
                        if matches!(d.class, Class::Primary(_)) {
                            o.class = d.class;
                        }
                    }
                }
            }
            out.expect("texts is not empty")
        }
        Unit::Unknown => primary(WhyPrimary::Other),
    }
}

/// Where a transaction goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica(usize),
}

/// The routing decision for one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Choice {
    pub target: Target,
    /// The work may write: releasing it from the primary records a write mark.
    pub writes: bool,
}

/// Replica pools of one (database, user) and the shared state they route by.
pub struct ReplicaSet {
    pub topology: Arc<Topology>,
    /// One pool per replica, in the topology's order.
    pub pools: Vec<Arc<Pool>>,
    /// This user's last write (read-your-writes scope `user`).
    pub writes: WriteMark,
}

impl ReplicaSet {
    /// Picks the target for a unit. `client_mark` is the client's own last write
    /// (scope `client`).
    pub fn choose(
        &self,
        mode: ReadRouting,
        ryw: ReadYourWrites,
        decision: &Decision,
        client_mark: u64,
    ) -> Choice {
        let stats = &self.topology.stats;
        let primary = |writes| Choice {
            target: Target::Primary,
            writes,
        };
        let is_read = matches!(decision.class, Class::Read | Class::BeginReadOnly);
        match mode {
            ReadRouting::PrimaryOnly => return primary(!is_read),
            ReadRouting::Auto | ReadRouting::ReplicaOnly => {}
        }
        if decision.hint == Some(Hint::Primary) {
            stats.kept_hint.fetch_add(1, Ordering::Relaxed);
            return primary(!is_read);
        }
        let forced = decision.hint == Some(Hint::Replica) || mode == ReadRouting::ReplicaOnly;
        if !is_read && !forced {
            if matches!(decision.class, Class::Primary(WhyPrimary::Unparseable)) {
                stats.kept_unparseable.fetch_add(1, Ordering::Relaxed);
            }
            return primary(true);
        }
        // Read-your-writes: the position this scope's reads need replayed.
        let mark = match ryw {
            _ if forced => 0,
            ReadYourWrites::Off => 0,
            ReadYourWrites::User => self.writes.get(),
            ReadYourWrites::Client => client_mark,
        };
        let needed = if mark == 0 {
            0
        } else {
            match self.topology.wal.position_for(mark) {
                Some(lsn) => lsn,
                None => {
                    stats.kept_write_before.fetch_add(1, Ordering::Relaxed);
                    return primary(!is_read);
                }
            }
        };
        match self.pick(needed) {
            Some(i) => Choice {
                target: Target::Replica(i),
                writes: false,
            },
            None => {
                let replicas = &self.topology.replicas;
                let counter = if replicas.iter().any(|r| r.is_healthy()) {
                    &stats.kept_write_before
                } else if replicas.iter().any(|r| r.is_lagging()) {
                    &stats.kept_lag
                } else {
                    &stats.kept_unhealthy
                };
                counter.fetch_add(1, Ordering::Relaxed);
                primary(!is_read)
            }
        }
    }

    /// The usable replica with the fewest transactions in flight; ties at random.
    fn pick(&self, needed: u64) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        let mut ties = 0u32;
        for r in &self.topology.replicas {
            if !self.topology.usable(r, needed) {
                continue;
            }
            let load = r.outstanding.load(Ordering::Relaxed);
            match best {
                Some((_, b)) if load > b => {}
                Some((_, b)) if load == b => {
                    ties += 1;
                    // Reservoir sampling keeps each tied replica equally likely.
                    if rand::thread_rng().gen_range(0..=ties) == 0 {
                        best = Some((r.index, load));
                    }
                }
                _ => {
                    best = Some((r.index, load));
                    ties = 0;
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.extend_from_slice(body);
    }

    fn parse(out: &mut BytesMut, name: &str, sql: &str) {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        frame(out, b'P', &b);
    }

    fn bind(out: &mut BytesMut, stmt: &str) {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        frame(out, b'B', &b);
    }

    #[test]
    fn simple_query_is_one_unit() {
        let mut buf = BytesMut::new();
        frame(&mut buf, b'Q', b"SELECT 1\0");
        frame(&mut buf, b'Q', b"INSERT INTO t VALUES (1)\0");
        let s = ClientStatements::default();
        assert_eq!(
            next_unit(&buf, &s, 1 << 20).unwrap().unit,
            Unit::Query(Bytes::from_static(b"SELECT 1"))
        );
    }

    #[test]
    fn extended_batch_collects_parsed_and_bound_texts() {
        let registry = crate::prepared::Registry::default();
        let mut s = ClientStatements::default();
        s.insert(
            "old".into(),
            registry.get_or_create(Bytes::from_static(b"SELECT 2"), Bytes::new()),
        );
        let mut buf = BytesMut::new();
        parse(&mut buf, "", "SELECT 1");
        bind(&mut buf, "");
        frame(&mut buf, b'E', b"\0\0\0\0\0");
        bind(&mut buf, "old");
        frame(&mut buf, b'E', b"\0\0\0\0\0");
        frame(&mut buf, b'S', b"");
        assert_eq!(
            next_unit(&buf, &s, 1 << 20).unwrap().unit,
            Unit::Batch(vec![
                Bytes::from_static(b"SELECT 1"),
                Bytes::from_static(b"SELECT 2")
            ])
        );
    }

    #[test]
    fn units_know_their_length_and_whether_they_can_run_again() {
        let s = ClientStatements::default();
        let mut buf = BytesMut::new();
        frame(&mut buf, b'Q', b"SELECT 1\0");
        let first = buf.len();
        frame(&mut buf, b'Q', b"SELECT 2\0");
        let n = next_unit(&buf, &s, 1 << 20).unwrap();
        assert_eq!(n.len, first);
        assert_eq!(replayable_len(&buf, &s, 1 << 20), Some(first));

        let mut buf = BytesMut::new();
        parse(&mut buf, "", "SELECT 1");
        bind(&mut buf, "");
        frame(&mut buf, b'S', b"");
        let n = next_unit(&buf, &s, 1 << 20).unwrap();
        assert_eq!(n.len, buf.len());
        assert_eq!(replayable_len(&buf, &s, 1 << 20), Some(buf.len()));

        // A named Parse registers a client statement: not sent twice.
        let mut buf = BytesMut::new();
        parse(&mut buf, "s1", "SELECT 1");
        bind(&mut buf, "s1");
        frame(&mut buf, b'S', b"");
        assert_eq!(replayable_len(&buf, &s, 1 << 20), None);

        // The unnamed statement of an earlier batch lives on the old server only.
        let mut buf = BytesMut::new();
        bind(&mut buf, "");
        frame(&mut buf, b'S', b"");
        assert_eq!(replayable_len(&buf, &s, 1 << 20), None);

        // A Close, or no Sync yet: not replayed.
        let mut buf = BytesMut::new();
        frame(&mut buf, b'C', b"Ss1\0");
        frame(&mut buf, b'S', b"");
        assert_eq!(replayable_len(&buf, &s, 1 << 20), None);
        let mut buf = BytesMut::new();
        parse(&mut buf, "", "SELECT 1");
        bind(&mut buf, "");
        assert_eq!(replayable_len(&buf, &s, 1 << 20), None);
    }

    #[test]
    fn incomplete_or_opaque_work_is_unknown() {
        let s = ClientStatements::default();
        let mut buf = BytesMut::new();
        parse(&mut buf, "", "SELECT 1");
        bind(&mut buf, "");
        // No Sync yet.
        assert_eq!(next_unit(&buf, &s, 1 << 20).unwrap().unit, Unit::Unknown);
        // A statement the client never prepared, an unnamed one from an earlier batch.
        for name in ["nope", ""] {
            let mut buf = BytesMut::new();
            bind(&mut buf, name);
            frame(&mut buf, b'S', b"");
            assert_eq!(next_unit(&buf, &s, 1 << 20).unwrap().unit, Unit::Unknown);
        }
        // FunctionCall.
        let mut buf = BytesMut::new();
        frame(&mut buf, b'F', b"\0\0\0\0");
        assert_eq!(next_unit(&buf, &s, 1 << 20).unwrap().unit, Unit::Unknown);
        // A Query in the middle of a batch.
        let mut buf = BytesMut::new();
        parse(&mut buf, "", "SELECT 1");
        frame(&mut buf, b'Q', b"SELECT 1\0");
        assert_eq!(next_unit(&buf, &s, 1 << 20).unwrap().unit, Unit::Unknown);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let s = ClientStatements::default();
        let mut buf = BytesMut::new();
        frame(&mut buf, b'Q', b"no terminator");
        assert!(next_unit(&buf, &s, 1 << 20).is_err());
    }

    #[test]
    fn a_batch_is_a_read_only_if_every_statement_is() {
        let router = Router::new(&[]);
        let read = Unit::Batch(vec![
            Bytes::from_static(b"SELECT 1"),
            Bytes::from_static(b"SELECT 2"),
        ]);
        assert!(matches!(classify(&router, &read).class, Class::Read));
        let mixed = Unit::Batch(vec![
            Bytes::from_static(b"SELECT 1"),
            Bytes::from_static(b"DELETE FROM t"),
        ]);
        assert!(matches!(classify(&router, &mixed).class, Class::Primary(_)));
        assert!(matches!(
            classify(&router, &Unit::Unknown).class,
            Class::Primary(_)
        ));
    }
}
