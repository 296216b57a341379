//! TOML file parsing with a line number for every error.
//!
//! The file is parsed with `toml_edit` (the parser behind the `toml` crate),
//! whose document keeps the byte span of every key and value. It is converted
//! into a small span-carrying tree ([`Node`]) that is then walked by hand, so
//! every unknown key and every bad value is reported with its full dotted key
//! path and 1-based line. (`toml::Spanned<T>` cannot be used for this: implicit
//! tables such as `databases` in `[databases.app]` have no span, and
//! deserializing them as `Spanned` fails.)

use std::{ops::Range, path::Path};

use crate::{
    pgurl,
    scalar::{parse_read_routing, parse_usize, Raw, Scalars, Sourced, ADMIN_KEYS, SCALAR_KEYS},
    ConfigError, DbLayer, FileLayer, Origin, ReadRouting, Secret, UserLayer,
};

/// (key, key span, value).
type Table = Vec<(String, Range<usize>, Node)>;

#[derive(Debug)]
enum Val {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Table),
}

/// A value with its byte span in the source (falls back to the key's or the
/// enclosing item's span when the value itself has none, e.g. implicit tables).
#[derive(Debug)]
struct Node {
    span: Range<usize>,
    val: Val,
}

impl Node {
    fn span(&self) -> Range<usize> {
        self.span.clone()
    }
    fn get_ref(&self) -> &Val {
        &self.val
    }
}

impl Val {
    /// The value as a [`Raw`]; an array is a type error here (see [`Val::raw_items`]).
    fn raw(&self) -> Raw<'_> {
        match self {
            Val::Str(s) => Raw::Str(s),
            Val::Int(i) => Raw::Int(*i),
            Val::Bool(b) => Raw::Bool(*b),
            other => Raw::Other(describe(other)),
        }
    }

    /// For an array, its items as [`Raw`]s (to be passed as [`Raw::Array`]); `None` otherwise.
    fn raw_items(&self) -> Option<Vec<Raw<'_>>> {
        match self {
            Val::Array(items) => Some(items.iter().map(|n| n.get_ref().raw()).collect()),
            _ => None,
        }
    }
}

fn convert_value(v: &toml_edit::Value, fallback: Range<usize>) -> Node {
    use toml_edit::Value as V;
    let span = v.span().unwrap_or_else(|| fallback.clone());
    let val = match v {
        V::String(s) => Val::Str(s.value().clone()),
        V::Integer(i) => Val::Int(*i.value()),
        V::Float(_) => Val::Float,
        V::Boolean(b) => Val::Bool(*b.value()),
        V::Datetime(_) => Val::Datetime,
        V::Array(a) => Val::Array(
            a.iter()
                .map(|item| convert_value(item, span.clone()))
                .collect(),
        ),
        V::InlineTable(t) => {
            let mut out = Vec::new();
            for (k, item) in t.iter() {
                let key_span = t
                    .get_key_value(k)
                    .and_then(|(key, _)| key.span())
                    .unwrap_or_else(|| span.clone());
                out.push((
                    k.to_string(),
                    key_span.clone(),
                    convert_value(item, key_span),
                ));
            }
            Val::Table(out)
        }
    };
    Node { span, val }
}

fn convert_table(t: &toml_edit::Table, fallback: Range<usize>) -> Node {
    let span = t.span().unwrap_or(fallback);
    Node {
        val: Val::Table(table_entries(t, &span)),
        span,
    }
}

fn table_entries(t: &toml_edit::Table, span: &Range<usize>) -> Table {
    let mut out = Vec::new();
    for (k, item) in t.iter() {
        let key_span = t
            .get_key_value(k)
            .and_then(|(key, _)| key.span())
            .unwrap_or_else(|| span.clone());
        out.push((
            k.to_string(),
            key_span.clone(),
            convert_item(item, key_span),
        ));
    }
    out
}

