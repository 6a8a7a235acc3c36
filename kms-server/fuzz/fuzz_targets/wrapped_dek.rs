//! Fuzz target: `kms_server::tools::fuzzing::wrapped_dek` (see that module). Seeds in `../seeds/wrapped_dek`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::wrapped_dek(data));
