//! Message bookkeeping while a client is linked to a server, both directions.
//!
//! [`pump_client`] moves complete client frames to the server's output. Most pass through
//! untouched (and without copying: the whole run is split off the read buffer). For each
//! frame it records in `server.expect` what the server will answer. Named prepared
//! statements are rewritten: a client's `Parse "s1"` becomes `Parse "pgmux_7"` (or is
//! answered by pgmux when the server already has it), a `Bind "s1"` / `Describe "s1"` gets
//! the server-side name and, on a server that lacks the statement, an injected Parse in
//! front whose ParseComplete is swallowed. A client's `Close "s1"` is answered by pgmux.
//!
//! [`scan_server`] walks server bytes in place and matches each response to the head of
//! `expect`: swallowed responses are cut out, synthetic ones are inserted when everything
//! before them has arrived, and an ErrorResponse in the extended protocol makes the
//! server skip to Sync, so the entries it will never answer are dropped at the next
//! ReadyForQuery (undoing what they would have done). DataRow and CopyData bodies stream
//! through as they arrive; every other message is inspected whole.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::{Expect, Server, Undo};
use crate::params::ClientParams;
use crate::pool::PoolStats;
use crate::prepared::{self, ClientStatements, Registry, Statement};
use crate::protocol::frame::{complete_frame_len, peek_header};
use crate::protocol::messages::{self as msg, cstr, ErrorFields, Severity};
use crate::protocol::ProtocolError;
use crate::sessionstate::{self, Feature};
use pgmux_config::SessionStateAction;

/// Stop taking client frames while this much is queued for the server.
pub const OUT_LIMIT: usize = 256 * 1024;
/// Largest server message inspected whole (everything but DataRow and CopyData).
const MAX_INSPECTED_SERVER_MESSAGE: usize = 16 << 20;

const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];

/// Everything [`pump_client`] needs besides the bytes.
pub struct Pump<'a> {
    pub server: &'a mut Server,
    /// Bytes for the server.
    pub out: &'a mut BytesMut,
    /// Bytes for the client (synthetic answers that are due at once).
    pub client_out: &'a mut BytesMut,
    pub statements: &'a mut ClientStatements,
    pub registry: &'a Registry,
    pub stats: &'a PoolStats,
    /// Statement cache size per server; 0 turns statement tracking off.
    pub max_prepared: usize,
    /// After pgmux answered a message with an error, it drops the client's messages up to
    /// the next Sync, as PostgreSQL would.
    pub skip_to_sync: &'a mut bool,
    /// Stop after one unit of work (a Query, or messages up to Sync): the server is a
    /// replica chosen for that unit alone.
    pub one_unit: bool,
    /// Set when pumping stopped at the end of a unit (with `one_unit`).
    pub unit_ended: bool,
    /// Session-state detection (`session_state_action`) and what it found.
    pub state: StateCheck,
    /// Parameters whose plain SETs are followed per client (`track_extra_parameters`).
    pub track: &'a [String],
}

/// Session-state detection for one [`pump_client`] call.
#[derive(Debug, Default, Clone, Copy)]
pub struct StateCheck {
    /// What to do about a statement that makes session state; None: do not look (the
    /// client's server is pinned already).
    pub action: Option<SessionStateAction>,
    /// The first such statement's kind.
    pub found: Option<Feature>,
    /// How many such statements (simple-query texts, Parses, Binds) went by.
    pub count: u32,
}

impl StateCheck {
    pub fn new(action: Option<SessionStateAction>) -> StateCheck {
        StateCheck {
            action,
            found: None,
            count: 0,
        }
    }

    fn saw(&mut self, f: Feature) {
        self.found.get_or_insert(f);
        self.count += 1;
    }
}

/// The first `n` bytes of `rbuf`, for the end of [`pump_client`] (inside its loop a
/// frame always follows, so `n` is never all of it there). All of it is taken whole:
/// `split_to` would turn the buffer into a shared one first (an allocation per client
/// message, and its free).
fn take_front(rbuf: &mut BytesMut, n: usize) -> BytesMut {
    if n == rbuf.len() {
        std::mem::take(rbuf)
    } else {
        rbuf.split_to(n)
    }
}

fn append(out: &mut BytesMut, chunk: BytesMut) {
    if out.is_empty() {
        *out = chunk;
    } else {
        out.extend_from_slice(&chunk);
    }
}

