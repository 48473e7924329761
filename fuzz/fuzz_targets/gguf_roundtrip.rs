#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| handgrad::fuzzing::gguf_roundtrip(data));
