//! Fuzz entry points: the code pgmux runs on bytes a client controls, driven without a
//! socket.
//!
//! Each function takes arbitrary bytes, must never panic, and asserts a few cheap
//! invariants (a panic is the failure signal). They are called by the `cargo fuzz`
//! targets under `fuzz/` (libFuzzer, nightly) and by the replay-and-mutate test
//! `proxy/tests/fuzz_replay.rs` (stable, CI). Not part of pgmux's API.
//!
//! Where the session's own code is `async` and socket-bound (`session::login`), the
//! entry point repeats its decisions around the same pure functions (marked below) so
//! that exactly those functions see the fuzzer's bytes.

use std::cell::RefCell;
use std::collections::HashSet;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use pgmux_config::SessionStateAction;
use sha2::{Digest, Sha256};

use crate::auth::{self, ScramError, ScramKeyClient, ScramKeys, ScramServer, ScramVerifier};
use crate::backend::{Server, ServerStream};
use crate::params::{self, ClientParams, ServerParams};
use crate::pool::PoolStats;
use crate::prepared::{ClientStatements, Registry, ServerStatements};
use crate::protocol::frame::{complete_frame_len, split_frame, split_startup_packet};
use crate::protocol::messages::{self as msg, ErrorFields, Severity};
use crate::protocol::{CANCEL_REQUEST, GSSENC_REQUEST, MAX_STARTUP_PACKET, SSL_REQUEST};
use crate::relay::{self, Pump, StateCheck};
use crate::router::Router;
use crate::routing::{self, Unit};
use crate::session::{sort_startup, Startup};

/// `max_message_size` the frontend target runs with: small, so that lengths written by
/// mutations (0x7fffffff …) hit the limit check rather than wait for bytes forever.
const MAX_MESSAGE: usize = 64 * 1024;

// ---------------------------------------------------------------------------------
// Startup packet

/// The startup phase as `session::login` runs it: [`split_startup_packet`] over the
/// input as one read buffer, then for each packet the same dispatch on the protocol
/// code (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage 3.x), then
/// [`msg::parse_startup_params`], the `options` parameter ([`params::parse_options`]),
/// [`ClientParams::new`] and the `SET`/`RESET` text [`ClientParams::sync_sql`] sends to
/// servers, and the FATAL error pgmux would answer with.
///
/// Asserts: a packet body is at least the 4-byte code and no longer than the bytes
/// consumed; a re-encoded StartupMessage parses back to the same parameters; the
/// synchronising SQL, when PostgreSQL's parser accepts it, is only `SET`/`RESET`
/// statements of exactly the client's names and values (no injection through startup
/// parameters); pgmux's error responses carrying the client's words re-split as one
/// well-formed message.
pub fn startup_packet(data: &[u8]) {
    let mut rbuf = BytesMut::from(data);
    // A server that already ran another client's settings, for the RESET branch.
    let mut server = ServerParams::from_startup(vec![
        ("application_name".into(), String::new()),
        ("client_encoding".into(), "UTF8".into()),
        ("DateStyle".into(), "ISO, MDY".into()),
        ("TimeZone".into(), "UTC".into()),
        ("server_version".into(), "17.0".into()),
    ]);
    for _ in 0..16 {
        let before = rbuf.len();
        let body = match split_startup_packet(&mut rbuf) {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(e) => {
                error_round_trip(&e.to_string());
                return;
            }
        };
        assert!(body.len() >= 4, "startup body shorter than its code");
        assert!(
            body.len() + 4 <= before,
            "startup body longer than its input"
        );
        assert!(body.len() + 4 <= MAX_STARTUP_PACKET);
        assert_eq!(before - rbuf.len(), body.len() + 4);
        // As session::login.
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST if body.len() == 4 => continue,
            CANCEL_REQUEST if body.len() == 12 => continue,
            v if v >> 16 == 3 => match msg::parse_startup_params(&body[4..]) {
                Ok(p) => {
                    startup_round_trip(v, &p);
                    startup_settings(p, &mut server);
                }
                Err(e) => error_round_trip(&e.to_string()),
            },
            v => error_round_trip(&format!(
                "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                (v >> 16) & 0xffff,
                v & 0xffff
            )),
        }
    }
}