/// Moves complete client frames from `rbuf` to `p.out`. Returns `true` if the client sent
/// Terminate (not forwarded; it stays in `rbuf`).
pub fn pump_client(
    rbuf: &mut BytesMut,
    p: &mut Pump<'_>,
    max: usize,
) -> Result<bool, ProtocolError> {
    // `n`: bytes at the front of `rbuf` checked and passing through unchanged.
    let mut n = 0;
    let mut terminate = false;
    while n < OUT_LIMIT && p.out.len() < OUT_LIMIT {
        let Some((tag, len)) = complete_frame_len(&rbuf[n..], max)? else {
            break;
        };
        if tag == b'X' {
            terminate = true;
            break;
        }
        if *p.skip_to_sync && tag != b'S' {
            append(p.out, rbuf.split_to(n));
            n = 0;
            rbuf.advance(len);
            continue;
        }
        let tracked = p.max_prepared > 0;
        let ends_unit = p.one_unit && (tag == b'Q' || (tag == b'S' && !p.server.copy_in));
        let body = &rbuf[n + 5..n + len];
        let text = match tag {
            b'Q' | b'P' => Some(query_text(tag, body)?),
            _ => None,
        };
        // A plain SET of a followed parameter, outside a transaction: recorded when it
        // succeeds, never session state.
        let followed = match text {
            Some(sql)
                if tag == b'Q'
                    && p.server.status == b'I'
                    && p.server.expect.is_empty()
                    && !p.server.unsynced =>
            {
                sessionstate::plain_set(sql).filter(|c| {
                    c.name()
                        .is_none_or(|name| p.track.iter().any(|t| t == name))
                })
            }
            _ => None,
        };
        if let (Some(action), Some(sql), None) = (p.state.action, text, &followed) {
            if let Some(f) = sessionstate::detect(sql) {
                p.state.saw(f);
                if action == SessionStateAction::Reject {
                    append(p.out, rbuf.split_to(n));
                    n = 0;
                    rbuf.advance(len);
                    refuse(p, tag, f);
                    if ends_unit {
                        p.unit_ended = true;
                        break;
                    }
                    continue;
                }
            }
        }
        let special = match tag {
            b'Q' => {
                p.server.unsynced = false;
                if let Some(change) = followed {
                    p.server.expect.push_back(Expect::TrackedSet {
                        change,
                        failed: false,
                    });
                    false
                } else if tracked && statement_command(body).is_some() {
                    true
                } else {
                    p.server.expect.push_back(Expect::Query);
                    false
                }
            }
            b'F' => {
                p.server.unsynced = false;
                p.server.expect.push_back(Expect::Function);
                false
            }
            b'S' if p.server.copy_in => false, // consumed by COPY, never answered
            b'S' => {
                p.server.unsynced = false;
                *p.skip_to_sync = false;
                p.server.expect.push_back(Expect::Sync);
                false
            }
            b'c' | b'f' => {
                p.server.copy_in = false;
                false
            }
            b'H' | b'd' => false,
            b'E' => {
                p.server.unsynced = true;
                p.server.expect.push_back(Expect::Execute);
                false
            }
            b'P' | b'B' | b'D' | b'C' => {
                p.server.unsynced = true;
                let named = tracked && names_a_statement(tag, body)?;
                if !named {
                    p.server.expect.push_back(match tag {
                        b'P' => Expect::Parse {
                            swallow: false,
                            stmt: None,
                        },
                        b'B' => Expect::Bind { stmt: None },
                        b'D' => Expect::Describe,
                        _ => Expect::Close {
                            swallow: false,
                            stmt: None,
                        },
                    });
                }
                named
            }
            other => return Err(ProtocolError::UnexpectedMessage(other as char)),
        };
        if special {
            append(p.out, rbuf.split_to(n));
            n = 0;
            let frame = rbuf.split_to(len).freeze();
            // Room at once for the rewritten message (its statement name may grow) and
            // what follows it in this read (a Bind's Execute and Sync): written a few
            // bytes at a time into an empty `out`, it grew by five reallocations.
            p.out
                .reserve(len + 32 + rbuf.len().min(OUT_LIMIT.saturating_sub(p.out.len())));
            handle_named(tag, frame.slice(5..), p)?;
        } else {
            n += len;
        }
        if ends_unit {
            p.unit_ended = true;
            break;
        }
    }
    // Nothing passed through: the buffer (and its capacity) stays the client's.
    if n > 0 {
        append(p.out, take_front(rbuf, n));
    }
    Ok(terminate)
}

