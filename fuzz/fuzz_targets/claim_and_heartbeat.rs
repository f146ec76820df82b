#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distributor::fuzzing::claim_and_heartbeat(data));
