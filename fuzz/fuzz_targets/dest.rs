//! Fuzz target `dest`: the logic lives in `maintgate::fuzz_logic::dest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::dest(data);
});
