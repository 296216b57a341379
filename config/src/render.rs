//! Rendering the effective configuration as redacted TOML.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use toml::{Table, Value};

use crate::{Config, ServerAddr};

/// Everything except RFC 3986 unreserved characters is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const REDACTED: &str = "<redacted>";

/// A `postgres://` URL for `addr`, without any credentials.
pub(crate) fn server_url(addr: &ServerAddr) -> String {
    let host = if addr.host.contains(':') && !addr.host.starts_with('/') {
        format!("[{}]", addr.host)
    } else {
        utf8_percent_encode(&addr.host, COMPONENT).to_string()
    };
    let mut out = format!(
        "postgres://{host}:{}/{}",
        addr.port,
        utf8_percent_encode(&addr.dbname, COMPONENT)
    );
    if !addr.params.is_empty() {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &addr.params {
            q.append_pair(k, v);
        }
        out.push('?');
        out.push_str(&q.finish());
    }
    out
}

fn int(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

fn size(n: usize) -> Value {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (mult, unit) in UNITS {
        if n >= mult && (n / mult) * mult == n {
            return Value::String(format!("{}{unit}", n / mult));
        }
    }
    int(n)
}

pub(crate) fn redacted_toml(c: &Config) -> String {
    let mut root = Table::new();
    root.insert("listen".into(), Value::String(c.listen.to_string()));
    root.insert("max_client_conn".into(), int(c.max_client_conn));
    root.insert("pool_size".into(), int(c.pool_size));
    root.insert(
        "auth_type".into(),
        Value::String(c.auth_type.as_str().into()),
    );
    root.insert("query_wait_timeout".into(), duration(c.query_wait_timeout));
    root.insert(
        "server_connect_timeout".into(),
        duration(c.server_connect_timeout),
    );
    root.insert(
        "client_login_timeout".into(),
        duration(c.client_login_timeout),
    );
    root.insert("shutdown_timeout".into(), duration(c.shutdown_timeout));
    root.insert(
        "server_idle_timeout".into(),
        duration(c.server_idle_timeout),
    );
    root.insert("max_message_size".into(), size(c.max_message_size));
    root.insert("workers".into(), int(c.workers));
    root.insert(
        "max_prepared_statements".into(),
        int(c.max_prepared_statements),
    );
    root.insert(
        "read_routing".into(),
        Value::String(c.read_routing.as_str().into()),
    );
    root.insert(
        "read_your_writes".into(),
        Value::String(c.read_your_writes.as_str().into()),
    );
    root.insert("max_replica_lag".into(), duration(c.max_replica_lag));
    root.insert(
        "replica_check_interval".into(),
        duration(c.replica_check_interval),
    );
    root.insert(
        "write_functions".into(),
        Value::Array(
            c.write_functions
                .iter()
                .map(|f| Value::String(f.clone()))
                .collect(),
        ),
    );

    let mut dbs = Table::new();
    for (name, db) in &c.databases {
        let mut t = Table::new();
        t.insert("url".into(), Value::String(server_url(&db.primary)));
        if !db.replicas.is_empty() {
            t.insert(
                "replicas".into(),
                Value::Array(
                    db.replicas
                        .iter()
                        .map(|r| Value::String(server_url(r)))
                        .collect(),
                ),
            );
        }
        if let Some(p) = db.pool_size {
            t.insert("pool_size".into(), int(p));
        }
        if let Some(r) = db.read_routing {
            t.insert("read_routing".into(), Value::String(r.as_str().into()));
        }
        dbs.insert(name.clone(), Value::Table(t));
    }
    root.insert("databases".into(), Value::Table(dbs));

    let mut users = Table::new();
    for (name, u) in &c.users {
        let mut t = Table::new();
        if u.password.is_some() {
            t.insert("password".into(), Value::String(REDACTED.into()));
        }
        if let Some(p) = u.pool_size {
            t.insert("pool_size".into(), int(p));
        }
        if let Some(r) = u.read_routing {
            t.insert("read_routing".into(), Value::String(r.as_str().into()));
        }
        users.insert(name.clone(), Value::Table(t));
    }
    root.insert("users".into(), Value::Table(users));

    toml::to_string(&root).unwrap_or_else(|e| format!("# failed to render configuration: {e}\n"))
}
