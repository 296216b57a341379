//! `auth_query`: secrets of users pgmux has no configured secret for, looked up in
//! PostgreSQL (PgBouncer's `auth_user` / `auth_query`).
//!
//! ```text
//!   login of an unknown user ─► slot (auth database, user) ─ lock ─┬─ fresh cache entry ─┐
//!                                                                  └─ run auth_query ────┤
//!                        check VALID UNTIL on every use (cached entries too) ◄───────────┘
//! ```
//!
//! The query runs on a server of the pool (auth database, `auth_user`), checked out like a
//! client's, so lookups are bounded by that pool's size and wait in its FIFO. It is one
//! extended-protocol round trip (Parse, Bind with the user name as the text parameter
//! `$1` and every result column in binary, Describe, Execute, Sync): the name is never
//! part of the SQL, and a `timestamptz`/`timestamp` third column arrives as microseconds
//! since 2000-01-01, so no date parsing is involved. The server is marked dirty while the
//! exchange runs: only a complete answer up to `ReadyForQuery` makes it clean again, so a
//! lookup interrupted anywhere (an error, the login timeout dropping the future) hands a
//! server in an unknown state to the guard, which closes it.
//!
//! The per-key slot is an async mutex: concurrent logins of one uncached user wait for the
//! first one's query instead of each running their own (single flight). Only lookups that
//! found a usable secret are cached (`auth_query_cache`); an unknown user, a NULL
//! password or an expired role is asked again next time, and a login that fails (wrong
//! proof, expired role) drops the entry, so a changed password or a changed VALID UNTIL
//! is seen at the next attempt. An entry keeps the role's VALID UNTIL, checked at every
//! use: a cached secret never outlives its role's validity (PgBouncer CVE-2025-2291).
//! An entry past it is not used at all; PostgreSQL is asked again, so a role whose
//! validity was extended meanwhile is not refused on stale data either.
//! Slots without a cached entry are removed when their last user leaves; a sweep bounds
//! the map when many distinct names are tried.
//!
//! Secrets never reach a log line or an error message: errors carry PostgreSQL's error
//! fields (about the query or the `auth_user` login) and pgmux's own descriptions only.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use dashmap::DashMap;
use pgmux_config::{AuthSecret, Config, Database};

use crate::pool::PoolError;
use crate::protocol::messages::ErrorFields;
use crate::protocol::ProtocolError;
use crate::Shared;

/// Largest message accepted from the server in answer to the lookup.
/// Above this many slots, a new one first sweeps out those without a fresh entry.
const SWEEP_ABOVE: usize = 4096;
/// Type OIDs of the VALID UNTIL column that are understood.
const TIMESTAMPTZ_OID: u32 = 1184;
const TIMESTAMP_OID: u32 = 1114;
/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    /// No server of the auth_user's pool: connect or login failed, or the wait timed out.
    #[error("{0}")]
    Checkout(#[from] PoolError),
    /// PostgreSQL refused the query.
    #[error("the query failed: {0}")]
    Query(ErrorFields),
    #[error("protocol error from the server: {0}")]
    Protocol(#[from] ProtocolError),
    /// The answer does not have the expected shape.
    #[error("unexpected result: {0}")]
    Result(&'static str),
}

impl AuthQueryError {
    /// Whether the problem is reaching or logging in to the server (vs. the query).
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            AuthQueryError::Checkout(_) | AuthQueryError::Protocol(_)
        )
    }
}

