//! The PgBouncer-compatible SQL console.
//!
//! Operators already have muscle memory, scripts and dashboards built around PgBouncer's
//! admin database (`psql -d pgbouncer -c 'SHOW POOLS'`), and `pgbouncer_exporter`
//! scrapes it. So the result sets here follow PgBouncer 1.18 exactly — column names,
//! order and types — even where a column means nothing to pgmux (it is then 0, `''` or
//! NULL, never dropped): tools look columns up by name and position and refuse result
//! sets they do not expect.
//!
//! pgmux keeps separate primary and replica pools for one (database, user); PgBouncer
//! has one. `SHOW POOLS` sums them into one row per (database, user), because two rows
//! with the same `database`/`user` labels are a duplicate series to Prometheus and
//! break the exporter's whole scrape; the per-role split is in the HTTP API instead.
//!
//! Parsing is deliberately small (a handful of keywords, identifiers, one value) and
//! total: any input, however broken, ends in an [`Reply::Error`], never a panic, and a
//! lexical error (unterminated quote) rejects the whole query string before anything
//! runs, as PostgreSQL does.
//!
//! Only the command logic lives here; the proxy's session speaks the wire protocol
//! around [`execute`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::{Control, ControlError};

/// What the console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `admin_users`: every command.
    Admin,
    /// `stats_users`: the read-only `SHOW` commands.
    Stats,
}

/// The type of a result column, as announced in RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    Text,
    Int4,
    Numeric,
}

impl ColType {
    /// The type's OID.
    pub fn oid(self) -> u32 {
        match self {
            ColType::Text => 25,
            ColType::Int4 => 23,
            ColType::Numeric => 1700,
        }
    }

    /// The type's size in RowDescription (-1: variable).
    // A size on the wire, not a collection length: `is_empty` would mean nothing.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> i16 {
        match self {
            ColType::Text | ColType::Numeric => -1,
            ColType::Int4 => 4,
        }
    }
}

/// One column of a result set.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColType,
}

/// One answer to send to the console client.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A result set: RowDescription, DataRows (text format, None = NULL), CommandComplete(tag).
    Table {
        columns: Vec<Column>,
        rows: Vec<Vec<Option<String>>>,
        tag: String,
    },
    /// CommandComplete only (e.g. "PAUSE", "SET", "RELOAD").
    Done(String),
    /// NoticeResponse (severity NOTICE) with message and optional detail, then continue.
    Notice {
        message: String,
        detail: Option<String>,
    },
    /// ErrorResponse (severity ERROR) with SQLSTATE code; processing of the rest of the query string stops.
    Error { code: &'static str, message: String },
    /// EmptyQueryResponse (empty query string).
    Empty,
}

/// How long `PAUSE` waits for the running transactions to finish.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLSTATE syntax_error.
const SYNTAX_ERROR: &str = "42601";
/// SQLSTATE insufficient_privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Longest piece of the user's input quoted back in an error message.
const MAX_ECHO_CHARS: usize = 200;

const HELP: &str = "\
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
\tSHOW LISTS|STATS|STATS_TOTALS
\tSET key = arg
\tRELOAD
\tPAUSE [<db>]
\tRESUME [<db>]
\tRECONNECT [<db>]
\tKILL <db>";

/// Runs every ';'-separated command of one Query message in order (stop after the first Error).
pub async fn execute(control: &dyn Control, access: Access, sql: &str) -> Vec<Reply> {
    let statements = match lex(sql) {
        Ok(statements) => statements,
        Err(error) => return vec![error],
    };
    if statements.is_empty() {
        return vec![Reply::Empty];
    }
    let mut replies = Vec::new();
    for statement in &statements {
        let answer = run(control, access, statement).await;
        let failed = answer.iter().any(|r| matches!(r, Reply::Error { .. }));
        replies.extend(answer);
        if failed {
            break;
        }
    }
    replies
}

// ---------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A bare word: keyword, name, number (case kept; keywords compare case-insensitively).
    Word(String),
    /// A double-quoted identifier, unescaped.
    Ident(String),
    /// A single-quoted string, unescaped.
    Str(String),
    /// `=`.
    Eq,
}

#[derive(Debug)]
struct Statement<'a> {
    /// The statement's text, for error messages.
    text: &'a str,
    tokens: Vec<Token>,
}

fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b';' | b'=' | b'\'' | b'"')
}

/// Splits the query string into statements of tokens. Every delimiter is ASCII, so every
/// slice boundary below is a char boundary.
fn lex(sql: &str) -> Result<Vec<Statement<'_>>, Reply> {
    let bytes = sql.as_bytes();
    let mut statements = Vec::new();
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => {
                if !tokens.is_empty() {
                    statements.push(Statement {
                        text: sql[start..i].trim(),
                        tokens: std::mem::take(&mut tokens),
                    });
                }
                i += 1;
                start = i;
            }
            b if b.is_ascii_whitespace() => i += 1,
            b'=' => {
                tokens.push(Token::Eq);
                i += 1;
            }
            quote @ (b'\'' | b'"') => {
                let (value, next) = quoted(sql, i, quote)?;
                tokens.push(if quote == b'"' {
                    Token::Ident(value)
                } else {
                    Token::Str(value)
                });
                i = next;
            }
            _ => {
                let word_start = i;
                while i < bytes.len() && !is_delimiter(bytes[i]) {
                    i += 1;
                }
                tokens.push(Token::Word(sql[word_start..i].to_string()));
            }
        }
    }
    if !tokens.is_empty() {
        statements.push(Statement {
            text: sql[start..].trim(),
            tokens,
        });
    }
    Ok(statements)
}

/// Reads the quoted token opening at `open` (a doubled quote stands for itself).
/// Returns its value and the index after the closing quote.
fn quoted(sql: &str, open: usize, quote: u8) -> Result<(String, usize), Reply> {
    let bytes = sql.as_bytes();
    let mut value = String::new();
    let mut piece = open + 1;
    let mut i = open + 1;
    loop {
        if i >= bytes.len() {
            let what = if quote == b'"' {
                "unterminated quoted identifier"
            } else {
                "unterminated quoted string"
            };
            return Err(error(SYNTAX_ERROR, what));
        }
        if bytes[i] == quote {
            value.push_str(&sql[piece..i]);
            if bytes.get(i + 1) == Some(&quote) {
                value.push(char::from(quote));
                i += 2;
                piece = i;
                continue;
            }
            if quote == b'"' && value.is_empty() {
                return Err(error(SYNTAX_ERROR, "zero-length delimited identifier"));
            }
            return Ok((value, i + 1));
        }
        i += 1;
    }
}

