//! Rendering the effective configuration as redacted TOML.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use toml::{Table, Value};

use crate::{scalar::LIVE_KEYS, Config, ServerAddr, Setting};

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

/// Top-level settings in file order, as TOML values (secrets redacted).
fn scalars(c: &Config) -> Vec<(&'static str, Value)> {
    let s = |v: &str| Value::String(v.to_string());
    let list = |v: &[String]| Value::Array(v.iter().map(|f| Value::String(f.clone())).collect());
    vec![
        ("listen", s(&c.listen.to_string())),
        ("max_client_conn", int(c.max_client_conn)),
        ("pool_size", int(c.pool_size)),
        ("min_pool_size", int(c.min_pool_size)),
        ("auth_type", s(c.auth_type.as_str())),
        ("query_wait_timeout", duration(c.query_wait_timeout)),
        ("server_connect_timeout", duration(c.server_connect_timeout)),
        ("client_login_timeout", duration(c.client_login_timeout)),
        ("shutdown_timeout", duration(c.shutdown_timeout)),
        ("server_idle_timeout", duration(c.server_idle_timeout)),
        ("client_idle_timeout", duration(c.client_idle_timeout)),
        (
            "idle_transaction_timeout",
            duration(c.idle_transaction_timeout),
        ),
        ("server_lifetime", duration(c.server_lifetime)),
        ("server_login_retry", duration(c.server_login_retry)),
        ("server_check_delay", duration(c.server_check_delay)),
        ("query_timeout", duration(c.query_timeout)),
        ("tcp_keepalive", Value::Boolean(c.tcp.keepalive)),
        ("tcp_keepidle", duration(c.tcp.keepidle)),
        ("tcp_keepintvl", duration(c.tcp.keepintvl)),
        ("tcp_keepcnt", int(c.tcp.keepcnt)),
        ("tcp_user_timeout", duration(c.tcp.user_timeout)),
        ("max_message_size", size(c.max_message_size)),
        ("workers", int(c.workers)),
        ("max_prepared_statements", int(c.max_prepared_statements)),
        ("read_routing", s(c.read_routing.as_str())),
        ("read_your_writes", s(c.read_your_writes.as_str())),
        ("session_state_action", s(c.session_state_action.as_str())),
        ("track_extra_parameters", list(&c.track_extra_parameters)),
        ("server_auth", s(c.server_auth.as_str())),
        ("aws_region", s(c.aws_region.as_deref().unwrap_or(""))),
        ("client_tls_mode", s(c.client_tls.mode.as_str())),
        ("max_db_connections", int(c.max_db_connections)),
        (
            "total_server_connections",
            match c.total_server_connections {
                crate::TotalBudget::Auto => s("auto"),
                b => int(match b {
                    crate::TotalBudget::Fixed(n) => n,
                    _ => 0,
                }),
            },
        ),
        (
            "reserved_server_connections",
            int(c.reserved_server_connections),
        ),
        ("peer_dns_name", s(c.peer_dns_name.as_deref().unwrap_or(""))),
        (
            "peer_dns_server",
            s(&c.peer_dns_server.map(|a| a.to_string()).unwrap_or_default()),
        ),
        ("peer_check_interval", duration(c.peer_check_interval)),
        ("server_tls_mode", s(c.server_tls_mode.as_str())),
        ("max_replica_lag", duration(c.max_replica_lag)),
        ("replica_check_interval", duration(c.replica_check_interval)),
        ("write_functions", list(&c.write_functions)),
        ("admin_users", list(&c.admin_users)),
        ("stats_users", list(&c.stats_users)),
    ]
    .into_iter()
    .chain(
        c.auth_file
            .as_ref()
            .map(|p| ("auth_file", s(&p.display().to_string()))),
    )
    .chain(c.auth_user.as_deref().map(|u| ("auth_user", s(u))))
    .chain([
        ("auth_query", s(&c.auth_query)),
        ("auth_query_cache", duration(c.auth_query_cache)),
    ])
    .chain(c.auth_dbname.as_deref().map(|d| ("auth_dbname", s(d))))
    .chain(
        [
            ("client_tls_cert_file", &c.client_tls.cert_file),
            ("client_tls_key_file", &c.client_tls.key_file),
            ("server_tls_ca_file", &c.server_tls_ca_file),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.as_ref().map(|p| (k, s(&p.display().to_string())))),
    )
    .collect()
}

/// `[admin]` settings (token redacted).
fn admin(c: &Config) -> Vec<(&'static str, Value)> {
    let mut v = vec![("listen", Value::String(c.admin.listen.to_string()))];
    if c.admin.token.is_some() {
        v.push(("token", Value::String(REDACTED.into())));
    }
    v.push(("protect_reads", Value::Boolean(c.admin.protect_reads)));
    v
}

/// A value as `SHOW CONFIG` shows it: strings bare, lists comma-separated.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub(crate) fn settings(c: &Config) -> Vec<Setting> {
    let defaults = Config::default();
    let default_values: Vec<(&str, Value)> = scalars(&defaults)
        .into_iter()
        .chain(admin(&defaults).into_iter().map(|(k, v)| (admin_key(k), v)))
        .collect();
    let default_of = |key: &str| {
        default_values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| plain(v))
            .unwrap_or_default()
    };
    let mut out: Vec<Setting> = scalars(c)
        .into_iter()
        .chain(admin(c).into_iter().map(|(k, v)| (admin_key(k), v)))
        .map(|(key, v)| Setting {
            key: key.to_string(),
            value: plain(&v),
            default: default_of(key),
            changeable: LIVE_KEYS.contains(&key),
        })
        .collect();
    let mut entry = |key: String, value: String| {
        out.push(Setting {
            key,
            value,
            default: String::new(),
            changeable: false,
        })
    };
    for (name, db) in &c.databases {
        entry(format!("databases.{name}.url"), server_url(&db.primary));
        if !db.replicas.is_empty() {
            let r: Vec<String> = db.replicas.iter().map(server_url).collect();
            entry(format!("databases.{name}.replicas"), r.join(","));
        }
        if let Some(p) = db.pool_size {
            entry(format!("databases.{name}.pool_size"), p.to_string());
        }
        if let Some(r) = db.read_routing {
            entry(format!("databases.{name}.read_routing"), r.as_str().into());
        }
    }
    for (name, u) in &c.users {
        if u.password.is_some() {
            entry(format!("users.{name}.password"), REDACTED.into());
        }
        if let Some(p) = u.pool_size {
            entry(format!("users.{name}.pool_size"), p.to_string());
        }
        if let Some(r) = u.read_routing {
            entry(format!("users.{name}.read_routing"), r.as_str().into());
        }
    }
    out
}

fn admin_key(k: &str) -> &'static str {
    match k {
        "listen" => "admin.listen",
        "token" => "admin.token",
        _ => "admin.protect_reads",
    }
}

pub(crate) fn redacted_toml(c: &Config) -> String {
    let mut root = Table::new();
    for (k, v) in scalars(c) {
        root.insert(k.into(), v);
    }
    root.insert(
        "admin".into(),
        Value::Table(
            admin(c)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
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
