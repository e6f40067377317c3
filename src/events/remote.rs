//! Label-set updates that arrive as one message (MQTT `labels/set`, HTTP `POST /labels`).
//!
//! A message-based transport has no back channel within one message, so a transfer takes two:
//!
//! 1. **The challenge request**: a payload holding only the `Begin` frame
//!    ([`encode_challenge_request`]). The device checks what it can (size, version) and
//!    answers [`UpdateReply::Challenge`]: a nonce for that transfer id, valid once.
//! 2. **The transfer**: the byte stream [`Sender::push`](crate::update::Sender::push) writes
//!    on a serial line or a TCP connection, COBS frames `Begin`, `Chunk`…, `Commit`, each ending
//!    in `0x00`, with the `Commit` signed for that nonce ([`encode_transfer`]).
//!
//! The device runs those frames through a [`Receiver`] on its [`UpdateGate`], like every other
//! transport, so one code path authenticates, checks and persists every label set; the
//! outcome comes back as an [`UpdateReply`] (JSON on the wire).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::update::{encode_frame, FrameDecoder, Line, Message, Nonce, Receiver, Sender, UpdateGate, NONCE_LEN};

/// The device's answer to a label-set update sent as one message.
///
/// Serialized with a `result` tag: `{"result":"accepted","transfer_id":7,"version":3}`,
/// `{"result":"rejected","transfer_id":7,"reason":"..."}` or
/// `{"result":"challenge","transfer_id":7,"nonce":"<32 hex digits>","device":"cam-1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum UpdateReply {
    /// The set was authenticated, checked, persisted and handed to the pipeline.
    Accepted {
        /// The transfer that carried it (from its `Begin`).
        transfer_id: u32,
        /// The label-set version now in use.
        version: u64,
    },
    /// The set was refused; the device keeps the set it had.
    Rejected {
        /// The transfer refused, when the payload named one.
        transfer_id: Option<u32>,
        /// Why, for a person to read.
        reason: String,
    },
    /// Answer to a challenge request: sign the transfer for this nonce and device name.
    Challenge {
        /// The transfer the nonce is for.
        transfer_id: u32,
        /// The nonce, as hex.
        nonce: String,
        /// The device's name.
        device: String,
    },
}

impl UpdateReply {
    /// The transfer this reply answers, if known.
    pub fn transfer_id(&self) -> Option<u32> {
        match self {
            Self::Accepted { transfer_id, .. } | Self::Challenge { transfer_id, .. } => Some(*transfer_id),
            Self::Rejected { transfer_id, .. } => *transfer_id,
        }
    }