// ---------------------------------------------------------------------------------
// Commands

/// The commands that change something, in their canonical spelling (also the tag).
const ADMIN_COMMANDS: [&str; 6] = ["PAUSE", "RESUME", "RELOAD", "RECONNECT", "KILL", "SET"];

async fn run(control: &dyn Control, access: Access, statement: &Statement<'_>) -> Vec<Reply> {
    let Some(Token::Word(first)) = statement.tokens.first() else {
        return vec![invalid_command(statement)];
    };
    let args = &statement.tokens[1..];
    if first.eq_ignore_ascii_case("SHOW") {
        return show(control, statement, args);
    }
    let Some(command) = ADMIN_COMMANDS
        .iter()
        .copied()
        .find(|c| first.eq_ignore_ascii_case(c))
    else {
        return vec![invalid_command(statement)];
    };
    if access != Access::Admin {
        return vec![error(
            INSUFFICIENT_PRIVILEGE,
            format!("admin access needed for {command}"),
        )];
    }
    let outcome = match command {
        "PAUSE" => match optional_name(args) {
            Some(db) => control.pause(db, PAUSE_TIMEOUT).await,
            None => return vec![invalid_command(statement)],
        },
        "RESUME" => match optional_name(args) {
            Some(db) => control.resume(db),
            None => return vec![invalid_command(statement)],
        },
        "RECONNECT" => match optional_name(args) {
            Some(db) => control.reconnect(db),
            None => return vec![invalid_command(statement)],
        },
        "RELOAD" => {
            if !args.is_empty() {
                return vec![invalid_command(statement)];
            }
            control.reload()
        }
        "KILL" => match optional_name(args) {
            Some(Some(db)) => control.kill(db),
            Some(None) => return vec![error(SYNTAX_ERROR, "KILL needs a database name")],
            None => return vec![invalid_command(statement)],
        },
        _ => match parse_set(args) {
            Some((key, value)) => control.set_config(&[(key, value)]),
            None => {
                return vec![error(
                    SYNTAX_ERROR,
                    format!(
                        "invalid command '{}', use SET key = value (value a number, a word or a 'string')",
                        echo(statement.text)
                    ),
                )]
            }
        },
    };
    match outcome {
        Ok(()) => vec![Reply::Done(command.to_string())],
        Err(e) => vec![control_error(e)],
    }
}

/// `[name]`: `Some(None)` without one, `Some(Some(name))` with one, `None` for anything
/// else.
fn optional_name(args: &[Token]) -> Option<Option<&str>> {
    match args {
        [] => Some(None),
        [Token::Word(name) | Token::Ident(name)] => Some(Some(name)),
        _ => None,
    }
}

/// `key = value` or `key TO value`, with the key in pgmux's spelling.
fn parse_set(args: &[Token]) -> Option<(String, String)> {
    let [key, op, value] = args else {
        return None;
    };
    let key = match key {
        Token::Word(word) => word.to_ascii_lowercase(),
        Token::Ident(ident) => ident.clone(),
        _ => return None,
    };
    match op {
        Token::Eq => {}
        Token::Word(word) if word.eq_ignore_ascii_case("TO") => {}
        _ => return None,
    }
    let value = match value {
        Token::Word(word) | Token::Str(word) => word.clone(),
        _ => return None,
    };
    Some((config_key(&key).to_string(), value))
}

/// PgBouncer's setting names in pgmux's configuration spelling. The timeouts keep their
/// names: PgBouncer gives them in plain seconds, which pgmux's configuration accepts.
fn config_key(pgbouncer_key: &str) -> &str {
    match pgbouncer_key {
        "default_pool_size" => "pool_size",
        other => other,
    }
}

fn error(code: &'static str, message: impl Into<String>) -> Reply {
    Reply::Error {
        code,
        message: message.into(),
    }
}

fn control_error(e: ControlError) -> Reply {
    match e {
        ControlError::Invalid { .. } => error("22023", e.to_string()),
        ControlError::NotFound(message) => error("3D000", message),
        ControlError::Failed(message) => error("55000", message),
    }
}

/// The user's input, shortened to quote it back.
fn echo(text: &str) -> String {
    let mut chars = text.chars();
    let mut shown: String = chars.by_ref().take(MAX_ECHO_CHARS).collect();
    if chars.next().is_some() {
        shown.push('…');
    }
    shown
}

fn invalid_command(statement: &Statement<'_>) -> Reply {
    error(
        SYNTAX_ERROR,
        format!("invalid command '{}', use SHOW HELP;", echo(statement.text)),
    )
}

// ---------------------------------------------------------------------------------
// SHOW

use ColType::{Int4, Numeric, Text};

type Columns = &'static [(&'static str, ColType)];
type Row = Vec<Option<String>>;

const POOLS_COLUMNS: Columns = &[
    ("database", Text),
    ("user", Text),
    ("cl_active", Int4),
    ("cl_waiting", Int4),
    ("cl_active_cancel_req", Int4),
    ("cl_waiting_cancel_req", Int4),
    ("sv_active", Int4),
    ("sv_active_cancel", Int4),
    ("sv_being_canceled", Int4),
    ("sv_idle", Int4),
    ("sv_used", Int4),
    ("sv_tested", Int4),
    ("sv_login", Int4),
    ("maxwait", Int4),
    ("maxwait_us", Int4),
    ("pool_mode", Text),
];

const STATS_COLUMNS: Columns = &[
    ("database", Text),
    ("total_xact_count", Numeric),
    ("total_query_count", Numeric),
    ("total_received", Numeric),
    ("total_sent", Numeric),
    ("total_xact_time", Numeric),
    ("total_query_time", Numeric),
    ("total_wait_time", Numeric),
    ("avg_xact_count", Numeric),
    ("avg_query_count", Numeric),
    ("avg_recv", Numeric),
    ("avg_sent", Numeric),
    ("avg_xact_time", Numeric),
    ("avg_query_time", Numeric),
    ("avg_wait_time", Numeric),
];

/// What pgbouncer_exporter (since it stopped reading the averages) queries.
const STATS_TOTALS_COLUMNS: Columns = &[
    ("database", Text),
    ("xact_count", Numeric),
    ("query_count", Numeric),
    ("bytes_received", Numeric),
    ("bytes_sent", Numeric),
    ("xact_time", Numeric),
    ("query_time", Numeric),
    ("wait_time", Numeric),
];

const SOCKET_COLUMNS: Columns = &[
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
];

