#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| handgrad::fuzzing::llama2c(data));
