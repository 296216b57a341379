//! Session state that cannot follow a client from one server connection to the next.
//!
//! In transaction mode a client's next transaction may run on another server. Settings
//! PostgreSQL reports (ParameterStatus) follow the client: see [`crate::params`]. Other
//! session state stays behind on the server it was made on, where the next client of that
//! server would find it: `SET` of a parameter pgmux does not track (work_mem,
//! search_path, role, …, also `set_config(…, false)`), `LISTEN`, session-level advisory
//! locks, `WITH HOLD` cursors, temporary tables, SQL-level `PREPARE`, `LOAD`.
//!
//! A plain `SET` of a parameter listed in `track_extra_parameters` (one statement,
//! outside a transaction; [`plain_set`]) is not session state: `relay` records it for the
//! client and it is re-applied like the reported parameters.
//!
//! [`detect`] finds such statements in a simple-query text or a Parse text. What the
//! session does with the answer is `session_state_action`: pin the server to the client,
//! warn, or reject (see `session` and `relay`).
//!
//! Detection reads tokens, not a parse tree: a small lexer that knows PostgreSQL's
//! comments, string literals (`'…'`, `E'…'`), quoted identifiers and dollar quoting
//! finds each top-level statement's command word and the function calls in it. It costs
//! one pass over the text, with no allocation, so it runs on every query. It errs toward
//! finding state (a pin is safe, a miss leaks): `SET x TO DEFAULT` counts, and a
//! `set_config` whose third argument is not the literal `true` counts. What it cannot
//! see: state changed inside a function or a `DO` block, or by a `CALL`.

/// A kind of session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `SET` (not `SET LOCAL`) of a parameter pgmux does not track; `SET ROLE`,
    /// `SET SESSION AUTHORIZATION`, `SET SESSION CHARACTERISTICS`.
    Set,
    /// `set_config(name, value, is_local)` with is_local not `true`, of a parameter pgmux
    /// does not track.
    SetConfig,
    /// `LISTEN channel`.
    Listen,
    /// `pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms (the
    /// transaction-level `_xact_` ones end with the transaction and are fine).
    AdvisoryLock,
    /// `DECLARE … CURSOR WITH HOLD`.
    HoldCursor,
    /// `CREATE TEMP TABLE` (or sequence, view) without `ON COMMIT DROP`, `SELECT … INTO
    /// TEMP`, anything created in `pg_temp`.
    TempTable,
    /// SQL-level `PREPARE name AS …` (protocol-level named statements are handled by
    /// pgmux and need nothing).
    Prepare,
    /// `LOAD 'library'`.
    Load,
}

impl Feature {
    pub const ALL: [Feature; 8] = [
        Feature::Set,
        Feature::SetConfig,
        Feature::Listen,
        Feature::AdvisoryLock,
        Feature::HoldCursor,
        Feature::TempTable,
        Feature::Prepare,
        Feature::Load,
    ];

    /// Stable name for logs, metric labels and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Set => "set",
            Feature::SetConfig => "set_config",
            Feature::Listen => "listen",
            Feature::AdvisoryLock => "advisory_lock",
            Feature::HoldCursor => "cursor_with_hold",
            Feature::TempTable => "temp_table",
            Feature::Prepare => "prepare",
            Feature::Load => "load",
        }
    }

    /// For error messages: what the statement does.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Set => "SET of a session parameter pgmux does not track",
            Feature::SetConfig => "set_config() of a session parameter pgmux does not track",
            Feature::Listen => "LISTEN",
            Feature::AdvisoryLock => "a session-level advisory lock",
            Feature::HoldCursor => "a cursor WITH HOLD",
            Feature::TempTable => "a temporary table",
            Feature::Prepare => "SQL-level PREPARE",
            Feature::Load => "LOAD",
        }
    }

    /// For error messages: what to do instead.
    pub fn hint(self) -> &'static str {
        match self {
            Feature::Set => {
                "Use SET LOCAL inside a transaction, or pass the setting in the connection's options."
            }
            Feature::SetConfig => "Call set_config(name, value, true) inside a transaction.",
            Feature::Listen => "Connect to PostgreSQL directly for LISTEN.",
            Feature::AdvisoryLock => "Use pg_advisory_xact_lock inside a transaction.",
            Feature::HoldCursor => "Use a cursor WITHOUT HOLD inside a transaction.",
            Feature::TempTable => "Create it with ON COMMIT DROP inside a transaction.",
            Feature::Prepare => "Use protocol-level prepared statements (pgmux keeps them per client).",
            Feature::Load => "Load the library with session_preload_libraries instead.",
        }
    }
}

/// The first session-state change in `sql` (one simple-query text or one Parse text, any
/// number of statements), if any.
pub fn detect(sql: &[u8]) -> Option<Feature> {
    if plainly_none(sql) {
        return None;
    }
    lex(sql)
}