const DATABASES_COLUMNS: Columns = &[
    ("name", Text),
    ("host", Text),
    ("port", Int4),
    ("database", Text),
    ("force_user", Text),
    ("pool_size", Int4),
    ("min_pool_size", Int4),
    ("reserve_pool", Int4),
    ("pool_mode", Text),
    ("max_connections", Int4),
    ("current_connections", Int4),
    ("paused", Int4),
    ("disabled", Int4),
];

const CONFIG_COLUMNS: Columns = &[
    ("key", Text),
    ("value", Text),
    ("default", Text),
    ("changeable", Text),
];

const LISTS_COLUMNS: Columns = &[("list", Text), ("items", Int4)];

const USERS_COLUMNS: Columns = &[("name", Text), ("pool_mode", Text)];

const VERSION_COLUMNS: Columns = &[("version", Text)];

fn show(control: &dyn Control, statement: &Statement<'_>, args: &[Token]) -> Vec<Reply> {
    let [Token::Word(what)] = args else {
        return vec![invalid_command(statement)];
    };
    let what = what.to_ascii_uppercase();
    let (columns, rows) = match what.as_str() {
        "POOLS" => (POOLS_COLUMNS, show_pools(control)),
        "STATS" => (STATS_COLUMNS, show_stats(control)),
        "STATS_TOTALS" => (STATS_TOTALS_COLUMNS, show_stats_totals(control)),
        "CLIENTS" => (SOCKET_COLUMNS, show_clients(control)),
        "SERVERS" => (SOCKET_COLUMNS, show_servers(control)),
        "DATABASES" => (DATABASES_COLUMNS, show_databases(control)),
        "CONFIG" => (CONFIG_COLUMNS, show_config(control)),
        "LISTS" => (LISTS_COLUMNS, show_lists(control)),
        "USERS" => (USERS_COLUMNS, show_users(control)),
        "VERSION" => (VERSION_COLUMNS, vec![vec![text(control.version())]]),
        "HELP" => {
            return vec![
                Reply::Notice {
                    message: "Console usage".to_string(),
                    detail: Some(HELP.to_string()),
                },
                Reply::Done("SHOW".to_string()),
            ]
        }
        _ => return vec![invalid_command(statement)],
    };
    vec![Reply::Table {
        columns: columns
            .iter()
            .map(|&(name, ty)| Column { name, ty })
            .collect(),
        rows,
        tag: "SHOW".to_string(),
    }]
}

fn text(value: impl Into<String>) -> Option<String> {
    Some(value.into())
}

/// An int4 value; larger values are clamped so clients can still parse them.
fn int4<T: TryInto<i32>>(value: T) -> Option<String> {
    Some(value.try_into().unwrap_or(i32::MAX).to_string())
}

fn numeric(value: u64) -> Option<String> {
    Some(value.to_string())
}

/// One `SHOW POOLS` row: the sum of a (database, user)'s primary and replica pools.
#[derive(Default)]
struct PoolRow {
    cl_active: usize,
    cl_waiting: usize,
    sv_active: usize,
    sv_idle: usize,
    sv_login: usize,
    max_wait_us: u64,
    pool_mode: &'static str,
}

fn pool_rows(control: &dyn Control) -> BTreeMap<(String, String), PoolRow> {
    let mut rows: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    for pool in control.pools() {
        let row = rows.entry((pool.database, pool.user)).or_default();
        row.cl_active = row.cl_active.saturating_add(pool.clients.active);
        row.cl_waiting = row.cl_waiting.saturating_add(pool.clients.waiting);
        row.sv_active = row.sv_active.saturating_add(pool.servers.active);
        row.sv_idle = row.sv_idle.saturating_add(pool.servers.idle);
        row.sv_login = row.sv_login.saturating_add(pool.servers.connecting);
        row.max_wait_us = row.max_wait_us.max(pool.max_wait_us);
        if row.pool_mode.is_empty() {
            row.pool_mode = pool.pool_mode;
        }
    }
    rows
}

fn show_pools(control: &dyn Control) -> Vec<Row> {
    pool_rows(control)
        .into_iter()
        .map(|((database, user), p)| {
            vec![
                text(database),
                text(user),
                int4(p.cl_active),
                int4(p.cl_waiting),
                int4(0),
                int4(0),
                int4(p.sv_active),
                int4(0),
                int4(0),
                int4(p.sv_idle),
                int4(0),
                int4(0),
                int4(p.sv_login),
                int4(p.max_wait_us / 1_000_000),
                int4(p.max_wait_us % 1_000_000),
                text(p.pool_mode),
            ]
        })
        .collect()
}

/// One database's totals, over its users and roles.
#[derive(Default)]
struct DatabaseTotals {
    xact_count: u64,
    query_count: u64,
    received: u64,
    sent: u64,
    xact_time: u64,
    query_time: u64,
    wait_time: u64,
}

fn database_totals(control: &dyn Control) -> BTreeMap<String, DatabaseTotals> {
    let mut sums: BTreeMap<String, DatabaseTotals> = BTreeMap::new();
    for pool in control.pools() {
        let t = &pool.totals;
        let s = sums.entry(pool.database).or_default();
        s.xact_count = s.xact_count.saturating_add(t.transactions);
        s.query_count = s.query_count.saturating_add(t.queries);
        s.received = s.received.saturating_add(t.bytes_received);
        s.sent = s.sent.saturating_add(t.bytes_sent);
        s.xact_time = s.xact_time.saturating_add(t.transaction_time_us);
        s.query_time = s.query_time.saturating_add(t.query_time_us);
        s.wait_time = s.wait_time.saturating_add(t.wait_time_us);
    }
    sums
}

/// PgBouncer's averages are over its last `stats_period` (60 s by default); pgmux keeps
/// no periods, so they are over the process uptime:
/// * avg_xact_count, avg_query_count, avg_recv, avg_sent: the total per second of
///   uptime (integer division);
/// * avg_xact_time: total_xact_time / total_xact_count, avg_query_time:
///   total_query_time / total_query_count, avg_wait_time: total_wait_time /
///   total_xact_count (µs, as PgBouncer);
///
/// and 0 wherever the divisor is 0.
fn show_stats(control: &dyn Control) -> Vec<Row> {
    let uptime_s = control.totals().uptime_ms / 1000;
    let per = |total: u64, by: u64| total.checked_div(by).unwrap_or(0);
    database_totals(control)
        .into_iter()
        .map(|(database, s)| {
            vec![
                text(database),
                numeric(s.xact_count),
                numeric(s.query_count),
                numeric(s.received),
                numeric(s.sent),
                numeric(s.xact_time),
                numeric(s.query_time),
                numeric(s.wait_time),
                numeric(per(s.xact_count, uptime_s)),
                numeric(per(s.query_count, uptime_s)),
                numeric(per(s.received, uptime_s)),
                numeric(per(s.sent, uptime_s)),
                numeric(per(s.xact_time, s.xact_count)),
                numeric(per(s.query_time, s.query_count)),
                numeric(per(s.wait_time, s.xact_count)),
            ]
        })
        .collect()
}