/// Whether a Parse/Bind/Describe/Close names a (non-empty) prepared statement.
fn names_a_statement(tag: u8, body: &[u8]) -> Result<bool, ProtocolError> {
    let bad = |what| ProtocolError::Malformed(what);
    Ok(match tag {
        b'P' => !cstr(body).ok_or(bad("Parse"))?.0.is_empty(),
        b'B' => {
            let (_, rest) = cstr(body).ok_or(bad("Bind"))?;
            !cstr(rest).ok_or(bad("Bind"))?.0.is_empty()
        }
        _ => {
            let (&kind, rest) = body.split_first().ok_or(bad("Describe/Close"))?;
            let (name, _) = cstr(rest).ok_or(bad("Describe/Close"))?;
            match kind {
                b'S' => !name.is_empty(),
                b'P' => false,
                _ => return Err(bad("Describe/Close")),
            }
        }
    })
}

/// The SQL text of a Query or Parse body.
fn query_text(tag: u8, body: &[u8]) -> Result<&[u8], ProtocolError> {
    let text = match tag {
        b'Q' => cstr(body).map(|(q, _)| q),
        _ => cstr(body).and_then(|(_, rest)| cstr(rest)).map(|(q, _)| q),
    };
    text.ok_or(ProtocolError::Malformed(if tag == b'Q' {
        "Query"
    } else {
        "Parse"
    }))
}

/// Refuses a Query, Parse or Bind that would make session state
/// (`session_state_action = "reject"`): the client gets 0A000 in its place and the
/// server fails as it would have on an error there (see [`synthetic_error`]); for a Query
/// a Sync follows, so the server answers ReadyForQuery as it would have for the Query.
fn refuse(p: &mut Pump<'_>, tag: u8, f: Feature) {
    let text = format!(
        "pgmux: {} is not allowed here: its session state would outlive the transaction \
         and reach other clients of the pooled server connection (session_state_action = reject)",
        f.describe()
    );
    let mut b = BytesMut::new();
    msg::error_response_with_hint(&mut b, Severity::Error, "0A000", &text, f.hint());
    // When the server skips to the client's next Sync, this Query included, nothing
    // goes in its place either.
    if fail_here(p, b.freeze()) && tag == b'Q' {
        p.out.put_slice(&[b'S', 0, 0, 0, 4]);
        p.server.expect.push_back(Expect::Sync);
        p.server.unsynced = false;
    }
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed(what))
}

fn handle_named(tag: u8, body: Bytes, p: &mut Pump<'_>) -> Result<(), ProtocolError> {
    match tag {
        b'P' => {
            let (name, rest) = cstr(&body).ok_or(ProtocolError::Malformed("Parse"))?;
            let (query, types) = cstr(rest).ok_or(ProtocolError::Malformed("Parse"))?;
            let name = utf8(name, "Parse")?;
            if p.statements.contains(&name) {
                synthetic_error(
                    p,
                    "42P05",
                    &format!("prepared statement \"{name}\" already exists"),
                );
                return Ok(());
            }
            let query = body.slice_ref(query);
            let types = body.slice_ref(types);
            let stmt = p.registry.get_or_create(query, types);
            p.statements.insert(name.clone(), stmt.clone());
            if p.server.statements.touch(&stmt) {
                p.stats
                    .statement_cache_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let undo = Undo::Forget(name, stmt.id);
                synthetic(p, Bytes::from_static(PARSE_COMPLETE), undo);
            } else {
                prepare_on_server(p, &stmt, Some(name));
            }
        }
        b'B' => {
            let (portal, rest) = cstr(&body).ok_or(ProtocolError::Malformed("Bind"))?;
            let (name, rest) = cstr(rest).ok_or(ProtocolError::Malformed("Bind"))?;
            let Some(stmt) = lookup(p, name) else {
                return Ok(());
            };
            if let (Some(action), Some(f)) = (p.state.action, stmt.session_state) {
                p.state.saw(f);
                if action == SessionStateAction::Reject {
                    refuse(p, b'B', f);
                    return Ok(());
                }
            }
            ensure_on_server(p, &stmt);
            let len = 4 + portal.len() + 1 + stmt.name.len() + 1 + rest.len();
            p.out.put_u8(b'B');
            p.out.put_i32(len as i32);
            p.out.put_slice(portal);
            p.out.put_u8(0);
            p.out.put_slice(stmt.name.as_bytes());
            p.out.put_u8(0);
            p.out.put_slice(rest);
            p.server.expect.push_back(Expect::Bind {
                stmt: Some(stmt.id),
            });
        }
        b'D' => {
            let (name, _) = cstr(&body[1..]).ok_or(ProtocolError::Malformed("Describe"))?;
            let Some(stmt) = lookup(p, name) else {
                return Ok(());
            };
            ensure_on_server(p, &stmt);
            p.out.put_u8(b'D');
            p.out.put_i32((4 + 1 + stmt.name.len() + 1) as i32);
            p.out.put_u8(b'S');
            p.out.put_slice(stmt.name.as_bytes());
            p.out.put_u8(0);
            p.server.expect.push_back(Expect::Describe);
        }
        b'C' => {
            // Close of a named statement: the client forgets the name; the server keeps the
            // statement cached for other clients. PostgreSQL answers CloseComplete even for
            // names that do not exist.
            let (name, _) = cstr(&body[1..]).ok_or(ProtocolError::Malformed("Close"))?;
            let name = utf8(name, "Close")?;
            let undo = match p.statements.remove(&name) {
                Some(stmt) => Undo::Restore(name, stmt),
                None => Undo::Nothing,
            };
            synthetic(p, Bytes::from_static(CLOSE_COMPLETE), undo);
        }
        b'Q' => {
            let (sql, _) = cstr(&body).ok_or(ProtocolError::Malformed("Query"))?;
            match statement_command(&body).expect("checked by the caller") {
                StatementCommand::DiscardAll => {
                    // The client's names go; the backend's statements may or may not (the
                    // command can fail inside a transaction block): re-check before reuse.
                    p.statements.clear();
                    p.server.statements.all_uncertain();
                    p.out.extend_from_slice(b"Q");
                    p.out.put_i32((4 + sql.len() + 1) as i32);
                    p.out.put_slice(sql);
                    p.out.put_u8(0);
                }
                StatementCommand::Deallocate(name) => match p.statements.remove(&name) {
                    Some(stmt) => {
                        // Deallocate pgmux's statement on this server, so the command tag
                        // and errors are PostgreSQL's own.
                        ensure_on_server(p, &stmt);
                        p.server.statements.forget(stmt.id);
                        msg::query(p.out, &format!("DEALLOCATE {}", stmt.name));
                    }
                    None => {
                        p.out.put_u8(b'Q');
                        p.out.put_i32((4 + sql.len() + 1) as i32);
                        p.out.put_slice(sql);
                        p.out.put_u8(0);
                    }
                },
            }
            p.server.expect.push_back(Expect::Query);
        }
        _ => unreachable!("only P, B, D, C, Q are special"),
    }
    Ok(())
}

