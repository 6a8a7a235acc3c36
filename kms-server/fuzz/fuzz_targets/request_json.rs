//! Fuzz target: `kms_server::tools::fuzzing::request_json` (see that module). Seeds in `../seeds/request_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::request_json(data));