fn show_stats_totals(control: &dyn Control) -> Vec<Row> {
    database_totals(control)
        .into_iter()
        .map(|(database, s)| {
            vec![
                text(database),
                numeric(s.xact_count),
                numeric(s.query_count),
                numeric(s.received),
                numeric(s.sent),
                numeric(s.xact_time),
                numeric(s.query_time),
                numeric(s.wait_time),
            ]
        })
        .collect()
}

/// PgBouncer shows the addresses of its client and server structs; pgmux shows ids, with
/// the kind in the high bits so a client's `link` matches its server's `ptr`.
fn client_ptr(id: u64) -> String {
    format!("0x{:x}", (1u64 << 40) | id)
}

fn server_ptr(id: u64) -> String {
    format!("0x{:x}", (2u64 << 40) | id)
}

fn tls(on: bool) -> Option<String> {
    text(if on { "TLS" } else { "" })
}

/// `ip:port`, `[ipv6]:port` or `dir:port` into the address (brackets dropped, as
/// PgBouncer shows it) and the port (0 when there is none).
fn split_addr(addr: &str) -> (&str, u16) {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((host, port)) = rest.rsplit_once("]:") {
            if let Ok(port) = port.parse() {
                return (host, port);
            }
        }
        return (rest.strip_suffix(']').unwrap_or(addr), 0);
    }
    match addr.rsplit_once(':') {
        // A bare IPv6 address has no port.
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, port),
            Err(_) => (addr, 0),
        },
        _ => (addr, 0),
    }
}

fn show_clients(control: &dyn Control) -> Vec<Row> {
    let mut clients = control.clients();
    clients.sort_by_key(|c| c.id);
    clients
        .into_iter()
        .map(|c| {
            let state = match c.state {
                "active" | "idle" => "active",
                other => other,
            };
            let (addr, port) = split_addr(&c.addr);
            let (local_addr, local_port) = split_addr(&c.local_addr);
            // pgmux does not track when a client last sent a request.
            let time = format_time(c.connect_time);
            vec![
                text("C"),
                text(c.user.as_str()),
                text(c.database.as_str()),
                text(state),
                text(addr),
                int4(port),
                text(local_addr),
                int4(local_port),
                text(time.as_str()),
                text(time.as_str()),
                int4(c.wait_us / 1_000_000),
                int4(c.wait_us % 1_000_000),
                int4(0),
                text(client_ptr(c.id)),
                text(c.server_id.map(server_ptr).unwrap_or_default()),
                int4(c.cancel_pid),
                tls(c.tls),
                text(c.application_name.as_str()),
            ]
        })
        .collect()
}

fn show_servers(control: &dyn Control) -> Vec<Row> {
    let mut servers = control.servers();
    servers.sort_by_key(|s| s.id);
    servers
        .into_iter()
        .map(|s| {
            let state = match s.state {
                "connecting" => "login",
                other => other,
            };
            let (addr, port) = split_addr(&s.addr);
            let time = format_time(s.connect_time);
            vec![
                text("S"),
                text(s.user.as_str()),
                text(s.database.as_str()),
                text(state),
                text(addr),
                int4(port),
                text(""),
                int4(0),
                text(time.as_str()),
                text(time.as_str()),
                int4(0),
                int4(0),
                int4(0),
                text(server_ptr(s.id)),
                text(s.client_id.map(client_ptr).unwrap_or_default()),
                int4(s.backend_pid.unwrap_or(0)),
                tls(s.tls),
                text(s.application_name.as_str()),
            ]
        })
        .collect()
}

fn show_databases(control: &dyn Control) -> Vec<Row> {
    control
        .databases()
        .into_iter()
        .map(|d| {
            vec![
                text(d.name),
                text(d.host),
                int4(d.port),
                text(d.dbname),
                None,
                int4(d.pool_size),
                int4(d.min_pool_size),
                int4(0),
                text("transaction"),
                int4(d.max_connections),
                int4(d.current_connections),
                int4(i32::from(d.paused)),
                int4(0),
            ]
        })
        .collect()
}

fn show_config(control: &dyn Control) -> Vec<Row> {
    control
        .config()
        .into_iter()
        .map(|c| {
            vec![
                text(c.key),
                text(c.value),
                text(c.default),
                text(if c.changeable { "yes" } else { "no" }),
            ]
        })
        .collect()
}