/// [`detect`] by the lexer alone.
fn lex(sql: &[u8]) -> Option<Feature> {
    let mut lx = Lexer {
        b: sql,
        i: 0,
        start: 0,
    };
    loop {
        // A statement's first token.
        let first = loop {
            match lx.next()? {
                Tok::Punct(b';') => continue,
                t => break t,
            }
        };
        let Tok::Word(w) = first else {
            // `(SELECT …)`, `VALUES`-less oddities: look for calls only.
            if let Some(f) = calls(&mut lx, first, false) {
                return Some(f);
            }
            continue;
        };
        let found = if eq(w, "set") {
            set_statement(&mut lx)
        } else if eq(w, "listen") {
            Some(Feature::Listen)
        } else if eq(w, "prepare") {
            Some(Feature::Prepare)
        } else if eq(w, "load") {
            Some(Feature::Load)
        } else if eq(w, "declare") {
            declare(&mut lx)
        } else if eq(w, "create") {
            create(&mut lx)
        } else {
            calls(&mut lx, first, eq(w, "select"))
        };
        if found.is_some() {
            return found;
        }
    }
}

/// A quick pass that proves most texts make no session state without lexing them: one
/// statement (no `;` before trailing whitespace), starting with a word that is not a
/// command of interest, with no `…advisory_…` or `set_config` anywhere and, in a SELECT
/// or WITH, no `into`. Quotes and comments are not understood here, only over-matched:
/// a `;` or a name inside a literal sends the text to the lexer, which decides.
fn plainly_none(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_alphabetic() {
        i += 1;
    }
    let first = &b[start..i];
    if first.is_empty()
        || ["set", "listen", "prepare", "load", "declare", "create"]
            .iter()
            .any(|kw| eq(first, kw))
    {
        return false;
    }
    let select = eq(first, "select") || eq(first, "with");
    let ends_with =
        |k: usize, word: &[u8]| k >= word.len() && b[k - word.len()..k].eq_ignore_ascii_case(word);
    // Only `;`, `_` and (after SELECT or WITH) `i` need a look: jump between them.
    let mut k = i;
    while let Some(at) = next_stop(b, k, select) {
        k = at;
        match b[k] {
            b';' => {
                return b[k..].iter().all(|c| c.is_ascii_whitespace() || *c == b';');
            }
            b'_' if ends_with(k, b"advisory")
                || (ends_with(k, b"set")
                    && b.get(k + 1..k + 7)
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"config"))) =>
            {
                return false;
            }
            b'i' | b'I'
                if select
                    && b.get(k..k + 4)
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"into")) =>
            {
                return false;
            }
            _ => {}
        }
        k += 1;
    }
    true
}

/// The first byte at or after `k` that [`plainly_none`] must look at: `;`, `_` and, with
/// `into`, `i` or `I`. Eight bytes at a time (the SQL texts it sees are mostly one
/// statement of 20–150 bytes, read byte by byte a third of a transaction's detection
/// cost). It may also stop at ESC (0x1B) or DEL (0x7F), which share a candidate's value
/// once bit 5 is set; the caller passes over bytes that are no stop.
fn next_stop(b: &[u8], mut k: usize, into: bool) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A high bit in each byte of `v` equal to `c`, exact at the lowest such byte (a
    // borrow can only mark bytes above a real one).
    let eq = |v: u64, c: u8| {
        let x = v ^ (ONES * u64::from(c));
        x.wrapping_sub(ONES) & !x & HIGH
    };
    while let Some(chunk) = b.get(k..k + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) | (ONES * 0x20);
        let mut m = eq(v, b';' | 0x20) | eq(v, b'_' | 0x20);
        if into {
            m |= eq(v, b'i' | 0x20);
        }
        if m != 0 {
            return Some(k + (m.trailing_zeros() / 8) as usize);
        }
        k += 8;
    }
    let stops = if into { &STOPS_SELECT } else { &STOPS };
    b[k..]
        .iter()
        .position(|c| stops[usize::from(*c)])
        .map(|off| k + off)
}

const fn stop_table(into: bool) -> [bool; 256] {
    let mut t = [false; 256];
    t[b';' as usize] = true;
    t[b'_' as usize] = true;
    t[b'i' as usize] = into;
    t[b'I' as usize] = into;
    t
}
/// The bytes [`plainly_none`] stops at.
static STOPS: [bool; 256] = stop_table(false);
static STOPS_SELECT: [bool; 256] = stop_table(true);

/// Whether the first word of `sql` (after leading whitespace) is `kw`, in any case, ended
/// by a byte that cannot continue an identifier (or by the end). A cheap refusal before
/// a text is looked at further; comments in front are not skipped.
pub(crate) fn first_word_is(sql: &[u8], kw: &[u8]) -> bool {
    let lead = sql.trim_ascii_start();
    lead.len() >= kw.len()
        && lead[..kw.len()].eq_ignore_ascii_case(kw)
        && lead
            .get(kw.len())
            .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_' && *b != b'$')
}