/// What one lookup found.
#[derive(Clone)]
enum Found {
    /// No row, or a NULL password: the user cannot log in.
    Nothing(&'static str),
    Role {
        secret: AuthSecret,
        /// VALID UNTIL in microseconds since 2000-01-01 UTC (`i64::MAX`: infinity);
        /// None: no expiry.
        valid_until: Option<i64>,
    },
}

/// A lookup that found a secret, and when.
struct Cached {
    at: Instant,
    secret: AuthSecret,
    valid_until: Option<i64>,
}

#[derive(Default)]
struct Slot {
    /// Held while the query runs: waiters then find the fresh entry.
    cell: tokio::sync::Mutex<Option<Cached>>,
}

impl Slot {
    /// Holds a fresh entry, or is in use (locked): must stay in the map.
    fn worth_keeping(&self, ttl: Duration) -> bool {
        match self.cell.try_lock() {
            Ok(g) => g.as_ref().is_some_and(|c| c.at.elapsed() < ttl),
            Err(_) => true,
        }
    }
}

/// The lookup cache, per (pgmux database the query runs in, user). Lives in [`Shared`].
#[derive(Default)]
pub struct AuthQueryCache {
    slots: DashMap<(String, String), Arc<Slot>>,
}

impl AuthQueryCache {
    /// Forgets every entry (a reload may have changed auth_user, auth_query or the TTL).
    pub fn clear(&self) {
        self.slots.clear();
    }

    /// A login with the entry of (database, user) failed: the password may have changed,
    /// so the next login asks PostgreSQL again.
    pub fn forget(&self, database: &str, user: &str) {
        let key = (database.to_owned(), user.to_owned());
        let Some(slot) = self.slots.get(&key).map(|s| s.clone()) else {
            return;
        };
        // A lookup in progress (locked) stores what PostgreSQL says now anyway.
        if let Ok(mut g) = slot.cell.try_lock() {
            *g = None;
        }
        self.remove_if_unused(&key);
    }

    fn slot(&self, key: &(String, String), ttl: Duration) -> Arc<Slot> {
        if let Some(s) = self.slots.get(key) {
            return s.clone();
        }
        if self.slots.len() > SWEEP_ABOVE {
            self.slots
                .retain(|_, s| Arc::strong_count(s) > 1 || s.worth_keeping(ttl));
        }
        self.slots.entry(key.clone()).or_default().clone()
    }

