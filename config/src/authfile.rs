//! `auth_file`: user names and secrets in PgBouncer's `userlist.txt` format.
//!
//! One user a line: `"name" "secret"` (two double-quoted fields; `""` inside a field is
//! a literal quote; the rest of the line is ignored, as PgBouncer does). The secret is a
//! plain password, an MD5 hash (`md5` + 32 hex digits, of password + user name) or a SCRAM
//! verifier (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in
//! `pg_authid.rolpassword`). Empty lines and lines starting with `;` or `#` are skipped;
//! anything else is an error naming the line. Read at start-up and at every reload.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Secret;

/// A user's secret from the auth file.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthSecret {
    /// A plain-text password: every client and server authentication works.
    Password(Secret),
    /// `md5…`: MD5 client authentication, and MD5 server logins.
    Md5(Secret),
    /// `SCRAM-SHA-256$…`: SCRAM client authentication; server logins with the keys the
    /// client's proof reveals (SCRAM passthrough).
    Scram(Secret),
}

/// Reads and parses `path`. Errors name the line (never a secret).
pub fn read(path: &Path) -> Result<BTreeMap<String, AuthSecret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
    parse(&text).map_err(|(line, m)| format!("{} line {line}: {m}", path.display()))
}

/// Parses the file's text; an error is (line number, message).
pub fn parse(text: &str) -> Result<BTreeMap<String, AuthSecret>, (usize, String)> {
    let mut users = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let (name, rest) = quoted(trimmed).ok_or((
            n,
            "expected \"user\" \"secret\" (two double-quoted fields)".to_string(),
        ))?;
        let (secret, _) = quoted(rest.trim_start()).ok_or((
            n,
            "expected a double-quoted secret after the user name".to_string(),
        ))?;
        if name.is_empty() {
            return Err((n, "empty user name".into()));
        }
        let secret = classify(secret).map_err(|m| (n, m))?;
        users.insert(name, secret);
    }
    Ok(users)
}

/// One `"…"` field at the start of `s`: its value and the rest of `s`.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut value = String::new();
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < s.len() {
        let c = s[i..].chars().next()?;
        if c == '"' {
            if bytes.get(i + 1) == Some(&b'"') {
                value.push('"');
                i += 2;
                continue;
            }
            return Some((value, &s[i + 1..]));
        }
        value.push(c);
        i += c.len_utf8();
    }
    None // no closing quote
}

/// Classifies a stored secret as the auth file and `auth_query` read it: `md5` + 32 hex
/// digits, a well-formed `SCRAM-SHA-256$…` verifier, else a plain password. The error
/// (a malformed SCRAM verifier) never contains the secret.
pub fn classify(secret: String) -> Result<AuthSecret, String> {
    if let Some(hex) = secret.strip_prefix("md5") {
        if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(AuthSecret::Md5(Secret::new(secret)));
        }
    }
    if let Some(rest) = secret.strip_prefix("SCRAM-SHA-256$") {
        let well_formed = rest.split_once('$').is_some_and(|(iter_salt, keys)| {
            iter_salt
                .split_once(':')
                .is_some_and(|(i, s)| i.parse::<u32>().is_ok_and(|i| i > 0) && !s.is_empty())
                && keys
                    .split_once(':')
                    .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        });
        if !well_formed {
            return Err(
                "malformed SCRAM secret (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
                    .into(),
            );
        }
        return Ok(AuthSecret::Scram(Secret::new(secret)));
    }
    Ok(AuthSecret::Password(Secret::new(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVka2V5c3RvcmVka2V5c3RvcmVka2V5c3Q=:c2VydmVya2V5c2VydmVya2V5c2VydmVya2V5c2U=";

    #[test]
    fn all_three_kinds_comments_and_escapes() {
        let text = format!(
            "; PgBouncer userlist\n\n\"plain\" \"pa\"\"ss word\"\n\
             \"hashed\" \"md5{}\" trailing ignored\n# comment\n  \"scram\" \"{SCRAM}\"\n\"qu\"\"ote\" \"x\"\n",
            "0123456789abcdef0123456789abcdef"
        );
        let u = parse(&text).unwrap();
        assert_eq!(u.len(), 4);
        match &u["plain"] {
            AuthSecret::Password(p) => assert_eq!(p.expose(), "pa\"ss word"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&u["hashed"], AuthSecret::Md5(h) if h.expose().len() == 35));
        assert!(matches!(&u["scram"], AuthSecret::Scram(s) if s.expose() == SCRAM));
        assert!(u.contains_key("qu\"ote"));
        // "md5" followed by something else is a plain password.
        let u = parse("\"u\" \"md5notahash\"").unwrap();
        assert!(matches!(&u["u"], AuthSecret::Password(_)));
    }

    #[test]
    fn errors_name_the_line_and_never_the_secret() {
        let (line, m) = parse("\"a\" \"b\"\nnot quoted\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(m.contains("double-quoted"), "{m}");
        let (line, _) = parse("\"a\" \"unterminated\n").unwrap_err();
        assert_eq!(line, 1);
        let (line, _) = parse("\"a\"\n").unwrap_err();
        assert_eq!(line, 1);
        let (line, m) = parse("\"\" \"x\"").unwrap_err();
        assert_eq!((line, m.as_str()), (1, "empty user name"));
        let (_, m) = parse("\"a\" \"SCRAM-SHA-256$abc:s3cr3t$x\"").unwrap_err();
        assert!(
            m.contains("malformed SCRAM") && !m.contains("s3cr3t"),
            "{m}"
        );
    }
}