/// A simple-query text that is exactly one plain `SET [SESSION] name {TO | =} value`,
/// `SET name TO DEFAULT`, `RESET name` or `RESET ALL`, as the change PostgreSQL makes. The
/// name is an identifier (dotted for custom parameters), folded to lowercase; the value
/// one bare word (folded, as PostgreSQL folds it), a number, or a plain `'…'` literal
/// without quotes or backslashes inside. Anything else (a list, an expression, `SET
/// LOCAL`, `SET ROLE`, …) is `None`.
pub fn plain_set(sql: &[u8]) -> Option<crate::params::ParamChange> {
    use crate::params::ParamChange;
    // Most texts are refused on their first word: SET, RESET, or a comment before them.
    let lead = sql.trim_ascii_start();
    if !(first_word_is(sql, b"set")
        || first_word_is(sql, b"reset")
        || lead.starts_with(b"/*")
        || lead.starts_with(b"--"))
    {
        return None;
    }
    let mut lx = Lexer {
        b: sql,
        i: 0,
        start: 0,
    };
    let first = lx.next()?;
    let change = if is_word(first, "reset") {
        let t = lx.next()?;
        if is_word(t, "all") {
            ParamChange::ResetAll
        } else {
            ParamChange::Reset(param_name(&mut lx, t)?)
        }
    } else if is_word(first, "set") {
        let mut t = lx.next()?;
        if is_word(t, "session") {
            t = lx.next()?;
        }
        const FORMS: [&str; 10] = [
            "local",
            "session",
            "transaction",
            "time",
            "names",
            "role",
            "schema",
            "constraints",
            "xml",
            "authorization",
        ];
        if FORMS.iter().any(|kw| is_word(t, kw)) {
            return None;
        }
        let name = param_name(&mut lx, t)?;
        let value = match lx.next()? {
            t if is_word(t, "to") => lx.next()?,
            Tok::Other(b"=") => lx.next()?,
            // `name=3`: the number rides on the `=`.
            Tok::Other(o) if o.first() == Some(&b'=') => Tok::Other(&o[1..]),
            _ => return None,
        };
        if is_word(value, "default") {
            ParamChange::Reset(name)
        } else {
            let start = match value {
                Tok::Other(o) => lx.i - o.len(),
                _ => lx.start,
            };
            // The value runs to the end of the statement.
            let mut end = sql.len();
            while end > start && (sql[end - 1].is_ascii_whitespace() || sql[end - 1] == b';') {
                end -= 1;
            }
            let value = plain_value(value, &sql[start..end], lx.i >= end)?;
            // All of `start..end` was read as the value.
            lx.i = lx.i.max(end);
            let value = crate::params::set_value(&name, value);
            ParamChange::Set(name, value)
        }
    } else {
        return None;
    };
    // Nothing but `;` after it.
    while let Some(t) = lx.next() {
        if t != Tok::Punct(b';') {
            return None;
        }
    }
    Some(change)
}

/// An identifier, or a dotted custom name (`app.tenant`), lowercase.
fn param_name(lx: &mut Lexer<'_>, first: Tok<'_>) -> Option<String> {
    let Tok::Word(w) = first else {
        return None;
    };
    let mut name = std::str::from_utf8(w).ok()?.to_ascii_lowercase();
    while lx.peek() == Some(Tok::Punct(b'.')) {
        lx.next();
        let Tok::Word(w) = lx.next()? else {
            return None;
        };
        name.push('.');
        name.push_str(&std::str::from_utf8(w).ok()?.to_ascii_lowercase());
    }
    crate::params::valid_name(&name).then_some(name)
}

/// The value of a plain SET (`raw`: its text to the statement's end; `whole`: the first
/// token is all of it).
fn plain_value(first: Tok<'_>, raw: &[u8], whole: bool) -> Option<String> {
    if raw.len() > 1024 {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    match first {
        Tok::Word(_) if whole => Some(text.to_ascii_lowercase()),
        Tok::Str(content)
            if whole
                && raw.first() == Some(&b'\'')
                && !content.iter().any(|c| matches!(c, b'\'' | b'\\' | 0)) =>
        {
            Some(std::str::from_utf8(content).ok()?.to_owned())
        }
        _ => {
            // A number: [+-]digits[.digits][e[+-]digits].
            let t = text.strip_prefix(['+', '-']).unwrap_or(text);
            let (mantissa, exp) = match t.find(['e', 'E']) {
                Some(i) => (&t[..i], Some(&t[i + 1..])),
                None => (t, None),
            };
            let digits_dot = |m: &str| {
                !m.is_empty()
                    && m.bytes().any(|c| c.is_ascii_digit())
                    && m.bytes().all(|c| c.is_ascii_digit() || c == b'.')
                    && m.bytes().filter(|c| *c == b'.').count() <= 1
            };
            let exp_ok = exp.is_none_or(|e| {
                let e = e.strip_prefix(['+', '-']).unwrap_or(e);
                !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit())
            });
            (digits_dot(mantissa) && exp_ok).then(|| text.to_owned())
        }
    }
}

/// ASCII case-insensitive comparison of a bare word with a lowercase keyword.
fn eq(word: &[u8], kw: &str) -> bool {
    word.eq_ignore_ascii_case(kw.as_bytes())
}

fn is_word(t: Tok<'_>, kw: &str) -> bool {
    matches!(t, Tok::Word(w) if eq(w, kw))
}

