//! Session parameters that follow the client, not the server.
//!
//! In transaction mode a client meets a different server connection every transaction.
//! PostgreSQL reports some settings to the client (ParameterStatus); for those the client
//! has a view pgmux must keep true. Every client carries its wanted values ([`ClientParams`]),
//! every server the values it currently has ([`ServerParams`]); at checkout pgmux compares
//! the two and sends one `SET …` batch for the differences. Parameters a client passed in
//! its StartupMessage (or `options=-c k=v`) that PostgreSQL does not report are applied the
//! same way and `RESET` when the next client does not want them, and so are the plain
//! `SET`s of `track_extra_parameters` a client runs outside a transaction ([`ParamChange`],
//! recognised by [`crate::sessionstate::plain_set`], recorded by `relay` when PostgreSQL
//! has carried it out).
//!
//! A client's reported values start as the server's at its login, with one exception:
//! `default_transaction_read_only` follows the client only once the client chose it;
//! until then a server keeps its node's default (`NODE_DEFAULT`, for failover).
//!
//! Values are sent as `E'…'` literals with `\` and `'` escaped, which PostgreSQL reads the
//! same whatever `standard_conforming_strings` is; names are restricted to identifier
//! characters. SQL is never built from unchecked client strings.
//!
//! Values are kept as the parameter's own string, the text a StartupMessage carries. For
//! most parameters `SET name = '…'` stores exactly that string, but for the list
//! parameters PostgreSQL quotes (`search_path`, [`LIST_QUOTED`]) `SET` would store each
//! value as one quoted identifier, making `-c search_path=a,b` one schema named `a,b`;
//! those are applied with `set_config(name, value, false)`, which takes the string as is.

use std::collections::BTreeMap;

/// Reported parameters a client may change and pgmux keeps per client.
pub const TRACKED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

/// The canonical spelling PostgreSQL reports for a GUC name (GUC names are case-insensitive).
pub fn canonical_name(name: &str) -> String {
    TRACKED
        .iter()
        .find(|t| t.eq_ignore_ascii_case(name))
        .map(|t| (*t).to_owned())
        .unwrap_or_else(|| name.to_ascii_lowercase())
}

/// The tracked parameter whose default is the node's own, not the value the client saw at
/// login: `default_transaction_read_only`. After a failover the address can lead to a
/// read-only node and later to the promoted one; a client that never chose the setting
/// must get the writable node's default then, not carry the old node's `on` onto it.
/// When it chose the setting (startup packet, or a `SET` it ran), it follows the client.
const NODE_DEFAULT: usize = 6;

fn tracked_index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| *t == name)
}

/// A GUC name safe to put into SQL unquoted.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// List parameters that PostgreSQL declares `GUC_LIST_QUOTE` and a user may set: `SET`
/// quotes each value it is given as an identifier, so they are applied with `set_config`.
pub const LIST_QUOTED: [&str; 4] = [
    "search_path",
    "temp_tablespaces",
    "local_preload_libraries",
    "session_preload_libraries",
];

pub fn is_list_quoted(name: &str) -> bool {
    LIST_QUOTED.contains(&name)
}

/// The string a plain `SET name = value` leaves the parameter with, `value` being the one
/// value as PostgreSQL's parser read it (a folded word, a number, a literal's text). For a
/// [`LIST_QUOTED`] parameter `SET` quotes it as an identifier when it is not a plain
/// lowercase one (PostgreSQL also quotes keywords; a keyword left unquoted names the same
/// schema); for every other parameter it is the value itself.
pub fn set_value(name: &str, value: String) -> String {
    if !is_list_quoted(name) {
        return value;
    }
    let plain = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        return value;
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Settings that ride along on the startup packet and mean nothing to pgmux.
pub fn is_protocol_key(name: &str) -> bool {
    matches!(name, "user" | "database" | "options" | "replication")
}

/// Parses libpq's `options` (`-c name=value`, `--name=value`, backslash escapes spaces).
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next()
                .ok_or_else(|| "missing value after -c in options".to_owned())?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(format!(
                "unsupported options entry \"{w}\": only -c name=value is supported"
            ));
        };
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("invalid options entry \"{kv}\": expected name=value"))?;
        out.push((k.replace('-', "_"), v.to_owned()));
    }
    Ok(out)
}

/// Values a client wants.
#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    tracked: [Option<String>; TRACKED.len()],
    extras: BTreeMap<String, String>,
    /// The extras of the startup packet: what `RESET` returns to.
    startup_extras: BTreeMap<String, String>,
}