/// A StartupMessage re-encoded from its parsed parameters parses back equal.
fn startup_round_trip(version: i32, p: &[(String, String)]) {
    let mut packet = BytesMut::new();
    packet.put_i32(0);
    packet.put_i32(version);
    for (k, v) in p {
        packet.put_slice(k.as_bytes());
        packet.put_u8(0);
        packet.put_slice(v.as_bytes());
        packet.put_u8(0);
    }
    packet.put_u8(0);
    let len = packet.len() as i32;
    packet[..4].copy_from_slice(&len.to_be_bytes());
    let body = split_startup_packet(&mut packet)
        .expect("a re-encoded startup packet is valid")
        .expect("and complete");
    let again = msg::parse_startup_params(&body[4..]).expect("re-encoded parameters parse");
    assert_eq!(again, p, "startup parameters do not round-trip");
    assert!(packet.is_empty());
}

/// The parameter handling of `session::login` after the packet was split (the sorting
/// is login's own `sort_startup`).
fn startup_settings(startup: Vec<(String, String)>, server: &mut ServerParams) {
    let Startup {
        user,
        database,
        requested,
        unknown_protocol_options,
    } = match sort_startup(startup) {
        Ok(s) => s,
        Err(text) => return error_round_trip(&text),
    };
    let mut wbuf = BytesMut::new();
    msg::negotiate_protocol_version(&mut wbuf, 0, &unknown_protocol_options);
    assert_one_frame(&wbuf);
    if let Some(user) = &user {
        error_round_trip(&format!(
            "password authentication failed for user \"{user}\""
        ));
        let database = database.unwrap_or_else(|| user.clone());
        error_round_trip(&format!("database \"{database}\" does not exist"));
    }
    let mut client = match ClientParams::new(server, &requested) {
        Ok(p) => p,
        Err(e) => {
            error_round_trip(&e);
            return;
        }
    };
    let mut burst = BytesMut::new();
    for (k, v) in client.login_report(server) {
        msg::parameter_status(&mut burst, k, v);
    }
    while !burst.is_empty() {
        let f = split_frame(&mut burst, usize::MAX >> 1)
            .expect("pgmux's ParameterStatus is well-formed")
            .expect("and complete");
        assert_eq!(f.tag, b'S');
    }
    if let Some(sql) = client.sync_sql(server) {
        check_sync_sql(&sql, &client);
        client.after_sync(server);
    }
}

/// The SQL that re-applies a client's settings, as PostgreSQL's parser reads it: only
/// SET/RESET statements, of the names and values pgmux meant.
fn check_sync_sql(sql: &str, client: &ClientParams) {
    use pg_query::protobuf::{a_const, VariableSetKind};
    use pg_query::NodeEnum;
    let sets = sql.matches("SET ").count() + sql.matches("set_config(").count();
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        // PostgreSQL would refuse it as a whole: nothing runs.
        return;
    };
    let stmts = &parsed.protobuf.stmts;
    assert!(
        stmts.len() <= sets,
        "more statements than SET/RESET: {sql:?}"
    );
    for raw in stmts {
        let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
        if let Some(NodeEnum::SelectStmt(select)) = node {
            check_set_config(select, sql, client);
            continue;
        }
        let Some(NodeEnum::VariableSetStmt(set)) = node else {
            panic!("sync SQL holds a statement other than SET/RESET: {sql:?}");
        };
        if set.kind == VariableSetKind::VarReset as i32 {
            assert!(
                client.get(&set.name).is_none() && set.args.is_empty(),
                "RESET of a setting the client has: {sql:?}"
            );
            continue;
        }
        assert_eq!(
            set.kind,
            VariableSetKind::VarSetValue as i32,
            "unexpected SET form: {sql:?}"
        );
        let [arg] = set.args.as_slice() else {
            panic!("SET with other than one value: {sql:?}");
        };
        let Some(NodeEnum::AConst(c)) = arg.node.as_ref() else {
            panic!("SET value is not a constant: {sql:?}");
        };
        let Some(a_const::Val::Sval(value)) = &c.val else {
            panic!("SET value is not a string: {sql:?}");
        };
        let want = params::TRACKED
            .iter()
            .find(|t| t.eq_ignore_ascii_case(&set.name))
            .map_or(set.name.as_str(), |t| t);
        assert_eq!(
            client.get(want),
            Some(value.sval.as_str()),
            "SET {} does not carry the client's value: {sql:?}",
            set.name
        );
    }
}