/// Reported parameters whose changes pgmux tracks per client (PostgreSQL tells it the new
/// value): a `SET` of one is fine.
fn tracked(name: &[u8]) -> bool {
    crate::params::TRACKED
        .iter()
        .any(|t| name.eq_ignore_ascii_case(t.as_bytes()))
}

/// After `SET`: the rest of the statement.
fn set_statement(lx: &mut Lexer<'_>) -> Option<Feature> {
    let mut t = lx.next();
    if t.is_some_and(|t| is_word(t, "session")) {
        t = lx.next();
        if t.is_some_and(|t| is_word(t, "characteristics") || is_word(t, "authorization")) {
            return Some(Feature::Set);
        }
    }
    let found = match t {
        None | Some(Tok::Punct(b';')) => return None,
        // Transaction-scoped forms.
        Some(t)
            if is_word(t, "local") || is_word(t, "transaction") || is_word(t, "constraints") =>
        {
            None
        }
        // SET TIME ZONE (TimeZone), SET NAMES (client_encoding): tracked.
        Some(t) if is_word(t, "time") || is_word(t, "names") => None,
        Some(Tok::Word(name)) | Some(Tok::Ident(name)) => {
            // A dotted custom name (`app.tenant`) is never tracked.
            let dotted = lx.peek() == Some(Tok::Punct(b'.'));
            (dotted || !tracked(name)).then_some(Feature::Set)
        }
        Some(_) => Some(Feature::Set),
    };
    skip_statement(lx);
    found
}

/// After `DECLARE`: `WITH HOLD` before `FOR`, then the query's calls.
fn declare(lx: &mut Lexer<'_>) -> Option<Feature> {
    let mut prev_with = false;
    while let Some(t) = lx.next() {
        match t {
            Tok::Punct(b';') => return None,
            t if prev_with && is_word(t, "hold") => return Some(Feature::HoldCursor),
            t if is_word(t, "for") => {
                let next = lx.next()?;
                return calls(lx, next, false);
            }
            _ => {}
        }
        prev_with = is_word(t, "with");
    }
    None
}