fn show_lists(control: &dyn Control) -> Vec<Row> {
    let pools = pool_rows(control);
    let users: BTreeSet<&str> = pools.keys().map(|(_, user)| user.as_str()).collect();
    let clients = control.clients();
    let login_clients = clients.iter().filter(|c| c.state == "login").count();
    let lists: [(&str, usize); 12] = [
        ("databases", control.databases().len()),
        ("users", users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", clients.len() - login_clients),
        ("login_clients", login_clients),
        ("free_servers", 0),
        ("used_servers", control.servers().len()),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    lists
        .into_iter()
        .map(|(list, items)| vec![text(list), int4(items)])
        .collect()
}

/// PgBouncer shows a user's own pool_mode, NULL when it inherits the global one; pgmux
/// has no per-user modes.
fn show_users(control: &dyn Control) -> Vec<Row> {
    let users: BTreeSet<String> = control.pools().into_iter().map(|p| p.user).collect();
    users
        .into_iter()
        .map(|user| vec![text(user), None])
        .collect()
}

/// Unix seconds as PgBouncer prints times: `2026-11-28 07:07:53 UTC`.
fn format_time(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(i64::MAX / 2);
    let secs = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to the proleptic Gregorian (year, month, day) (Howard
/// Hinnant's `civil_from_days`). `days` is at most `u64::MAX / 86400`, far from
/// overflowing.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        AdminAuth, BoxFuture, ClientCounts, ClientInfo, ConfigItem, DatabaseInfo, PoolInfo,
        PoolLimits, PoolPatch, PoolTotals, Readiness, ReplicaInfo, Role, ServerCounts, ServerInfo,
        Totals,
    };

    #[derive(Default)]
    struct Fake {
        pools: Vec<PoolInfo>,
        clients: Vec<ClientInfo>,
        servers: Vec<ServerInfo>,
        databases: Vec<DatabaseInfo>,
        config: Vec<ConfigItem>,
        uptime_ms: u64,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Control for Fake {
        fn pools(&self) -> Vec<PoolInfo> {
            self.pools.clone()
        }
        fn clients(&self) -> Vec<ClientInfo> {
            self.clients.clone()
        }
        fn servers(&self) -> Vec<ServerInfo> {
            self.servers.clone()
        }
        fn databases(&self) -> Vec<DatabaseInfo> {
            self.databases.clone()
        }
        fn replicas(&self) -> Vec<ReplicaInfo> {
            Vec::new()
        }
        fn totals(&self) -> Totals {
            Totals {
                uptime_ms: self.uptime_ms,
                ..Totals::default()
            }
        }
        fn config(&self) -> Vec<ConfigItem> {
            self.config.clone()
        }
        fn set_pool_limits(
            &self,
            database: &str,
            user: &str,
            _patch: &PoolPatch,
        ) -> Result<(), ControlError> {
            self.record(format!("set_pool_limits {database} {user}"));
            Ok(())
        }
        fn set_config(&self, changes: &[(String, String)]) -> Result<(), ControlError> {
            for (key, value) in changes {
                self.record(format!("set {key}={value}"));
                if key == "bogus" {
                    return Err(ControlError::invalid("bogus", "unknown setting"));
                }
            }
            Ok(())
        }
        fn pause(
            &self,
            database: Option<&str>,
            timeout: Duration,
        ) -> BoxFuture<'_, Result<(), ControlError>> {
            self.record(format!("pause {database:?} {}s", timeout.as_secs()));
            let result = match database {
                Some("slow") => Err(ControlError::Failed("pause timed out".into())),
                _ => Ok(()),
            };
            Box::pin(async move { result })
        }
        fn resume(&self, database: Option<&str>) -> Result<(), ControlError> {
            self.record(format!("resume {database:?}"));
            Ok(())
        }
        fn reload(&self) -> Result<(), ControlError> {
            self.record("reload".into());
            Ok(())
        }
        fn reconnect(&self, database: Option<&str>) -> Result<(), ControlError> {
            self.record(format!("reconnect {database:?}"));
            Ok(())
        }
        fn kill(&self, database: &str) -> Result<(), ControlError> {
            self.record(format!("kill {database}"));
            if database == "nope" {
                return Err(ControlError::NotFound("no database nope".into()));
            }
            Ok(())
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
            "pgmux 0.1.0".into()
        }
        fn auth(&self) -> AdminAuth {
            AdminAuth::default()
        }
    }

    fn pool(database: &str, user: &str, role: Role) -> PoolInfo {
        PoolInfo {
            database: database.into(),
            user: user.into(),
            role,
            server: "db:5432".into(),
            pool_mode: "transaction",
            paused: false,
            limits: PoolLimits {
                pool_size: 10,
                min_pool_size: 0,
                max_client_conn: 100,
                query_wait_timeout_ms: 120_000,
                server_idle_timeout_ms: 600_000,
                max_prepared_statements: 100,
            },
            servers: ServerCounts::default(),
            clients: ClientCounts::default(),
            max_wait_us: 0,
            totals: PoolTotals::default(),
        }
    }

    fn client(id: u64, state: &'static str) -> ClientInfo {
        ClientInfo {
            id,
            addr: "10.0.0.5:51234".into(),
            local_addr: "10.0.0.1:6432".into(),
            user: "alice".into(),
            database: "app".into(),
            application_name: "psql".into(),
            state,
            connect_time: 1_795_849_673,
            age_ms: 0,
            wait_us: 0,
            server_id: None,
            server_pid: None,
            cancel_pid: 4242,
            tls: false,
        }
    }

    fn server(id: u64, state: &'static str) -> ServerInfo {
        ServerInfo {
            id,
            database: "app".into(),
            user: "alice".into(),
            role: Role::Primary,
            addr: "db.internal:5432".into(),
            state,
            connect_time: 951_868_799,
            age_ms: 0,
            idle_ms: 0,
            backend_pid: Some(777),
            client_id: None,
            prepared_statements: 0,
            application_name: "pgmux".into(),
            tls: true,
        }
    }

    fn database(name: &str) -> DatabaseInfo {
        DatabaseInfo {
            name: name.into(),
            host: "db.internal".into(),
            port: 5432,
            dbname: format!("{name}_prod"),
            replicas: Vec::new(),
            pool_size: 20,
            min_pool_size: 2,
            max_client_conn: 100,
            current_connections: 3,
            max_connections: 0,
            paused: true,
        }
    }

    async fn run_one(control: &Fake, access: Access, sql: &str) -> Reply {
        let mut replies = execute(control, access, sql).await;
        assert_eq!(replies.len(), 1, "{sql}: {replies:?}");
        replies.remove(0)
    }

    /// The (name, type) list of a table reply, and its rows.
    fn table(reply: Reply) -> (Vec<(&'static str, ColType)>, Vec<Row>) {
        match reply {
            Reply::Table { columns, rows, tag } => {
                assert_eq!(tag, "SHOW");
                (columns.into_iter().map(|c| (c.name, c.ty)).collect(), rows)
            }
            other => panic!("not a table: {other:?}"),
        }
    }

    fn strings(row: &[Option<String>]) -> Vec<&str> {
        row.iter()
            .map(|v| v.as_deref().unwrap_or("<NULL>"))
            .collect()
    }

    fn assert_error(reply: &Reply, want_code: &str, want_message: &str) {
        match reply {
            Reply::Error { code, message } => {
                assert_eq!(*code, want_code, "{message}");
                assert_eq!(message, want_message);
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn col_types() {
        assert_eq!((Text.oid(), Text.len()), (25, -1));
        assert_eq!((Int4.oid(), Int4.len()), (23, 4));
        assert_eq!((Numeric.oid(), Numeric.len()), (1700, -1));
    }

    #[tokio::test]
    async fn show_columns_are_pgbouncer_118s() {
        let fake = Fake::default();
        let cases: Vec<(&str, Vec<(&str, ColType)>)> = vec![
            (
                "SHOW POOLS",
                vec![
                    ("database", Text),
                    ("user", Text),
                    ("cl_active", Int4),
                    ("cl_waiting", Int4),
                    ("cl_active_cancel_req", Int4),
                    ("cl_waiting_cancel_req", Int4),
                    ("sv_active", Int4),
                    ("sv_active_cancel", Int4),
                    ("sv_being_canceled", Int4),
                    ("sv_idle", Int4),
                    ("sv_used", Int4),
                    ("sv_tested", Int4),
                    ("sv_login", Int4),
                    ("maxwait", Int4),
                    ("maxwait_us", Int4),
                    ("pool_mode", Text),
                ],
            ),
            (
                "SHOW STATS",
                vec![
                    ("database", Text),
                    ("total_xact_count", Numeric),
                    ("total_query_count", Numeric),
                    ("total_received", Numeric),
                    ("total_sent", Numeric),
                    ("total_xact_time", Numeric),
                    ("total_query_time", Numeric),
                    ("total_wait_time", Numeric),
                    ("avg_xact_count", Numeric),
                    ("avg_query_count", Numeric),
                    ("avg_recv", Numeric),
                    ("avg_sent", Numeric),
                    ("avg_xact_time", Numeric),
                    ("avg_query_time", Numeric),
                    ("avg_wait_time", Numeric),
                ],
            ),
            (
                "SHOW STATS_TOTALS",
                vec![
                    ("database", Text),
                    ("xact_count", Numeric),
                    ("query_count", Numeric),
                    ("bytes_received", Numeric),
                    ("bytes_sent", Numeric),
                    ("xact_time", Numeric),
                    ("query_time", Numeric),
                    ("wait_time", Numeric),
                ],
            ),
            (
                "SHOW DATABASES",
                vec![
                    ("name", Text),
                    ("host", Text),
                    ("port", Int4),
                    ("database", Text),
                    ("force_user", Text),
                    ("pool_size", Int4),
                    ("min_pool_size", Int4),
                    ("reserve_pool", Int4),
                    ("pool_mode", Text),
                    ("max_connections", Int4),
                    ("current_connections", Int4),
                    ("paused", Int4),
                    ("disabled", Int4),
                ],
            ),
            (
                "SHOW CONFIG",
                vec![
                    ("key", Text),
                    ("value", Text),
                    ("default", Text),
                    ("changeable", Text),
                ],
            ),
            ("SHOW LISTS", vec![("list", Text), ("items", Int4)]),
            ("SHOW USERS", vec![("name", Text), ("pool_mode", Text)]),
            ("SHOW VERSION", vec![("version", Text)]),
        ];
        let sockets = vec![
            ("type", Text),
            ("user", Text),
            ("database", Text),
            ("state", Text),
            ("addr", Text),
            ("port", Int4),
            ("local_addr", Text),
            ("local_port", Int4),
            ("connect_time", Text),
            ("request_time", Text),
            ("wait", Int4),
            ("wait_us", Int4),
            ("close_needed", Int4),
            ("ptr", Text),
            ("link", Text),
            ("remote_pid", Int4),
            ("tls", Text),
            ("application_name", Text),
        ];
        let cases = cases
            .into_iter()
            .chain([("SHOW CLIENTS", sockets.clone()), ("SHOW SERVERS", sockets)]);
        for (sql, want) in cases {
            let (columns, _) = table(run_one(&fake, Access::Stats, sql).await);
            assert_eq!(columns, want, "{sql}");
        }
    }

    #[tokio::test]
    async fn pools_sum_primary_and_replica() {
        let mut primary = pool("app", "alice", Role::Primary);
        primary.clients = ClientCounts {
            active: 3,
            waiting: 1,
        };
        primary.servers = ServerCounts {
            active: 2,
            idle: 4,
            connecting: 1,
            pinned: 0,
        };
        primary.max_wait_us = 1_250_000;
        let mut replica = pool("app", "alice", Role::Replica);
        replica.clients = ClientCounts {
            active: 5,
            waiting: 2,
        };
        replica.servers = ServerCounts {
            active: 1,
            idle: 1,
            connecting: 2,
            pinned: 0,
        };
        replica.max_wait_us = 3_000_007;
        let other = pool("app", "bob", Role::Primary);
        let fake = Fake {
            pools: vec![primary, other, replica],
            ..Fake::default()
        };
        let (_, rows) = table(run_one(&fake, Access::Admin, "show pools").await);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            strings(&rows[0]),
            [
                "app",
                "alice",
                "8",
                "3",
                "0",
                "0",
                "3",
                "0",
                "0",
                "5",
                "0",
                "0",
                "3",
                "3",
                "7",
                "transaction"
            ]
        );
        assert_eq!(&strings(&rows[1])[..3], ["app", "bob", "0"]);

        let (_, rows) = table(run_one(&fake, Access::Admin, "SHOW LISTS").await);
        let lists: Vec<Vec<&str>> = rows.iter().map(|r| strings(r)).collect();
        assert_eq!(lists[1], ["users", "2"]);
        assert_eq!(lists[2], ["pools", "2"]);
    }

    #[tokio::test]
    async fn clients_format() {
        let mut waiting = client(2, "waiting");
        waiting.wait_us = 2_000_300;
        waiting.addr = "[::1]:40000".into();
        waiting.tls = true;
        let mut active = client(1, "idle");
        active.server_id = Some(9);
        let fake = Fake {
            clients: vec![waiting, active, client(3, "login")],
            ..Fake::default()
        };
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW CLIENTS").await);
        assert_eq!(
            strings(&rows[0]),
            [
                "C",
                "alice",
                "app",
                "active",
                "10.0.0.5",
                "51234",
                "10.0.0.1",
                "6432",
                "2026-11-28 07:07:53 UTC",
                "2026-11-28 07:07:53 UTC",
                "0",
                "0",
                "0",
                "0x10000000001",
                "0x20000000009",
                "4242",
                "",
                "psql"
            ]
        );
        let second = strings(&rows[1]);
        assert_eq!(second[3], "waiting");
        assert_eq!((second[4], second[5]), ("::1", "40000"));
        assert_eq!((second[10], second[11]), ("2", "300"));
        assert_eq!((second[13], second[14]), ("0x10000000002", ""));
        assert_eq!(second[16], "TLS");
        assert_eq!(strings(&rows[2])[3], "login");

        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW LISTS").await);
        let lists: Vec<Vec<&str>> = rows.iter().map(|r| strings(r)).collect();
        assert_eq!(
            lists,
            [
                ["databases", "0"],
                ["users", "0"],
                ["pools", "0"],
                ["free_clients", "0"],
                ["used_clients", "2"],
                ["login_clients", "1"],
                ["free_servers", "0"],
                ["used_servers", "0"],
                ["dns_names", "0"],
                ["dns_zones", "0"],
                ["dns_queries", "0"],
                ["dns_pending", "0"],
            ]
        );
    }

    #[tokio::test]
    async fn servers_format() {
        let mut active = server(5, "active");
        active.client_id = Some(1);
        let mut connecting = server(4, "connecting");
        connecting.backend_pid = None;
        connecting.addr = "[2001:db8::1]:5433".into();
        connecting.tls = false;
        let fake = Fake {
            servers: vec![active, connecting, server(6, "idle")],
            ..Fake::default()
        };
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW SERVERS").await);
        assert_eq!(
            strings(&rows[0]),
            [
                "S",
                "alice",
                "app",
                "login",
                "2001:db8::1",
                "5433",
                "",
                "0",
                "2000-02-29 23:59:59 UTC",
                "2000-02-29 23:59:59 UTC",
                "0",
                "0",
                "0",
                "0x20000000004",
                "",
                "0",
                "",
                "pgmux"
            ]
        );
        let active = strings(&rows[1]);
        assert_eq!(&active[3..6], ["active", "db.internal", "5432"]);
        assert_eq!(
            &active[13..],
            ["0x20000000005", "0x10000000001", "777", "TLS", "pgmux"]
        );
        assert_eq!(strings(&rows[2])[3], "idle");
    }

    #[tokio::test]
    async fn stats_averages_over_uptime() {
        let mut primary = pool("app", "alice", Role::Primary);
        primary.totals = PoolTotals {
            transactions: 90,
            queries: 300,
            bytes_received: 10_000,
            bytes_sent: 50_000,
            wait_time_us: 900,
            transaction_time_us: 9_000,
            query_time_us: 6_000,
            ..PoolTotals::default()
        };
        let mut replica = pool("app", "bob", Role::Replica);
        replica.totals = PoolTotals {
            transactions: 10,
            queries: 100,
            ..PoolTotals::default()
        };
        let idle = pool("quiet", "alice", Role::Primary);
        let fake = Fake {
            pools: vec![primary, replica, idle],
            uptime_ms: 10_999,
            ..Fake::default()
        };
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW STATS").await);
        assert_eq!(
            strings(&rows[0]),
            [
                "app", "100", "400", "10000", "50000", "9000", "6000", "900", "10", "40", "1000",
                "5000", "90", "15", "9"
            ]
        );
        assert_eq!(
            strings(&rows[1]),
            ["quiet", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]
        );

        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW STATS_TOTALS").await);
        assert_eq!(
            strings(&rows[0]),
            ["app", "100", "400", "10000", "50000", "9000", "6000", "900"]
        );

        // Before the first second of uptime, no division by zero.
        let fake = Fake {
            uptime_ms: 500,
            ..fake
        };
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW STATS").await);
        assert_eq!(&strings(&rows[0])[8..12], ["0", "0", "0", "0"]);
    }

    #[tokio::test]
    async fn databases_config_users_version() {
        let fake = Fake {
            databases: vec![database("app")],
            config: vec![ConfigItem {
                key: "pool_size".into(),
                value: "20".into(),
                default: "10".into(),
                changeable: true,
            }],
            pools: vec![
                pool("app", "zed", Role::Primary),
                pool("x", "amy", Role::Replica),
            ],
            ..Fake::default()
        };
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW DATABASES").await);
        assert_eq!(
            strings(&rows[0]),
            [
                "app",
                "db.internal",
                "5432",
                "app_prod",
                "<NULL>",
                "20",
                "2",
                "0",
                "transaction",
                "0",
                "3",
                "1",
                "0"
            ]
        );
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW CONFIG").await);
        assert_eq!(strings(&rows[0]), ["pool_size", "20", "10", "yes"]);
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW USERS").await);
        assert_eq!(rows, [[text("amy"), None], [text("zed"), None]]);
        let (_, rows) = table(run_one(&fake, Access::Stats, "SHOW VERSION").await);
        assert_eq!(rows, [[text("pgmux 0.1.0")]]);
    }

    #[tokio::test]
    async fn show_help() {
        let fake = Fake::default();
        let replies = execute(&fake, Access::Stats, "SHOW HELP").await;
        assert_eq!(replies.len(), 2);
        match &replies[0] {
            Reply::Notice { message, detail } => {
                assert_eq!(message, "Console usage");
                assert!(detail.as_deref().unwrap().contains("PAUSE [<db>]"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(replies[1], Reply::Done("SHOW".into()));
    }

    #[tokio::test]
    async fn stats_user_may_only_show() {
        let fake = Fake::default();
        for (sql, command) in [
            ("PAUSE", "PAUSE"),
            ("pause app", "PAUSE"),
            ("SET pool_size = 5", "SET"),
            ("resume", "RESUME"),
            ("RELOAD", "RELOAD"),
            ("reconnect app", "RECONNECT"),
            ("KILL app", "KILL"),
        ] {
            let reply = run_one(&fake, Access::Stats, sql).await;
            assert_error(
                &reply,
                "42501",
                &format!("admin access needed for {command}"),
            );
        }
        assert!(fake.calls().is_empty());
        assert!(matches!(
            run_one(&fake, Access::Stats, "SHOW POOLS").await,
            Reply::Table { .. }
        ));
    }

    #[tokio::test]
    async fn admin_commands_call_control() {
        let fake = Fake::default();
        let replies = execute(
            &fake,
            Access::Admin,
            "PAUSE; pause \"my-db\"; RESUME app ;Reconnect; RECONNECT x; RELOAD; KILL app;",
        )
        .await;
        let tags = [
            "PAUSE",
            "PAUSE",
            "RESUME",
            "RECONNECT",
            "RECONNECT",
            "RELOAD",
            "KILL",
        ];
        let want: Vec<Reply> = tags.iter().map(|t| Reply::Done(t.to_string())).collect();
        assert_eq!(replies, want);
        assert_eq!(
            fake.calls(),
            [
                "pause None 30s",
                "pause Some(\"my-db\") 30s",
                "resume Some(\"app\")",
                "reconnect None",
                "reconnect Some(\"x\")",
                "reload",
                "kill app",
            ]
        );
    }

    #[tokio::test]
    async fn set_maps_keys_and_values() {
        let fake = Fake::default();
        for sql in [
            "SET default_pool_size = 40",
            "set DEFAULT_POOL_SIZE to '40'",
            "SET default_pool_size=40;",
            "SET \"default_pool_size\" TO 40",
            "SET query_wait_timeout = '2 min'",
            "SET server_idle_timeout = 600",
            "SET application_name_add_host = 'it''s'",
        ] {
            assert_eq!(
                run_one(&fake, Access::Admin, sql).await,
                Reply::Done("SET".into()),
                "{sql}"
            );
        }
        assert_eq!(
            fake.calls(),
            [
                "set pool_size=40",
                "set pool_size=40",
                "set pool_size=40",
                "set pool_size=40",
                "set query_wait_timeout=2 min",
                "set server_idle_timeout=600",
                "set application_name_add_host=it's",
            ]
        );
    }

    #[tokio::test]
    async fn control_errors_map_to_sqlstates() {
        let fake = Fake::default();
        let reply = run_one(&fake, Access::Admin, "SET bogus = 1").await;
        assert_error(&reply, "22023", "bogus: unknown setting");
        let reply = run_one(&fake, Access::Admin, "KILL nope").await;
        assert_error(&reply, "3D000", "no database nope");
        let reply = run_one(&fake, Access::Admin, "PAUSE slow").await;
        assert_error(&reply, "55000", "pause timed out");
    }

    #[tokio::test]
    async fn multiple_commands_stop_at_first_error() {
        let fake = Fake::default();
        let replies = execute(
            &fake,
            Access::Admin,
            "SHOW VERSION; RESUME; FOO; RELOAD; SHOW VERSION",
        )
        .await;
        assert_eq!(replies.len(), 3);
        assert!(matches!(replies[0], Reply::Table { .. }));
        assert_eq!(replies[1], Reply::Done("RESUME".into()));
        assert_error(
            &replies[2],
            "42601",
            "invalid command 'FOO', use SHOW HELP;",
        );
        assert_eq!(fake.calls(), ["resume None"]);
    }

    #[tokio::test]
    async fn semicolons_inside_quotes_do_not_split() {
        let fake = Fake::default();
        let replies = execute(&fake, Access::Admin, "SET x = 'a;b'; PAUSE \"d;b\"").await;
        assert_eq!(
            replies,
            [Reply::Done("SET".into()), Reply::Done("PAUSE".into())]
        );
        assert_eq!(fake.calls(), ["set x=a;b", "pause Some(\"d;b\") 30s"]);
    }

    #[tokio::test]
    async fn empty_queries() {
        let fake = Fake::default();
        for sql in ["", "   ", ";", " ;\n; "] {
            assert_eq!(execute(&fake, Access::Stats, sql).await, [Reply::Empty]);
        }
    }

    #[tokio::test]
    async fn bad_input_is_an_error_not_a_panic() {
        let fake = Fake::default();
        let huge = "x".repeat(1_000_000);
        let huge_quote = format!("SET a = '{huge}");
        let cases: Vec<(&str, &str)> = vec![
            ("FOO", "invalid command 'FOO', use SHOW HELP;"),
            ("select 1", "invalid command 'select 1', use SHOW HELP;"),
            ("SHOW", "invalid command 'SHOW', use SHOW HELP;"),
            ("SHOW FOO", "invalid command 'SHOW FOO', use SHOW HELP;"),
            (
                "SHOW POOLS extra",
                "invalid command 'SHOW POOLS extra', use SHOW HELP;",
            ),
            (
                "SHOW 'pools'",
                "invalid command 'SHOW 'pools'', use SHOW HELP;",
            ),
            ("PAUSE a b", "invalid command 'PAUSE a b', use SHOW HELP;"),
            ("RELOAD now", "invalid command 'RELOAD now', use SHOW HELP;"),
            ("KILL", "KILL needs a database name"),
            ("= 1", "invalid command '= 1', use SHOW HELP;"),
            (
                "\"SHOW\" POOLS",
                "invalid command '\"SHOW\" POOLS', use SHOW HELP;",
            ),
            ("ЅHOW POOLS", "invalid command 'ЅHOW POOLS', use SHOW HELP;"),
            ("SHOW PÖÖLS", "invalid command 'SHOW PÖÖLS', use SHOW HELP;"),
            ("SHOW POOLS 'oops", "unterminated quoted string"),
            ("PAUSE \"oops", "unterminated quoted identifier"),
            ("PAUSE \"\"", "zero-length delimited identifier"),
            (&huge_quote, "unterminated quoted string"),
        ];
        for (sql, message) in cases {
            let reply = run_one(&fake, Access::Admin, sql).await;
            assert_error(&reply, "42601", message);
        }
        for sql in [
            "SET",
            "SET a",
            "SET a =",
            "SET a b",
            "SET = 1",
            "SET a = \"b\"",
            "SET a = 1 2",
            "SET 'a' = 1",
            "SET a == 1",
        ] {
            match run_one(&fake, Access::Admin, sql).await {
                Reply::Error {
                    code: "42601",
                    message,
                } => {
                    assert!(message.starts_with("invalid command"), "{message}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        // A huge unknown command is quoted back shortened.
        match run_one(&fake, Access::Admin, &huge).await {
            Reply::Error { code, message } => {
                assert_eq!(code, "42601");
                assert!(message.len() < 300, "{}", message.len());
            }
            other => panic!("{other:?}"),
        }
        // A lexical error rejects the whole string before anything runs.
        let replies = execute(&fake, Access::Admin, "RELOAD; PAUSE 'x").await;
        assert_error(&replies[0], "42601", "unterminated quoted string");
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn fuzzish_inputs_never_panic() {
        let fake = Fake::default();
        let alphabet = [
            "SHOW", "SET", "PAUSE", " ", ";", "=", "'", "\"", "''", "\"\"", "é", "\u{0}", "TO",
            "POOLS", "\t", "x", "1", "→", "\r\n",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut sql = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                sql.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            seed = seed.wrapping_add(1);
            let replies = execute(&fake, Access::Admin, &sql).await;
            assert!(!replies.is_empty(), "{sql:?}");
        }
    }

    #[test]
    fn times_like_pgbouncer() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_868_799), "2000-02-29 23:59:59 UTC");
        assert_eq!(format_time(1_795_849_673), "2026-11-28 07:07:53 UTC");
        assert_eq!(format_time(4_107_542_400), "2100-03-01 00:00:00 UTC");
        assert_eq!(format_time(1_709_251_199), "2024-02-29 23:59:59 UTC");
        // Absurd but must not panic.
        assert!(format_time(u64::MAX).ends_with(" UTC"));
    }

    #[test]
    fn addresses_split() {
        assert_eq!(split_addr("10.0.0.5:51234"), ("10.0.0.5", 51234));
        assert_eq!(split_addr("[::1]:5432"), ("::1", 5432));
        assert_eq!(split_addr("[::1]"), ("::1", 0));
        assert_eq!(split_addr("::1"), ("::1", 0));
        assert_eq!(
            split_addr("/var/run/postgresql:5432"),
            ("/var/run/postgresql", 5432)
        );
        assert_eq!(split_addr("host"), ("host", 0));
        assert_eq!(split_addr("host:notaport"), ("host:notaport", 0));
        assert_eq!(split_addr("[::1]:99999"), ("[::1]:99999", 0));
        assert_eq!(split_addr(""), ("", 0));
    }
}