    /// Removes the slot of `key` unless it holds an entry or someone else uses it (the
    /// caller may hold one reference: the map's shard lock keeps others from taking one
    /// meanwhile).
    fn remove_if_unused(&self, key: &(String, String)) {
        self.slots.remove_if(key, |_, s| {
            Arc::strong_count(s) <= 2 && s.cell.try_lock().is_ok_and(|g| g.is_none())
        });
    }
}

/// The outcome of [`secret_for`].
pub struct UserSecret {
    /// None: nothing to authenticate against (the login goes through the same exchange
    /// against an impossible verifier, and fails like a wrong password).
    pub secret: Option<AuthSecret>,
    /// Set when the secret came from auth_query (or auth_query refused the user): the
    /// pgmux database the lookup ran in, for [`AuthQueryCache::forget`].
    pub looked_up_in: Option<String>,
}

/// The secret `user` authenticates with: `[users]`/URL password, else the auth file's
/// entry, else (with `auth_user` set) what auth_query returns in `auth_dbname` or the
/// client's `database`.
pub async fn secret_for(
    shared: &Arc<Shared>,
    cfg: &Config,
    user: &str,
    database: &str,
) -> Result<UserSecret, (String, AuthQueryError)> {
    // A configured password wins over the auth file's entry.
    let configured = match cfg.users.get(user).and_then(|u| u.password.as_ref()) {
        Some(p) => Some(AuthSecret::Password(p.clone())),
        None => cfg.auth_users.get(user).cloned(),
    };
    let unqueried = |secret| {
        Ok(UserSecret {
            secret,
            looked_up_in: None,
        })
    };
    if configured.is_some() || cfg.auth_user.is_none() {
        return unqueried(configured);
    }
    if cfg.auth_type == pgmux_config::AuthType::Trust {
        // Nothing to check a client against.
        return unqueried(None);
    }
    let auth_db = cfg.auth_dbname.as_deref().unwrap_or(database);
    let Some(db) = cfg.databases.get(auth_db) else {
        // The client asked for a database pgmux does not serve: nowhere to look.
        return unqueried(None);
    };
    let secret = lookup(shared, cfg, db, user)
        .await
        .map_err(|e| (db.name.clone(), e))?;
    Ok(UserSecret {
        secret,
        looked_up_in: Some(db.name.clone()),
    })
}

/// The secret of `user` from the cache or PostgreSQL, with its VALID UNTIL checked.
async fn lookup(
    shared: &Arc<Shared>,
    cfg: &Config,
    db: &Database,
    user: &str,
) -> Result<Option<AuthSecret>, AuthQueryError> {
    let ttl = cfg.auth_query_cache;
    let cache = &shared.auth_query;
    let key = (db.name.clone(), user.to_owned());
    let slot = cache.slot(&key, ttl);
    let result = {
        let mut cell = slot.cell.lock().await;
        // An entry past its role's VALID UNTIL is never used: PostgreSQL is asked again
        // (the role may have been extended) and decides.
        let fresh = cell
            .as_ref()
            .filter(|c| c.at.elapsed() < ttl && !expired(c.valid_until));
        let found = match fresh {
            Some(c) => Ok(Found::Role {
                secret: c.secret.clone(),
                valid_until: c.valid_until,
            }),
            None => {
                *cell = None;
                run_query(shared, cfg, db, user).await
            }
        };
        match found {
            Ok(Found::Nothing(why)) => {
                tracing::debug!(%user, db = %db.name, why, "auth_query: no usable secret");
                Ok(None)
            }
            Ok(Found::Role {
                secret,
                valid_until,
            }) => {
                if expired(valid_until) {
                    *cell = None;
                    tracing::info!(%user, db = %db.name, "auth_query: the role's VALID UNTIL has passed; login refused");
                    Ok(None)
                } else {
                    if cell.is_none() && !ttl.is_zero() {
                        *cell = Some(Cached {
                            at: Instant::now(),
                            secret: secret.clone(),
                            valid_until,
                        });
                    }
                    Ok(Some(secret))
                }
            }
            Err(e) => Err(e),
        }
    };
    cache.remove_if_unused(&key);
    result
}

/// Whether a VALID UNTIL has passed (None: no expiry).
fn expired(valid_until: Option<i64>) -> bool {
    valid_until.is_some_and(|t| t < pg_now())
}

/// Now, in PostgreSQL's timestamp representation.
fn pg_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_UNIX_SECS * 1_000_000
}

/// Runs auth_query for `user` on a server of (db, auth_user).
async fn run_query(
    shared: &Arc<Shared>,
    cfg: &Config,
    db: &Database,
    user: &str,
) -> Result<Found, AuthQueryError> {
    let auth_user = cfg
        .auth_user
        .as_deref()
        .ok_or(AuthQueryError::Result("auth_user is not set"))?;
    let pool = shared.pool_for(cfg, db, auth_user);
    let mut server = pool.checkout(cfg.query_wait_timeout).await?;
    // Clean again only once the whole answer has been read.
    server.dirty = true;
    let mut out = BytesMut::with_capacity(cfg.auth_query.len() + user.len() + 64);
    encode_lookup(&mut out, &cfg.auth_query, user);
    server
        .stream
        .send(&out)
        .await
        .map_err(ProtocolError::from)?;

    let mut columns: Option<Vec<u32>> = None;
    let mut row: Option<Vec<Option<BytesMut>>> = None;
    let mut error = None;
    let status = loop {
        let frame = server.read_frame().await?;
        match frame.tag {
            b'T' => columns = Some(parse_row_description(&frame.body)?),
            b'D' if row.is_none() => row = Some(split_data_row(frame.body)?),
            b'E' if error.is_none() => error = Some(ErrorFields::parse(&frame.body)?),
            b'S' => {
                let (k, v) = crate::protocol::messages::parse_parameter_status(&frame.body)?;
                server.params.reported(k, v);
            }
            b'Z' => break frame.body.first().copied().unwrap_or(b'E'),
            // ParseComplete, BindComplete, NoData, further rows, CommandComplete,
            // notices: nothing to keep.
            _ => {}
        }
    };
    server.status = status;
    if server.buf.is_empty() {
        server.dirty = false;
    }
    drop(server);
    if let Some(e) = error {
        return Err(AuthQueryError::Query(e));
    }
    let columns = columns.ok_or(AuthQueryError::Result("the query returns no columns"))?;
    if columns.len() < 2 {
        return Err(AuthQueryError::Result(
            "the query must return (user name, password[, valid until])",
        ));
    }
    let Some(row) = row else {
        return Ok(Found::Nothing("no such user"));
    };
    decode_row(&columns, row)
}

