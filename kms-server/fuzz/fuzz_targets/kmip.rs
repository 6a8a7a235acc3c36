//! Fuzz target: `kms_server::tools::fuzzing::kmip` (see that module). Seeds in `../seeds/kmip`
//! (PyKMIP 0.11's requests and responses, as it encodes them).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_server::tools::fuzzing::kmip(data));
