//! Fuzz target: `kms_server::tools::fuzzing::pem_crl` (see that module). Seeds in `../seeds/pem_crl`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::pem_crl(data));
