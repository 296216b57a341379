//! CI's share of fuzzing (stable toolchain): replays `fuzz/corpus/console_command/` and
//! `fuzz/regressions/console_command/` through the console's fuzz entry point, then
//! mutates them for `PGMUX_FUZZ_SECS` seconds (default 5). See `fuzz/replay.rs`.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn console_command() {
    replay::run(
        "console_command",
        pgmux_admin::fuzzing::console_command,
        &[
            b"SHOW ",
            b"SET ",
            b" = ",
            b" TO ",
            b"KILL ",
            b"PAUSE ",
            b"RESUME",
            b"RELOAD",
            b"RECONNECT",
            b"POOLS",
            b"'",
            b"\"",
            b"''",
            b"\"\"",
            b";",
            b"\xc3\xa9",
            b"bad",
            b"gone",
            b"slow",
        ],
    );
}