/// A change of an untracked parameter that pgmux follows (`track_extra_parameters`):
/// a plain `SET`/`RESET` that PostgreSQL carried out outside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamChange {
    /// `SET name = value` (name lowercase, value the parameter's string: [`set_value`]).
    Set(String, String),
    /// `RESET name`, `SET name TO DEFAULT`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
}

impl ParamChange {
    /// The parameter it changes (None: all of them).
    pub fn name(&self) -> Option<&str> {
        match self {
            ParamChange::Set(n, _) | ParamChange::Reset(n) => Some(n),
            ParamChange::ResetAll => None,
        }
    }
}

/// Values a server connection currently has.
#[derive(Debug, Clone, Default)]
pub struct ServerParams {
    tracked: [Option<String>; TRACKED.len()],
    extras: BTreeMap<String, String>,
    /// Everything the server reported at login, for the client's login burst.
    pub startup: Vec<(String, String)>,
    /// The [`NODE_DEFAULT`] parameter's value at login: the node's default.
    node_default: Option<String>,
}

impl ServerParams {
    /// Records a ParameterStatus received from this server.
    pub fn reported(&mut self, name: &str, value: &str) {
        if let Some(i) = tracked_index(name) {
            if self.tracked[i].as_deref() != Some(value) {
                self.tracked[i] = Some(value.to_owned());
            }
        }
    }

    pub fn from_startup(startup: Vec<(String, String)>) -> Self {
        let mut p = ServerParams {
            startup: Vec::new(),
            ..Default::default()
        };
        for (k, v) in &startup {
            p.reported(k, v);
        }
        p.node_default.clone_from(&p.tracked[NODE_DEFAULT]);
        p.startup = startup;
        p
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        tracked_index(name).and_then(|i| self.tracked[i].as_deref())
    }

    /// The server carried out `change`: its session defaults are pgmux's login, so a
    /// reset leaves no extra behind.
    pub fn track(&mut self, change: &ParamChange) {
        match change {
            ParamChange::Set(k, v) => {
                self.extras.insert(k.clone(), v.clone());
            }
            ParamChange::Reset(k) => {
                self.extras.remove(k);
            }
            ParamChange::ResetAll => self.extras.clear(),
        }
    }
}

impl ClientParams {
    /// Starts from the server defaults (what a direct connection would have reported) and
    /// applies what the client asked for at startup.
    pub fn new(defaults: &ServerParams, requested: &[(String, String)]) -> Result<Self, String> {
        let mut p = ClientParams {
            tracked: defaults.tracked.clone(),
            extras: BTreeMap::new(),
            startup_extras: BTreeMap::new(),
        };
        // Not chosen (yet): each server keeps its node's default.
        p.tracked[NODE_DEFAULT] = None;
        for (k, v) in requested {
            let name = canonical_name(k);
            if !valid_name(&name) {
                return Err(format!("invalid parameter name \"{k}\""));
            }
            if v.contains('\0') {
                return Err(format!("invalid value for parameter \"{k}\""));
            }
            match tracked_index(&name) {
                Some(i) => p.tracked[i] = Some(v.clone()),
                None => {
                    p.extras.insert(name, v.clone());
                }
            }
        }
        p.startup_extras.clone_from(&p.extras);
        Ok(p)
    }

    /// The client's own `change` went through: from now on it wants that (a reset goes
    /// back to what it asked for at startup, as PostgreSQL's session default would).
    pub fn track(&mut self, change: &ParamChange) {
        match change {
            ParamChange::Set(k, v) => {
                self.extras.insert(k.clone(), v.clone());
            }
            ParamChange::Reset(k) => match self.startup_extras.get(k) {
                Some(v) => {
                    self.extras.insert(k.clone(), v.clone());
                }
                None => {
                    self.extras.remove(k);
                }
            },
            ParamChange::ResetAll => self.extras.clone_from(&self.startup_extras),
        }
    }

