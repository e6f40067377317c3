//! Label-set decoding never panics; whatever decodes re-encodes to the same bytes.
#![no_main]

use clipact::labels::LabelSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = LabelSet::decode(data) {
        let bytes = set.encode().expect("a decoded set re-encodes");
        assert_eq!(LabelSet::decode(&bytes).expect("re-encoded set decodes"), set);
    }
});