fn convert_item(item: &toml_edit::Item, fallback: Range<usize>) -> Node {
    use toml_edit::Item;
    match item {
        Item::Value(v) => convert_value(v, fallback),
        Item::Table(t) => convert_table(t, fallback),
        Item::ArrayOfTables(a) => {
            let span = a.span().unwrap_or(fallback);
            Node {
                val: Val::Array(a.iter().map(|t| convert_table(t, span.clone())).collect()),
                span,
            }
        }
        Item::None => Node {
            span: fallback,
            val: Val::Table(Vec::new()),
        },
    }
}

struct Ctx<'a> {
    src: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn origin(&self, span: Range<usize>) -> Origin {
        let start = span.start.min(self.src.len());
        let line = self.src.as_bytes()[..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Origin::File {
            path: self.path.to_path_buf(),
            line: Some(line),
        }
    }

    fn err(&self, key: &str, span: Range<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(key, self.origin(span), msg)
    }

    fn table<'v>(&self, key: &str, v: &'v Node) -> Result<&'v Table, ConfigError> {
        match v.get_ref() {
            Val::Table(t) => Ok(t),
            other => Err(self.err(
                key,
                v.span(),
                format!("expected a table, got {}", describe(other)),
            )),
        }
    }

    fn string<'v>(&self, key: &str, v: &'v Node) -> Result<&'v str, ConfigError> {
        match v.get_ref() {
            Val::Str(s) => Ok(s),
            other => Err(self.err(
                key,
                v.span(),
                format!("expected a string, got {}", describe(other)),
            )),
        }
    }

    fn usize(&self, key: &str, v: &Node) -> Result<Sourced<usize>, ConfigError> {
        let n = parse_usize(v.get_ref().raw()).map_err(|m| self.err(key, v.span(), m))?;
        Ok(Sourced::new(n, key, self.origin(v.span())))
    }

    fn read_routing(&self, key: &str, v: &Node) -> Result<ReadRouting, ConfigError> {
        parse_read_routing(v.get_ref().raw()).map_err(|m| self.err(key, v.span(), m))
    }

    fn url(
        &self,
        key: &str,
        v: &Node,
        db_name: &str,
    ) -> Result<Sourced<pgurl::ParsedUrl>, ConfigError> {
        let s = self.string(key, v)?;
        let parsed = pgurl::parse(s, Some(db_name)).map_err(|m| self.err(key, v.span(), m))?;
        Ok(Sourced::new(parsed, key, self.origin(v.span())))
    }
}

fn describe(v: &Val) -> &'static str {
    match v {
        Val::Datetime => "a datetime",
        Val::Str(_) => "a string",
        Val::Int(_) => "an integer",
        Val::Float => "a float",
        Val::Bool(_) => "a boolean",
        Val::Array(_) => "an array",
        Val::Table(_) => "a table",
    }
}

