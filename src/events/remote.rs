//! Label-set updates that arrive as one message (MQTT `labels/set`, HTTP `POST /labels`).
//!
//! A message-based transport carries the whole transfer at once: the payload is exactly the
//! byte stream [`Sender::push`](crate::update::Sender::push) writes on a serial line or a TCP
//! connection, COBS frames `Begin`, `Chunk`…, `Commit`, each ending in `0x00`
//! ([`encode_transfer`] builds it). The device runs those frames through the same
//! [`Receiver`] as every other transport, so one code path authenticates, checks and persists
//! every label set; the outcome comes back as an [`UpdateReply`] (JSON on the wire).

use serde::{Deserialize, Serialize};

use crate::labels::LabelSet;
use crate::update::{encode_frame, FrameDecoder, Message, Receiver, ReceiverConfig, Sender};

/// The device's answer to a label-set update sent as one message.
///
/// Serialized with a `result` tag: `{"result":"accepted","transfer_id":7,"version":3}` or
/// `{"result":"rejected","transfer_id":7,"reason":"..."}`.
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
}

impl UpdateReply {
    /// The transfer this reply answers, if known.
    pub fn transfer_id(&self) -> Option<u32> {
        match self {
            Self::Accepted { transfer_id, .. } => Some(*transfer_id),
            Self::Rejected { transfer_id, .. } => *transfer_id,
        }
    }

    fn rejected(transfer_id: Option<u32>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        tracing::warn!(?transfer_id, "label-set update rejected: {reason}");
        Self::Rejected {
            transfer_id,
            reason,
        }
    }
}

/// The payload that carries `sender`'s whole transfer in one message: its `Begin`, every
/// `Chunk` and its `Commit`, each as a frame.
pub fn encode_transfer(sender: &Sender) -> Vec<u8> {
    let mut payload = encode_frame(&sender.begin());
    for chunk in sender.chunks() {
        payload.extend_from_slice(&encode_frame(&chunk));
    }
    payload.extend_from_slice(&encode_frame(&sender.commit()));
    payload
}

