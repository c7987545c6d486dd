//! Arbitrary bytes through choreo's decode path; see `choreo_tests::fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    choreo_tests::fuzz::decode_any(data);
});