/// Parse the file text: scalar keys go into `scalars`, databases/users are returned.
pub(crate) fn parse(
    src: &str,
    path: &Path,
    scalars: &mut Scalars,
) -> Result<FileLayer, ConfigError> {
    let ctx = Ctx { src, path };
    let doc = toml_edit::ImDocument::parse(src).map_err(|e| {
        let origin = match e.span() {
            Some(span) => ctx.origin(span),
            None => Origin::File {
                path: path.to_path_buf(),
                line: None,
            },
        };
        ConfigError::new(
            "config",
            origin,
            format!("invalid TOML: {}", e.message().trim()),
        )
    })?;
    let root = table_entries(doc.as_table(), &(0..0));

    let mut layer = FileLayer::default();
    for (k, ks, v) in &root {
        let key = k.as_str();
        match key {
            "databases" => {
                for (name, _, db) in ctx.table(key, v)? {
                    let name_str = name;
                    let db_key = format!("databases.{name_str}");
                    if name_str.is_empty() {
                        return Err(ctx.err(&db_key, db.span(), "database name is empty"));
                    }
                    let db_layer = parse_db(&ctx, &db_key, name_str, db.span(), db)?;
                    layer.databases.insert(name_str.clone(), db_layer);
                }
            }
            "users" => {
                for (name, _, user) in ctx.table(key, v)? {
                    let name_str = name;
                    let user_key = format!("users.{name_str}");
                    if name_str.is_empty() {
                        return Err(ctx.err(&user_key, user.span(), "user name is empty"));
                    }
                    let u = parse_user(&ctx, &user_key, user)?;
                    layer.users.insert(name_str.clone(), u);
                }
            }
            "admin" => {
                for (k, ks, v) in ctx.table(key, v)? {
                    let full = format!("admin.{k}");
                    if !ADMIN_KEYS.contains(&full.as_str()) {
                        return Err(ctx.err(
                            &full,
                            ks.clone(),
                            format!("unknown key (expected one of: {})", ADMIN_KEYS.join(", ")),
                        ));
                    }
                    scalars.set(&full, v.get_ref().raw(), ctx.origin(v.span()))?;
                }
            }
            k if SCALAR_KEYS.contains(&k) => {
                let items = v.get_ref().raw_items();
                let raw = match &items {
                    Some(items) => Raw::Array(items),
                    None => v.get_ref().raw(),
                };
                scalars.set(key, raw, ctx.origin(v.span()))?;
            }
            _ => {
                return Err(ctx.err(
                    key,
                    ks.clone(),
                    format!(
                        "unknown key (expected one of: {}, admin, databases, users)",
                        SCALAR_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(layer)
}

fn parse_db(
    ctx: &Ctx<'_>,
    db_key: &str,
    name: &str,
    name_span: Range<usize>,
    v: &Node,
) -> Result<DbLayer, ConfigError> {
    let mut primary = None;
    let mut replicas = Vec::new();
    let mut pool_size = None;
    let mut read_routing = None;
    for (k, ks, v) in ctx.table(db_key, v)? {
        let key = format!("{db_key}.{}", k);
        match k.as_str() {
            "url" => primary = Some(ctx.url(&key, v, name)?),
            "replicas" => {
                let Val::Array(items) = v.get_ref() else {
                    return Err(ctx.err(
                        &key,
                        v.span(),
                        format!("expected an array of URLs, got {}", describe(v.get_ref())),
                    ));
                };
                for (i, item) in items.iter().enumerate() {
                    replicas.push(ctx.url(&format!("{key}[{i}]"), item, name)?);
                }
            }
            "pool_size" => pool_size = Some(ctx.usize(&key, v)?),
            "read_routing" => read_routing = Some(ctx.read_routing(&key, v)?),
            _ => {
                return Err(ctx.err(
                    &key,
                    ks.clone(),
                    "unknown key (expected one of: url, replicas, pool_size, read_routing)",
                ))
            }
        }
    }
    let Some(primary) = primary else {
        return Err(ctx.err(
            &format!("{db_key}.url"),
            name_span,
            "missing required key `url` (the primary server's postgres:// URL)",
        ));
    };
    Ok(DbLayer {
        primary,
        replicas,
        pool_size,
        read_routing,
    })
}

fn parse_user(ctx: &Ctx<'_>, user_key: &str, v: &Node) -> Result<UserLayer, ConfigError> {
    let mut u = UserLayer {
        password: None,
        pool_size: None,
        read_routing: None,
    };
    for (k, ks, v) in ctx.table(user_key, v)? {
        let key = format!("{user_key}.{}", k);
        match k.as_str() {
            "password" => {
                // The value itself is never echoed in messages.
                let Val::Str(s) = v.get_ref() else {
                    return Err(ctx.err(
                        &key,
                        v.span(),
                        format!("expected a string, got {}", describe(v.get_ref())),
                    ));
                };
                u.password = Some(Sourced::new(
                    Secret::new(s.clone()),
                    &key,
                    ctx.origin(v.span()),
                ));
            }
            "pool_size" => u.pool_size = Some(ctx.usize(&key, v)?),
            "read_routing" => u.read_routing = Some(ctx.read_routing(&key, v)?),
            _ => {
                return Err(ctx.err(
                    &key,
                    ks.clone(),
                    "unknown key (expected one of: password, pool_size, read_routing)",
                ))
            }
        }
    }
    Ok(u)
}
