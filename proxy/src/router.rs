//! Read/write classification of SQL text for read routing.
//!
//! pgmux sends provably read-only work to replicas. When a transaction needs a server, the
//! session asks [`Router::classify`] about the text that opens it (a simple Query, or the
//! text of a Parse) and gets a [`Decision`]: an optional query [`Hint`] from a leading
//! comment, and a [`Class`]. This module only decides; it does no I/O and knows nothing of
//! pools, transactions in progress or hint precedence (the caller owns all of that).
//!
//! A statement may go to a replica only when it is *provably* read-only; anything unsure is
//! [`Class::Primary`]. `classify` works in four steps, cheapest first:
//!
//! 1. **Leading trivia.** Whitespace and comments (`--` lines and nested `/* */` blocks, as
//!    PostgreSQL's lexer has them) are skipped; a comment that reads exactly `pgmux:primary`
//!    or `pgmux:replica` (ASCII case-insensitive, surrounding whitespace allowed) becomes
//!    the hint. The hint never changes the class.
//! 2. **Pre-filter.** After trivia and opening parentheses, the first keyword decides most
//!    writes without parsing: only `SELECT`, `WITH`, `VALUES`, `TABLE`, `SHOW`, `EXPLAIN`,
//!    `BEGIN` and `START` can begin a replica-safe text, everything else is primary with a
//!    reason taken from the keyword (the `KEYWORDS` table). pgbench's `UPDATE` costs tens of
//!    nanoseconds instead of a parse.
//! 3. **Cache.** The class of a text that needs the parser is remembered, keyed by the text
//!    after its leading comments (so per-request comment tags share an entry). It is a
//!    sharded map bounded by entry count and total bytes, cleared wholesale when full:
//!    repeated texts (ORM queries, extended-protocol Parse texts) are parsed once, and a
//!    workload of ever-new texts just parses, as without a cache. Texts over
//!    [`MAX_CACHED_TEXT`] are classified but not kept.
//! 4. **Parse and walk.** `pg_query` runs PostgreSQL's own grammar (raw parse only, no
//!    catalog), and the tree of each statement is walked by a *whitelist*: every node kind a
//!    read may contain is listed with all its fields (structs are destructured without
//!    `..`, so a `pg_query` upgrade that adds a field fails to compile here instead of
//!    hiding a function call), and any other node kind makes the statement
//!    [`WhyPrimary::Other`]. On the way the walk rejects row locks (`FOR UPDATE/SHARE/…`
//!    at any depth), data-modifying statements in `WITH`, `SELECT … INTO`, and calls to the
//!    write-function list anywhere — arguments, subqueries, CTEs, `FROM`, windows, `ORDER
//!    BY`, `LIMIT`, `VALUES` lists.
//!
//! What it cannot see: a user-defined function that writes (name it in the configured
//! extra list), an operator or cast implemented by such a function, a view or a table
//! that does not exist on replicas. Trees deeper than the protobuf decoder's recursion
//! limit (about 100 levels, e.g. `1+1+…` with 50 terms) fail to decode and count as
//! unparseable, so they stay on the primary.
//!
//! **Stack.** Decoding that tree recurses once per level, so the recursion limit also
//! bounds the stack `classify` can use: measured under 200 KiB in release builds, but about
//! 2.5 MiB in debug builds, whose decoder frames are much larger. Tokio's default 2 MiB
//! worker stack is therefore enough in release builds only; threads that classify in any
//! build should have [`CLASSIFY_STACK_BYTES`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use pg_query::protobuf as pb;
use pg_query::{Node, NodeEnum};

/// Functions whose call makes a read unsafe on a replica: they write, take locks, read
/// per-primary-session state, or fail in recovery. Lowercase, unqualified. Any function
/// whose name starts with `pg_stat_reset` counts too.
pub const DEFAULT_WRITE_FUNCTIONS: &[&str] = &[
    // Sequences: nextval/setval write; currval/lastval read state of the session that called
    // nextval, which lives on the primary.
    "nextval",
    "setval",
    "currval",
    "lastval",
    // Advisory locks exist per server: one taken on a replica excludes nobody on the primary.
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    // Transaction ids: assigning one fails in recovery.
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    // Session settings: would apply to a replica session the client never sees again.
    "set_config",
    // NOTIFY through a function: not allowed in recovery.
    "pg_notify",
    // WAL positions and control: fail during recovery.
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_switch_wal",
    "pg_create_restore_point",
    // Large objects: creating, importing, writing or removing one writes.
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lo_open",
    "lo_write",
    "lo_truncate",
    "lo_truncate64",
    // dblink_exec runs arbitrary commands, usually writes.
    "dblink_exec",
    // Server administration: acts on the server it runs on, which must be the primary.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    // Statistics resets (the whole pg_stat_reset* family, matched by prefix).
    "pg_stat_reset",
];

/// Every name starting with this is a write function (`pg_stat_reset_shared`, …).
const WRITE_FUNCTION_PREFIX: &str = "pg_stat_reset";

/// Stack a thread calling [`Router::classify`] needs in any build, with margin over the
/// measured worst case (about 2.5 MiB in debug builds, under 200 KiB in release builds).
pub const CLASSIFY_STACK_BYTES: usize = 4 << 20;

/// Texts longer than this are classified but not cached.
pub const MAX_CACHED_TEXT: usize = 64 * 1024;
/// The cache is cleared when it would hold more entries than this…
const CACHE_MAX_ENTRIES: usize = 4096;
/// …or more text bytes than this.
const CACHE_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Where a query hint in a leading comment asks to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// Why a statement must run on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhyPrimary {
    /// INSERT/UPDATE/DELETE/MERGE, DDL, COPY, SELECT INTO, a data-modifying CTE, …
    Write,
    /// `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE` or `FOR KEY SHARE` somewhere.
    LockingRead,
    /// A call to a function of the write list.
    WritingFunction,
    /// A parse error, or no statement at all.
    Unparseable,
    /// BEGIN without READ ONLY, COMMIT, ROLLBACK, SAVEPOINT, …
    TransactionControl,
    /// Anything else not provably read-only (SET, LISTEN, unknown node kinds, …).
    Other,
}

impl WhyPrimary {
    /// Stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WhyPrimary::Write => "write",
            WhyPrimary::LockingRead => "locking_read",
            WhyPrimary::WritingFunction => "writing_function",
            WhyPrimary::Unparseable => "unparseable",
            WhyPrimary::TransactionControl => "transaction_control",
            WhyPrimary::Other => "other",
        }
    }
}