    /// The nonce and device name of a challenge.
    pub fn challenge(&self) -> Option<(Nonce, &str)> {
        let Self::Challenge { nonce, device, .. } = self else { return None };
        let mut bytes = [0u8; NONCE_LEN];
        if nonce.len() != 2 * NONCE_LEN {
            return None;
        }
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(nonce.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some((bytes, device))
    }
}

/// The payload that asks for a challenge for `sender`'s transfer: its `Begin` alone.
pub fn encode_challenge_request(sender: &Sender) -> Vec<u8> {
    encode_frame(&sender.begin())
}

/// The payload that carries `sender`'s whole transfer in one message, signed for the
/// device's challenge: its `Begin`, every `Chunk` and its `Commit`, each as a frame.
pub fn encode_transfer(sender: &Sender, nonce: &Nonce, device: &str) -> Vec<u8> {
    let mut payload = encode_frame(&sender.begin());
    for chunk in sender.chunks() {
        payload.extend_from_slice(&encode_frame(&chunk));
    }
    payload.extend_from_slice(&encode_frame(&sender.commit(nonce, device)));
    payload
}

/// Runs one `payload` (a challenge request or a whole transfer) through the device's `gate`
/// and returns the reply. An accepted set is persisted and handed to the pipeline by the
/// gate before this returns.
///
/// Blocking: an accepted set is fsynced. The caller holds the payload's bytes against the
/// gate's budget ([`UpdateGate::hold_bytes`]). Refused outright when the device has no key: a
/// set arriving over a network must be authenticated. Anything but `Begin` alone, or `Begin`,
/// `Chunk`… `Commit` for one transfer, or a corrupt or cut-off frame, is a rejection; so is
/// every refusal of the [`Receiver`], with its reason.
pub fn apply_update(gate: &Arc<UpdateGate>, payload: &[u8]) -> UpdateReply {
    let rejected = |transfer_id: Option<u32>, reason: String| {
        gate.log_rejection(transfer_id, &reason);
        UpdateReply::Rejected { transfer_id, reason }
    };
    if gate.config().key.is_none() {
        return rejected(
            None,
            "this device has no update key (`[updates] key_file`), so it accepts no label sets over the network".into(),
        );
    }
    let mut decoder = FrameDecoder::new();
    let frames = decoder.feed(payload);
    let mut messages = Vec::with_capacity(frames.len());
    for (index, frame) in frames.into_iter().enumerate() {
        match frame {
            Ok(message) => messages.push(message),
            Err(e) => return rejected(None, format!("frame {index} of the update: {e}")),
        }
    }
    if decoder.buffered() > 0 {
        return rejected(None, "the update ends in the middle of a frame (every frame ends with a 0x00 byte)".into());
    }
    let transfer_id = match messages.first() {
        Some(Message::Begin { transfer_id, .. }) => *transfer_id,
        Some(other) => return rejected(None, format!("an update must start with Begin, not {}", message_name(other))),
        None => {
            return rejected(
                None,
                "empty update: expected Begin alone (a challenge request), or Begin, chunks and Commit".into(),
            )
        }
    };
    if let [Message::Begin { total_len, version, force, .. }] = messages[..] {
        return match gate.check_begin(total_len, version, force) {
            Ok(()) => UpdateReply::Challenge {
                transfer_id,
                nonce: gate.issue_challenge(transfer_id).iter().map(|b| format!("{b:02x}")).collect(),
                device: gate.config().device_name.clone(),
            },
            Err(e) => rejected(Some(transfer_id), e.to_string()),
        };
    }
    let mut receiver = Receiver::new(gate.clone(), Line::Message);
    for message in messages {
        let allowed = match &message {
            Message::Begin { transfer_id: id, .. }
            | Message::Chunk { transfer_id: id, .. }
            | Message::Commit { transfer_id: id, .. } => *id == transfer_id,
            _ => false,
        };
        if !allowed {
            return rejected(
                Some(transfer_id),
                format!(
                    "unexpected {} in an update: one message carries Begin, chunks and Commit of one transfer",
                    message_name(&message)
                ),
            );
        }
        match receiver.handle(message) {
            Some(Message::Ack { .. } | Message::Challenge { .. }) => {}
            Some(Message::Accepted { version, .. }) => return UpdateReply::Accepted { transfer_id, version },
            // The Receiver has counted and logged it.
            Some(Message::Rejected { reason, .. }) => {
                return UpdateReply::Rejected { transfer_id: Some(transfer_id), reason }
            }
            other => return rejected(Some(transfer_id), format!("unexpected answer from the receiver: {other:?}")),
        }
    }
    rejected(Some(transfer_id), "the update ends without Commit: nothing was applied".into())
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Begin { .. } => "Begin",
        Message::Chunk { .. } => "Chunk",
        Message::Commit { .. } => "Commit",
        Message::Abort { .. } => "Abort",
        Message::Status => "Status",
        Message::Ack { .. } => "Ack",
        Message::Accepted { .. } => "Accepted",
        Message::Rejected { .. } => "Rejected",
        Message::StatusReply(_) => "StatusReply",
        Message::Challenge { .. } => "Challenge",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::labels::{Label, LabelSet};
    use crate::update::{PreSharedKey, ReceiverConfig, UpdateLimits};

    fn set(version: u64) -> LabelSet {
        LabelSet {
            calibration: None,
            version,
            dim: 2,
            space_id: "space".into(),
            labels: vec![Label {
                name: "waving".into(),
                text: "a person waving".into(),
                tokens: vec![1.0, 0.0, 0.0, 1.0],
                token_weights: vec![0.5, 0.5],
                pooled: vec![0.0, 1.0],
                threshold: None,
            }],
        }
    }

    fn key() -> PreSharedKey {
        PreSharedKey::new(*b"sixteen byte key!").unwrap()
    }

    /// A gate for a device `cam` running version 1, and the sets it delivered.
    fn gate(dir: &tempfile::TempDir, key: Option<PreSharedKey>) -> (Arc<UpdateGate>, Arc<Mutex<Vec<u64>>>) {
        let config = ReceiverConfig {
            device_name: "cam".into(),
            dim: 2,
            space_id: "space".into(),
            path: dir.path().join("labels.cls"),
            key,
            limits: UpdateLimits::default(),
        };
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let sink = delivered.clone();
        let gate = UpdateGate::new(config, Some(&set(1)), 1, move |set| {
            sink.lock().unwrap().push(set.version);
            Ok(())
        });
        (gate, delivered)
    }

    /// Asks `gate` for a challenge for `sender` and returns the signed transfer.
    fn signed_transfer(gate: &Arc<UpdateGate>, sender: &Sender) -> Vec<u8> {
        let reply = apply_update(gate, &encode_challenge_request(sender));
        let (nonce, device) = reply.challenge().unwrap_or_else(|| panic!("expected a challenge, got {reply:?}"));
        assert_eq!(reply.transfer_id(), Some(sender.transfer_id()));
        encode_transfer(sender, &nonce, device)
    }

    #[test]
    fn a_signed_newer_set_is_accepted_once_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, delivered) = gate(&dir, Some(key()));
        let sender = Sender::for_set(&set(2), false, Some(&key())).unwrap();
        let payload = signed_transfer(&gate, &sender);
        assert_eq!(
            apply_update(&gate, &payload),
            UpdateReply::Accepted { transfer_id: sender.transfer_id(), version: 2 }
        );
        assert_eq!(*delivered.lock().unwrap(), [2]);
        assert_eq!(LabelSet::load(&dir.path().join("labels.cls")).unwrap().version, 2);
        // The same message again: refused (not newer); forced, its challenge would be used up.
        assert!(reason(apply_update(&gate, &payload)).contains("not newer"));
        let forced = Sender::for_set(&set(2), true, Some(&key())).unwrap();
        let once = signed_transfer(&gate, &forced);
        assert!(matches!(apply_update(&gate, &once), UpdateReply::Accepted { version: 2, .. }));
        assert!(reason(apply_update(&gate, &once)).contains("no challenge issued"));
        // A forced rollback, recorded and replayed after a fresh challenge for its transfer id:
        // signed for another nonce.
        let rollback = Sender::for_set(&set(1), true, Some(&key())).unwrap();
        let recorded = signed_transfer(&gate, &rollback);
        assert!(matches!(apply_update(&gate, &recorded), UpdateReply::Accepted { version: 1, .. }));
        apply_update(&gate, &encode_challenge_request(&rollback));
        assert!(reason(apply_update(&gate, &recorded)).contains("authentication failed"));
        assert_eq!(*delivered.lock().unwrap(), [2, 2, 1]);
    }

    fn reason(reply: UpdateReply) -> String {
        match reply {
            UpdateReply::Rejected { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_problem_and_touch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (keyless, _) = gate(&dir, None);
        let (device, delivered) = gate(&dir, Some(key()));
        let signer = Sender::for_set(&set(2), false, Some(&key())).unwrap();
        let signed = signed_transfer(&device, &signer);
        let unsigned = signed_transfer(&device, &Sender::for_set(&set(2), false, None).unwrap());
        let old = encode_challenge_request(&Sender::for_set(&set(1), false, Some(&key())).unwrap());
        let cases: Vec<(&Arc<UpdateGate>, Vec<u8>, &str)> = vec![
            (&keyless, signed.clone(), "no update key"),
            (&device, unsigned, "authentication failed"),
            (&device, old, "not newer"),
            (&device, signed[..signed.len() - 1].to_vec(), "middle of a frame"),
            (&device, Vec::new(), "empty update"),
            (&device, encode_frame(&Message::Status), "must start with Begin"),
        ];
        for (gate, payload, expected) in cases {
            let reason = reason(apply_update(gate, &payload));
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
            assert!(!dir.path().join("labels.cls").exists());
        }
        // Without its Commit, nothing is applied.
        let sender = Sender::for_set(&set(2), false, Some(&key())).unwrap();
        apply_update(&device, &encode_challenge_request(&sender));
        let mut no_commit = encode_frame(&sender.begin());
        for chunk in sender.chunks() {
            no_commit.extend(encode_frame(&chunk));
        }
        assert!(reason(apply_update(&device, &no_commit)).contains("without Commit"));
        // A corrupted byte fails the frame's CRC.
        let mut corrupt = signed.clone();
        corrupt[20] ^= 0x55;
        assert!(reason(apply_update(&device, &corrupt)).contains("frame"));
        assert!(!dir.path().join("labels.cls").exists());
        assert!(delivered.lock().unwrap().is_empty());
        assert_eq!(device.rejected_total(), 7);
    }

    #[test]
    fn replies_are_tagged_json() {
        let accepted = UpdateReply::Accepted { transfer_id: 7, version: 3 };
        let json = serde_json::to_string(&accepted).unwrap();
        assert_eq!(json, r#"{"result":"accepted","transfer_id":7,"version":3}"#);
        let back: UpdateReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, accepted);
        let rejected: UpdateReply =
            serde_json::from_str(r#"{"result":"rejected","transfer_id":null,"reason":"x"}"#).unwrap();
        assert_eq!(rejected.transfer_id(), None);
        let challenge: UpdateReply = serde_json::from_str(
            r#"{"result":"challenge","transfer_id":9,"nonce":"000102030405060708090a0b0c0d0eff","device":"cam"}"#,
        )
        .unwrap();
        let (nonce, device) = challenge.challenge().unwrap();
        assert_eq!((nonce[1], nonce[15], device), (1, 0xff, "cam"));
        let short = UpdateReply::Challenge { transfer_id: 9, nonce: "00ff".into(), device: "cam".into() };
        assert_eq!(short.challenge(), None);
    }
}
