//! Fuzz target: `kms_server::tools::fuzzing::client_cert` (see that module). Seeds in `../seeds/client_cert`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::client_cert(data));
