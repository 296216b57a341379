//! `cargo +nightly fuzz run startup_packet`: see [`pgmux_proxy::fuzzing::startup_packet`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux_proxy::fuzzing::startup_packet(data));
