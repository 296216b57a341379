//! `cargo +nightly fuzz run console_command`: see [`pgmux_admin::fuzzing::console_command`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux_admin::fuzzing::console_command(data));