/// With no server linked: if the client's buffered messages up to the next Sync are only
/// Parse of statements a server has accepted before and Close of statements, answer them
/// without a server (ParseComplete/CloseComplete, then ReadyForQuery 'I'). Besides saving
/// a round trip, this keeps clients that prepare synchronously while other connections of
/// the same thread hold servers (pgbench -M prepared) from waiting on each other. Returns
/// whether it answered. A statement that became invalid since (DDL) reports its error at
/// the Bind that re-prepares it.
pub fn answer_without_server(
    rbuf: &mut BytesMut,
    out: &mut BytesMut,
    statements: &mut ClientStatements,
    registry: &Registry,
    stats: &PoolStats,
    max: usize,
) -> Result<bool, ProtocolError> {
    enum Step {
        Parse(String, std::sync::Arc<Statement>),
        Close(String),
    }
    let mut steps = Vec::new();
    let mut n = 0;
    loop {
        let Some((tag, len)) = complete_frame_len(&rbuf[n..], max)? else {
            return Ok(false);
        };
        let body = &rbuf[n + 5..n + len];
        n += len;
        match tag {
            b'S' => break,
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    return Ok(false);
                };
                // The unnamed statement (every -M extended query) goes to a server: known
                // before the query text is scanned.
                if name.is_empty() {
                    return Ok(false);
                }
                let Some((query, types)) = cstr(rest) else {
                    return Ok(false);
                };
                let Ok(name) = std::str::from_utf8(name) else {
                    return Ok(false);
                };
                let seen = steps
                    .iter()
                    .any(|s| matches!(s, Step::Parse(n, _) | Step::Close(n) if n == name));
                if seen || statements.contains(name) {
                    return Ok(false);
                }
                match registry.get(query, types) {
                    Some(stmt) if stmt.is_valid() => steps.push(Step::Parse(name.to_owned(), stmt)),
                    _ => return Ok(false),
                }
            }
            b'C' => match body.split_first() {
                Some((b'S', rest)) => match cstr(rest).map(|(n, _)| std::str::from_utf8(n)) {
                    Some(Ok(name)) if !name.is_empty() => steps.push(Step::Close(name.to_owned())),
                    _ => return Ok(false),
                },
                _ => return Ok(false),
            },
            _ => return Ok(false),
        }
    }
    rbuf.advance(n);
    for step in steps {
        match step {
            Step::Parse(name, stmt) => {
                stats
                    .statement_cache_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                statements.insert(name, stmt);
                out.extend_from_slice(PARSE_COMPLETE);
            }
            Step::Close(name) => {
                statements.remove(&name);
                out.extend_from_slice(CLOSE_COMPLETE);
            }
        }
    }
    msg::ready_for_query(out, b'I');
    Ok(true)
}

