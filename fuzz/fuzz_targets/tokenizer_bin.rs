#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| handgrad::fuzzing::tokenizer_bin(data));
