//! CI's share of fuzzing (stable toolchain): replays `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` through the proxy's fuzz entry points, then mutates them
//! for `PGMUX_FUZZ_SECS` seconds each (default 5). See `fuzz/replay.rs`.

#[path = "../../fuzz/replay.rs"]
mod replay;

use pgmux_proxy::fuzzing;

#[test]
fn startup_packet() {
    replay::run(
        "startup_packet",
        fuzzing::startup_packet,
        &[
            b"\0",
            b"user\0",
            b"database\0",
            b"options\0",
            b"-c ",
            b"application_name\0",
            b"_pq_.",
            b"\x00\x03\x00\x00",
            b"\x04\xd2\x16\x2f",
            b"\x04\xd2\x16\x2e",
            b"\\",
            b"'",
        ],
    );
}

#[test]
fn frontend_messages() {
    replay::run(
        "frontend_messages",
        fuzzing::frontend_messages,
        &[
            b"S\0\0\0\x04",
            b"H\0\0\0\x04",
            b"X\0\0\0\x04",
            b"E\0\0\0\x09\0\0\0\0\0",
            b"s1\0",
            b"pgmux_1\0",
            b"DEALLOCATE ",
            b"DISCARD ALL",
            b"LISTEN ",
            b"$$",
            b"/*",
            b"--",
            b"'",
            b"\"",
        ],
    );
}

#[test]
fn scram_exchange() {
    replay::run(
        "scram_exchange",
        fuzzing::scram_exchange,
        &[
            b"%N",
            b"%P",
            b"%C",
            b"%S",
            b"%I",
            b"%V",
            b",p=",
            b",r=",
            b"c=",
            b"n,,",
            b"y,,",
            b"p=tls-server-end-point,,",
            b"\0",
        ],
    );
}