/// The client's statement `name`, or a synthetic 26000 error.
fn lookup(p: &mut Pump<'_>, name: &[u8]) -> Option<std::sync::Arc<Statement>> {
    match p.statements.get(&String::from_utf8_lossy(name)) {
        Some(s) => Some(s.clone()),
        None => {
            let text = format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            synthetic_error(p, "26000", &text);
            None
        }
    }
}

/// Makes sure the server has `stmt` prepared, injecting a swallowed Parse if not.
fn ensure_on_server(p: &mut Pump<'_>, stmt: &std::sync::Arc<Statement>) {
    if p.server.statements.touch(stmt) {
        p.stats
            .statement_cache_hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    } else {
        prepare_on_server(p, stmt, None);
    }
}

/// Sends a Parse for `stmt` (closing evicted or stale statements first). `client_name`:
/// the client's own Parse (its ParseComplete goes to the client); None: injected.
fn prepare_on_server(
    p: &mut Pump<'_>,
    stmt: &std::sync::Arc<Statement>,
    client_name: Option<String>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let plan = p.server.statements.prepare(stmt, p.max_prepared);
    for id in plan.reprepare.iter().chain(&plan.evict) {
        prepared::encode_close_statement(&prepared::server_name(*id), p.out);
        p.server.expect.push_back(Expect::Close {
            swallow: true,
            stmt: Some(*id),
        });
    }
    p.stats
        .statement_evictions
        .fetch_add(plan.evict.len() as u64, Relaxed);
    p.stats.statements_prepared.fetch_add(1, Relaxed);
    stmt.encode_parse(p.out);
    p.server.expect.push_back(Expect::Parse {
        swallow: client_name.is_none(),
        stmt: Some((stmt.clone(), client_name)),
    });
    p.server.unsynced = true;
}

/// Whether the server will skip the message being pumped now: it is skipping after an
/// extended-protocol error (scanned already) and no Sync is owed before this message. A
/// Sync still owed ends that skip before the server reaches this message (the client
/// pipelined past it), so the message counts.
fn will_skip(p: &Pump<'_>) -> bool {
    p.server.skipping && !p.server.expect.iter().any(|e| matches!(e, Expect::Sync))
}

/// Queues a response pgmux makes itself; sends it at once if nothing is owed before it.
fn synthetic(p: &mut Pump<'_>, bytes: Bytes, undo: Undo) {
    if will_skip(p) {
        // The server is skipping to Sync: PostgreSQL would not answer this message.
        undo_client(&undo, p.statements);
    } else if p.server.expect.is_empty() {
        p.client_out.extend_from_slice(&bytes);
    } else {
        p.server.expect.push_back(Expect::Synthetic { bytes, undo });
    }
}

/// The error PostgreSQL would give a client message pgmux refuses itself (its
/// statement names are pgmux's, not the server's). The server must fail too, or a
/// transaction the error should abort would commit: a Describe of a portal no client can
/// name goes in the message's place, and its error is replaced with this one. The server
/// then skips the client's messages up to Sync, as it would have.
fn synthetic_error(p: &mut Pump<'_>, code: &str, text: &str) {
    let mut b = BytesMut::new();
    msg::error_response(&mut b, Severity::Error, code, text);
    fail_here(p, b.freeze());
}

/// The server fails here on purpose and the client sees `error` in its place (a
/// Describe of a portal no client can name; see [`synthetic_error`]). False when the
/// server skips this message anyway: nothing is sent.
fn fail_here(p: &mut Pump<'_>, error: Bytes) -> bool {
    if will_skip(p) {
        // PostgreSQL would not have looked at this message.
        return false;
    }
    p.out.put_u8(b'D');
    p.out.put_i32((4 + 1 + FAIL_PORTAL.len() + 1) as i32);
    p.out.put_u8(b'P');
    p.out.put_slice(FAIL_PORTAL);
    p.out.put_u8(0);
    p.server.expect.push_back(Expect::Fail { error });
    p.server.unsynced = true;
    true
}

/// A portal name no client creates by accident (a control character first).
const FAIL_PORTAL: &[u8] = b"\x01pgmux refused";

fn undo_client(undo: &Undo, statements: &mut ClientStatements) {
    match undo {
        Undo::Nothing => {}
        Undo::Forget(name, id) => statements.remove_if(name, *id),
        Undo::Restore(name, stmt) => statements.insert(name.clone(), stmt.clone()),
    }
}

