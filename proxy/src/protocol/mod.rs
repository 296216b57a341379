//! PostgreSQL wire protocol (v3) pieces pgmux needs, and nothing more.
//!
//! * [`frame`]: the one place where bytes from a socket become messages. Every length is
//!   checked (`4 <= len <= max`) before anything is allocated for it, and frames are
//!   split off the read buffer without copying.
//! * [`messages`]: encoders for the backend messages pgmux itself sends (ErrorResponse,
//!   ParameterStatus, authentication requests …) and decoders for the few bodies it must
//!   read (ParameterStatus, ErrorResponse, startup parameters).
//! * [`sqlstate`]: the SQLSTATE codes pgmux answers with.

pub mod frame;
pub mod messages;
pub mod sqlstate;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196_608;
/// Magic "protocol version" of an SSLRequest.
pub const SSL_REQUEST: i32 = 80_877_103;
/// Magic "protocol version" of a GSSENCRequest.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// Magic "protocol version" of a CancelRequest.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL's own limit for a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// What went wrong while reading the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid length {len} in message of type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, more than max_message_size ({max})")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("invalid startup packet: {0}")]
    BadStartup(&'static str),
    #[error("invalid frontend message type {0:?}")]
    UnexpectedMessage(char),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