    /// The client saw a ParameterStatus (it changed the setting itself).
    pub fn reported(&mut self, name: &str, value: &str) {
        if let Some(i) = tracked_index(name) {
            if self.tracked[i].as_deref() != Some(value) {
                self.tracked[i] = Some(value.to_owned());
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        tracked_index(name)
            .and_then(|i| self.tracked[i].as_deref())
            .or_else(|| self.extras.get(name).map(|s| s.as_str()))
    }

    /// The ParameterStatus list for this client's login: the server's report with the
    /// client's own values substituted.
    pub fn login_report<'a>(&'a self, server: &'a ServerParams) -> Vec<(&'a str, &'a str)> {
        let mut out: Vec<(&str, &str)> = Vec::with_capacity(server.startup.len() + 2);
        for (k, v) in &server.startup {
            match tracked_index(k) {
                Some(i) => out.push((k, self.tracked[i].as_deref().unwrap_or(v))),
                None => out.push((k, v)),
            }
        }
        for (i, name) in TRACKED.iter().enumerate() {
            if let Some(v) = &self.tracked[i] {
                if !out.iter().any(|(k, _)| k == name) {
                    out.push((name, v));
                }
            }
        }
        out
    }

    /// The SQL that makes `server` match this client, or `None` when they already agree.
    /// Cheap when nothing differs: a handful of string comparisons, no allocation.
    pub fn sync_sql(&self, server: &ServerParams) -> Option<String> {
        let tracked_differs = self
            .tracked
            .iter()
            .zip(&server.tracked)
            .any(|(c, s)| c.is_some() && c != s);
        // Left changed by an earlier client, where this one never chose it.
        let node_default_changed = self.tracked[NODE_DEFAULT].is_none()
            && server.tracked[NODE_DEFAULT] != server.node_default;
        if !tracked_differs && !node_default_changed && self.extras == server.extras {
            return None;
        }
        let mut sql = String::new();
        for (i, name) in TRACKED.iter().enumerate() {
            if let Some(v) = &self.tracked[i] {
                if Some(v) != server.tracked[i].as_ref() {
                    push_set(&mut sql, name, v);
                }
            }
        }
        if node_default_changed {
            sql.push_str("RESET ");
            sql.push_str(TRACKED[NODE_DEFAULT]);
            sql.push(';');
        }
        for (k, v) in &self.extras {
            if server.extras.get(k) != Some(v) {
                push_set(&mut sql, k, v);
            }
        }
        for k in server.extras.keys() {
            if !self.extras.contains_key(k) {
                sql.push_str("RESET ");
                sql.push_str(k);
                sql.push(';');
            }
        }
        Some(sql)
    }

    /// After `sync_sql` ran successfully: the server now has the client's extras, and the
    /// client adopts the server's spelling of tracked values (e.g. `DateStyle=iso` is
    /// reported back as `ISO, MDY`). Returns the tracked values whose spelling changed, which
    /// the client must be told about.
    pub fn after_sync(&mut self, server: &mut ServerParams) -> Vec<(&'static str, String)> {
        server.extras.clone_from(&self.extras);
        let mut changed = Vec::new();
        for (i, name) in TRACKED.iter().enumerate() {
            if let (Some(c), Some(s)) = (&self.tracked[i], &server.tracked[i]) {
                if c != s {
                    changed.push((*name, s.clone()));
                    self.tracked[i] = Some(s.clone());
                }
            }
        }
        changed
    }
}

fn push_set(sql: &mut String, name: &str, value: &str) {
    if is_list_quoted(name) {
        // `name` is one of LIST_QUOTED: no quote in it.
        sql.push_str("SELECT pg_catalog.set_config('");
        sql.push_str(name);
        sql.push_str("', ");
        push_literal(sql, value);
        sql.push_str(", false);");
        return;
    }
    sql.push_str("SET ");
    sql.push_str(name);
    sql.push_str(" = ");
    push_literal(sql, value);
    sql.push(';');
}

fn push_literal(sql: &mut String, value: &str) {
    sql.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerParams {
        ServerParams::from_startup(vec![
            ("TimeZone".into(), "UTC".into()),
            ("application_name".into(), "".into()),
            ("server_version".into(), "15.1".into()),
        ])
    }

    #[test]
    fn nothing_to_do_when_equal() {
        let s = server();
        let c = ClientParams::new(&s, &[]).unwrap();
        assert_eq!(c.sync_sql(&s), None);
    }

    #[test]
    fn list_quoted_parameters_go_through_set_config() {
        let s = server();
        let c = ClientParams::new(
            &s,
            &[
                ("search_path".into(), "a, \"B c\"".into()),
                ("temp_tablespaces".into(), "t1,t2".into()),
            ],
        )
        .unwrap();
        let sql = c.sync_sql(&s).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('search_path', E'a, \"B c\"', false);\
             SELECT pg_catalog.set_config('temp_tablespaces', E't1,t2', false);"
        );
    }

