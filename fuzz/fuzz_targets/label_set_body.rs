//! Fuzzes what the CRC otherwise shields: arbitrary body bytes in a valid envelope reach the
//! postcard decoder and the validator. Nothing may panic; whatever decodes round-trips.
#![no_main]

use clipact::labels::{LabelSet, FORMAT_VERSION, MAGIC};
use libfuzzer_sys::fuzz_target;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

fuzz_target!(|body: &[u8]| {
    let mut bytes = Vec::with_capacity(body.len() + 18);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(body);
    let crc = CRC32.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    if let Ok(set) = LabelSet::decode(&bytes) {
        assert_eq!(set.encode().expect("a decoded set re-encodes"), bytes);
    }
});
