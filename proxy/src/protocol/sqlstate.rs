//! SQLSTATE codes used in pgmux's own ErrorResponses, and the few of PostgreSQL's that
//! pgmux acts on (PostgreSQL Appendix A).

pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const CONNECTION_FAILURE: &str = "08006";
pub const CONNECTION_EXCEPTION: &str = "08000";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_AUTHORIZATION: &str = "28000";
pub const INVALID_CATALOG_NAME: &str = "3D000";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const QUERY_CANCELED: &str = "57014";
pub const INVALID_PARAMETER_VALUE: &str = "22023";
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
/// PostgreSQL's refusal of a write in a read-only transaction (or on a standby).
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