    #[test]
    fn a_set_value_of_a_list_quoted_parameter_is_one_identifier() {
        // What PostgreSQL's SET stores: `SET search_path TO Tenant_A` folds the word,
        // `SET search_path = 'My "x"'` quotes the literal as an identifier.
        assert_eq!(set_value("search_path", "tenant_a".into()), "tenant_a");
        assert_eq!(set_value("search_path", "_t9".into()), "_t9");
        assert_eq!(
            set_value("search_path", "My \"x\"".into()),
            "\"My \"\"x\"\"\""
        );
        assert_eq!(set_value("search_path", "a,b".into()), "\"a,b\"");
        assert_eq!(set_value("search_path", "9a".into()), "\"9a\"");
        assert_eq!(set_value("search_path", String::new()), "\"\"");
        // Other parameters keep the value as it is.
        assert_eq!(set_value("work_mem", "64MB".into()), "64MB");
        assert_eq!(set_value("app.tenant", "a,b".into()), "a,b");
    }

    #[test]
    fn sets_differences_with_escaping() {
        let s = server();
        let c = ClientParams::new(
            &s,
            &[
                ("timezone".into(), "Europe/Paris".into()),
                ("application_name".into(), "o'reilly \\ x".into()),
                ("work_mem".into(), "8MB".into()),
            ],
        )
        .unwrap();
        let sql = c.sync_sql(&s).unwrap();
        assert!(
            sql.contains("SET application_name = E'o''reilly \\\\ x';"),
            "{sql}"
        );
        assert!(sql.contains("SET TimeZone = E'Europe/Paris';"));
        assert!(sql.contains("SET work_mem = E'8MB';"));
    }

    #[test]
    fn resets_extras_the_next_client_does_not_want() {
        let mut s = server();
        let mut a = ClientParams::new(&s, &[("work_mem".into(), "8MB".into())]).unwrap();
        a.after_sync(&mut s);
        let b = ClientParams::new(&server(), &[]).unwrap();
        assert_eq!(b.sync_sql(&s).unwrap(), "RESET work_mem;");
    }

    #[test]
    fn rejects_unsafe_names() {
        let s = server();
        assert!(ClientParams::new(&s, &[("x; drop table t".into(), "1".into())]).is_err());
        assert!(valid_name("foo.bar_baz"));
        assert!(!valid_name("1abc"));
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options("-c search_path=a,b --work-mem=4MB -csynchronous_commit=off").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("work_mem".into(), "4MB".into()),
                ("synchronous_commit".into(), "off".into())
            ]
        );
        assert_eq!(
            parse_options("-c application_name=a\\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-x").is_err());
    }

    fn node(read_only: &str) -> ServerParams {
        ServerParams::from_startup(vec![
            ("TimeZone".into(), "UTC".into()),
            ("default_transaction_read_only".into(), read_only.into()),
        ])
    }

    #[test]
    fn the_node_default_is_the_one_tracked_parameter_not_frozen_at_login() {
        assert_eq!(TRACKED[NODE_DEFAULT], "default_transaction_read_only");
    }

    #[test]
    fn a_read_only_default_seen_at_login_does_not_follow_the_client() {
        // Logged in while the address led to a read-only node ...
        let mut c = ClientParams::new(&node("on"), &[]).unwrap();
        assert!(c
            .login_report(&node("on"))
            .contains(&("default_transaction_read_only", "on")));
        // ... a server of the writable node is used as it is.
        let mut writable = node("off");
        assert_eq!(c.sync_sql(&writable), None);
        // One that an earlier client left read-only goes back to the node's default.
        writable.reported("default_transaction_read_only", "on");
        assert_eq!(
            c.sync_sql(&writable).as_deref(),
            Some("RESET default_transaction_read_only;")
        );
        // The client's own SET (its ParameterStatus) makes it the client's choice.
        c.reported("default_transaction_read_only", "on");
        assert_eq!(
            c.sync_sql(&node("off")).as_deref(),
            Some("SET default_transaction_read_only = E'on';")
        );
        assert_eq!(c.sync_sql(&writable), None);
    }

    #[test]
    fn a_read_only_default_asked_for_at_startup_follows_the_client() {
        let c = ClientParams::new(
            &node("off"),
            &[("default_transaction_read_only".into(), "on".into())],
        )
        .unwrap();
        assert_eq!(
            c.sync_sql(&node("off")).as_deref(),
            Some("SET default_transaction_read_only = E'on';")
        );
        assert_eq!(c.sync_sql(&node("on")), None);
    }
}
