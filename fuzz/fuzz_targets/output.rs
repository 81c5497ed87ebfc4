#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llama_webgpu::fuzzing::output(data));
