//! Fuzz target `connect_head`: the logic lives in `maintgate::fuzz_logic::connect_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::connect_head(data);
});
