//! Fuzz target `hello`: the logic lives in `maintgate::fuzz_logic::hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::hello(data);
});
