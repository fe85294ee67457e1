//! Fuzz target `ws_frames`: the logic lives in `maintgate::fuzz_logic::ws_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    maintgate::fuzz_logic::ws_frames(data);
});
