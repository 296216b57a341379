//! `cargo +nightly fuzz run scram_exchange`: see [`pgmux_proxy::fuzzing::scram_exchange`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgmux_proxy::fuzzing::scram_exchange(data));