/// `SELECT pg_catalog.set_config('name', 'value', false)` of a list-quoted parameter with
/// the client's value, and nothing else.
fn check_set_config(select: &pg_query::protobuf::SelectStmt, sql: &str, client: &ClientParams) {
    use pg_query::protobuf::a_const;
    use pg_query::NodeEnum;
    let string = |n: &pg_query::protobuf::Node| match n.node.as_ref() {
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        _ => None,
    };
    assert!(
        select.from_clause.is_empty() && select.where_clause.is_none(),
        "set_config with more than its call: {sql:?}"
    );
    let [target] = select.target_list.as_slice() else {
        panic!("sync SELECT with other than one column: {sql:?}");
    };
    let Some(NodeEnum::ResTarget(t)) = target.node.as_ref() else {
        panic!("unexpected SELECT target: {sql:?}");
    };
    let Some(NodeEnum::FuncCall(f)) = t.val.as_ref().and_then(|v| v.node.as_ref()) else {
        panic!("sync SELECT is not a function call: {sql:?}");
    };
    let func: Vec<_> = f.funcname.iter().filter_map(string).collect();
    assert_eq!(func, ["pg_catalog", "set_config"], "{sql:?}");
    let [name, value, local] = f.args.as_slice() else {
        panic!("set_config with other than three arguments: {sql:?}");
    };
    let name = string(name).expect("a constant name");
    assert!(
        params::is_list_quoted(&name),
        "set_config of {name}: {sql:?}"
    );
    assert_eq!(
        client.get(&name),
        string(value).as_deref(),
        "set_config does not carry the client's value: {sql:?}"
    );
    let Some(NodeEnum::AConst(c)) = local.node.as_ref() else {
        panic!("set_config's is_local is not a constant: {sql:?}");
    };
    assert!(
        matches!(c.val, Some(a_const::Val::Boolval(ref b)) if !b.boolval),
        "set_config is not for the session: {sql:?}"
    );
}

/// pgmux's FATAL/ERROR with `text` in it splits back as one ErrorResponse whose message
/// is `text` without NULs.
fn error_round_trip(text: &str) {
    let mut buf = BytesMut::new();
    msg::error_response(&mut buf, Severity::Fatal, "08P01", text);
    let f = split_frame(&mut buf, usize::MAX >> 1)
        .expect("pgmux's ErrorResponse is well-formed")
        .expect("and complete");
    assert!(buf.is_empty());
    assert_eq!(f.tag, b'E');
    let fields = ErrorFields::parse(&f.body).expect("pgmux's ErrorResponse parses");
    let want: String = text.chars().filter(|c| *c != '\0').collect();
    // Invalid UTF-8 cannot occur: `text` is a str and NULs were dropped whole.
    assert_eq!(fields.message(), want);
    assert_eq!(fields.code(), "08P01");
}

fn assert_one_frame(buf: &[u8]) {
    assert_eq!(
        complete_frame_len(buf, usize::MAX >> 1)
            .ok()
            .flatten()
            .map(|(_, n)| n),
        Some(buf.len()),
        "not one well-formed message"
    );
}