/// Simple-query commands that change prepared statements, recognised when they are the
/// whole query.
enum StatementCommand {
    DiscardAll,
    Deallocate(String),
}

fn statement_command(body: &[u8]) -> Option<StatementCommand> {
    // Nearly every query is neither: refused on its first word, before the text is
    // looked at further (1 in 3 of a pgbench transaction's instructions went here).
    if !sessionstate::first_word_is(body, b"discard")
        && !sessionstate::first_word_is(body, b"deallocate")
    {
        return None;
    }
    let (sql, _) = cstr(body)?;
    if sql.len() > 200 {
        return None;
    }
    let sql = std::str::from_utf8(sql)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim_end();
    let mut words = sql.split_whitespace();
    let first = words.next()?.to_ascii_lowercase();
    let rest: Vec<&str> = words.collect();
    match (first.as_str(), rest.as_slice()) {
        ("discard", [w]) if w.eq_ignore_ascii_case("all") => Some(StatementCommand::DiscardAll),
        ("deallocate", [w]) | ("deallocate", [_, w]) if w.eq_ignore_ascii_case("all") => {
            if rest.len() == 2 && !rest[0].eq_ignore_ascii_case("prepare") {
                return None;
            }
            Some(StatementCommand::DiscardAll)
        }
        ("deallocate", [name]) | ("deallocate", [_, name]) => {
            if rest.len() == 2 && !rest[0].eq_ignore_ascii_case("prepare") {
                return None;
            }
            identifier(name).map(StatementCommand::Deallocate)
        }
        _ => None,
    }
}

/// An SQL identifier as PostgreSQL reads it: `"Quoted"` keeps case, bare folds to lower.
fn identifier(word: &str) -> Option<String> {
    if let Some(inner) = word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        if inner.is_empty() {
            return None;
        }
        return Some(inner.replace("\"\"", "\""));
    }
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
    {
        Some(word.to_ascii_lowercase())
    } else {
        None
    }
}

/// Scans server bytes in place, moving what the client should see into `out`.
pub fn scan_server(
    server: &mut Server,
    out: &mut BytesMut,
    params: &mut ClientParams,
    statements: &mut ClientStatements,
) -> Result<(), ProtocolError> {
    let mut pos = 0;
    loop {
        if server.pending_body > 0 {
            let take = server.pending_body.min(server.buf.len() - pos);
            pos += take;
            server.pending_body -= take;
            if server.pending_body > 0 {
                break;
            }
        }
        let Some((tag, total)) = peek_header(&server.buf[pos..], i32::MAX as usize)? else {
            break;
        };
        if tag == b'D' || tag == b'd' {
            let avail = total.min(server.buf.len() - pos);
            pos += avail;
            server.pending_body = total - avail;
            continue;
        }
        if total > MAX_INSPECTED_SERVER_MESSAGE {
            return Err(ProtocolError::TooLarge {
                tag: tag as char,
                len: total,
                max: MAX_INSPECTED_SERVER_MESSAGE,
            });
        }
        if server.buf.len() - pos < total {
            break;
        }
        let mut replacement = None;
        let parts = Parts {
            replacement: &mut replacement,
            expect: &mut server.expect,
            skipping: &mut server.skipping,
            copy_in: &mut server.copy_in,
            statements: &mut server.statements,
            params: &mut server.params,
            status: &mut server.status,
            readies: &mut server.readies,
            error_classes: &mut server.error_classes,
            said_fatal: &mut server.said_fatal,
            refused_write: &mut server.refused_write,
        };
        let swallow = on_message(
            parts,
            tag,
            &server.buf[pos + 5..pos + total],
            params,
            statements,
        )?;
        if swallow {
            append(out, server.buf.split_to(pos));
            server.buf.advance(total);
            pos = 0;
            if let Some(error) = replacement {
                out.extend_from_slice(&error);
            }
        } else {
            pos += total;
        }
        // The last answer owed, outside a transaction: anything after it is unsolicited
        // (typically a FATAL from a backend being shut down) and stays in the buffer, so
        // the client never sees an error for a request it did not make; the session
        // drops the server.
        if tag == b'Z' && server.expect.is_empty() && server.status == b'I' {
            break;
        }
        // Responses pgmux makes itself go out once everything before them has.
        while !server.skipping && matches!(server.expect.front(), Some(Expect::Synthetic { .. })) {
            if let Some(Expect::Synthetic { bytes, .. }) = server.expect.pop_front() {
                append(out, server.buf.split_to(pos));
                pos = 0;
                out.extend_from_slice(&bytes);
            }
        }
    }
    append(out, server.buf.split_to(pos));
    Ok(())
}