/// Runs one whole-transfer `payload` through a [`Receiver`] built from `config` for a device
/// using `current`, and returns the reply and, when accepted, the new set (already persisted
/// to `config.path`) for the caller to swap in.
///
/// Blocking: an accepted set is fsynced. Refused outright when `config` has no key: a set
/// arriving over a network must be authenticated. Anything but `Begin`, `Chunk`… `Commit`
/// for one transfer, or a corrupt or cut-off frame, is a rejection; so is every refusal of
/// the [`Receiver`], with its reason. The set in use and its file stay untouched unless the
/// reply is [`UpdateReply::Accepted`].
pub fn apply_update(
    config: ReceiverConfig,
    current: Option<&LabelSet>,
    payload: &[u8],
) -> (UpdateReply, Option<LabelSet>) {
    if config.key.is_none() {
        return (
            UpdateReply::rejected(
                None,
                "this device has no update key (`[updates] key_file`), so it accepts no label \
                 sets over the network",
            ),
            None,
        );
    }
    let mut decoder = FrameDecoder::new();
    let frames = decoder.feed(payload);
    let mut messages = Vec::with_capacity(frames.len());
    for (index, frame) in frames.into_iter().enumerate() {
        match frame {
            Ok(message) => messages.push(message),
            Err(e) => {
                return (
                    UpdateReply::rejected(None, format!("frame {index} of the update: {e}")),
                    None,
                )
            }
        }
    }
    if decoder.buffered() > 0 {
        return (
            UpdateReply::rejected(
                None,
                "the update ends in the middle of a frame (every frame ends with a 0x00 byte)",
            ),
            None,
        );
    }
    let transfer_id = match messages.first() {
        Some(Message::Begin { transfer_id, .. }) => *transfer_id,
        Some(other) => {
            return (
                UpdateReply::rejected(
                    None,
                    format!(
                        "an update must start with Begin, not {}",
                        message_name(other)
                    ),
                ),
                None,
            )
        }
        None => {
            return (
                UpdateReply::rejected(None, "empty update: expected Begin, chunks and Commit"),
                None,
            )
        }
    };
    let mut receiver = Receiver::new(config, current);
    for message in messages {
        let allowed = match &message {
            Message::Begin { transfer_id: id, .. }
            | Message::Chunk { transfer_id: id, .. }
            | Message::Commit { transfer_id: id, .. } => *id == transfer_id,
            _ => false,
        };
        if !allowed {
            return (
                UpdateReply::rejected(
                    Some(transfer_id),
                    format!(
                        "unexpected {} in an update: one message carries Begin, chunks and \
                         Commit of one transfer",
                        message_name(&message)
                    ),
                ),
                None,
            );
        }
        match receiver.handle(message) {
            Some(Message::Ack { .. }) => {}
            Some(Message::Accepted { version, .. }) => {
                let set = receiver.take_accepted();
                return (
                    UpdateReply::Accepted {
                        transfer_id,
                        version,
                    },
                    set,
                );
            }
            Some(Message::Rejected { reason, .. }) => {
                // The Receiver has logged it already.
                return (
                    UpdateReply::Rejected {
                        transfer_id: Some(transfer_id),
                        reason,
                    },
                    None,
                );
            }
            other => {
                return (
                    UpdateReply::rejected(
                        Some(transfer_id),
                        format!("unexpected answer from the receiver: {other:?}"),
                    ),
                    None,
                )
            }
        }
    }
    (
        UpdateReply::rejected(
            Some(transfer_id),
            "the update ends without Commit: nothing was applied",
        ),
        None,
    )
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;
    use crate::update::PreSharedKey;

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

    fn config(dir: &tempfile::TempDir, key: Option<PreSharedKey>) -> ReceiverConfig {
        ReceiverConfig {
            dim: 2,
            space_id: "space".into(),
            path: dir.path().join("labels.cls"),
            key,
        }
    }

    #[test]
    fn a_signed_newer_set_is_accepted_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let sender = Sender::for_set(&set(2), false, Some(&key())).unwrap();
        let (reply, applied) = apply_update(
            config(&dir, Some(key())),
            Some(&set(1)),
            &encode_transfer(&sender),
        );
        assert_eq!(
            reply,
            UpdateReply::Accepted {
                transfer_id: sender.transfer_id(),
                version: 2
            }
        );
        assert_eq!(applied.unwrap().version, 2);
        assert_eq!(
            LabelSet::load(&dir.path().join("labels.cls"))
                .unwrap()
                .version,
            2
        );
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
        let signed = encode_transfer(&Sender::for_set(&set(2), false, Some(&key())).unwrap());
        let unsigned = encode_transfer(&Sender::for_set(&set(2), false, None).unwrap());
        let old = encode_transfer(&Sender::for_set(&set(1), false, Some(&key())).unwrap());
        let cases: Vec<(Option<PreSharedKey>, Vec<u8>, &str)> = vec![
            (None, signed.clone(), "no update key"),
            (Some(key()), unsigned, "authentication failed"),
            (Some(key()), old, "not newer"),
            (Some(key()), signed[..signed.len() - 1].to_vec(), "middle of a frame"),
            (Some(key()), Vec::new(), "empty update"),
            (
                Some(key()),
                encode_frame(&Message::Status),
                "must start with Begin",
            ),
        ];
        for (key, payload, expected) in cases {
            let (reply, applied) = apply_update(config(&dir, key), Some(&set(1)), &payload);
            let reason = reason(reply);
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
            assert!(applied.is_none());
            assert!(!dir.path().join("labels.cls").exists());
        }
        // Without its Commit, nothing is applied.
        let sender = Sender::for_set(&set(2), false, Some(&key())).unwrap();
        let mut no_commit = encode_frame(&sender.begin());
        for chunk in sender.chunks() {
            no_commit.extend(encode_frame(&chunk));
        }
        let (reply, _) = apply_update(config(&dir, Some(key())), Some(&set(1)), &no_commit);
        assert!(reason(reply).contains("without Commit"));
        // A corrupted byte fails the frame's CRC.
        let mut corrupt = signed.clone();
        corrupt[20] ^= 0x55;
        let (reply, _) = apply_update(config(&dir, Some(key())), Some(&set(1)), &corrupt);
        assert!(reason(reply).contains("frame"));
        assert!(!dir.path().join("labels.cls").exists());
    }

    #[test]
    fn replies_are_tagged_json() {
        let accepted = UpdateReply::Accepted {
            transfer_id: 7,
            version: 3,
        };
        let json = serde_json::to_string(&accepted).unwrap();
        assert_eq!(json, r#"{"result":"accepted","transfer_id":7,"version":3}"#);
        let back: UpdateReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, accepted);
        let rejected: UpdateReply =
            serde_json::from_str(r#"{"result":"rejected","transfer_id":null,"reason":"x"}"#)
                .unwrap();
        assert_eq!(rejected.transfer_id(), None);
    }
}