/// The secret and VALID UNTIL of one row (binary format).
fn decode_row(columns: &[u32], mut row: Vec<Option<BytesMut>>) -> Result<Found, AuthQueryError> {
    if row.len() != columns.len() {
        return Err(AuthQueryError::Result(
            "row and row description disagree on the columns",
        ));
    }
    let valid_until = match (columns.get(2), row.get(2)) {
        (Some(_), Some(None)) | (None, _) => None,
        (Some(&oid), Some(Some(v))) => {
            if oid != TIMESTAMPTZ_OID && oid != TIMESTAMP_OID {
                return Err(AuthQueryError::Result(
                    "the third column (valid until) must be timestamptz or timestamp",
                ));
            }
            let raw: [u8; 8] = v[..]
                .try_into()
                .map_err(|_| AuthQueryError::Result("malformed timestamp"))?;
            Some(i64::from_be_bytes(raw))
        }
        (Some(_), None) => None,
    };
    let Some(password) = row.swap_remove(1) else {
        return Ok(Found::Nothing("NULL password"));
    };
    let password = String::from_utf8(password.to_vec())
        .map_err(|_| AuthQueryError::Result("the password is not valid UTF-8"))?;
    if password.is_empty() {
        return Ok(Found::Nothing("empty password"));
    }
    let secret = pgmux_config::authfile::classify(password)
        .map_err(|_| AuthQueryError::Result("malformed SCRAM secret"))?;
    Ok(Found::Role {
        secret,
        valid_until,
    })
}

