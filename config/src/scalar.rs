//! Top-level scalar keys: parsing from any source, layering, range validation.

use std::{net::SocketAddr, time::Duration};

use crate::{AuthType, Config, ConfigError, Origin, MAX_MAX_MESSAGE_SIZE, MIN_MAX_MESSAGE_SIZE};

/// A value plus the key and origin it came from.
#[derive(Debug, Clone)]
pub(crate) struct Sourced<T> {
    pub(crate) value: T,
    pub(crate) key: String,
    pub(crate) origin: Origin,
}

impl<T> Sourced<T> {
    pub(crate) fn new(value: T, key: impl Into<String>, origin: Origin) -> Self {
        Sourced {
            value,
            key: key.into(),
            origin,
        }
    }

    pub(crate) fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.key.clone(), self.origin.clone(), message)
    }
}

impl Sourced<usize> {
    pub(crate) fn at_least_one(self) -> Result<usize, ConfigError> {
        if self.value == 0 {
            Err(self.err("must be at least 1"))
        } else {
            Ok(self.value)
        }
    }
}

/// An untyped value from any source.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Raw<'a> {
    Str(&'a str),
    Int(i64),
    /// Any other TOML type (its name), always a type error.
    Other(&'static str),
}

impl Raw<'_> {
    fn describe(&self) -> String {
        match self {
            Raw::Str(s) => format!("string {s:?}"),
            Raw::Int(i) => format!("integer {i}"),
            Raw::Other(t) => (*t).to_string(),
        }
    }
}

/// All top-level scalar keys; `None` = not set by any source so far.
#[derive(Debug, Default)]
pub(crate) struct Scalars {
    listen: Option<Sourced<SocketAddr>>,
    max_client_conn: Option<Sourced<usize>>,
    pool_size: Option<Sourced<usize>>,
    auth_type: Option<Sourced<AuthType>>,
    query_wait_timeout: Option<Sourced<Duration>>,
    server_connect_timeout: Option<Sourced<Duration>>,
    client_login_timeout: Option<Sourced<Duration>>,
    shutdown_timeout: Option<Sourced<Duration>>,
    server_idle_timeout: Option<Sourced<Duration>>,
    max_message_size: Option<Sourced<usize>>,
    workers: Option<Sourced<usize>>,
    max_prepared_statements: Option<Sourced<usize>>,
}

/// All top-level scalar key names.
pub(crate) const SCALAR_KEYS: &[&str] = &[
    "listen",
    "max_client_conn",
    "pool_size",
    "auth_type",
    "query_wait_timeout",
    "server_connect_timeout",
    "client_login_timeout",
    "shutdown_timeout",
    "server_idle_timeout",
    "max_message_size",
    "workers",
    "max_prepared_statements",
];

impl Scalars {
    /// Set `key` from `raw` (later calls win). Errors on an unknown key or a type error.
    pub(crate) fn set(
        &mut self,
        key: &str,
        raw: Raw<'_>,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(key, origin.clone(), m);
        fn wrap<T>(
            r: Result<T, String>,
            key: &str,
            origin: &Origin,
        ) -> Result<Option<Sourced<T>>, ConfigError> {
            match r {
                Ok(v) => Ok(Some(Sourced::new(v, key, origin.clone()))),
                Err(m) => Err(ConfigError::new(key, origin.clone(), m)),
            }
        }
        match key {
            "listen" => self.listen = wrap(parse_listen(raw), key, &origin)?,
            "max_client_conn" => self.max_client_conn = wrap(parse_usize(raw), key, &origin)?,
            "pool_size" => self.pool_size = wrap(parse_usize(raw), key, &origin)?,
            "workers" => self.workers = wrap(parse_usize(raw), key, &origin)?,
            "max_prepared_statements" => {
                self.max_prepared_statements = wrap(parse_usize(raw), key, &origin)?
            }
            "max_message_size" => self.max_message_size = wrap(parse_size(raw), key, &origin)?,
            "auth_type" => {
                let v = match raw {
                    Raw::Str(s) => AuthType::parse(s).ok_or_else(|| {
                        format!("expected \"scram-sha-256\", \"md5\" or \"trust\", got {s:?}")
                    }),
                    other => Err(format!(
                        "expected \"scram-sha-256\", \"md5\" or \"trust\", got {}",
                        other.describe()
                    )),
                };
                self.auth_type = Some(Sourced::new(v.map_err(err)?, key, origin.clone()));
            }
            "query_wait_timeout"
            | "server_connect_timeout"
            | "client_login_timeout"
            | "shutdown_timeout"
            | "server_idle_timeout" => {
                let d = Some(Sourced::new(
                    parse_duration(raw).map_err(err)?,
                    key,
                    origin.clone(),
                ));
                match key {
                    "query_wait_timeout" => self.query_wait_timeout = d,
                    "server_connect_timeout" => self.server_connect_timeout = d,
                    "client_login_timeout" => self.client_login_timeout = d,
                    "shutdown_timeout" => self.shutdown_timeout = d,
                    _ => self.server_idle_timeout = d,
                }
            }
            _ => return Err(err("unknown key".into())),
        }
        Ok(())
    }

