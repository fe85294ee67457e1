//! Fuzz target `config`: the logic lives in `maintgate::fuzz_logic::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::config(data);
});