/// What the text allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Every statement in the text is a plain read: may run on a replica in autocommit.
    Read,
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY` (alone, or followed by reads in the
    /// same text): the transaction it opens may run on a replica.
    BeginReadOnly,
    /// Must run on the primary.
    Primary(WhyPrimary),
}

impl Class {
    /// Read or BeginReadOnly.
    pub fn replica_ok(self) -> bool {
        matches!(self, Class::Read | Class::BeginReadOnly)
    }
}

/// The answer for one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub hint: Option<Hint>,
    pub class: Class,
}

/// The classifier: write-function list plus a bounded cache. `Send + Sync`, meant to be
/// shared in an `Arc`.
pub struct Router {
    write_functions: HashSet<Box<str>>,
    cache: DashMap<Box<str>, Class>,
    /// Approximate (updated without a lock around the map) entry and byte counts.
    cached_entries: AtomicUsize,
    cached_bytes: AtomicUsize,
}

impl Default for Router {
    fn default() -> Router {
        Router::new(&[])
    }
}

impl Router {
    /// A router whose write list is [`DEFAULT_WRITE_FUNCTIONS`] plus `extra_write_functions`
    /// (compared lowercase and unqualified: `App.Bump` means any function named `bump`).
    pub fn new(extra_write_functions: &[String]) -> Router {
        let extra = extra_write_functions.iter().filter_map(|name| {
            let name = name.trim();
            let name = name.rsplit('.').next().unwrap_or(name).trim();
            (!name.is_empty()).then(|| name.to_lowercase())
        });
        let write_functions = DEFAULT_WRITE_FUNCTIONS
            .iter()
            .map(|s| (*s).to_owned())
            .chain(extra)
            .map(String::into_boxed_str)
            .collect();
        Router {
            write_functions,
            cache: DashMap::new(),
            cached_entries: AtomicUsize::new(0),
            cached_bytes: AtomicUsize::new(0),
        }
    }

    /// Classifies `sql` (one simple-query text or one Parse text).
    pub fn classify(&self, sql: &str) -> Decision {
        let (hint, start) = leading_trivia(sql.as_bytes());
        let class = match start {
            None => Class::Primary(WhyPrimary::Unparseable),
            Some(start) => match prefilter(sql.as_bytes(), start) {
                Some(why) => Class::Primary(why),
                None => self.classify_parsed(&sql[start..]),
            },
        };
        Decision { hint, class }
    }

    /// Number of texts in the cache (approximate under concurrency).
    pub fn cache_len(&self) -> usize {
        self.cached_entries.load(Ordering::Relaxed)
    }

    /// Whether `name` (one unqualified function name) is on the write list.
    pub fn is_write_function(&self, name: &str) -> bool {
        let name: Cow<str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        name.starts_with(WRITE_FUNCTION_PREFIX) || self.write_functions.contains(&*name)
    }

    /// Cache, then parser. `text` starts at the first token (leading comments stripped).
    fn classify_parsed(&self, text: &str) -> Class {
        if let Some(class) = self.cache.get(text) {
            return *class;
        }
        let class = match pg_query::parse(text, pg_query::ParserOptions::DEFAULT) {
            Ok(parsed) => self.classify_statements(text, &parsed.protobuf.stmts),
            Err(_) => Class::Primary(WhyPrimary::Unparseable),
        };
        self.remember(text, class);
        class
    }

    fn remember(&self, text: &str, class: Class) {
        if text.len() > MAX_CACHED_TEXT {
            return;
        }
        let entries = self.cached_entries.load(Ordering::Relaxed);
        let bytes = self.cached_bytes.load(Ordering::Relaxed);
        if entries >= CACHE_MAX_ENTRIES || bytes + text.len() > CACHE_MAX_BYTES {
            // Arbitrary eviction: all of it. Hot texts come back after one parse each.
            self.cache.clear();
            self.cached_entries.store(0, Ordering::Relaxed);
            self.cached_bytes.store(0, Ordering::Relaxed);
        }
        if self.cache.insert(text.into(), class).is_none() {
            self.cached_entries.fetch_add(1, Ordering::Relaxed);
            self.cached_bytes.fetch_add(text.len(), Ordering::Relaxed);
        }
    }

    /// All statements must be reads, except that the first may be `BEGIN READ ONLY`.
    fn classify_statements(&self, text: &str, stmts: &[pb::RawStmt]) -> Class {
        if stmts.is_empty() {
            return Class::Primary(WhyPrimary::Unparseable);
        }
        let mut class = Class::Read;
        for (i, raw) in stmts.iter().enumerate() {
            let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
                return Class::Primary(WhyPrimary::Unparseable);
            };
            // A read-only transaction sent whole may end in the same text.
            if class == Class::BeginReadOnly && i + 1 == stmts.len() {
                if let NodeEnum::TransactionStmt(t) = node {
                    if ends_transaction(t) {
                        break;
                    }
                }
            }
            match self.statement(node, statement_text(text, raw)) {
                Ok(Stmt::Read) => {}
                Ok(Stmt::BeginReadOnly) if i == 0 => class = Class::BeginReadOnly,
                Ok(Stmt::BeginReadOnly) => return Class::Primary(WhyPrimary::TransactionControl),
                Err(why) => return Class::Primary(why),
            }
        }
        class
    }

    /// One top-level statement.
    fn statement(&self, node: &NodeEnum, text: &str) -> Result<Stmt, WhyPrimary> {
        let functions = WriteFunctions(self);
        match node {
            NodeEnum::SelectStmt(s) => functions.select(s).map(|()| Stmt::Read),
            NodeEnum::VariableShowStmt(_) => Ok(Stmt::Read),
            NodeEnum::ExplainStmt(e) => self.explain(e, text),
            NodeEnum::TransactionStmt(t) if begin_read_only(t) => Ok(Stmt::BeginReadOnly),
            NodeEnum::TransactionStmt(_) => Err(WhyPrimary::TransactionControl),
            NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_)
            | NodeEnum::CreateTableAsStmt(_) => Err(WhyPrimary::Write),
            // Anything else in a multi-statement text: the keyword says why.
            _ => Err(prefilter(text.as_bytes(), 0).unwrap_or(WhyPrimary::Other)),
        }
    }

    /// EXPLAIN plans without running, so it is a read whatever it explains, unless ANALYZE
    /// (or an option value we cannot read as false) makes it run the statement.
    fn explain(&self, e: &pb::ExplainStmt, text: &str) -> Result<Stmt, WhyPrimary> {
        let pb::ExplainStmt { query, options } = e;
        let inner = query.as_deref().and_then(|n| n.node.as_ref());
        let Some(inner) = inner else {
            return Err(WhyPrimary::Unparseable);
        };
        // EXECUTE names a prepared statement of one server session (and pgmux renames
        // protocol-level ones), so EXPLAIN EXECUTE stays where that session is.
        if matches!(inner, NodeEnum::ExecuteStmt(_)) {
            return Err(WhyPrimary::Other);
        }
        let analyze = options.iter().any(|o| match &o.node {
            Some(NodeEnum::DefElem(d)) if is_analyze(&d.defname) => {
                def_bool(d.arg.as_deref()) != Some(false)
            }
            Some(NodeEnum::DefElem(_)) => false,
            _ => true,
        });
        if !analyze {
            return Ok(Stmt::Read);
        }
        // EXPLAIN ANALYZE runs the statement: report why that statement writes, if it does;
        // a read under ANALYZE still stays on the primary (diagnostics belong there).
        match self.statement(inner, text) {
            Ok(_) => Err(WhyPrimary::Other),
            Err(why) => Err(why),
        }
    }
}

/// A top-level statement that may run on a replica.
enum Stmt {
    Read,
    BeginReadOnly,
}

/// The text of one statement of a multi-statement string (for keyword reasons).
fn statement_text<'a>(text: &'a str, raw: &pb::RawStmt) -> &'a str {
    let start = usize::try_from(raw.stmt_location).unwrap_or(0);
    let end = match usize::try_from(raw.stmt_len) {
        Ok(0) | Err(_) => text.len(),
        Ok(len) => start.saturating_add(len).min(text.len()),
    };
    text.get(start..end).unwrap_or("")
}

fn is_analyze(option: &str) -> bool {
    option.eq_ignore_ascii_case("analyze") || option.eq_ignore_ascii_case("analyse")
}

/// `BEGIN`/`START TRANSACTION` whose transaction_read_only options are all true (and
/// there is one). Later options win in PostgreSQL; requiring all of them true is simpler
/// and never wrong in the unsafe direction.
/// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (not `… AND CHAIN`, which opens a new one).
fn ends_transaction(t: &pb::TransactionStmt) -> bool {
    matches!(
        t.kind(),
        pb::TransactionStmtKind::TransStmtCommit | pb::TransactionStmtKind::TransStmtRollback
    ) && !t.chain
}

fn begin_read_only(t: &pb::TransactionStmt) -> bool {
    if !matches!(
        t.kind(),
        pb::TransactionStmtKind::TransStmtBegin | pb::TransactionStmtKind::TransStmtStart
    ) {
        return false;
    }
    let mut read_only = false;
    for option in &t.options {
        let Some(NodeEnum::DefElem(d)) = &option.node else {
            return false;
        };
        if d.defname == "transaction_read_only" {
            if def_bool(d.arg.as_deref()) != Some(true) {
                return false;
            }
            read_only = true;
        }
    }
    read_only
}

/// The boolean value of a DefElem argument as PostgreSQL's `defGetBoolean` reads it:
/// absent means true; `None` when it is not a boolean we recognise.
fn def_bool(arg: Option<&Node>) -> Option<bool> {
    let Some(arg) = arg else {
        return Some(true);
    };
    let int = |i: i32| match i {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    };
    let string = |s: &str| {
        if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("on") {
            Some(true)
        } else if s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("off") {
            Some(false)
        } else {
            None
        }
    };
    match arg.node.as_ref()? {
        NodeEnum::Boolean(b) => Some(b.boolval),
        NodeEnum::Integer(i) => int(i.ival),
        NodeEnum::String(s) => string(&s.sval),
        NodeEnum::AConst(c) => match c.val.as_ref()? {
            pb::a_const::Val::Boolval(b) => Some(b.boolval),
            pb::a_const::Val::Ival(i) => int(i.ival),
            pb::a_const::Val::Sval(s) => string(&s.sval),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// The tree walk.
// ---------------------------------------------------------------------------------------

/// `Ok` = nothing found that forbids a replica.
type Walk = Result<(), WhyPrimary>;

/// The whitelist walk over a SELECT's tree, checking calls against the router's list.
struct WriteFunctions<'r>(&'r Router);

impl WriteFunctions<'_> {
    fn node(&self, n: &Node) -> Walk {
        match &n.node {
            Some(e) => self.visit(e),
            None => Ok(()),
        }
    }

    fn nodes(&self, ns: &[Node]) -> Walk {
        ns.iter().try_for_each(|n| self.node(n))
    }

    fn opt(&self, n: &Option<Box<Node>>) -> Walk {
        n.as_deref().map_or(Ok(()), |n| self.node(n))
    }

    fn select(&self, s: &pb::SelectStmt) -> Walk {
        let pb::SelectStmt {
            distinct_clause,
            into_clause,
            target_list,
            from_clause,
            where_clause,
            group_clause,
            group_distinct: _,
            having_clause,
            window_clause,
            values_lists,
            sort_clause,
            limit_offset,
            limit_count,
            limit_option: _,
            locking_clause,
            with_clause,
            op: _,
            all: _,
            larg,
            rarg,
        } = s;
        if into_clause.is_some() {
            return Err(WhyPrimary::Write);
        }
        if !locking_clause.is_empty() {
            return Err(WhyPrimary::LockingRead);
        }
        if let Some(w) = with_clause {
            self.with(w)?;
        }
        self.nodes(distinct_clause)?;
        self.nodes(target_list)?;
        self.nodes(from_clause)?;
        self.opt(where_clause)?;
        self.nodes(group_clause)?;
        self.opt(having_clause)?;
        self.nodes(window_clause)?;
        self.nodes(values_lists)?;
        self.nodes(sort_clause)?;
        self.opt(limit_offset)?;
        self.opt(limit_count)?;
        if let Some(l) = larg {
            self.select(l)?;
        }
        if let Some(r) = rarg {
            self.select(r)?;
        }
        Ok(())
    }

    fn with(&self, w: &pb::WithClause) -> Walk {
        let pb::WithClause {
            ctes,
            recursive: _,
            location: _,
        } = w;
        self.nodes(ctes)
    }

    fn func_call(&self, f: &pb::FuncCall) -> Walk {
        let pb::FuncCall {
            funcname,
            args,
            agg_order,
            agg_filter,
            over,
            agg_within_group: _,
            agg_star: _,
            agg_distinct: _,
            func_variadic: _,
            funcformat: _,
            location: _,
        } = f;
        // The unqualified name is the last part: `pg_catalog.nextval` is `nextval`.
        match funcname.last().and_then(|n| n.node.as_ref()) {
            Some(NodeEnum::String(name)) if self.0.is_write_function(&name.sval) => {
                return Err(WhyPrimary::WritingFunction)
            }
            Some(NodeEnum::String(_)) => {}
            _ => return Err(WhyPrimary::Other),
        }
        self.nodes(args)?;
        self.nodes(agg_order)?;
        self.opt(agg_filter)?;
        if let Some(w) = over {
            self.window(w)?;
        }
        Ok(())
    }

    fn window(&self, w: &pb::WindowDef) -> Walk {
        let pb::WindowDef {
            name: _,
            refname: _,
            partition_clause,
            order_clause,
            frame_options: _,
            start_offset,
            end_offset,
            location: _,
        } = w;
        self.nodes(partition_clause)?;
        self.nodes(order_clause)?;
        self.opt(start_offset)?;
        self.opt(end_offset)
    }

    fn type_name(&self, t: Option<&pb::TypeName>) -> Walk {
        let Some(pb::TypeName {
            names: _,
            type_oid: _,
            setof: _,
            pct_type: _,
            typmods,
            typemod: _,
            array_bounds,
            location: _,
        }) = t
        else {
            return Ok(());
        };
        self.nodes(typmods)?;
        self.nodes(array_bounds)
    }

    fn cte(&self, c: &pb::CommonTableExpr) -> Walk {
        let pb::CommonTableExpr {
            ctename: _,
            aliascolnames: _,
            ctematerialized: _,
            ctequery,
            search_clause: _,
            cycle_clause,
            location: _,
            cterecursive: _,
            cterefcount: _,
            ctecolnames: _,
            ctecoltypes: _,
            ctecoltypmods: _,
            ctecolcollations: _,
        } = c;
        // A data-modifying CTE shows up here as an Insert/Update/Delete/Merge node.
        self.opt(ctequery)?;
        if let Some(cycle) = cycle_clause {
            let pb::CteCycleClause {
                cycle_col_list: _,
                cycle_mark_column: _,
                cycle_mark_value,
                cycle_mark_default,
                cycle_path_column: _,
                location: _,
                cycle_mark_type: _,
                cycle_mark_typmod: _,
                cycle_mark_collation: _,
                cycle_mark_neop: _,
            } = &**cycle;
            self.opt(cycle_mark_value)?;
            self.opt(cycle_mark_default)?;
        }
        Ok(())
    }

    fn json_value(&self, v: Option<&pb::JsonValueExpr>) -> Walk {
        let Some(v) = v else {
            return Ok(());
        };
        let pb::JsonValueExpr {
            raw_expr,
            formatted_expr,
            format: _,
        } = v;
        self.opt(raw_expr)?;
        self.opt(formatted_expr)
    }

    fn json_output(&self, o: &Option<pb::JsonOutput>) -> Walk {
        let Some(pb::JsonOutput {
            type_name,
            returning: _,
        }) = o
        else {
            return Ok(());
        };
        self.type_name(type_name.as_ref())
    }

    fn json_behavior(&self, b: Option<&pb::JsonBehavior>) -> Walk {
        let Some(b) = b else {
            return Ok(());
        };
        let pb::JsonBehavior {
            btype: _,
            expr,
            coerce: _,
            location: _,
        } = b;
        self.opt(expr)
    }

    fn json_path(&self, p: Option<&pb::JsonTablePathSpec>) -> Walk {
        let Some(p) = p else {
            return Ok(());
        };
        let pb::JsonTablePathSpec {
            string,
            name: _,
            name_location: _,
            location: _,
        } = p;
        self.opt(string)
    }

    fn json_key_value(&self, kv: &pb::JsonKeyValue) -> Walk {
        let pb::JsonKeyValue { key, value } = kv;
        self.opt(key)?;
        self.json_value(value.as_deref())
    }

    fn json_agg(&self, c: &Option<Box<pb::JsonAggConstructor>>) -> Walk {
        let Some(c) = c.as_deref() else {
            return Ok(());
        };
        let pb::JsonAggConstructor {
            output,
            agg_filter,
            agg_order,
            over,
            location: _,
        } = c;
        self.json_output(output)?;
        self.opt(agg_filter)?;
        self.nodes(agg_order)?;
        if let Some(w) = over {
            self.window(w)?;
        }
        Ok(())
    }

    /// Every node kind a read may contain, with all of its child nodes. Anything else is
    /// not provably read-only.
    fn visit(&self, e: &NodeEnum) -> Walk {
        match e {
            // Leaves.
            NodeEnum::String(_)
            | NodeEnum::Integer(_)
            | NodeEnum::Float(_)
            | NodeEnum::Boolean(_)
            | NodeEnum::BitString(_)
            | NodeEnum::AConst(_)
            | NodeEnum::ParamRef(_)
            | NodeEnum::AStar(_)
            | NodeEnum::RangeVar(_)
            | NodeEnum::Alias(_) => Ok(()),

            // What makes a read not one.
            NodeEnum::LockingClause(_) => Err(WhyPrimary::LockingRead),
            NodeEnum::IntoClause(_)
            | NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_) => Err(WhyPrimary::Write),
            NodeEnum::FuncCall(f) => self.func_call(f),

            // Queries and their parts.
            NodeEnum::SelectStmt(s) => self.select(s),
            NodeEnum::CommonTableExpr(c) => self.cte(c),
            NodeEnum::List(pb::List { items }) => self.nodes(items),
            NodeEnum::ResTarget(r) => {
                let pb::ResTarget {
                    name: _,
                    indirection,
                    val,
                    location: _,
                } = &**r;
                self.nodes(indirection)?;
                self.opt(val)
            }
            NodeEnum::ColumnRef(c) => {
                let pb::ColumnRef {
                    fields,
                    location: _,
                } = c;
                self.nodes(fields)
            }
            NodeEnum::SortBy(s) => {
                let pb::SortBy {
                    node,
                    sortby_dir: _,
                    sortby_nulls: _,
                    use_op: _,
                    location: _,
                } = &**s;
                self.opt(node)
            }
            NodeEnum::WindowDef(w) => self.window(w),
            NodeEnum::GroupingSet(g) => {
                let pb::GroupingSet {
                    kind: _,
                    content,
                    location: _,
                } = g;
                self.nodes(content)
            }
            NodeEnum::RangeSubselect(r) => {
                let pb::RangeSubselect {
                    lateral: _,
                    subquery,
                    alias: _,
                } = &**r;
                self.opt(subquery)
            }
            NodeEnum::RangeFunction(r) => {
                let pb::RangeFunction {
                    lateral: _,
                    ordinality: _,
                    is_rowsfrom: _,
                    functions,
                    alias: _,
                    coldeflist,
                } = r;
                self.nodes(functions)?;
                self.nodes(coldeflist)
            }
            NodeEnum::ColumnDef(c) => {
                // Only as a column definition list of a function in FROM.
                let pb::ColumnDef {
                    colname: _,
                    type_name,
                    compression: _,
                    inhcount: _,
                    is_local: _,
                    is_not_null: _,
                    is_from_type: _,
                    storage: _,
                    storage_name: _,
                    raw_default,
                    cooked_default,
                    identity: _,
                    identity_sequence: _,
                    generated: _,
                    coll_clause,
                    coll_oid: _,
                    constraints,
                    fdwoptions,
                    location: _,
                } = &**c;
                if !constraints.is_empty() || !fdwoptions.is_empty() {
                    return Err(WhyPrimary::Other);
                }
                self.type_name(type_name.as_ref())?;
                self.opt(raw_default)?;
                self.opt(cooked_default)?;
                if let Some(c) = coll_clause {
                    self.opt(&c.arg)?;
                }
                Ok(())
            }
            NodeEnum::RangeTableSample(r) => {
                let pb::RangeTableSample {
                    relation,
                    method: _,
                    args,
                    repeatable,
                    location: _,
                } = &**r;
                self.opt(relation)?;
                self.nodes(args)?;
                self.opt(repeatable)
            }
            NodeEnum::RangeTableFunc(r) => {
                let pb::RangeTableFunc {
                    lateral: _,
                    docexpr,
                    rowexpr,
                    namespaces,
                    columns,
                    alias: _,
                    location: _,
                } = &**r;
                self.opt(docexpr)?;
                self.opt(rowexpr)?;
                self.nodes(namespaces)?;
                self.nodes(columns)
            }
            NodeEnum::RangeTableFuncCol(c) => {
                let pb::RangeTableFuncCol {
                    colname: _,
                    type_name,
                    for_ordinality: _,
                    is_not_null: _,
                    colexpr,
                    coldefexpr,
                    location: _,
                } = &**c;
                self.type_name(type_name.as_ref())?;
                self.opt(colexpr)?;
                self.opt(coldefexpr)
            }
            NodeEnum::JoinExpr(j) => {
                let pb::JoinExpr {
                    jointype: _,
                    is_natural: _,
                    larg,
                    rarg,
                    using_clause,
                    join_using_alias: _,
                    quals,
                    alias: _,
                    rtindex: _,
                } = &**j;
                self.opt(larg)?;
                self.opt(rarg)?;
                self.nodes(using_clause)?;
                self.opt(quals)
            }

            // Expressions.
            NodeEnum::AExpr(a) => {
                let pb::AExpr {
                    kind: _,
                    name: _,
                    lexpr,
                    rexpr,
                    rexpr_list_start: _,
                    rexpr_list_end: _,
                    location: _,
                } = &**a;
                self.opt(lexpr)?;
                self.opt(rexpr)
            }
            NodeEnum::BoolExpr(b) => {
                let pb::BoolExpr {
                    xpr,
                    boolop: _,
                    args,
                    location: _,
                } = &**b;
                self.opt(xpr)?;
                self.nodes(args)
            }
            NodeEnum::TypeCast(t) => {
                let pb::TypeCast {
                    arg,
                    type_name,
                    location: _,
                } = &**t;
                self.opt(arg)?;
                self.type_name(type_name.as_ref())
            }
            NodeEnum::TypeName(t) => self.type_name(Some(t)),
            NodeEnum::CollateClause(c) => {
                let pb::CollateClause {
                    arg,
                    collname: _,
                    location: _,
                } = &**c;
                self.opt(arg)
            }
            NodeEnum::NamedArgExpr(n) => {
                let pb::NamedArgExpr {
                    xpr,
                    arg,
                    name: _,
                    argnumber: _,
                    location: _,
                } = &**n;
                self.opt(xpr)?;
                self.opt(arg)
            }
            NodeEnum::SubLink(s) => {
                let pb::SubLink {
                    xpr,
                    sub_link_type: _,
                    sub_link_id: _,
                    testexpr,
                    oper_name: _,
                    subselect,
                    location: _,
                } = &**s;
                self.opt(xpr)?;
                self.opt(testexpr)?;
                self.opt(subselect)
            }
            NodeEnum::CaseExpr(c) => {
                let pb::CaseExpr {
                    xpr,
                    casetype: _,
                    casecollid: _,
                    arg,
                    args,
                    defresult,
                    location: _,
                } = &**c;
                self.opt(xpr)?;
                self.opt(arg)?;
                self.nodes(args)?;
                self.opt(defresult)
            }
            NodeEnum::CaseWhen(w) => {
                let pb::CaseWhen {
                    xpr,
                    expr,
                    result,
                    location: _,
                } = &**w;
                self.opt(xpr)?;
                self.opt(expr)?;
                self.opt(result)
            }
            NodeEnum::CoalesceExpr(c) => {
                let pb::CoalesceExpr {
                    xpr,
                    coalescetype: _,
                    coalescecollid: _,
                    args,
                    location: _,
                } = &**c;
                self.opt(xpr)?;
                self.nodes(args)
            }
            NodeEnum::MinMaxExpr(m) => {
                let pb::MinMaxExpr {
                    xpr,
                    minmaxtype: _,
                    minmaxcollid: _,
                    inputcollid: _,
                    op: _,
                    args,
                    location: _,
                } = &**m;
                self.opt(xpr)?;
                self.nodes(args)
            }
            NodeEnum::NullTest(n) => {
                let pb::NullTest {
                    xpr,
                    arg,
                    nulltesttype: _,
                    argisrow: _,
                    location: _,
                } = &**n;
                self.opt(xpr)?;
                self.opt(arg)
            }
            NodeEnum::BooleanTest(b) => {
                let pb::BooleanTest {
                    xpr,
                    arg,
                    booltesttype: _,
                    location: _,
                } = &**b;
                self.opt(xpr)?;
                self.opt(arg)
            }
            NodeEnum::RowExpr(r) => {
                let pb::RowExpr {
                    xpr,
                    args,
                    row_typeid: _,
                    row_format: _,
                    colnames: _,
                    location: _,
                } = &**r;
                self.opt(xpr)?;
                self.nodes(args)
            }
            NodeEnum::AArrayExpr(a) => {
                let pb::AArrayExpr {
                    elements,
                    list_start: _,
                    list_end: _,
                    location: _,
                } = a;
                self.nodes(elements)
            }
            NodeEnum::AIndirection(a) => {
                let pb::AIndirection { arg, indirection } = &**a;
                self.opt(arg)?;
                self.nodes(indirection)
            }
            NodeEnum::AIndices(a) => {
                let pb::AIndices {
                    is_slice: _,
                    lidx,
                    uidx,
                } = &**a;
                self.opt(lidx)?;
                self.opt(uidx)
            }
            NodeEnum::SqlvalueFunction(s) => {
                let pb::SqlValueFunction {
                    xpr,
                    op: _,
                    r#type: _,
                    typmod: _,
                    location: _,
                } = &**s;
                self.opt(xpr)
            }
            NodeEnum::GroupingFunc(g) => {
                let pb::GroupingFunc {
                    xpr,
                    args,
                    refs,
                    agglevelsup: _,
                    location: _,
                } = &**g;
                self.opt(xpr)?;
                self.nodes(args)?;
                self.nodes(refs)
            }
            NodeEnum::XmlExpr(x) => {
                let pb::XmlExpr {
                    xpr,
                    op: _,
                    name: _,
                    named_args,
                    arg_names: _,
                    args,
                    xmloption: _,
                    indent: _,
                    r#type: _,
                    typmod: _,
                    location: _,
                } = &**x;
                self.opt(xpr)?;
                self.nodes(named_args)?;
                self.nodes(args)
            }
            NodeEnum::XmlSerialize(x) => {
                let pb::XmlSerialize {
                    xmloption: _,
                    expr,
                    type_name,
                    indent: _,
                    location: _,
                } = &**x;
                self.opt(expr)?;
                self.type_name(type_name.as_ref())
            }

            // SQL/JSON constructors and functions.
            NodeEnum::JsonValueExpr(v) => self.json_value(Some(v)),
            NodeEnum::JsonKeyValue(kv) => self.json_key_value(kv),
            NodeEnum::JsonObjectConstructor(c) => {
                let pb::JsonObjectConstructor {
                    exprs,
                    output,
                    absent_on_null: _,
                    unique: _,
                    location: _,
                } = c;
                self.nodes(exprs)?;
                self.json_output(output)
            }
            NodeEnum::JsonArrayConstructor(c) => {
                let pb::JsonArrayConstructor {
                    exprs,
                    output,
                    absent_on_null: _,
                    location: _,
                } = c;
                self.nodes(exprs)?;
                self.json_output(output)
            }
            NodeEnum::JsonArrayQueryConstructor(c) => {
                let pb::JsonArrayQueryConstructor {
                    query,
                    output,
                    format: _,
                    absent_on_null: _,
                    location: _,
                } = &**c;
                self.opt(query)?;
                self.json_output(output)
            }
            NodeEnum::JsonObjectAgg(a) => {
                let pb::JsonObjectAgg {
                    constructor,
                    arg,
                    absent_on_null: _,
                    unique: _,
                } = &**a;
                self.json_agg(constructor)?;
                match arg.as_deref() {
                    Some(kv) => self.json_key_value(kv),
                    None => Ok(()),
                }
            }
            NodeEnum::JsonArrayAgg(a) => {
                let pb::JsonArrayAgg {
                    constructor,
                    arg,
                    absent_on_null: _,
                } = &**a;
                self.json_agg(constructor)?;
                self.json_value(arg.as_deref())
            }
            NodeEnum::JsonIsPredicate(p) => {
                let pb::JsonIsPredicate {
                    expr,
                    format: _,
                    item_type: _,
                    unique_keys: _,
                    location: _,
                } = &**p;
                self.opt(expr)
            }
            NodeEnum::JsonParseExpr(p) => {
                let pb::JsonParseExpr {
                    expr,
                    output,
                    unique_keys: _,
                    location: _,
                } = &**p;
                self.json_value(expr.as_deref())?;
                self.json_output(output)
            }
            NodeEnum::JsonScalarExpr(s) => {
                let pb::JsonScalarExpr {
                    expr,
                    output,
                    location: _,
                } = &**s;
                self.opt(expr)?;
                self.json_output(output)
            }
            NodeEnum::JsonSerializeExpr(s) => {
                let pb::JsonSerializeExpr {
                    expr,
                    output,
                    location: _,
                } = &**s;
                self.json_value(expr.as_deref())?;
                self.json_output(output)
            }
            NodeEnum::JsonFuncExpr(f) => {
                let pb::JsonFuncExpr {
                    op: _,
                    column_name: _,
                    context_item,
                    pathspec,
                    passing,
                    output,
                    on_empty,
                    on_error,
                    wrapper: _,
                    quotes: _,
                    location: _,
                } = &**f;
                self.json_value(context_item.as_deref())?;
                self.opt(pathspec)?;
                self.nodes(passing)?;
                self.json_output(output)?;
                self.json_behavior(on_empty.as_deref())?;
                self.json_behavior(on_error.as_deref())
            }
            NodeEnum::JsonArgument(a) => {
                let pb::JsonArgument { val, name: _ } = &**a;
                self.json_value(val.as_deref())
            }
            NodeEnum::JsonBehavior(b) => self.json_behavior(Some(b)),
            NodeEnum::JsonTable(t) => {
                let pb::JsonTable {
                    context_item,
                    pathspec,
                    passing,
                    columns,
                    on_error,
                    alias: _,
                    lateral: _,
                    location: _,
                } = &**t;
                self.json_value(context_item.as_deref())?;
                self.json_path(pathspec.as_deref())?;
                self.nodes(passing)?;
                self.nodes(columns)?;
                self.json_behavior(on_error.as_deref())
            }
            NodeEnum::JsonTableColumn(c) => {
                let pb::JsonTableColumn {
                    coltype: _,
                    name: _,
                    type_name,
                    pathspec,
                    format: _,
                    wrapper: _,
                    quotes: _,
                    columns,
                    on_empty,
                    on_error,
                    location: _,
                } = &**c;
                self.type_name(type_name.as_ref())?;
                self.json_path(pathspec.as_deref())?;
                self.nodes(columns)?;
                self.json_behavior(on_empty.as_deref())?;
                self.json_behavior(on_error.as_deref())
            }
            NodeEnum::JsonTablePathSpec(p) => self.json_path(Some(p)),

            _ => Err(WhyPrimary::Other),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Leading trivia, hints and the keyword pre-filter (bytes only, no allocation).
// ---------------------------------------------------------------------------------------

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

/// Identifier characters as PostgreSQL's lexer has them (any non-ASCII byte included).
fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Skips whitespace and comments from `i`, passing each comment's body to `comment`.
/// Returns the offset of the first other byte (`b.len()` at the end), or `None` for an
/// unterminated block comment.
fn skip_trivia(b: &[u8], mut i: usize, mut comment: impl FnMut(&[u8])) -> Option<usize> {
    loop {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n' || c == b'\r')
                .map_or(b.len(), |p| i + p);
            comment(&b[i + 2..end]);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let end = block_comment_end(b, i)?;
            comment(&b[i + 2..end - 2]);
            i = end;
        } else {
            return Some(i);
        }
    }
}

/// `b[i..]` starts with `/*`: the offset just past the matching `*/` (comments nest).
fn block_comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The first pgmux hint among the leading comments, and where the first token starts
/// (`None`: unterminated comment).
fn leading_trivia(b: &[u8]) -> (Option<Hint>, Option<usize>) {
    let mut hint = None;
    let start = skip_trivia(b, 0, |body| {
        if hint.is_none() {
            hint = parse_hint(body);
        }
    });
    (hint, start)
}

fn parse_hint(body: &[u8]) -> Option<Hint> {
    let body = body.trim_ascii();
    if body.eq_ignore_ascii_case(b"pgmux:primary") {
        Some(Hint::Primary)
    } else if body.eq_ignore_ascii_case(b"pgmux:replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

/// What a leading keyword means.
#[derive(Clone, Copy)]
enum Kw {
    /// May begin a replica-safe text: ask the parser.
    Parse,
    Write,
    Txn,
    /// PREPARE TRANSACTION is transaction control, PREPARE name AS … is not.
    Prepare,
}

/// Leading keywords the pre-filter knows; any other is [`WhyPrimary::Other`].
const KEYWORDS: &[(&str, Kw)] = &[
    ("select", Kw::Parse),
    ("with", Kw::Parse),
    ("values", Kw::Parse),
    ("table", Kw::Parse),
    ("show", Kw::Parse),
    ("explain", Kw::Parse),
    ("begin", Kw::Parse),
    ("start", Kw::Parse),
    ("insert", Kw::Write),
    ("update", Kw::Write),
    ("delete", Kw::Write),
    ("merge", Kw::Write),
    ("create", Kw::Write),
    ("alter", Kw::Write),
    ("drop", Kw::Write),
    ("truncate", Kw::Write),
    ("copy", Kw::Write),
    ("grant", Kw::Write),
    ("revoke", Kw::Write),
    ("comment", Kw::Write),
    ("security", Kw::Write),
    ("reindex", Kw::Write),
    ("cluster", Kw::Write),
    ("vacuum", Kw::Write),
    ("analyze", Kw::Write),
    ("analyse", Kw::Write),
    ("refresh", Kw::Write),
    ("lock", Kw::Write),
    ("import", Kw::Write),
    ("reassign", Kw::Write),
    ("call", Kw::Write),
    ("do", Kw::Write),
    ("commit", Kw::Txn),
    ("rollback", Kw::Txn),
    ("savepoint", Kw::Txn),
    ("release", Kw::Txn),
    ("end", Kw::Txn),
    ("abort", Kw::Txn),
    ("prepare", Kw::Prepare),
];

/// The word at `b[i..]`, if an identifier starts there.
fn word(b: &[u8], i: usize) -> &[u8] {
    match b.get(i) {
        Some(&c) if is_ident(c) && !c.is_ascii_digit() && c != b'$' => {
            let len = b[i..].iter().position(|&c| !is_ident(c));
            &b[i..len.map_or(b.len(), |l| i + l)]
        }
        _ => &[],
    }
}

/// `None` when the text may be a read and needs the parser; otherwise why it cannot be.
/// `start` is the offset of the first token (after leading comments).
fn prefilter(b: &[u8], start: usize) -> Option<WhyPrimary> {
    let mut i = start;
    loop {
        i = match skip_trivia(b, i, |_| {}) {
            Some(i) => i,
            None => return Some(WhyPrimary::Unparseable),
        };
        match b.get(i) {
            None => return Some(WhyPrimary::Unparseable),
            Some(b'(') => i += 1,
            Some(_) => break,
        }
    }
    let first = word(b, i);
    let kw = KEYWORDS
        .iter()
        .find(|(k, _)| first.eq_ignore_ascii_case(k.as_bytes()))
        .map(|&(_, kw)| kw);
    match kw {
        Some(Kw::Parse) => None,
        Some(Kw::Write) => Some(WhyPrimary::Write),
        Some(Kw::Txn) => Some(WhyPrimary::TransactionControl),
        Some(Kw::Prepare) => {
            let next = skip_trivia(b, i + first.len(), |_| {}).map(|j| word(b, j));
            if next.is_some_and(|w| w.eq_ignore_ascii_case(b"transaction")) {
                Some(WhyPrimary::TransactionControl)
            } else {
                Some(WhyPrimary::Other)
            }
        }
        None => Some(WhyPrimary::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(sql: &str) -> Class {
        Router::default().classify(sql).class
    }

    fn primary(sql: &str) -> WhyPrimary {
        match class(sql) {
            Class::Primary(why) => why,
            other => panic!("{sql:?}: expected primary, got {other:?}"),
        }
    }

    fn hint(sql: &str) -> Option<Hint> {
        Router::default().classify(sql).hint
    }

    #[test]
    fn plain_select_is_read() {
        assert_eq!(
            class("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
            Class::Read
        );
        assert_eq!(class("select 1"), Class::Read);
        assert_eq!(
            class("SeLeCt * FROM t JOIN u USING (id) ORDER BY 1 LIMIT 5"),
            Class::Read
        );
        assert_eq!(
            class("SELECT count(*) OVER (PARTITION BY a) FROM t"),
            Class::Read
        );
        assert_eq!(
            class("WITH x AS (SELECT 1 AS a) SELECT a FROM x UNION ALL SELECT 2"),
            Class::Read
        );
    }

    #[test]
    fn the_whitelist_covers_common_reads() {
        for sql in [
            "SELECT * FROM t WHERE a = ANY($1) AND b IN (1, 2) AND c BETWEEN 1 AND 2",
            "SELECT * FROM t WHERE x LIKE 'a%' OR y ILIKE 'b' OR z SIMILAR TO 'c'",
            "SELECT a::int[], CAST(b AS varchar(10)), '1 day'::interval FROM t",
            "SELECT CURRENT_TIMESTAMP, now(), current_user, pg_is_in_recovery()",
            "SELECT x->>'a', arr[1], arr[1:2], (t.c).f FROM t",
            "SELECT EXISTS (SELECT 1), NULLIF(1, 2), GREATEST(1, 2), ARRAY(SELECT 1)",
            "SELECT a > ALL (SELECT 1), ROW(1, 2), a IS DISTINCT FROM b, b IS NOT TRUE FROM t",
            "SELECT * FROM t TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
            "SELECT row_number() OVER w FROM t WINDOW w AS (ORDER BY a ROWS 1 PRECEDING)",
            "SELECT a, GROUPING(a) FROM t GROUP BY ROLLUP (a), CUBE (b) HAVING count(*) > 1",
            "SELECT DISTINCT ON (a) a COLLATE \"C\" FROM t ORDER BY a DESC NULLS LAST",
            "SELECT * FROM json_to_record('{}') AS x(a int, b text)",
            "SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY AS u(x, n)",
            "SELECT * FROM ROWS FROM (generate_series(1, 2), generate_series(1, 3)) AS x(a, b)",
            "SELECT count(DISTINCT a) FILTER (WHERE b), percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
            "SELECT * FROM a JOIN b ON a.id = b.id LEFT JOIN LATERAL (SELECT 1) c ON true CROSS JOIN d",
            "SELECT a FROM t INTERSECT SELECT a FROM u EXCEPT SELECT 1",
            "SELECT a FROM t ORDER BY a FETCH FIRST 1 ROWS WITH TIES",
            "WITH RECURSIVE r(a) AS (SELECT 1 UNION ALL SELECT a + 1 FROM r WHERE a < 5) \
             SEARCH DEPTH FIRST BY a SET o CYCLE a SET c USING p SELECT * FROM r",
            "SELECT f(a => 1), g(VARIADIC ARRAY[1]), now() AT TIME ZONE 'UTC'",
            "SELECT substring('abc' FROM 1 FOR 2), extract(year FROM now()), trim(both 'x' FROM 'xax')",
            "SELECT xmlelement(name foo, xmlattributes(1 AS a)), xmlserialize(content '<a/>' AS text)",
            "SELECT * FROM XMLTABLE('/r' PASSING '<r/>' COLUMNS a int PATH 'a', o FOR ORDINALITY)",
            "SELECT JSON_OBJECT('a': 1), JSON_ARRAY(1, 2), JSON_ARRAYAGG(a ORDER BY a) FROM t",
            "SELECT JSON_VALUE(j, '$.a' RETURNING int DEFAULT 0 ON ERROR), j IS JSON OBJECT FROM t",
            "SELECT * FROM JSON_TABLE('[1]', '$[*]' COLUMNS (a int PATH '$'))",
        ] {
            assert_eq!(class(sql), Class::Read, "{sql}");
        }
        assert_eq!(
            primary("SELECT JSON_OBJECT('a': nextval('s'))"),
            WhyPrimary::WritingFunction
        );
    }

    #[test]
    fn values_table_show_are_reads() {
        assert_eq!(class("VALUES (1, 'a'), (2, 'b')"), Class::Read);
        assert_eq!(class("TABLE t"), Class::Read);
        assert_eq!(class("SHOW search_path"), Class::Read);
        assert_eq!(class("show all"), Class::Read);
    }

    #[test]
    fn explain_without_analyze_is_read() {
        assert_eq!(class("EXPLAIN SELECT * FROM t"), Class::Read);
        assert_eq!(class("EXPLAIN (VERBOSE, COSTS off) SELECT 1"), Class::Read);
        assert_eq!(
            class("EXPLAIN (ANALYZE false) SELECT * FROM t"),
            Class::Read
        );
        assert_eq!(
            class("EXPLAIN (ANALYZE off, BUFFERS) SELECT 1"),
            Class::Read
        );
        // Plans only: the INSERT does not run.
        assert_eq!(class("EXPLAIN INSERT INTO t VALUES (1)"), Class::Read);
    }

    #[test]
    fn explain_analyze_is_primary() {
        assert_eq!(
            primary("EXPLAIN ANALYZE SELECT * FROM t"),
            WhyPrimary::Other
        );
        assert_eq!(primary("EXPLAIN (ANALYZE) SELECT 1"), WhyPrimary::Other);
        assert_eq!(
            primary("EXPLAIN (ANALYZE true) SELECT 1"),
            WhyPrimary::Other
        );
        assert_eq!(primary("EXPLAIN (ANALYZE 1) SELECT 1"), WhyPrimary::Other);
        assert_eq!(primary("explain analyse select 1"), WhyPrimary::Other);
        assert_eq!(
            primary("EXPLAIN ANALYZE UPDATE t SET a = 1"),
            WhyPrimary::Write
        );
        assert_eq!(primary("EXPLAIN EXECUTE s(1)"), WhyPrimary::Other);
    }

    #[test]
    fn row_locks_are_primary() {
        for sql in [
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM t FOR NO KEY UPDATE",
            "SELECT * FROM t FOR KEY SHARE",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE SKIP LOCKED",
            "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
            "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)",
            "SELECT (SELECT a FROM t LIMIT 1 FOR KEY SHARE)",
            "WITH x AS (SELECT * FROM t FOR NO KEY UPDATE) SELECT * FROM x",
            "SELECT 1 UNION (SELECT 2 FROM t FOR UPDATE)",
        ] {
            assert_eq!(primary(sql), WhyPrimary::LockingRead, "{sql}");
        }
    }

    #[test]
    fn write_functions_anywhere_are_primary() {
        for sql in [
            "SELECT nextval('s')",
            "SELECT NEXTVAL('s')",
            "SELECT pg_catalog.nextval('s')",
            "SELECT \"nextval\"('s')",
            "SELECT coalesce(nextval('s'), 1)",
            "SELECT * FROM pg_advisory_lock(1)",
            "SELECT pg_try_advisory_xact_lock(42)",
            "SELECT * FROM t, LATERAL pg_advisory_lock(t.id) l",
            "WITH x AS (SELECT setval('s', 10)) SELECT * FROM x",
            "SELECT * FROM t WHERE id = (SELECT currval('s'))",
            "SELECT * FROM t WHERE EXISTS (SELECT 1 WHERE lastval() > 0)",
            "VALUES (nextval('s'))",
            "SELECT 1 LIMIT nextval('s')",
            "SELECT * FROM t ORDER BY nextval('s')",
            "SELECT CASE WHEN a THEN txid_current() END FROM t",
            "SELECT sum(a) FILTER (WHERE set_config('x', 'y', false) IS NOT NULL) FROM t",
            "SELECT pg_stat_reset_shared('bgwriter')",
            "SELECT * FROM ROWS FROM (generate_series(1, 2), lo_import('/etc/passwd'))",
            "SELECT ARRAY[pg_current_wal_lsn()]",
            "SELECT (nextval('s'))::text",
            "SELECT 1 UNION SELECT nextval('s')",
            "SELECT * FROM generate_series(1, nextval('s'))",
            "SELECT pg_notify('c', 'x')",
        ] {
            assert_eq!(primary(sql), WhyPrimary::WritingFunction, "{sql}");
        }
        // Reading sequence metadata or a column with a similar name is fine.
        assert_eq!(class("SELECT nextval_count FROM t"), Class::Read);
        assert_eq!(class("SELECT last_value FROM s"), Class::Read);
        assert_eq!(class("SELECT pg_last_wal_replay_lsn()"), Class::Read);
    }

    #[test]
    fn data_modifying_cte_and_select_into_are_writes() {
        assert_eq!(
            primary("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("WITH x AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM x"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("WITH x AS (INSERT INTO t VALUES (1)) INSERT INTO u SELECT 1"),
            WhyPrimary::Write
        );
        assert_eq!(primary("SELECT * INTO new_t FROM t"), WhyPrimary::Write);
        assert_eq!(primary("SELECT 1 AS a INTO TEMP x"), WhyPrimary::Write);
    }

    #[test]
    fn dml_and_ddl_are_writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
            "DELETE FROM t",
            "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD COLUMN b int",
            "DROP TABLE t",
            "TRUNCATE t",
            "COPY t FROM STDIN",
            "GRANT SELECT ON t TO u",
            "VACUUM t",
            "CREATE TABLE x AS SELECT 1",
        ] {
            assert_eq!(primary(sql), WhyPrimary::Write, "{sql}");
        }
    }

    #[test]
    fn set_and_others_are_primary() {
        assert_eq!(primary("SET search_path = x"), WhyPrimary::Other);
        assert_eq!(primary("RESET ALL"), WhyPrimary::Other);
        assert_eq!(primary("LISTEN chan"), WhyPrimary::Other);
        assert_eq!(primary("DISCARD ALL"), WhyPrimary::Other);
        assert_eq!(primary("PREPARE p AS SELECT 1"), WhyPrimary::Other);
        assert_eq!(primary("EXECUTE p"), WhyPrimary::Other);
        assert_eq!(
            primary("PREPARE TRANSACTION 'x'"),
            WhyPrimary::TransactionControl
        );
    }

    #[test]
    fn multi_statement_texts() {
        assert_eq!(class("SELECT 1; SELECT 2"), Class::Read);
        assert_eq!(class("SELECT 1; SHOW x; VALUES (1);"), Class::Read);
        assert_eq!(
            primary("SELECT 1; INSERT INTO t VALUES (1)"),
            WhyPrimary::Write
        );
        assert_eq!(primary("SELECT 1; SET x = 1"), WhyPrimary::Other);
        assert_eq!(primary("SELECT 1; COMMIT"), WhyPrimary::TransactionControl);
        assert_eq!(
            primary("SELECT 1; SELECT nextval('s')"),
            WhyPrimary::WritingFunction
        );
        assert_eq!(
            primary("SELECT 1; BEGIN READ ONLY"),
            WhyPrimary::TransactionControl
        );
    }

    #[test]
    fn begin_read_only() {
        assert_eq!(class("BEGIN READ ONLY"), Class::BeginReadOnly);
        assert_eq!(class("begin transaction read only;"), Class::BeginReadOnly);
        assert_eq!(class("START TRANSACTION READ ONLY"), Class::BeginReadOnly);
        assert_eq!(
            class("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            Class::BeginReadOnly
        );
        assert_eq!(
            class("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"),
            Class::BeginReadOnly
        );
        assert_eq!(
            class("BEGIN READ ONLY; SELECT * FROM t; SELECT 2"),
            Class::BeginReadOnly
        );
        assert_eq!(
            class("BEGIN READ ONLY; SELECT * FROM t; COMMIT"),
            Class::BeginReadOnly
        );
        assert_eq!(
            class("START TRANSACTION READ ONLY; SELECT 1; ROLLBACK"),
            Class::BeginReadOnly
        );
        assert_eq!(
            primary("BEGIN READ ONLY; SELECT 1; COMMIT AND CHAIN"),
            WhyPrimary::TransactionControl
        );
        assert_eq!(
            primary("BEGIN READ ONLY; COMMIT; SELECT 1"),
            WhyPrimary::TransactionControl
        );
        assert_eq!(
            primary("BEGIN READ ONLY; UPDATE t SET a = 1"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("BEGIN READ ONLY; SELECT 1 FOR UPDATE"),
            WhyPrimary::LockingRead
        );
        assert_eq!(
            primary("BEGIN READ ONLY, READ WRITE"),
            WhyPrimary::TransactionControl
        );
    }

    #[test]
    fn other_transaction_control_is_primary() {
        for sql in [
            "BEGIN",
            "BEGIN READ WRITE",
            "START TRANSACTION",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "BEGIN; SELECT 1",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "END",
            "ABORT",
        ] {
            assert_eq!(primary(sql), WhyPrimary::TransactionControl, "{sql}");
        }
    }

    #[test]
    fn hints() {
        assert_eq!(hint("/* pgmux:replica */ SELECT 1"), Some(Hint::Replica));
        assert_eq!(hint("/*pgmux:primary*/SELECT 1"), Some(Hint::Primary));
        assert_eq!(
            hint("  \n /*  PGMUX:Replica \n */ SELECT 1"),
            Some(Hint::Replica)
        );
        assert_eq!(hint("-- pgmux:primary\nSELECT 1"), Some(Hint::Primary));
        assert_eq!(hint("--pgmux:replica\r\nSELECT 1"), Some(Hint::Replica));
        assert_eq!(
            hint("/* app=web */ /* pgmux:replica */ SELECT 1"),
            Some(Hint::Replica)
        );
        assert_eq!(hint("/* pgmux:elsewhere */ SELECT 1"), None);
        assert_eq!(hint("/* pgmux: replica please */ SELECT 1"), None);
        assert_eq!(hint("SELECT 1 /* pgmux:replica */"), None);
        assert_eq!(hint("SELECT 1"), None);
        // The class is computed regardless of the hint.
        let d = Router::default().classify("/* pgmux:replica */ UPDATE t SET a = 1");
        assert_eq!(d.hint, Some(Hint::Replica));
        assert_eq!(d.class, Class::Primary(WhyPrimary::Write));
        let d = Router::default().classify("/* pgmux:primary */ SELECT 1");
        assert_eq!(d.hint, Some(Hint::Primary));
        assert_eq!(d.class, Class::Read);
    }

    #[test]
    fn unparseable_and_empty() {
        assert_eq!(primary("SELECT FROM WHERE ("), WhyPrimary::Unparseable);
        assert_eq!(primary("SELECT 'unterminated"), WhyPrimary::Unparseable);
        assert_eq!(primary(""), WhyPrimary::Unparseable);
        assert_eq!(primary("   \n\t"), WhyPrimary::Unparseable);
        assert_eq!(primary("/* only a comment */"), WhyPrimary::Unparseable);
        assert_eq!(primary("-- only a comment"), WhyPrimary::Unparseable);
        assert_eq!(primary("/* unterminated SELECT 1"), WhyPrimary::Unparseable);
        assert_eq!(primary("SELECT 1 /* unterminated"), WhyPrimary::Unparseable);
        assert_eq!(primary("("), WhyPrimary::Unparseable);
    }

    #[test]
    fn extra_write_functions() {
        let r = Router::new(&["Bump_Counter".to_owned(), " app.Touch ".to_owned()]);
        let c = |sql| r.classify(sql).class;
        assert_eq!(
            c("SELECT bump_counter(1)"),
            Class::Primary(WhyPrimary::WritingFunction)
        );
        assert_eq!(
            c("SELECT * FROM app.touch()"),
            Class::Primary(WhyPrimary::WritingFunction)
        );
        assert_eq!(
            c("SELECT nextval('s')"),
            Class::Primary(WhyPrimary::WritingFunction)
        );
        assert_eq!(class("SELECT bump_counter(1)"), Class::Read);
    }

    #[test]
    fn prefilter_skips_comments_and_parens() {
        assert_eq!(
            primary("/* x */ INSERT INTO t VALUES (1)"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("-- x\n insert into t values (1)"),
            WhyPrimary::Write
        );
        assert_eq!(
            primary("/* a /* nested */ still comment */ DELETE FROM t"),
            WhyPrimary::Write
        );
        assert_eq!(class("(SELECT 1)"), Class::Read);
        assert_eq!(class("( /* c */ (SELECT 1) UNION (SELECT 2))"), Class::Read);
        // The keyword must end at a non-identifier character.
        assert_eq!(primary("selectx 1"), WhyPrimary::Other);
        assert_eq!(primary("updated"), WhyPrimary::Other);
        assert_eq!(prefilter(b"SELECT", 0), None);
        assert_eq!(prefilter(b"Select\t1", 0), None);
        assert_eq!(prefilter(b"UPDATE t", 0), Some(WhyPrimary::Write));
        assert_eq!(
            prefilter(b"commit", 0),
            Some(WhyPrimary::TransactionControl)
        );
        assert_eq!(prefilter(b"1", 0), Some(WhyPrimary::Other));
    }

    #[test]
    fn cache_returns_the_same_answer() {
        let r = Router::default();
        let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
        let first = r.classify(sql);
        assert_eq!(r.cache_len(), 1);
        assert_eq!(r.classify(sql), first);
        assert_eq!(first.class, Class::Read);
        // Leading comments are not part of the key.
        assert_eq!(r.classify(&format!("/* req=1 */ {sql}")).class, Class::Read);
        assert_eq!(r.cache_len(), 1);
        let w = r.classify("SELECT nextval('s')");
        assert_eq!(r.classify("SELECT nextval('s')"), w);
        assert_eq!(r.cache_len(), 2);
        // Pre-filtered texts never reach the cache.
        r.classify("UPDATE t SET a = 1");
        assert_eq!(r.cache_len(), 2);
    }

    #[test]
    fn cache_is_bounded() {
        let r = Router::default();
        for i in 0..CACHE_MAX_ENTRIES + 10 {
            assert_eq!(r.classify(&format!("SELECT {i}")).class, Class::Read);
        }
        assert!(r.cache_len() <= CACHE_MAX_ENTRIES);
        let huge = format!("SELECT 1 WHERE 'x' <> '{}'", "a".repeat(MAX_CACHED_TEXT));
        assert_eq!(r.classify(&huge).class, Class::Read);
        assert!(!r.cache.contains_key(huge.as_str()));
    }

    #[test]
    fn huge_select_still_classifies() {
        let cols: Vec<String> = (0..5000).map(|i| format!("c{i}")).collect();
        let sql = format!(
            "SELECT {} FROM t WHERE id IN ({})",
            cols.join(", "),
            cols.join(", ")
        );
        assert!(sql.len() > 64 * 1024);
        assert_eq!(class(&sql), Class::Read);
        let sql = format!("{sql} AND nextval('s') > 0");
        assert_eq!(primary(&sql), WhyPrimary::WritingFunction);
    }

    #[test]
    fn deepest_trees_fit_in_the_documented_stack() {
        let n = 60;
        let shapes = [
            format!("SELECT {}", vec!["1"; 45].join("+")),
            format!("SELECT {}", vec!["1"; n].join("+")),
            format!("SELECT {}1{}", "(SELECT ".repeat(n), ")".repeat(n)),
            format!("SELECT {}1{}", "coalesce(".repeat(n), ")".repeat(n)),
            format!("SELECT {}1{}", "ARRAY[".repeat(n), "]".repeat(n)),
            format!("SELECT * FROM t0{}", " JOIN t ON true".repeat(n)),
        ];
        let router = Router::default();
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(CLASSIFY_STACK_BYTES)
                .spawn_scoped(s, || {
                    for sql in &shapes {
                        let class = router.classify(sql).class;
                        assert!(
                            class == Class::Read
                                || class == Class::Primary(WhyPrimary::Unparseable),
                            "{class:?}"
                        );
                    }
                    // Deep but decodable, with a write function at the bottom.
                    let sql = format!(
                        "SELECT {}nextval('s'){}",
                        "(SELECT ".repeat(8),
                        ")".repeat(8)
                    );
                    assert_eq!(
                        router.classify(&sql).class,
                        Class::Primary(WhyPrimary::WritingFunction)
                    );
                })
                .expect("spawn")
                .join()
                .expect("no overflow");
        });
    }

    #[test]
    fn router_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Router>();
    }
}
