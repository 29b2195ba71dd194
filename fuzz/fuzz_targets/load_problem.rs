#![no_main]
//! libFuzzer target: arbitrary bytes as a safetensors input file.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gateloop_fuzz::load_problem(data);
});