/// What a pinned server sent while its client was between transactions.
pub enum Unsolicited {
    /// Only messages a backend may send at any time (NotificationResponse, NoticeResponse,
    /// ParameterStatus), now in `out`; an incomplete one stays in the server's buffer.
    Forwarded,
    /// An ErrorResponse (a backend being terminated says FATAL, then closes): its body.
    Error(Bytes),
}

/// Moves the complete asynchronous messages a pinned, idle server sent (a LISTEN
/// notification, a notice, a parameter change) from its buffer to the client's `out`.
/// Anything else is a protocol error: an idle backend owes nothing.
pub fn take_unsolicited(
    server: &mut Server,
    out: &mut BytesMut,
    params: &mut ClientParams,
) -> Result<Unsolicited, ProtocolError> {
    while let Some((tag, total)) = complete_frame_len(&server.buf, MAX_INSPECTED_SERVER_MESSAGE)? {
        let frame = server.buf.split_to(total);
        match tag {
            b'A' | b'N' => out.extend_from_slice(&frame),
            b'S' => {
                let (k, v) = msg::parse_parameter_status(&frame[5..])?;
                server.params.reported(k, v);
                params.reported(k, v);
                out.extend_from_slice(&frame);
            }
            b'E' => return Ok(Unsolicited::Error(frame.freeze().slice(5..))),
            other => return Err(ProtocolError::UnexpectedMessage(other as char)),
        }
    }
    Ok(Unsolicited::Forwarded)
}

/// The parts of a server `on_message` updates (disjoint from the read buffer).
struct Parts<'a> {
    /// Set with a swallowed message: what the client gets in its place.
    replacement: &'a mut Option<Bytes>,
    expect: &'a mut std::collections::VecDeque<Expect>,
    skipping: &'a mut bool,
    copy_in: &'a mut bool,
    statements: &'a mut prepared::ServerStatements,
    params: &'a mut crate::params::ServerParams,
    status: &'a mut u8,
    readies: &'a mut u64,
    error_classes: &'a mut Vec<[u8; 2]>,
    said_fatal: &'a mut bool,
    refused_write: &'a mut bool,
}

/// Handles one whole server message; returns whether to hide it from the client.
fn on_message(
    mut s: Parts<'_>,
    tag: u8,
    body: &[u8],
    params: &mut ClientParams,
    statements: &mut ClientStatements,
) -> Result<bool, ProtocolError> {
    let head_is = |s: &Parts<'_>, f: fn(&Expect) -> bool| s.expect.front().is_some_and(f);
    match tag {
        b'G' => {
            // COPY FROM STDIN: until CopyDone/CopyFail the backend reads Syncs as part of
            // the copy and never answers them. Drivers (tokio-postgres, libpq pipelines)
            // send Bind/Execute/Sync before they see this message: un-count that Sync.
            *s.copy_in = true;
            if let Some(head) = s.expect.pop_front() {
                s.expect.retain(|e| !matches!(e, Expect::Sync));
                s.expect.push_front(head);
            }
        }
        b'Z' => {
            *s.status = *body
                .first()
                .ok_or(ProtocolError::Malformed("ReadyForQuery"))?;
            *s.readies += 1;
            // Close the entry this answers, dropping what the server skipped before it.
            while let Some(e) = s.expect.pop_front() {
                if let Expect::TrackedSet { change, failed } = &e {
                    // Carried out, and not inside a transaction that could undo it.
                    if !*failed && *s.status == b'I' {
                        params.track(change);
                        s.params.track(change);
                    }
                }
                if e.ends_at_ready() {
                    break;
                }
                undo_skipped(e, &mut s, statements);
            }
            *s.skipping = false;
        }
        b'S' => {
            let (k, v) = msg::parse_parameter_status(body)?;
            s.params.reported(k, v);
            params.reported(k, v);
        }
        b'E' => {
            // Counted by the class of the error the client sees.
            let count_class = |s: &mut Parts<'_>, f: &ErrorFields| {
                if let [a, b, ..] = f.code().as_bytes() {
                    s.error_classes.push([*a, *b]);
                }
            };
            if let Some(Expect::Fail { error }) = s.expect.front() {
                // The failure pgmux asked for: the client gets its own error instead.
                let error = error.clone();
                if let Ok(f) = ErrorFields::parse(&error[5..]) {
                    count_class(&mut s, &f);
                }
                s.expect.pop_front();
                *s.skipping = true;
                *s.replacement = Some(error);
                return Ok(true);
            }
            if let Ok(f) = ErrorFields::parse(body) {
                count_class(&mut s, &f);
                if matches!(f.severity(), "FATAL" | "PANIC") {
                    *s.said_fatal = true;
                }
                if f.code() == crate::protocol::sqlstate::READ_ONLY_SQL_TRANSACTION {
                    *s.refused_write = true;
                }
            }
            if let Some(Expect::TrackedSet { failed, .. }) = s.expect.front_mut() {
                *failed = true;
            }
            let extended = s.expect.front().is_some_and(|e| !e.ends_at_ready());
            if extended {
                let e = s.expect.pop_front().expect("non-empty");
                if let Expect::Bind { stmt: Some(id) } = &e {
                    // After DDL, PostgreSQL refuses an old plan (0A000); re-prepare that
                    // statement on this server before its next use.
                    let f = ErrorFields::parse(body)?;
                    if f.code() == "0A000"
                        && f.message()
                            .starts_with("cached plan must not change result type")
                    {
                        s.statements.mark_stale(*id);
                    }
                }
                undo_skipped(e, &mut s, statements);
                *s.skipping = true;
            }
        }
        b'1' if head_is(&s, |e| matches!(e, Expect::Parse { .. })) => {
            if let Some(Expect::Parse { swallow, stmt }) = s.expect.pop_front() {
                if let Some((stmt, _)) = stmt {
                    stmt.mark_valid();
                }
                return Ok(swallow);
            }
        }
        b'2' if head_is(&s, |e| matches!(e, Expect::Bind { .. })) => {
            s.expect.pop_front();
        }
        b'3' if head_is(&s, |e| matches!(e, Expect::Close { .. })) => {
            if let Some(Expect::Close { swallow, .. }) = s.expect.pop_front() {
                return Ok(swallow);
            }
        }
        b'T' | b'n' if head_is(&s, |e| matches!(e, Expect::Describe)) => {
            s.expect.pop_front();
        }
        b'T' | b'n' if head_is(&s, |e| matches!(e, Expect::Fail { .. })) => {
            // Someone did create that portal: the server did not fail, but the client
            // still gets the error for its own message.
            if let Some(Expect::Fail { error }) = s.expect.pop_front() {
                *s.replacement = Some(error);
                return Ok(true);
            }
        }
        b'C' | b'I' | b's' if head_is(&s, |e| matches!(e, Expect::Execute)) => {
            s.expect.pop_front();
        }
        _ => {}
    }
    Ok(false)
}