/// After `CREATE`: a temporary relation that outlives the transaction.
fn create(lx: &mut Lexer<'_>) -> Option<Feature> {
    let mut temp = false;
    // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} …
    let mut t = lx.next()?;
    loop {
        if is_word(t, "or") || is_word(t, "replace") || is_word(t, "global") || is_word(t, "local")
        {
            t = lx.next()?;
            continue;
        }
        if is_word(t, "temp") || is_word(t, "temporary") {
            temp = true;
        }
        break;
    }
    // Anything created in pg_temp is temporary too (`CREATE TABLE pg_temp.t …`).
    let mut on_commit_drop = false;
    let mut window: [Option<Tok<'_>>; 2] = [None, None];
    let mut advisory = None;
    while let Some(t) = lx.next() {
        match t {
            Tok::Punct(b';') => break,
            Tok::Punct(b'.') if matches!(window[1], Some(Tok::Word(w)) | Some(Tok::Ident(w)) if eq(w, "pg_temp")) =>
            {
                temp = true;
            }
            Tok::Punct(b'(') => {
                if let Some(f) = call(lx, window[1]) {
                    advisory.get_or_insert(f);
                }
            }
            t if is_word(t, "drop")
                && window[0].is_some_and(|w| is_word(w, "on"))
                && window[1].is_some_and(|w| is_word(w, "commit")) =>
            {
                on_commit_drop = true;
            }
            _ => {}
        }
        window = [window[1], Some(t)];
    }
    if temp && !on_commit_drop {
        return Some(Feature::TempTable);
    }
    advisory
}

/// Scans one statement (from its first token `first`) for calls that make session state,
/// and, in a SELECT, for `INTO TEMP`.
fn calls(lx: &mut Lexer<'_>, first: Tok<'_>, select: bool) -> Option<Feature> {
    let mut prev: Option<Tok<'_>> = None;
    let mut t = first;
    loop {
        match t {
            Tok::Punct(b';') => return None,
            Tok::Punct(b'(') => {
                if let Some(f) = call(lx, prev) {
                    return Some(f);
                }
            }
            t if select
                && (is_word(t, "temp") || is_word(t, "temporary"))
                && prev.is_some_and(|p| is_word(p, "into")) =>
            {
                return Some(Feature::TempTable)
            }
            _ => {}
        }
        prev = Some(t);
        t = lx.next()?;
    }
}

/// At the `(` after `name`: whether that call makes session state. Consumes the
/// arguments only for `set_config`.
fn call(lx: &mut Lexer<'_>, name: Option<Tok<'_>>) -> Option<Feature> {
    let name = match name? {
        Tok::Word(w) => w,
        Tok::Ident(w) => w,
        _ => return None,
    };
    const SESSION_LOCKS: [&str; 4] = [
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    ];
    if SESSION_LOCKS.iter().any(|f| eq(name, f)) {
        return Some(Feature::AdvisoryLock);
    }
    if eq(name, "set_config") {
        return set_config(lx);
    }
    None
}

/// The arguments of `set_config(` up to its `)`: state unless the parameter is tracked or
/// the third argument is literally true.
fn set_config(lx: &mut Lexer<'_>) -> Option<Feature> {
    let mut depth = 1usize;
    let mut arg = 0usize;
    // The first argument when it is one string literal, the third when it is one token.
    let mut first: Option<Tok<'_>> = None;
    let mut first_len = 0usize;
    let mut third: Option<Tok<'_>> = None;
    let mut third_len = 0usize;
    while depth > 0 {
        let t = lx.next()?;
        match t {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => {
                depth -= 1;
                continue;
            }
            Tok::Punct(b',') if depth == 1 => {
                arg += 1;
                continue;
            }
            Tok::Punct(b';') => return Some(Feature::SetConfig),
            _ => {}
        }
        match arg {
            0 => {
                first = Some(t);
                first_len += 1;
            }
            2 => {
                third = Some(t);
                third_len += 1;
            }
            _ => {}
        }
    }
    if first_len == 1 {
        if let Some(Tok::Str(name)) = first {
            if tracked(name) {
                return None;
            }
        }
    }
    let local = third_len == 1
        && match third {
            Some(Tok::Word(w)) => eq(w, "true"),
            Some(Tok::Str(s)) => ["t", "true", "on", "1", "yes", "y"]
                .iter()
                .any(|v| s.eq_ignore_ascii_case(v.as_bytes())),
            _ => false,
        };
    (!local).then_some(Feature::SetConfig)
}

fn skip_statement(lx: &mut Lexer<'_>) {
    while let Some(t) = lx.next() {
        if t == Tok::Punct(b';') {
            return;
        }
    }
}

/// A token, borrowing from the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    /// A bare word (keyword or identifier), as written.
    Word(&'a [u8]),
    /// A quoted identifier's content (doubled quotes left doubled).
    Ident(&'a [u8]),
    /// A string literal's content (`'…'`, `E'…'`, `$$…$$`), escapes left as written.
    Str(&'a [u8]),
    /// `(`, `)`, `,`, `;`, `.`.
    Punct(u8),
    /// Anything else (numbers, operators, parameters), as written.
    Other(&'a [u8]),
}

struct Lexer<'a> {
    b: &'a [u8],
    i: usize,
    /// Where the last token returned by `next` starts.
    start: usize,
}

fn word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        let mut copy = Lexer {
            b: self.b,
            i: self.i,
            start: self.start,
        };
        copy.next()
    }

    fn next(&mut self) -> Option<Tok<'a>> {
        let b = self.b;
        loop {
            self.start = self.i;
            let c = *b.get(self.i)?;
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.i += 1,
                b'-' if b.get(self.i + 1) == Some(&b'-') => {
                    while self.i < b.len() && b[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                b'/' if b.get(self.i + 1) == Some(&b'*') => {
                    // Nested, as PostgreSQL's lexer has them.
                    let mut depth = 0usize;
                    while self.i < b.len() {
                        if b[self.i..].starts_with(b"/*") {
                            depth += 1;
                            self.i += 2;
                        } else if b[self.i..].starts_with(b"*/") {
                            depth -= 1;
                            self.i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            self.i += 1;
                        }
                    }
                }
                b'\'' => return Some(Tok::Str(self.quoted(b'\'', false))),
                b'"' => return Some(Tok::Ident(self.quoted(b'"', false))),
                b'$' => return Some(self.dollar()),
                b'(' | b')' | b',' | b';' | b'.' => {
                    self.i += 1;
                    return Some(Tok::Punct(c));
                }
                c if word_start(c) => {
                    let start = self.i;
                    while self.i < b.len() && word_byte(b[self.i]) {
                        self.i += 1;
                    }
                    let w = &b[start..self.i];
                    // E'…' (and U&'…', B'…', X'…': their contents never matter here).
                    if self.i < b.len() && b[self.i] == b'\'' && w.len() == 1 {
                        let escapes = w.eq_ignore_ascii_case(b"e");
                        return Some(Tok::Str(self.quoted(b'\'', escapes)));
                    }
                    return Some(Tok::Word(w));
                }
                _ => {
                    let start = self.i;
                    self.i += 1;
                    // Numbers and operators: one token per run of such bytes.
                    while self.i < b.len()
                        && !matches!(
                            b[self.i],
                            b' ' | b'\t'
                                | b'\n'
                                | b'\r'
                                | b'\x0c'
                                | b'\''
                                | b'"'
                                | b'$'
                                | b'('
                                | b')'
                                | b','
                                | b';'
                                | b'.'
                        )
                        && !word_start(b[self.i])
                        && !b[self.i..].starts_with(b"--")
                        && !b[self.i..].starts_with(b"/*")
                    {
                        self.i += 1;
                    }
                    return Some(Tok::Other(&b[start..self.i]));
                }
            }
        }
    }

    /// From an opening quote at `self.i` to past the closing one (a doubled quote is part
    /// of the content; with `escapes`, so is a backslash and the byte after it). An
    /// unterminated literal runs to the end.
    fn quoted(&mut self, q: u8, escapes: bool) -> &'a [u8] {
        let b = self.b;
        self.i += 1;
        let start = self.i;
        while self.i < b.len() {
            let c = b[self.i];
            if escapes && c == b'\\' {
                self.i += 2;
            } else if c == q {
                if b.get(self.i + 1) == Some(&q) {
                    self.i += 2;
                } else {
                    let s = &b[start..self.i];
                    self.i += 1;
                    return s;
                }
            } else {
                self.i += 1;
            }
        }
        self.i = b.len();
        &b[start.min(b.len())..]
    }

    /// At `$`: a dollar-quoted string (`$$…$$`, `$tag$…$tag$`) or a parameter (`$1`).
    fn dollar(&mut self) -> Tok<'a> {
        let b = self.b;
        let start = self.i;
        let mut j = start + 1;
        if b.get(j).is_some_and(|c| c.is_ascii_digit()) {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            self.i = j;
            return Tok::Other(&b[start..j]);
        }
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
            j += 1;
        }
        if b.get(j) != Some(&b'$') {
            self.i = j.max(start + 1);
            return Tok::Other(&b[start..self.i]);
        }
        let tag = &b[start..=j];
        let body = j + 1;
        match find(&b[body..], tag) {
            Some(k) => {
                self.i = body + k + tag.len();
                Tok::Str(&b[body..body + k])
            }
            None => {
                self.i = b.len();
                Tok::Str(&b[body.min(b.len())..])
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `detect`, checked against the lexer alone (the quick pass must never clear a text
    /// the lexer flags).
    fn d(sql: &str) -> Option<Feature> {
        let found = detect(sql.as_bytes());
        assert_eq!(
            found,
            lex(sql.as_bytes()),
            "quick pass disagrees on {sql:?}"
        );
        found
    }

    #[test]
    fn set_of_untracked_parameters() {
        use Feature::Set;
        assert_eq!(d("SET work_mem = '64MB'"), Some(Set));
        assert_eq!(d("set search_path to tenant_a, public"), Some(Set));
        assert_eq!(d("SET SESSION statement_timeout = 5"), Some(Set));
        assert_eq!(d("SET ROLE reporting"), Some(Set));
        assert_eq!(d("SET SESSION AUTHORIZATION bob"), Some(Set));
        assert_eq!(
            d("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Some(Set)
        );
        assert_eq!(d("SET SCHEMA 'x'"), Some(Set));
        assert_eq!(d("SET app.tenant = '7'"), Some(Set));
        // A custom name that looks like a tracked one is not it.
        assert_eq!(d("SET app.TimeZone = 'x'"), Some(Set));
        assert_eq!(d("SET \"work_mem\" = '1MB'"), Some(Set));
        assert_eq!(d("/* tag */ -- x\n  SeT  work_mem=1"), Some(Set));
        assert_eq!(d("BEGIN; SET work_mem = 1; COMMIT"), Some(Set));
        assert_eq!(d("select 1; set search_path = x"), Some(Set));
    }

    #[test]
    fn transaction_scoped_and_tracked_settings_are_fine() {
        assert_eq!(d("SET LOCAL work_mem = '64MB'"), None);
        assert_eq!(d("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), None);
        assert_eq!(d("SET CONSTRAINTS ALL DEFERRED"), None);
        assert_eq!(d("SET TimeZone = 'UTC'"), None);
        assert_eq!(d("set timezone to 'Europe/Paris'"), None);
        assert_eq!(d("SET TIME ZONE 'UTC'"), None);
        assert_eq!(d("SET application_name = 'x'"), None);
        assert_eq!(d("SET NAMES 'UTF8'"), None);
        assert_eq!(d("SET DateStyle TO ISO, MDY"), None);
        assert_eq!(d("SET SESSION default_transaction_read_only = on"), None);
        assert_eq!(d("RESET work_mem"), None);
        assert_eq!(d("RESET ALL"), None);
        assert_eq!(d("UPDATE t SET x = 1 WHERE id = 2"), None);
        assert_eq!(
            d("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 2"),
            None
        );
        assert_eq!(d("SELECT 'SET work_mem = 1'"), None);
        assert_eq!(d("SELECT $$; SET work_mem = 1$$"), None);
        assert_eq!(d("SELECT $a$ ; LISTEN x $a$, 1"), None);
        assert_eq!(d("-- SET work_mem = 1\nSELECT 1"), None);
        assert_eq!(d("/* /* nested */ SET work_mem = 1 */ SELECT 1"), None);
        assert_eq!(d("SELECT E'\\'; SET work_mem = 1'"), None);
        assert_eq!(d("SELECT \"a;\"\"b\" FROM t"), None);
        assert_eq!(d(""), None);
        assert_eq!(d(";;"), None);
    }

    #[test]
    fn other_session_state() {
        assert_eq!(d("LISTEN jobs"), Some(Feature::Listen));
        assert_eq!(d("UNLISTEN *"), None);
        assert_eq!(d("NOTIFY jobs, 'x'"), None);
        assert_eq!(d("PREPARE q(int) AS SELECT $1"), Some(Feature::Prepare));
        assert_eq!(d("EXECUTE q(1)"), None);
        assert_eq!(d("DEALLOCATE q"), None);
        assert_eq!(d("LOAD 'auto_explain'"), Some(Feature::Load));
        assert_eq!(d("SELECT pg_advisory_lock(1)"), Some(Feature::AdvisoryLock));
        assert_eq!(
            d("select pg_catalog.PG_TRY_ADVISORY_LOCK_SHARED(1, 2)"),
            Some(Feature::AdvisoryLock)
        );
        assert_eq!(
            d("SELECT x FROM t WHERE pg_try_advisory_lock(id)"),
            Some(Feature::AdvisoryLock)
        );
        assert_eq!(d("SELECT pg_advisory_xact_lock(1)"), None);
        assert_eq!(d("SELECT pg_advisory_unlock(1)"), None);
        assert_eq!(d("SELECT 'pg_advisory_lock(1)'"), None);
        assert_eq!(
            d("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Some(Feature::HoldCursor)
        );
        assert_eq!(
            d("declare c binary no scroll cursor with hold for select * from t"),
            Some(Feature::HoldCursor)
        );
        assert_eq!(d("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1"), None);
        assert_eq!(d("DECLARE c CURSOR FOR SELECT 1"), None);
        assert_eq!(
            d("DECLARE c CURSOR FOR SELECT pg_advisory_lock(1)"),
            Some(Feature::AdvisoryLock)
        );
        assert_eq!(d("CREATE TEMP TABLE t (x int)"), Some(Feature::TempTable));
        assert_eq!(
            d("create global temporary table t as select 1"),
            Some(Feature::TempTable)
        );
        assert_eq!(
            d("CREATE OR REPLACE TEMP VIEW v AS SELECT 1"),
            Some(Feature::TempTable)
        );
        assert_eq!(
            d("CREATE TABLE pg_temp.t (x int)"),
            Some(Feature::TempTable)
        );
        assert_eq!(d("CREATE TEMP TABLE t (x int) ON COMMIT DROP"), None);
        assert_eq!(d("CREATE TABLE t (x int)"), None);
        assert_eq!(d("CREATE INDEX temp ON t (x)"), None);
        assert_eq!(d("SELECT * INTO TEMP t FROM u"), Some(Feature::TempTable));
        assert_eq!(d("INSERT INTO temp VALUES (1)"), None);
        assert_eq!(
            d("CREATE FUNCTION f() RETURNS void AS $$ SELECT pg_advisory_lock(1) $$ LANGUAGE sql"),
            None
        );
    }

    #[test]
    fn set_config_needs_a_literal_true() {
        assert_eq!(d("SELECT set_config('app.tenant', '7', true)"), None);
        assert_eq!(d("SELECT set_config('app.tenant', $1, 'on')"), None);
        assert_eq!(
            d("SELECT set_config('app.tenant', '7', false)"),
            Some(Feature::SetConfig)
        );
        assert_eq!(
            d("SELECT set_config('app.tenant', f(1, 2), $3)"),
            Some(Feature::SetConfig)
        );
        assert_eq!(
            d("SELECT set_config('search_path', 'x', false)"),
            Some(Feature::SetConfig)
        );
        assert_eq!(d("SELECT set_config('TimeZone', 'UTC', false)"), None);
        assert_eq!(
            d("SELECT set_config('a', 'b'"),
            None,
            "unterminated: PostgreSQL refuses it"
        );
    }

    #[test]
    fn the_quick_pass_only_clears_what_the_lexer_clears() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "UPDATE t SET x = 1",
            "INSERT INTO t VALUES ('a;b')",
            "select pg_advisory_lock(1)",
            "SELECT PG_TRY_ADVISORY_LOCK(1)",
            "select set_config('a', 'b', false)",
            "SELECT 'x_advisory_y'",
            "SELECT * INTO TEMP t FROM u",
            "select 1; set work_mem = 1",
            "select 1;  ;\n",
            "  Listen x",
            "(select 1)",
            "-- c\nSET x = 1",
            "SHOW work_mem",
            "with a as (select 1) select * into temporary t from a",
        ];
        for t in texts {
            if plainly_none(t.as_bytes()) {
                assert_eq!(lex(t.as_bytes()), None, "{t}");
            }
        }
        assert!(plainly_none(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
        ));
        assert!(plainly_none(b"UPDATE t SET x = 1 WHERE id = 2"));
        assert!(!plainly_none(b"select 1; set work_mem = 1"));
        assert!(!plainly_none(b"SELECT PG_TRY_ADVISORY_LOCK(1)"));
        // The jumps between stop bytes see the first and the last byte too.
        assert!(!plainly_none(b"select x from t into"));
        assert!(!plainly_none(b"select x INTO y ; "));
        assert!(!plainly_none(b"select set_config(1); "));
        assert!(!plainly_none(b"select 1;x"));
        assert!(plainly_none(b"update t set a_b = 1 where c_d = 2 ;  "));
        assert!(!plainly_none(
            b"update t set x = 1 where pg_advisory_unlock(1)"
        ));
        // A stop in every lane of a word and in the tail after the last whole word.
        for at in 0..20 {
            let mut t = b"update tttttttttttttttttttttttt".to_vec();
            t[7 + at] = b';';
            t.extend_from_slice(b" x");
            assert!(!plainly_none(&t), "{}", String::from_utf8_lossy(&t));
        }
    }

    #[test]
    fn the_word_scan_stops_where_the_byte_scan_does() {
        // Every byte value once in each lane, and the near misses of the stops (bit 5
        // flipped, ±1), at every start offset.
        let mut texts: Vec<Vec<u8>> = (0..=255u8)
            .map(|c| {
                let mut t = vec![b'a'; 19];
                t[c as usize % 19] = c;
                t
            })
            .collect();
        texts.push(b"\x1b\x7f\x49\x69\x3b\x5f\x1b;_iI\x3a\x3c\x5e\x60\x68\x6a\x48\x4a".to_vec());
        texts.push(b"\xff\xbb\xdf\xe9\xc9;\x80\x00\x01 select x INTO y".to_vec());
        texts.push(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;".to_vec());
        for t in &texts {
            for into in [false, true] {
                let stops = if into { &STOPS_SELECT } else { &STOPS };
                for from in 0..=t.len() {
                    // The byte scan's stop; the word scan may stop earlier only at ESC/DEL.
                    let want = t[from..]
                        .iter()
                        .position(|c| stops[usize::from(*c)])
                        .map(|o| from + o);
                    let mut k = from;
                    let got = loop {
                        match next_stop(t, k, into) {
                            Some(at) if !stops[usize::from(t[at])] => {
                                assert!(matches!(t[at], 0x1b | 0x7f), "{t:?} {at}");
                                k = at + 1;
                            }
                            other => break other,
                        }
                    };
                    assert_eq!(got, want, "{t:?} from {from} into {into}");
                }
            }
        }
    }

    #[test]
    fn plain_sets_are_recognised_exactly() {
        use crate::params::ParamChange::{Reset, ResetAll, Set};
        let p = |s: &str| plain_set(s.as_bytes());
        let set = |n: &str, v: &str| Some(Set(n.into(), v.into()));
        assert_eq!(
            p("SET client_min_messages TO 'warning'"),
            set("client_min_messages", "warning")
        );
        assert_eq!(
            p("set client_min_messages = WARNING;"),
            set("client_min_messages", "warning")
        );
        assert_eq!(
            p("SET SESSION extra_float_digits = 3"),
            set("extra_float_digits", "3")
        );
        assert_eq!(
            p("SET extra_float_digits=-1"),
            set("extra_float_digits", "-1")
        );
        assert_eq!(p("SET x.y = 0.5"), set("x.y", "0.5"));
        assert_eq!(p("SET work_mem = '64MB' ; "), set("work_mem", "64MB"));
        assert_eq!(
            p("SET search_path TO Tenant_A"),
            set("search_path", "tenant_a")
        );
        // As PostgreSQL stores it: SET quotes a search_path value as one identifier.
        assert_eq!(
            p("SET search_path = 'Tenant B'"),
            set("search_path", "\"Tenant B\"")
        );
        assert_eq!(
            p("SET App.Tenant = 'Acme Corp'"),
            set("app.tenant", "Acme Corp")
        );
        assert_eq!(p("SET work_mem TO DEFAULT"), Some(Reset("work_mem".into())));
        assert_eq!(
            p("RESET client_min_messages"),
            Some(Reset("client_min_messages".into()))
        );
        assert_eq!(p("reset all"), Some(ResetAll));
        // The first-word check in front of the lexer lets comments and odd spacing through.
        assert_eq!(p("/* app */ SET work_mem = 1"), set("work_mem", "1"));
        assert_eq!(p("-- x\n\tReSeT all"), Some(ResetAll));
        assert_eq!(p("SET\nwork_mem=1"), set("work_mem", "1"));
        for no in [
            "SETTINGS x = 1",
            "set_config x = 1",
            "RESETS all",
            "SET LOCAL work_mem = 1",
            "SET search_path = a, b",
            "SET x = 'it''s'",
            "SET x = E'a\\nb'",
            "SET x = $$a$$",
            "SET x = 1 + 1",
            "SET x = 1; SELECT 1",
            "SET ROLE bob",
            "SET SESSION AUTHORIZATION bob",
            "SET TIME ZONE 'UTC'",
            "SET \"X\" = 1",
            "SET x",
            "SET x =",
            "SET x = 1e",
            "SET x = 1.2.3",
            "RESET",
            "SELECT 1",
            "",
        ] {
            assert_eq!(p(no), None, "{no}");
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in [
            "$",
            "$$",
            "$a",
            "$1$",
            "'",
            "\"",
            "E'",
            "E'\\",
            "/*",
            "/* /*",
            "--",
            "set",
            "set session",
            "create",
            "create or",
            "declare c",
            "declare c for",
            "select set_config(",
            "select pg_advisory_lock",
            "\u{00e9}t\u{00e9} 1",
            "$\u{00e9}$ x $\u{00e9}$",
        ] {
            let _ = d(s);
        }
        let bytes: Vec<u8> = (0..=255u8).collect();
        let _ = detect(&bytes);
    }
}
