//! `postgres://` URL parsing. Error messages never contain the URL itself
//! (it may hold a password).

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;

use crate::{Secret, ServerAddr};

/// A parsed server URL with its credentials split off.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedUrl {
    pub(crate) addr: ServerAddr,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
}

const SSLMODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

fn decode(s: &str, what: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what} is not valid UTF-8 after percent-decoding"))
}

/// Parse a `postgres://` / `postgresql://` URL.
///
/// `default_dbname` is used when the URL has neither a path nor a user name; with
/// `None` such a URL is an error.
pub(crate) fn parse(input: &str, default_dbname: Option<&str>) -> Result<ParsedUrl, String> {
    let input = input.trim();
    let url = url::Url::parse(input).map_err(|e| format!("invalid URL: {e}"))?;
    match url.scheme() {
        "postgres" | "postgresql" => {}
        other => {
            return Err(format!(
                "invalid URL: scheme must be postgres:// or postgresql://, got {other:?}"
            ))
        }
    }

    let mut user = match url.username() {
        "" => None,
        u => Some(decode(u, "user name")?),
    };
    let mut password = match url.password() {
        None => None,
        Some(p) => Some(Secret::new(decode(p, "password")?)),
    };
    let mut host = match url.host_str() {
        None | Some("") => None,
        Some(h) => {
            let h = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h);
            Some(decode(h, "host")?)
        }
    };
    let mut port = url.port();
    let path = url.path();
    let path = path.strip_prefix('/').unwrap_or(path);
    let mut dbname = match path {
        "" => None,
        p => Some(decode(p, "database name")?),
    };

    let mut params = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        let (k, v) = (k.into_owned(), v.into_owned());
        match k.as_str() {
            "host" if !v.is_empty() => host = Some(v),
            "port" if !v.is_empty() => {
                port = Some(
                    v.parse::<u16>()
                        .map_err(|_| format!("invalid URL: invalid port parameter {v:?}"))?,
                )
            }
            "user" if !v.is_empty() => user = Some(v),
            "password" => password = Some(Secret::new(v)),
            "dbname" if !v.is_empty() => dbname = Some(v),
            "host" | "port" | "user" | "dbname" => {}
            "sslmode" => {
                if !SSLMODES.contains(&v.as_str()) {
                    return Err(format!(
                        "invalid URL: sslmode must be one of {}, got {v:?}",
                        SSLMODES.join(", ")
                    ));
                }
                params.insert(k, v);
            }
            _ => {
                params.insert(k, v);
            }
        }
    }

    let Some(host) = host else {
        return Err(
            "invalid URL: a host is required (postgres://HOST/DB, or ?host=/socket/dir)".into(),
        );
    };
    if host.contains(',') {
        return Err("invalid URL: multiple hosts are not supported".into());
    }
    if password.is_some() && user.is_none() {
        return Err("invalid URL: a password was given without a user name".into());
    }
    let dbname = match (dbname, &user, default_dbname) {
        (Some(d), _, _) => d,
        (None, Some(u), _) => u.clone(),
        (None, None, Some(d)) => d.to_string(),
        (None, None, None) => {
            return Err(
                "invalid URL: needs a database name (postgres://HOST/DBNAME) or a user name".into(),
            )
        }
    };

    Ok(ParsedUrl {
        addr: ServerAddr {
            host,
            port: port.unwrap_or(5432),
            dbname,
            params,
            tls: Default::default(),
        },
        user,
        password,
    })
}
