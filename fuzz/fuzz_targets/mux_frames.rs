//! Fuzz target `mux_frames`: the logic lives in `maintgate::fuzz_logic::mux_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::mux_frames(data);
});