/// An entry the server will never answer (it failed, or was skipped after an error):
/// take back its effect on statement bookkeeping.
fn undo_skipped(e: Expect, s: &mut Parts<'_>, statements: &mut ClientStatements) {
    match e {
        Expect::Parse {
            stmt: Some((stmt, name)),
            ..
        } => {
            s.statements.forget(stmt.id);
            if let Some(name) = name {
                statements.remove_if(&name, stmt.id);
            }
        }
        Expect::Close {
            swallow: true,
            stmt: Some(id),
        } => s.statements.close_skipped(id),
        Expect::Synthetic { undo, .. } => undo_client(&undo, statements),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(sql: &str) -> Vec<u8> {
        let mut v = sql.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn recognises_statement_commands() {
        assert!(matches!(
            statement_command(&q("DISCARD ALL")),
            Some(StatementCommand::DiscardAll)
        ));
        assert!(matches!(
            statement_command(&q(" deallocate all ;")),
            Some(StatementCommand::DiscardAll)
        ));
        assert!(matches!(
            statement_command(&q("DEALLOCATE PREPARE ALL")),
            Some(StatementCommand::DiscardAll)
        ));
        assert!(
            matches!(statement_command(&q("deallocate pdo_stmt_0001")), Some(StatementCommand::Deallocate(n)) if n == "pdo_stmt_0001")
        );
        assert!(
            matches!(statement_command(&q("DEALLOCATE PREPARE \"S_1\"")), Some(StatementCommand::Deallocate(n)) if n == "S_1")
        );
        assert!(
            matches!(statement_command(&q("DEALLOCATE Foo")), Some(StatementCommand::Deallocate(n)) if n == "foo")
        );
        assert!(statement_command(&q("select 1")).is_none());
        // The first-word check in front: only the whole word counts.
        assert!(matches!(
            statement_command(&q("\n DISCARD\tALL;")),
            Some(StatementCommand::DiscardAll)
        ));
        assert!(statement_command(&q("discards all")).is_none());
        assert!(statement_command(&q("deallocatex all")).is_none());
        assert!(statement_command(&q("discard")).is_none());
        assert!(statement_command(&q("discard all; select 1")).is_none());
        assert!(statement_command(&q("deallocate x y")).is_none());
    }
}
