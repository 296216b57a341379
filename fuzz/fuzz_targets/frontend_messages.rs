//! `cargo +nightly fuzz run frontend_messages`: see [`pgmux_proxy::fuzzing::frontend_messages`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux_proxy::fuzzing::frontend_messages(data));