    /// Apply defaults and range checks; returns a config without databases/users.
    pub(crate) fn finish(self) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(v) = self.listen {
            c.listen = v.value;
        }
        if let Some(v) = self.max_client_conn {
            c.max_client_conn = v.at_least_one()?;
        }
        if let Some(v) = self.pool_size {
            c.pool_size = v.at_least_one()?;
        }
        if let Some(v) = self.auth_type {
            c.auth_type = v.value;
        }
        let durations = [
            (self.query_wait_timeout, &mut c.query_wait_timeout),
            (self.server_connect_timeout, &mut c.server_connect_timeout),
            (self.client_login_timeout, &mut c.client_login_timeout),
            (self.shutdown_timeout, &mut c.shutdown_timeout),
            (self.server_idle_timeout, &mut c.server_idle_timeout),
        ];
        for (src, dst) in durations {
            if let Some(v) = src {
                *dst = v.value;
            }
        }
        if let Some(v) = self.max_message_size {
            if !(MIN_MAX_MESSAGE_SIZE..=MAX_MAX_MESSAGE_SIZE).contains(&v.value) {
                return Err(v.err(format!(
                    "must be between 1024 bytes and 1GiB, got {} bytes",
                    v.value
                )));
            }
            c.max_message_size = v.value;
        }
        if let Some(v) = self.workers {
            c.workers = v.value;
        }
        if let Some(v) = self.max_prepared_statements {
            c.max_prepared_statements = v.value;
        }
        Ok(c)
    }
}

pub(crate) fn parse_usize(raw: Raw<'_>) -> Result<usize, String> {
    match raw {
        Raw::Int(i) => {
            usize::try_from(i).map_err(|_| format!("expected a non-negative integer, got {i}"))
        }
        Raw::Str(s) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("expected a non-negative integer, got {s:?}")),
        other => Err(format!(
            "expected a non-negative integer, got {}",
            other.describe()
        )),
    }
}

fn parse_listen(raw: Raw<'_>) -> Result<SocketAddr, String> {
    let Raw::Str(s) = raw else {
        return Err(format!(
            "expected an address like \"0.0.0.0:6432\", got {}",
            raw.describe()
        ));
    };
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!(
        "expected an IP address and port like \"0.0.0.0:6432\" or \"[::]:6432\", got {s:?}"
    ))
}

pub(crate) fn parse_duration(raw: Raw<'_>) -> Result<Duration, String> {
    match raw {
        Raw::Int(i) => u64::try_from(i)
            .map(Duration::from_secs)
            .map_err(|_| format!("expected a non-negative number of seconds, got {i}")),
        Raw::Str(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                return s
                    .parse::<u64>()
                    .map(Duration::from_secs)
                    .map_err(|e| format!("invalid number of seconds {s:?}: {e}"));
            }
            humantime::parse_duration(s).map_err(|e| {
                format!("invalid duration {s:?} ({e}); expected e.g. \"30s\", \"5m\", \"250ms\"")
            })
        }
        other => Err(format!(
            "expected a duration like \"30s\" or an integer number of seconds, got {}",
            other.describe()
        )),
    }
}

pub(crate) fn parse_size(raw: Raw<'_>) -> Result<usize, String> {
    let s = match raw {
        Raw::Int(_) => return parse_usize(raw),
        Raw::Str(s) => s.trim(),
        other => {
            return Err(format!(
                "expected a size like \"64MiB\" or integer bytes, got {}",
                other.describe()
            ))
        }
    };
    let bad = || {
        format!("invalid size {s:?}; expected e.g. \"64MiB\", \"512kB\", \"1GiB\" or integer bytes")
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: usize = num.parse().map_err(|_| bad())?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" | "KiB" | "kiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}
