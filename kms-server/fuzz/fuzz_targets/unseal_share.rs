//! Fuzz target: `kms_server::tools::fuzzing::unseal_share` (see that module). Seeds in `../seeds/unseal_share`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::unseal_share(data));
