#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distributor::fuzzing::sealed(data));