/// Parse (unnamed, no declared types), Bind (`user` as the text parameter `$1`, all
/// result columns binary), Describe portal, Execute, Sync.
fn encode_lookup(out: &mut BytesMut, sql: &str, user: &str) {
    message(out, b'P', |b| {
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    });
    message(out, b'B', |b| {
        b.put_u8(0); // portal
        b.put_u8(0); // statement
        b.put_i16(0); // parameter formats: all text
        b.put_i16(1);
        b.put_i32(user.len() as i32);
        b.put_slice(user.as_bytes());
        b.put_i16(1); // result formats: one code for all columns
        b.put_i16(1); // binary
    });
    message(out, b'D', |b| {
        b.put_u8(b'P');
        b.put_u8(0);
    });
    message(out, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    message(out, b'S', |_| {});
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The type OIDs of a RowDescription's columns.
fn parse_row_description(body: &[u8]) -> Result<Vec<u32>, ProtocolError> {
    let bad = || ProtocolError::Malformed("RowDescription");
    let count = u16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut rest = &body[2..];
    let mut oids = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        let (_name, tail) = crate::protocol::messages::cstr(rest).ok_or_else(bad)?;
        // table oid (4), column number (2), type oid (4), size (2), modifier (4), format (2)
        let fixed = tail.get(..18).ok_or_else(bad)?;
        oids.push(u32::from_be_bytes([fixed[6], fixed[7], fixed[8], fixed[9]]));
        rest = &tail[18..];
    }
    Ok(oids)
}

/// A DataRow's values as raw bytes (NULL as None), sliced from `body` without copying.
fn split_data_row(mut body: BytesMut) -> Result<Vec<Option<BytesMut>>, ProtocolError> {
    let bad = || ProtocolError::Malformed("DataRow");
    if body.len() < 2 {
        return Err(bad());
    }
    let count = u16::from_be_bytes([body[0], body[1]]);
    let _ = body.split_to(2);
    let mut values = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        if body.len() < 4 {
            return Err(bad());
        }
        let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let _ = body.split_to(4);
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(bad());
        }
        values.push(Some(body.split_to(len)));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_frame;

    fn row(values: &[Option<&[u8]>]) -> Vec<Option<BytesMut>> {
        values.iter().map(|v| v.map(BytesMut::from)).collect()
    }

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";

    #[test]
    fn rows_decode_to_secrets_and_expiry() {
        let cols = [19, 25, TIMESTAMPTZ_OID];
        let never = i64::MAX.to_be_bytes();
        match decode_row(
            &cols,
            row(&[Some(b"u"), Some(SCRAM.as_bytes()), Some(&never)]),
        ) {
            Ok(Found::Role {
                secret: AuthSecret::Scram(_),
                valid_until: Some(i64::MAX),
            }) => {}
            _ => panic!("scram"),
        }
        let md5 = "md50123456789abcdef0123456789abcdef";
        match decode_row(&cols, row(&[Some(b"u"), Some(md5.as_bytes()), None])) {
            Ok(Found::Role {
                secret: AuthSecret::Md5(_),
                valid_until: None,
            }) => {}
            _ => panic!("md5"),
        }
        match decode_row(&cols[..2], row(&[Some(b"u"), Some(b"plain")])) {
            Ok(Found::Role {
                secret: AuthSecret::Password(p),
                valid_until: None,
            }) => assert_eq!(p.expose(), "plain"),
            _ => panic!("plain"),
        }
        assert!(matches!(
            decode_row(&cols, row(&[Some(b"u"), None, None])),
            Ok(Found::Nothing(_))
        ));
        // 2000-01-01 is long past; the timestamp without time zone decodes the same way.
        let y2k = 0i64.to_be_bytes();
        match decode_row(
            &[19, 25, TIMESTAMP_OID],
            row(&[Some(b"u"), Some(b"pw"), Some(&y2k)]),
        ) {
            Ok(Found::Role {
                valid_until: Some(t),
                ..
            }) => assert!(t < pg_now()),
            _ => panic!("timestamp"),
        }
        // A text third column is refused, not guessed at.
        assert!(decode_row(
            &[19, 25, 25],
            row(&[Some(b"u"), Some(b"pw"), Some(b"2030")])
        )
        .is_err());
    }

    #[test]
    fn lookup_messages_carry_the_name_as_a_parameter() {
        let mut out = BytesMut::new();
        encode_lookup(&mut out, "SELECT $1", "o'brien");
        let mut tags = Vec::new();
        let mut buf = out.clone();
        while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
            tags.push(f.tag);
            if f.tag == b'P' {
                assert!(!f.body.windows(7).any(|w| w == b"o'brien"));
            }
            if f.tag == b'B' {
                assert!(f.body.ends_with(&[0, 1, 0, 1]), "all results binary");
            }
        }
        assert_eq!(tags, b"PBDES");
    }

    #[test]
    fn row_description_gives_type_oids() {
        let mut b = BytesMut::new();
        crate::protocol::messages::row_description(
            &mut b,
            &[
                ("usename", 19, 64),
                ("passwd", 25, -1),
                ("valuntil", 1184, 8),
            ],
        );
        let mut buf = b.clone();
        let f = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(parse_row_description(&f.body).unwrap(), vec![19, 25, 1184]);
    }

    #[test]
    fn cache_keeps_only_fresh_or_used_slots() {
        let cache = AuthQueryCache::default();
        let key = ("db".to_string(), "u".to_string());
        let slot = cache.slot(&key, Duration::from_secs(10));
        *slot.cell.try_lock().unwrap() = Some(Cached {
            at: Instant::now(),
            secret: AuthSecret::Password(pgmux_config::Secret::new("x")),
            valid_until: None,
        });
        drop(slot);
        cache.remove_if_unused(&key);
        assert_eq!(cache.slots.len(), 1, "an entry stays");
        cache.forget("db", "u");
        assert_eq!(cache.slots.len(), 0, "forgotten and removed");
    }
}
