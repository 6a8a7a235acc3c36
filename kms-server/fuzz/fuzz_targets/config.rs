//! Fuzz target: `kms_server::tools::fuzzing::config` (see that module). Seeds in `../seeds/config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::config(data));
