//! Fuzzes what a network peer sends before any authentication: an MQTT or HTTP update body
//! through the device's gate (frame decoder, challenge step, receiver), and the same bytes as
//! a stream on a TCP or serial line. Nothing may panic, no set may be accepted unsigned, and
//! no bytes stay held afterwards.
#![no_main]

use std::sync::Arc;

use clipact::events::apply_update;
use clipact::events::UpdateReply;
use clipact::update::{FrameDecoder, Line, PreSharedKey, Receiver, ReceiverConfig, UpdateGate, UpdateLimits};
use libfuzzer_sys::fuzz_target;

/// A fresh gate per input (no state carries over), persisting into one directory per process.
fn gate() -> Arc<UpdateGate> {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("clipact-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    let config = ReceiverConfig {
        device_name: "fuzz".into(),
        dim: 4,
        space_id: "fuzz-space".into(),
        path: dir.join("labels.cls"),
        key: Some(PreSharedKey::new(*b"a key no fuzzer will ever guess!").unwrap()),
        limits: UpdateLimits { max_buffered_bytes: 256 * 1024, ..UpdateLimits::default() },
    };
    UpdateGate::new(config, None, 1, |_| panic!("an unsigned set was accepted"))
}

fuzz_target!(|data: &[u8]| {
    let gate = gate();
    assert!(!matches!(apply_update(&gate, data), UpdateReply::Accepted { .. }));
    let mut receiver = Receiver::new(gate.clone(), Line::Stream);
    let mut decoder = FrameDecoder::new();
    for message in decoder.feed(data).into_iter().flatten() {
        receiver.handle(message);
    }
    drop(receiver);
    assert_eq!(gate.buffered_bytes(), 0);
});
