//! Fuzz target `basic`: the logic lives in `maintgate::fuzz_logic::basic`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::basic(data);
});