/// `buf` is a sequence of whole, well-formed messages (the peer stays in sync).
fn assert_frames(buf: &[u8], what: &str) {
    let mut pos = 0;
    while pos < buf.len() {
        match complete_frame_len(&buf[pos..], usize::MAX >> 1) {
            Ok(Some((_, n))) => pos += n,
            other => panic!(
                "{what}: not whole messages at byte {pos} of {}: {other:?}",
                buf.len()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------
// Frontend messages

/// The server half of [`frontend_messages`]: a stand-in backend, reused across inputs.
struct Rig {
    // Dropped before the runtime its socket is registered with.
    server: Server,
    _peer: tokio::net::UnixStream,
    _runtime: tokio::runtime::Runtime,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let _enter = runtime.enter();
    let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
    let addr = std::sync::Arc::new(pgmux_config::ServerAddr {
        host: "/tmp".into(),
        port: 5432,
        dbname: "fuzz".into(),
        params: Default::default(),
        tls: Default::default(),
    });
    Rig {
        server: Server::detached(ServerStream::Unix(a), addr),
        _peer: b,
        _runtime: runtime,
    }
}

/// Resets the relay state of a reused server (the stream is never touched).
fn reset(server: &mut Server) {
    server.buf.clear();
    server.params = ServerParams::default();
    server.expect.clear();
    server.skipping = false;
    server.copy_in = false;
    server.statements = ServerStatements::default();
    server.unsynced = false;
    server.status = b'I';
    server.dirty = false;
    server.pending_body = 0;
    server.error_classes.clear();
}

/// A frontend byte stream through everything pgmux does with it while a client is
/// linked or about to be: [`routing::next_unit`] and [`routing::replayable_len`] (read
/// routing and retries), [`routing::classify`] (PostgreSQL's parser on the texts),
/// [`relay::answer_without_server`], and [`relay::pump_client`] (framing, statement
/// renaming, Close/DEALLOCATE/DISCARD handling, skip-to-Sync) with a stand-in backend
/// that answers what pgmux forwards as PostgreSQL would (errors included) through
/// [`relay::scan_server`].
///
/// The first input byte picks the settings: bits 0–1 the statement cache size (0, 1, 2,
/// 100), bit 2 one unit per server, bit 3 the backend fails every Parse, bit 4 the
/// client starts with statements `s1`/`s2` known, bits 5–6 `session_state_action`
/// (off, pin, warn, reject: [`crate::sessionstate::detect`] on every Query and Parse
/// text); the rest is the client's bytes.
///
/// Asserts: units never span more bytes than there are; a replayable unit is exactly
/// the unit read routing saw; the buffer only shrinks; what goes to the server and
/// what goes to the client are whole, well-formed messages (neither side desynchronises).
pub fn frontend_messages(data: &[u8]) {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let max_prepared = [0, 1, 2, 100][usize::from(flags & 3)];
    let one_unit = flags & 4 != 0;
    let fail_parse = flags & 8 != 0;
    let state_action = [
        None,
        Some(SessionStateAction::Pin),
        Some(SessionStateAction::Warn),
        Some(SessionStateAction::Reject),
    ][usize::from(flags >> 5 & 3)];
    let registry = Registry::default();
    let stats = PoolStats::default();
    let mut statements = ClientStatements::default();
    let mut held = Vec::new();
    if flags & 16 != 0 {
        for (name, sql) in [("s1", "select 1"), ("s2", "select $1::int")] {
            let stmt = registry.get_or_create(sql.into(), bytes::Bytes::new());
            stmt.mark_valid();
            statements.insert(name.into(), stmt.clone());
            held.push(stmt);
        }
    }

    // Read routing looks at the next unit before a server is chosen.
    if let Ok(next) = routing::next_unit(wire, &statements, MAX_MESSAGE) {
        assert!(next.len <= wire.len(), "unit longer than the buffer");
        if next.unit != Unit::Unknown {
            if let Some(n) = routing::replayable_len(wire, &statements, MAX_MESSAGE) {
                assert_eq!(n, next.len, "replayable unit differs from the routed one");
            }
            let _ = ROUTER.with(|r| routing::classify(r, &next.unit));
        } else {
            assert_eq!(next.len, 0);
        }
    }
    if let Some(n) = routing::replayable_len(wire, &statements, MAX_MESSAGE) {
        assert!(n <= wire.len() && n >= 5);
    }

    // Parse/Close answered without a server.
    {
        let mut rbuf = BytesMut::from(wire);
        let mut out = BytesMut::new();
        let mut names = ClientStatements::default();
        for (name, stmt) in held.iter().enumerate() {
            names.insert(format!("s{}", name + 1), stmt.clone());
        }
        let before = rbuf.len();
        if let Ok(true) = relay::answer_without_server(
            &mut rbuf,
            &mut out,
            &mut names,
            &registry,
            &stats,
            MAX_MESSAGE,
        ) {
            assert!(rbuf.len() < before);
            assert_frames(&out, "answer_without_server");
        }
    }

    RIG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let rig = cell.get_or_insert_with(rig);
        let server = &mut rig.server;
        reset(server);
        let mut backend = Backend {
            fail_parse,
            ..Backend::default()
        };
        let mut client_params = ClientParams::default();
        let track: Vec<String> = ["client_min_messages", "work_mem"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut rbuf = BytesMut::from(wire);
        let mut skip_to_sync = false;
        for _ in 0..256 {
            let before = rbuf.len();
            let mut out = BytesMut::new();
            let mut client_out = BytesMut::new();
            let mut pump = Pump {
                server,
                out: &mut out,
                client_out: &mut client_out,
                statements: &mut statements,
                registry: &registry,
                stats: &stats,
                max_prepared,
                skip_to_sync: &mut skip_to_sync,
                one_unit,
                unit_ended: false,
                state: StateCheck::new(state_action),
                track: &track,
            };
            let result = relay::pump_client(&mut rbuf, &mut pump, MAX_MESSAGE);
            assert!(rbuf.len() <= before, "the read buffer grew");
            assert_frames(&out, "to the server");
            assert_frames(&client_out, "to the client (synthetic)");
            backend.answer(&out, &mut server.buf);
            let mut to_client = BytesMut::new();
            let scanned =
                relay::scan_server(server, &mut to_client, &mut client_params, &mut statements);
            if scanned.is_ok() {
                assert_frames(&to_client, "to the client");
            }
            match result {
                Ok(false) if rbuf.len() < before && scanned.is_ok() => {}
                _ => break,
            }
        }
    });
    drop(held);
}

thread_local! {
    static ROUTER: Router = Router::new(&[]);
}

/// A stand-in PostgreSQL backend: answers the messages pgmux sends as PostgreSQL
/// would, from the protocol alone (prepared statements by name, skip to Sync after an
/// error, COPY FROM STDIN).
#[derive(Default)]
struct Backend {
    statements: HashSet<Vec<u8>>,
    skipping: bool,
    copy_in: bool,
    fail_parse: bool,
}

impl Backend {
    fn answer(&mut self, mut sent: &[u8], reply: &mut BytesMut) {
        while let Ok(Some((tag, len))) = complete_frame_len(sent, usize::MAX >> 1) {
            let body = &sent[5..len];
            sent = &sent[len..];
            self.one(tag, body, reply);
        }
    }

    fn error(&mut self, reply: &mut BytesMut, code: &str, extended: bool) {
        msg::error_response(reply, Severity::Error, code, "stand-in backend error");
        if extended {
            self.skipping = true;
        }
    }

    fn one(&mut self, tag: u8, body: &[u8], reply: &mut BytesMut) {
        let cstr = |b: &[u8]| msg::cstr(b).map_or(b.to_vec(), |(s, _)| s.to_vec());
        if self.copy_in {
            match tag {
                b'd' | b'S' | b'H' => {}
                b'c' => {
                    self.copy_in = false;
                    msg::command_complete(reply, "COPY 0");
                    msg::ready_for_query(reply, b'I');
                }
                _ => {
                    self.copy_in = false;
                    self.error(reply, "57014", false);
                    msg::ready_for_query(reply, b'I');
                }
            }
            return;
        }
        if tag == b'S' {
            self.skipping = false;
            msg::ready_for_query(reply, b'I');
            return;
        }
        if self.skipping {
            return;
        }
        match tag {
            b'Q' => {
                let sql = String::from_utf8_lossy(&cstr(body)).to_ascii_lowercase();
                let words: Vec<&str> = sql
                    .split(|c: char| c.is_whitespace() || c == ';')
                    .filter(|w| !w.is_empty())
                    .collect();
                match words.as_slice() {
                    [] => msg::empty_query_response(reply),
                    ["discard", "all"] => {
                        self.statements.clear();
                        msg::command_complete(reply, "DISCARD ALL");
                    }
                    ["deallocate", name] if name.starts_with("pgmux_") => {
                        if self.statements.remove(name.as_bytes()) {
                            msg::command_complete(reply, "DEALLOCATE");
                        } else {
                            self.error(reply, "26000", false);
                        }
                    }
                    w if w.contains(&"stdin") => {
                        // CopyInResponse, text, no columns.
                        reply.put_slice(&[b'G', 0, 0, 0, 7, 0, 0, 0]);
                        self.copy_in = true;
                        return;
                    }
                    w if w.contains(&"error") => self.error(reply, "42601", false),
                    ["set", ..] => {
                        msg::parameter_status(reply, "application_name", "fuzz");
                        msg::command_complete(reply, "SET");
                    }
                    _ => msg::command_complete(reply, "SELECT 1"),
                }
                msg::ready_for_query(reply, b'I');
            }
            b'F' => {
                reply.put_slice(&[b'V', 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff]);
                msg::ready_for_query(reply, b'I');
            }
            b'P' => {
                let name = cstr(body);
                if self.fail_parse || (!name.is_empty() && self.statements.contains(&name)) {
                    self.error(reply, "42P05", true);
                } else {
                    if !name.is_empty() {
                        self.statements.insert(name);
                    }
                    reply.put_slice(&[b'1', 0, 0, 0, 4]);
                }
            }
            b'B' => {
                let name = msg::cstr(body)
                    .map(|(_, rest)| cstr(rest))
                    .unwrap_or_default();
                if !name.is_empty() && !self.statements.contains(&name) {
                    self.error(reply, "26000", true);
                } else {
                    reply.put_slice(&[b'2', 0, 0, 0, 4]);
                }
            }
            b'D' => match body.split_first() {
                Some((b'S', rest)) if !self.statements.contains(&cstr(rest)) => {
                    self.error(reply, "26000", true)
                }
                Some((b'P', rest)) if rest.first() == Some(&1) => self.error(reply, "34000", true),
                _ => reply.put_slice(&[b'n', 0, 0, 0, 4]),
            },
            b'E' => msg::command_complete(reply, "SELECT 0"),
            b'C' => {
                if let Some((b'S', rest)) = body.split_first() {
                    self.statements.remove(&cstr(rest));
                }
                reply.put_slice(&[b'3', 0, 0, 0, 4]);
            }
            // Flush; CopyData/CopyDone/CopyFail outside COPY are ignored.
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------
// SCRAM

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The stand-in client's ClientKey: the verifier is built from keys, not a password, so
/// no 4096-round derivation runs per input.
const CLIENT_KEY: [u8; 32] = *b"pgmux fuzzing client key 32bytes";
const CHANNEL_DATA: &[u8] = b"tls-server-end-point hash of the certificate";

fn verifier() -> ScramVerifier {
    ScramVerifier {
        iterations: 4096,
        salt: b"pgmux-fuzz-salt!".to_vec(),
        stored_key: Sha256::digest(CLIENT_KEY).into(),
        server_key: hmac(b"server", b"key"),
    }
}

/// Replaces the placeholders the fuzzer cannot guess: `%N` the other side's nonce,
/// `%C` the expected `c=` value (a final `,p=%P` is filled in by the caller, which
/// needs the rest of the message to compute the proof).
fn fill(template: &str, nonce: &str, channel: &str) -> String {
    template.replace("%N", nonce).replace("%C", channel)
}

/// Both sides of SCRAM-SHA-256 as pgmux runs them: [`ScramServer`] on a client's
/// SASLInitialResponse and SASLResponse (the login of every client), and
/// [`ScramKeyClient`] on a server's messages (SCRAM passthrough), plus
/// [`ScramVerifier::parse`] on an `auth_file`/`auth_query` secret.
///
/// Input: byte 0 flags (bit 0 the connection has channel-binding data, bit 1 the
/// client chose SCRAM-SHA-256-PLUS, bit 7 fuzz the client side instead), then the two
/// messages separated by the first NUL (the first also read as a stored SCRAM or MD5
/// secret). The messages may hold placeholders the fuzzer
/// cannot guess (`%N` the other side's nonce, `%C` the expected `c=` value, `%P` the
/// correct proof or `%V` the correct server signature, `%S`/`%I` the verifier's salt
/// and iterations), so the success paths are reachable too.
///
/// Asserts: the server accepts a final message only with the right proof (then it
/// reveals exactly the client's key and signs with the ServerKey), and accepts every
/// well-formed exchange that fills in the right values; the client accepts only the
/// right server signature.
pub fn scram_exchange(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (first, last) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // The first message read as a stored secret (auth_file, auth_query).
    if let Ok(s) = std::str::from_utf8(first) {
        if let Some(v) = ScramVerifier::parse(s) {
            assert_eq!(v.stored_key.len(), 32);
        }
        if auth::is_md5_hash(s) {
            assert_eq!(auth::md5_response_from_hash(s, [1, 2, 3, 4]).len(), 35);
        }
    }
    if flags & 0x80 != 0 {
        scram_client(flags, first, last);
    } else {
        scram_server(flags, first, last);
    }
}

fn scram_server(flags: u8, client_first: &[u8], client_final: &[u8]) {
    let verifier = verifier();
    let binding = (flags & 1 != 0).then_some(CHANNEL_DATA);
    let plus = flags & 2 != 0;
    let Ok((server, server_first)) = ScramServer::start(&verifier, client_first, binding, plus)
    else {
        return;
    };
    // What the server must have understood, recomputed from the client's side.
    let text = std::str::from_utf8(client_first).expect("start accepted it");
    let mut parts = text.splitn(3, ',');
    let (flag, authzid, bare) = (
        parts.next().expect("gs2 flag"),
        parts.next().expect("authzid"),
        parts.next().expect("bare"),
    );
    let nonce = server_first
        .strip_prefix("r=")
        .and_then(|s| s.split(',').next())
        .expect("server-first starts with the nonce");
    assert!(server_first.ends_with(",i=4096"));
    let mut channel = format!("{flag},{authzid},").into_bytes();
    if flag.starts_with("p=") {
        channel.extend_from_slice(CHANNEL_DATA);
    }
    let Ok(template) = std::str::from_utf8(client_final) else {
        let _ = server.finish(client_final);
        return;
    };
    let mut last = fill(template, nonce, &B64.encode(&channel));
    let mut honest = false;
    if let Some(without_proof) = last.strip_suffix(",p=%P") {
        let without_proof = without_proof.to_owned();
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = CLIENT_KEY
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        last = format!("{without_proof},p={}", B64.encode(proof));
        // Right nonce, right channel binding, right proof: must be accepted.
        honest = without_proof == format!("c={},r={nonce}", B64.encode(&channel));
    }
    match server.finish(last.as_bytes()) {
        Ok((server_final, client_key)) => {
            assert_eq!(client_key, CLIENT_KEY, "accepted a proof of another key");
            let (without_proof, _) = last.rsplit_once(",p=").expect("accepted: has a proof");
            let auth_message = format!("{bare},{server_first},{without_proof}");
            let want = hmac(&verifier.server_key, auth_message.as_bytes());
            assert_eq!(server_final, format!("v={}", B64.encode(want)));
        }
        Err(e) => assert!(
            !honest,
            "refused an honest client-final {last:?} after {text:?}: {e}"
        ),
    }
}

fn scram_client(flags: u8, server_first: &[u8], server_final: &[u8]) {
    let keys = ScramKeys {
        verifier: verifier(),
        client_key: CLIENT_KEY,
    };
    let binding = (flags & 1 != 0).then_some(CHANNEL_DATA);
    let (mut client, client_first) = ScramKeyClient::start(&keys, binding);
    let bare = client_first
        .splitn(3, ',')
        .nth(2)
        .expect("client-first has a gs2 header");
    let nonce = bare.rsplit_once("r=").expect("client nonce").1;
    let salt = B64.encode(&keys.verifier.salt);
    let Ok(template) = std::str::from_utf8(server_first) else {
        assert!(client.update(server_first).is_err());
        return;
    };
    let first = fill(template, nonce, "")
        .replace("%S", &salt)
        .replace("%I", "4096");
    let Ok(client_final) = client.update(first.as_bytes()) else {
        return;
    };
    let (without_proof, _) = client_final.rsplit_once(",p=").expect("proof");
    let auth_message = format!("{bare},{first},{without_proof}");
    let signature = B64.encode(hmac(&keys.verifier.server_key, auth_message.as_bytes()));
    let last = String::from_utf8_lossy(server_final).replace("%V", &signature);
    let honest = last == format!("v={signature}");
    match client.finish(last.as_bytes()) {
        Ok(()) => {
            let sig = B64
                .decode(last.strip_prefix("v=").expect("accepted: v="))
                .expect("accepted: base64");
            assert_eq!(B64.encode(sig), signature, "accepted a wrong signature");
        }
        Err(ScramError::BadProof | ScramError::Malformed(_) | ScramError::ChannelBinding) => {
            assert!(!honest, "refused the right server signature");
        }
    }
}
