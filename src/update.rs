//! Label-set updates: the wire protocol that carries a new [`LabelSet`] from a host to a device.
//!
//! The same protocol runs over serial lines and TCP (`DESIGN.md` § Updates and events). It has
//! three layers, each usable on its own:
//!
//! - **Frames** ([`encode_frame`], [`FrameDecoder`]): a [`Message`] is encoded with postcard,
//!   led by [`PROTOCOL_VERSION`] and followed by a CRC-32, then COBS-encoded and terminated by
//!   `0x00`. A receiver can therefore resynchronise at the next `0x00` after any line noise,
//!   and drops every frame whose CRC fails.
//! - **The device's state machine** ([`Receiver`]): sans-IO, one reply per request. It collects
//!   chunks, authenticates the whole transfer, decodes and checks the set, persists it
//!   atomically and hands it out; any failure is answered with [`Message::Rejected`] naming
//!   the problem, and the set in use stays untouched.
//! - **Transport glue** ([`Sender::push`] on the host, [`serve`] on the device) over any tokio
//!   `AsyncRead + AsyncWrite`.
//!
//! # A transfer
//!
//! ```text
//! host                                          device
//! Begin { transfer_id, total_len, n_chunks, version, force }
//!                                               Ack { next_index: 0 }  | Rejected
//! Chunk { index: 0, data }                      Ack { next_index: 1 }  | Rejected
//! ...                                           ...
//! Commit { mac }                                Accepted { version }   | Rejected
//! ```
//!
//! The host sends one chunk at a time and waits for its acknowledgement (stop-and-wait): a
//! serial line has tiny buffers and no flow control, and a lost frame is found by a timeout
//! and resent. The device acknowledges a repeated chunk again without storing it twice, and
//! answers a repeated `Commit` with the outcome it already sent, so every retry is harmless.
//!
//! # Authentication
//!
//! `Commit` carries an HMAC-SHA256, under a pre-shared key, of the transfer's metadata and the
//! whole encoded set ([`transfer_mac`]). A device configured with a key ([`ReceiverConfig::key`])
//! refuses every transfer whose MAC does not verify; updates arriving over a network must use
//! one. A device without a key ignores the MAC: acceptable only where whoever can reach the
//! transport could also replace the files (a serial console on the board).
//!
//! Not covered: replay. Someone who recorded a forced update can play it again; a non-forced
//! one is refused as not newer. A device-chosen nonce would close that (a future protocol
//! version, by appending variants).
//!
//! # Compatibility
//!
//! postcard is not self-describing: [`Message`] variants and fields keep their order, new
//! variants are only ever appended, and anything else needs a new [`PROTOCOL_VERSION`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::labels::{LabelSet, LabelSetError};

/// Version of the frame layout and message set; the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest number of label-set bytes in one [`Message::Chunk`].
pub const MAX_CHUNK: usize = 512;
/// Largest label set a device accepts, in bytes (64 MiB).
pub const MAX_SET_LEN: u32 = 64 * 1024 * 1024;
/// Longest reason a device sends in [`Message::Rejected`], in bytes; longer ones are cut.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest frame a [`FrameDecoder`] accepts by default, COBS-encoded, without its `0x00`.
///
/// The largest message, a full chunk or a rejection with the longest reason, takes about half
/// of this.
pub const MAX_FRAME_LEN: usize = 2048;
/// Shortest pre-shared key [`PreSharedKey::new`] accepts, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Domain separation for [`transfer_mac`]: a MAC made for anything else never verifies here.
const MAC_DOMAIN: &[u8] = b"clipact label-set update v1\0";
/// Bytes a frame needs besides its message: the protocol version and the CRC.
const FRAME_OVERHEAD: usize = 1 + 4;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

type HmacSha256 = Hmac<Sha256>;

/// One protocol message. Variants up to [`Message::Status`] go from host to device, the
/// others from device to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Starts a transfer, abandoning any transfer in progress.
    Begin {
        /// Chosen by the host; names this transfer in every later message.
        transfer_id: u32,
        /// Length of the encoded label set, in bytes.
        total_len: u32,
        /// Number of chunks that will carry it.
        n_chunks: u32,
        /// Version of the set, so that a device can refuse an old one before it is sent.
        version: u64,
        /// Accept a set that is not newer than the current one (a rollback).
        force: bool,
    },
    /// The next piece of the encoded label set: 1 to [`MAX_CHUNK`] bytes.
    Chunk {
        /// The transfer this chunk belongs to.
        transfer_id: u32,
        /// Position of the chunk, from 0.
        index: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Ends a transfer: the device checks and applies the set.
    Commit {
        /// The transfer to commit.
        transfer_id: u32,
        /// [`transfer_mac`] of the transfer; ignored by a device without a key.
        mac: [u8; 32],
    },
    /// Abandons a transfer; the device does not reply.
    Abort {
        /// The transfer to abandon.
        transfer_id: u32,
    },
    /// Asks for the device's [`DeviceStatus`].
    Status,
    /// A chunk, or the `Begin`, was received.
    Ack {
        /// The transfer acknowledged.
        transfer_id: u32,
        /// Index of the chunk the device expects next.
        next_index: u32,
    },
    /// The set was checked, persisted and handed to the pipeline.
    Accepted {
        /// The transfer that carried it.
        transfer_id: u32,
        /// The version now in use.
        version: u64,
    },
    /// The transfer was refused; the device keeps its current set.
    Rejected {
        /// The transfer refused.
        transfer_id: u32,
        /// Why, for a person to read.
        reason: String,
    },
    /// Answer to [`Message::Status`].
    StatusReply(DeviceStatus),
}

impl Message {
    /// A [`Message::Rejected`] whose reason is cut to [`MAX_REASON_LEN`] bytes (on a character
    /// boundary), so that the frame stays under [`MAX_FRAME_LEN`].
    pub fn rejected(transfer_id: u32, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Message::Rejected {
            transfer_id,
            reason,
        }
    }
}

/// What a device reports about the label set it uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Version of the set in use; `None` when the device has none.
    pub version: Option<u64>,
    /// Embedding dimension of the device's encoder.
    pub dim: u32,
    /// Embedding-space id of the device's encoder.
    pub space_id: String,
    /// Number of labels in the set in use (0 without one).
    pub n_labels: u32,
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Encodes `message` as one frame: COBS(`PROTOCOL_VERSION`, postcard(message), CRC-32 LE),
/// then `0x00`.
///
/// The layout is postcard's own `to_stdvec_crc32` of `(PROTOCOL_VERSION, message)`, so any
/// postcard peer can read it with `from_bytes_crc32`. A peer drops frames longer than
/// [`MAX_FRAME_LEN`]: keep chunks to [`MAX_CHUNK`] and build rejections with
/// [`Message::rejected`].
pub fn encode_frame(message: &Message) -> Vec<u8> {
    let raw = postcard::to_stdvec_crc32(&(PROTOCOL_VERSION, message), CRC32.digest())
        // Serializing to a growable vector only fails for sequences of unknown length, which
        // `Message` does not have.
        .expect("a Message always serializes");
    let mut frame = cobs::encode_vec(&raw);
    frame.push(0);
    frame
}

/// Why a frame was dropped.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// More bytes than the decoder's limit arrived without a `0x00`.
    #[error("frame longer than {max} bytes dropped")]
    TooLong {
        /// The decoder's limit.
        max: usize,
    },
    /// The bytes between two `0x00` are not valid COBS.
    #[error("frame is not valid COBS")]
    Cobs,
    /// Too few bytes for a version, a message and a CRC.
    #[error("frame of {len} bytes is too short")]
    TooShort {
        /// Decoded length.
        len: usize,
    },
    /// The CRC does not match: the frame was corrupted (or is line noise).
    #[error("frame CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        /// CRC carried by the frame.
        stored: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    Protocol {
        /// The version byte found.
        found: u8,
    },
    /// The CRC matched but the message could not be decoded (a newer peer's variant, say).
    #[error("frame cannot be decoded: {0}")]
    Decode(#[source] postcard::Error),
}

/// Decodes one COBS frame (without its `0x00`) into a message.
fn decode_frame(encoded: &[u8]) -> Result<Message, FrameError> {
    let raw = cobs::decode_vec(encoded).map_err(|_| FrameError::Cobs)?;
    if raw.len() <= FRAME_OVERHEAD {
        return Err(FrameError::TooShort { len: raw.len() });
    }
    // Check the CRC before looking at anything else, so that noise is reported as noise, and
    // only then the version, so that a newer peer is reported as such rather than as garbage.
    let (covered, crc) = raw.split_at(raw.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = CRC32.checksum(covered);
    if stored != computed {
        return Err(FrameError::Crc { stored, computed });
    }
    if covered[0] != PROTOCOL_VERSION {
        return Err(FrameError::Protocol { found: covered[0] });
    }
    match postcard::take_from_bytes::<Message>(&covered[1..]) {
        Ok((message, [])) => Ok(message),
        Ok(_) => Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding)),
        Err(e) => Err(FrameError::Decode(e)),
    }
}

/// Splits a byte stream into frames and decodes them.
///
/// Feed it whatever the transport delivers: partial frames, several frames at once, noise.
/// Every `0x00` ends a frame; a frame that fails to decode is reported and counted, and the
/// decoder carries on with the next one. It never panics and never buffers more than its
/// limit: a longer run of bytes is dropped and the decoder resynchronises at the next `0x00`.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_len: usize,
    /// Inside a frame that outgrew `max_len`: skip to the next `0x00`.
    discarding: bool,
    bad_frames: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder for frames of up to [`MAX_FRAME_LEN`] bytes.
    pub fn new() -> Self {
        Self::with_max_len(MAX_FRAME_LEN)
    }

    /// A decoder for frames of up to `max_len` encoded bytes.
    pub fn with_max_len(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len,
            discarding: false,
            bad_frames: 0,
        }
    }

    /// Consumes `bytes` and returns the outcome of every frame they complete, in order.
    ///
    /// Empty frames (consecutive `0x00`) are not reported: a sender may send a lone `0x00` to
    /// end whatever noise came before.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Message, FrameError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == 0) {
            self.append(&rest[..end], &mut out);
            self.finish(&mut out);
            rest = &rest[end + 1..];
        }
        self.append(rest, &mut out);
        out
    }

    /// Number of frames dropped so far.
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames
    }

    /// Bytes of an unfinished frame held now; never more than the limit.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn append(&mut self, part: &[u8], out: &mut Vec<Result<Message, FrameError>>) {
        if self.discarding || part.is_empty() {
            return;
        }
        if self.buf.len() + part.len() > self.max_len {
            self.buf.clear();
            self.discarding = true;
            self.bad_frames += 1;
            out.push(Err(FrameError::TooLong { max: self.max_len }));
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn finish(&mut self, out: &mut Vec<Result<Message, FrameError>>) {
        if std::mem::take(&mut self.discarding) || self.buf.is_empty() {
            return;
        }
        let result = decode_frame(&self.buf);
        self.buf.clear();
        if result.is_err() {
            self.bad_frames += 1;
        }
        out.push(result);
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// A pre-shared key for [`transfer_mac`]. Its `Debug` output does not show the key.
#[derive(Clone)]
pub struct PreSharedKey(Vec<u8>);

/// A key shorter than [`MIN_KEY_LEN`].
#[derive(Debug, thiserror::Error)]
#[error("pre-shared key of {len} bytes is too short: use at least {MIN_KEY_LEN} random bytes")]
pub struct WeakKeyError {
    /// Length of the key offered.
    pub len: usize,
}

impl PreSharedKey {
    /// Wraps `key`, refusing one shorter than [`MIN_KEY_LEN`] bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, WeakKeyError> {
        let key = key.into();
        if key.len() < MIN_KEY_LEN {
            return Err(WeakKeyError { len: key.len() });
        }
        Ok(Self(key))
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length (long ones are hashed first).
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreSharedKey({} bytes)", self.0.len())
    }
}

/// Feeds the authenticated data into `mac`: everything that decides what the device does with
/// the set (its bytes, version and `force`), tied to the transfer.
fn mac_input(mac: &mut HmacSha256, transfer_id: u32, version: u64, force: bool, set: &[u8]) {
    mac.update(MAC_DOMAIN);
    mac.update(&transfer_id.to_le_bytes());
    mac.update(&version.to_le_bytes());
    mac.update(&[u8::from(force)]);
    mac.update(&(set.len() as u64).to_le_bytes());
    mac.update(set);
}

/// The MAC a [`Message::Commit`] carries: HMAC-SHA256 under `key` of a domain string, the
/// transfer id, version, `force` flag and length (little-endian), then the encoded set.
pub fn transfer_mac(
    key: &PreSharedKey,
    transfer_id: u32,
    version: u64,
    force: bool,
    set: &[u8],
) -> [u8; 32] {
    let mut mac = key.hmac();
    mac_input(&mut mac, transfer_id, version, force, set);
    mac.finalize().into_bytes().into()
}

// ---------------------------------------------------------------------------------------------
// Device side

/// Why a device refused a transfer; its text is the reason sent in [`Message::Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The announced set is larger than [`MAX_SET_LEN`].
    #[error("label set of {len} bytes exceeds the limit of {MAX_SET_LEN} bytes")]
    TooLarge {
        /// Announced length.
        len: u32,
    },
    /// `Begin` announced a chunk count that cannot carry the announced length.
    #[error("{n_chunks} chunks of 1 to {MAX_CHUNK} bytes cannot carry {total_len} bytes")]
    BadChunkCount {
        /// Announced length.
        total_len: u32,
        /// Announced chunk count.
        n_chunks: u32,
    },
    /// A chunk or commit for a transfer that is not in progress.
    #[error("no transfer {transfer_id} in progress")]
    NoTransfer {
        /// The transfer named.
        transfer_id: u32,
    },
    /// A chunk arrived ahead of the one expected.
    #[error("chunk {index} out of order: expected chunk {expected}")]
    OutOfOrder {
        /// Index received.
        index: u32,
        /// Index expected.
        expected: u32,
    },
    /// A chunk with no bytes or more than [`MAX_CHUNK`].
    #[error("chunk {index} has {len} bytes; a chunk carries 1 to {MAX_CHUNK}")]
    BadChunkLen {
        /// Index of the chunk.
        index: u32,
        /// Its length.
        len: usize,
    },
    /// Chunks beyond the announced count or length.
    #[error("chunk {index} overruns the announced {n_chunks} chunks of {total_len} bytes")]
    Overrun {
        /// Index of the chunk.
        index: u32,
        /// Announced chunk count.
        n_chunks: u32,
        /// Announced length.
        total_len: u32,
    },
    /// `Commit` before every chunk arrived.
    #[error(
        "transfer incomplete: {received} of {total_len} bytes in {chunks} of {n_chunks} chunks"
    )]
    Incomplete {
        /// Bytes received.
        received: usize,
        /// Announced length.
        total_len: u32,
        /// Chunks received.
        chunks: u32,
        /// Announced chunk count.
        n_chunks: u32,
    },
    /// The MAC does not verify under the device's key.
    #[error("authentication failed: the HMAC does not match this device's pre-shared key")]
    BadMac,
    /// The set's version differs from the one `Begin` announced.
    #[error("Begin announced version {announced}, the label set holds version {found}")]
    VersionMismatch {
        /// Version in `Begin`.
        announced: u64,
        /// Version in the set.
        found: u64,
    },
    /// The set itself was refused: corrupt, wrong format, dim or space, or not newer.
    #[error(transparent)]
    LabelSet(LabelSetError),
    /// The set was fine but could not be persisted, so it was not applied either.
    #[error("label set not applied: {0}")]
    Persist(LabelSetError),
}

/// What a [`Receiver`] checks sets against, and where it keeps them.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Embedding dimension of the device's encoder.
    pub dim: u32,
    /// Embedding-space id of the device's encoder.
    pub space_id: String,
    /// File an accepted set is saved to, atomically, before it is applied.
    pub path: PathBuf,
    /// When set, every transfer must carry a valid [`transfer_mac`] under this key. Required
    /// for updates from a network; `None` trusts the transport (a local serial console).
    pub key: Option<PreSharedKey>,
}

/// A transfer in progress.
#[derive(Debug)]
struct Transfer {
    id: u32,
    total_len: u32,
    n_chunks: u32,
    version: u64,
    force: bool,
    next_index: u32,
    data: Vec<u8>,
}

/// The device's side of the protocol, without any I/O: feed it messages, send its replies.
///
/// It holds at most one transfer; a new `Begin` abandons the old one. Every refusal leaves
/// the set in use, and the file at [`ReceiverConfig::path`], untouched.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    /// Version and label count of the set in use.
    current: Option<(u64, u32)>,
    transfer: Option<Transfer>,
    /// The last transfer's id and outcome, resent when the host repeats its `Commit` because
    /// the first answer was lost.
    last_outcome: Option<(u32, Message)>,
    accepted: Option<LabelSet>,
}

impl Receiver {
    /// A receiver for a device using `current` (if any).
    pub fn new(config: ReceiverConfig, current: Option<&LabelSet>) -> Self {
        Self {
            config,
            current: current.map(|set| (set.version, set.labels.len() as u32)),
            transfer: None,
            last_outcome: None,
            accepted: None,
        }
    }

    /// Catches up with the set in use when it changed by another way (another transport, a
    /// reload): a long-lived line (a serial port) would otherwise judge "newer" against the set
    /// that was in use when it opened.
    pub fn sync_current(&mut self, current: &LabelSet) {
        self.current = Some((current.version, current.labels.len() as u32));
    }

    /// The version of the set in use, as this receiver knows it.
    pub fn current_version(&self) -> Option<u64> {
        self.current.map(|(version, _)| version)
    }

    /// What [`Message::Status`] answers.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            version: self.current_version(),
            dim: self.config.dim,
            space_id: self.config.space_id.clone(),
            n_labels: self.current.map_or(0, |(_, n)| n),
        }
    }

    /// Takes the set accepted by the last [`Receiver::handle`], if any, to swap it in.
    pub fn take_accepted(&mut self) -> Option<LabelSet> {
        self.accepted.take()
    }

    /// Abandons the transfer in progress (the connection carrying it was lost), freeing its
    /// buffer.
    pub fn abort_transfer(&mut self) {
        self.transfer = None;
    }

    /// Handles one message and returns the reply to send, if any.
    ///
    /// Messages meant for a host are ignored without a reply: answering them could make two
    /// devices wired to each other talk forever.
    pub fn handle(&mut self, message: Message) -> Option<Message> {
        match message {
            Message::Begin {
                transfer_id,
                total_len,
                n_chunks,
                version,
                force,
            } => Some(self.begin(transfer_id, total_len, n_chunks, version, force)),
            Message::Chunk {
                transfer_id,
                index,
                data,
            } => Some(self.chunk(transfer_id, index, &data)),
            Message::Commit { transfer_id, mac } => Some(self.commit(transfer_id, &mac)),
            Message::Abort { transfer_id } => {
                if self.transfer.as_ref().is_some_and(|t| t.id == transfer_id) {
                    self.transfer = None;
                }
                None
            }
            Message::Status => Some(Message::StatusReply(self.status())),
            Message::Ack { .. }
            | Message::Accepted { .. }
            | Message::Rejected { .. }
            | Message::StatusReply(_) => None,
        }
    }

    fn begin(
        &mut self,
        id: u32,
        total_len: u32,
        n_chunks: u32,
        version: u64,
        force: bool,
    ) -> Message {
        self.transfer = None;
        let checked = (|| {
            if total_len > MAX_SET_LEN {
                return Err(UpdateError::TooLarge { len: total_len });
            }
            // Chunks carry 1 to MAX_CHUNK bytes: the count is bounded on both sides, which
            // also refuses an empty set.
            let fewest = total_len.div_ceil(MAX_CHUNK as u32);
            if n_chunks == 0 || n_chunks < fewest || n_chunks > total_len {
                return Err(UpdateError::BadChunkCount {
                    total_len,
                    n_chunks,
                });
            }
            // Refuse an old version now rather than after the whole set was sent; the set's
            // own version is checked again at the commit.
            match self.current_version() {
                Some(current) if !force && version <= current => {
                    Err(UpdateError::LabelSet(LabelSetError::NotNewer {
                        current,
                        offered: version,
                    }))
                }
                _ => Ok(()),
            }
        })();
        match checked {
            Ok(()) => {
                self.transfer = Some(Transfer {
                    id,
                    total_len,
                    n_chunks,
                    version,
                    force,
                    next_index: 0,
                    // Grow as chunks arrive rather than trusting the announced length.
                    data: Vec::with_capacity(total_len.min(64 * 1024) as usize),
                });
                Message::Ack {
                    transfer_id: id,
                    next_index: 0,
                }
            }
            Err(e) => self.reject(id, e),
        }
    }

    fn chunk(&mut self, id: u32, index: u32, data: &[u8]) -> Message {
        let Some(t) = self.transfer.as_mut().filter(|t| t.id == id) else {
            return self.reject(id, UpdateError::NoTransfer { transfer_id: id });
        };
        if index < t.next_index {
            // A retry after a lost Ack: the bytes are already stored.
            return Message::Ack {
                transfer_id: id,
                next_index: t.next_index,
            };
        }
        let error = if index > t.next_index {
            UpdateError::OutOfOrder {
                index,
                expected: t.next_index,
            }
        } else if data.is_empty() || data.len() > MAX_CHUNK {
            UpdateError::BadChunkLen {
                index,
                len: data.len(),
            }
        } else if index >= t.n_chunks || t.data.len() + data.len() > t.total_len as usize {
            UpdateError::Overrun {
                index,
                n_chunks: t.n_chunks,
                total_len: t.total_len,
            }
        } else {
            t.data.extend_from_slice(data);
            t.next_index += 1;
            return Message::Ack {
                transfer_id: id,
                next_index: t.next_index,
            };
        };
        self.transfer = None;
        self.reject(id, error)
    }

    fn commit(&mut self, id: u32, mac: &[u8; 32]) -> Message {
        let Some(transfer) = self.transfer.take_if(|t| t.id == id) else {
            return match &self.last_outcome {
                Some((last, outcome)) if *last == id => outcome.clone(),
                _ => self.reject(id, UpdateError::NoTransfer { transfer_id: id }),
            };
        };
        let outcome = match self.apply(&transfer, mac) {
            Ok(set) => {
                let version = set.version;
                tracing::info!(version, labels = set.labels.len(), "label set accepted");
                self.current = Some((version, set.labels.len() as u32));
                self.accepted = Some(set);
                Message::Accepted {
                    transfer_id: id,
                    version,
                }
            }
            Err(e) => self.reject(id, e),
        };
        self.last_outcome = Some((id, outcome.clone()));
        outcome
    }

    /// Checks a complete transfer and persists its set; nothing changes unless it succeeds.
    fn apply(&self, t: &Transfer, mac: &[u8; 32]) -> Result<LabelSet, UpdateError> {
        if t.next_index != t.n_chunks || t.data.len() != t.total_len as usize {
            return Err(UpdateError::Incomplete {
                received: t.data.len(),
                total_len: t.total_len,
                chunks: t.next_index,
                n_chunks: t.n_chunks,
            });
        }
        // Authenticate before parsing: untrusted bytes never reach the decoder.
        if let Some(key) = &self.config.key {
            let mut hmac = key.hmac();
            mac_input(&mut hmac, t.id, t.version, t.force, &t.data);
            // verify_slice compares in constant time.
            hmac.verify_slice(mac).map_err(|_| UpdateError::BadMac)?;
        }
        let set = LabelSet::decode(&t.data).map_err(UpdateError::LabelSet)?;
        if set.version != t.version {
            return Err(UpdateError::VersionMismatch {
                announced: t.version,
                found: set.version,
            });
        }
        set.check_compatible(
            self.config.dim,
            &self.config.space_id,
            self.current_version(),
            t.force,
        )
        .map_err(UpdateError::LabelSet)?;
        set.save_atomic(&self.config.path)
            .map_err(UpdateError::Persist)?;
        Ok(set)
    }

    fn reject(&self, transfer_id: u32, error: UpdateError) -> Message {
        tracing::warn!(transfer_id, "label-set update rejected: {error}");
        Message::rejected(transfer_id, error.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Host side

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The device refused the set; `reason` is its explanation.
    #[error("device rejected the label set: {reason}")]
    Rejected {
        /// The device's reason.
        reason: String,
    },
    /// The device did not answer, even after retries.
    #[error("no answer from the device to {what} after {attempts} attempts")]
    Timeout {
        /// The message that went unanswered.
        what: String,
        /// How often it was sent.
        attempts: u32,
    },
    /// The device closed the connection.
    #[error("the device closed the connection")]
    Closed,
    /// The encoded set is larger than a device accepts.
    #[error("label set of {len} bytes exceeds the limit of {MAX_SET_LEN} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
    },
    /// The set could not be encoded.
    #[error(transparent)]
    LabelSet(#[from] LabelSetError),
    /// Reading or writing the transport failed.
    #[error("label-set push: {0}")]
    Io(#[from] io::Error),
}

/// Timeouts and retries of [`Sender::push`] and [`query_status`].
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// How long to wait for the answer to `Begin` or a chunk before sending it again.
    pub timeout: Duration,
    /// How long to wait for the answer to `Commit`, which includes decoding and an fsync.
    pub commit_timeout: Duration,
    /// How often a message is sent again before giving up.
    pub retries: u32,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            commit_timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

/// The host's side of one transfer: an encoded set cut into the messages that carry it.
#[derive(Debug, Clone)]
pub struct Sender {
    transfer_id: u32,
    version: u64,
    force: bool,
    set: Vec<u8>,
    mac: [u8; 32],
}

impl Sender {
    /// Prepares a transfer of `set`, encoded bytes announced as `version`.
    ///
    /// The bytes are sent as given, so a device's checks can be exercised with any bytes.
    /// Without a `key` the MAC is zeros: only a device without a key accepts it.
    pub fn new(
        set: Vec<u8>,
        version: u64,
        force: bool,
        key: Option<&PreSharedKey>,
        transfer_id: u32,
    ) -> Result<Self, PushError> {
        if set.len() > MAX_SET_LEN as usize {
            return Err(PushError::TooLarge { len: set.len() });
        }
        let mac = key.map_or([0; 32], |key| {
            transfer_mac(key, transfer_id, version, force, &set)
        });
        Ok(Self {
            transfer_id,
            version,
            force,
            set,
            mac,
        })
    }

    /// Prepares a transfer of `set` under a fresh transfer id.
    pub fn for_set(
        set: &LabelSet,
        force: bool,
        key: Option<&PreSharedKey>,
    ) -> Result<Self, PushError> {
        Self::new(set.encode()?, set.version, force, key, fresh_transfer_id())
    }

    /// The id naming this transfer.
    pub fn transfer_id(&self) -> u32 {
        self.transfer_id
    }

    /// Number of chunks.
    pub fn n_chunks(&self) -> u32 {
        self.set.len().div_ceil(MAX_CHUNK) as u32
    }

    /// The message that starts the transfer.
    pub fn begin(&self) -> Message {
        Message::Begin {
            transfer_id: self.transfer_id,
            total_len: self.set.len() as u32,
            n_chunks: self.n_chunks(),
            version: self.version,
            force: self.force,
        }
    }

    /// The chunk messages, in order.
    pub fn chunks(&self) -> impl Iterator<Item = Message> + '_ {
        self.set
            .chunks(MAX_CHUNK)
            .enumerate()
            .map(|(index, data)| Message::Chunk {
                transfer_id: self.transfer_id,
                index: index as u32,
                data: data.to_vec(),
            })
    }

    /// The message that ends the transfer.
    pub fn commit(&self) -> Message {
        Message::Commit {
            transfer_id: self.transfer_id,
            mac: self.mac,
        }
    }

    /// Sends the set over `stream` and waits for the device's verdict: the version now in use,
    /// or the device's reason for refusing it.
    ///
    /// Each message is sent again after a timeout, up to `options.retries` times; a push that
    /// gives up sends `Abort` so the device frees the transfer.
    pub async fn push<S>(&self, stream: &mut S, options: &PushOptions) -> Result<u64, PushError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut link = Link::new(stream);
        // A lone delimiter ends whatever noise is sitting in the device's decoder, so that
        // the Begin is not glued to it and lost.
        link.write(&[0]).await?;
        let id = self.transfer_id;
        let result = async {
            link.exchange(&self.begin(), id, options.timeout, options.retries, |m| {
                matches!(m, Message::Ack { transfer_id, next_index: 0 } if *transfer_id == id)
                    .then_some(())
            })
            .await?;
            for (index, chunk) in self.chunks().enumerate() {
                let want = index as u32 + 1;
                // Ignore stale acknowledgements (answers to an earlier copy of a resent
                // chunk): only progress counts.
                link.exchange(&chunk, id, options.timeout, options.retries, |m| {
                    matches!(m, Message::Ack { transfer_id, next_index }
                        if *transfer_id == id && *next_index == want)
                    .then_some(())
                })
                .await?;
            }
            link.exchange(
                &self.commit(),
                id,
                options.commit_timeout,
                options.retries,
                |m| match m {
                    Message::Accepted {
                        transfer_id,
                        version,
                    } if *transfer_id == id => Some(*version),
                    _ => None,
                },
            )
            .await
        }
        .await;
        if matches!(result, Err(PushError::Timeout { .. })) {
            // Best effort: the line may be dead.
            let _ = link.send(&Message::Abort { transfer_id: id }).await;
        }
        result
    }
}

/// Asks the device on `stream` for its [`DeviceStatus`].
pub async fn query_status<S>(
    stream: &mut S,
    options: &PushOptions,
) -> Result<DeviceStatus, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut link = Link::new(stream);
    link.write(&[0]).await?;
    // No transfer id: Rejected never matches one, since a device does not reject Status.
    link.exchange(
        &Message::Status,
        u32::MAX,
        options.timeout,
        options.retries,
        |m| match m {
            Message::StatusReply(status) => Some(status.clone()),
            _ => None,
        },
    )
    .await
}

/// A transfer id unlikely to repeat across pushes and hosts (not secret, not random).
fn fresh_transfer_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
    nanos ^ std::process::id().rotate_left(16) ^ COUNTER.fetch_add(0x9E37_79B9, Ordering::Relaxed)
}

/// A framed connection for the host: sends messages, collects decoded replies.
struct Link<'a, S> {
    stream: &'a mut S,
    decoder: FrameDecoder,
    pending: VecDeque<Message>,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Link<'a, S> {
    fn new(stream: &'a mut S) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
            pending: VecDeque::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn send(&mut self, message: &Message) -> io::Result<()> {
        self.write(&encode_frame(message)).await
    }

    /// The next message, or `None` once `deadline` passes.
    async fn recv(&mut self, deadline: Instant) -> Result<Option<Message>, PushError> {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(message) = self.pending.pop_front() {
                return Ok(Some(message));
            }
            // `read` is cancel-safe: a timeout loses no bytes.
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_elapsed) => return Ok(None),
                Ok(read) => read?,
            };
            if n == 0 {
                return Err(PushError::Closed);
            }
            for result in self.decoder.feed(&buf[..n]) {
                match result {
                    Ok(message) => self.pending.push_back(message),
                    Err(e) => tracing::debug!("dropped a frame from the device: {e}"),
                }
            }
        }
    }

    /// Sends `message` until `want` picks an answer from the replies or the device rejects
    /// transfer `id`, resending after each `timeout`, at most `retries` more times.
    async fn exchange<T>(
        &mut self,
        message: &Message,
        id: u32,
        timeout: Duration,
        retries: u32,
        mut want: impl FnMut(&Message) -> Option<T>,
    ) -> Result<T, PushError> {
        for _ in 0..=retries {
            self.send(message).await?;
            let deadline = Instant::now() + timeout;
            while let Some(reply) = self.recv(deadline).await? {
                if let Some(answer) = want(&reply) {
                    return Ok(answer);
                }
                if let Message::Rejected {
                    transfer_id,
                    reason,
                } = reply
                {
                    if transfer_id == id {
                        return Err(PushError::Rejected { reason });
                    }
                }
            }
        }
        Err(PushError::Timeout {
            what: describe(message),
            attempts: retries + 1,
        })
    }
}

/// Names a message without its payload, for errors.
fn describe(message: &Message) -> String {
    match message {
        Message::Chunk { index, .. } => format!("chunk {index}"),
        Message::Begin { .. } => "Begin".into(),
        Message::Commit { .. } => "Commit".into(),
        Message::Status => "Status".into(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Device transport glue

/// Runs `receiver` over `stream` until the peer closes it: decodes frames, answers each
/// message, and calls `on_accept` with every accepted set (before its `Accepted` goes out, so
/// a host that sees `Accepted` knows the set is in use).
///
/// The same loop serves a TCP connection and a serial port. Bad frames are logged and
/// skipped. When the stream ends, a transfer in progress is abandoned.
pub async fn serve<S, F>(stream: S, receiver: &mut Receiver, on_accept: F) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(LabelSet),
{
    serve_tracking(stream, receiver, || None, on_accept).await
}

/// [`serve`] for a device whose set can also change by other ways: `current` returns the set
/// in use now, and the receiver syncs with it before every `Begin`, so a set that arrived by
/// another transport meanwhile counts in the version check.
pub async fn serve_tracking<S, C, F>(mut stream: S, receiver: &mut Receiver, current: C, mut on_accept: F) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Fn() -> Option<std::sync::Arc<LabelSet>>,
    F: FnMut(LabelSet),
{
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let result = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            for frame in decoder.feed(&buf[..n]) {
                let message = match frame {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::debug!("dropped a frame: {e}");
                        continue;
                    }
                };
                if let (Message::Begin { .. }, Some(set)) = (&message, current()) {
                    receiver.sync_current(&set);
                }
                let reply = receiver.handle(message);
                if let Some(set) = receiver.take_accepted() {
                    on_accept(set);
                }
                if let Some(reply) = reply {
                    stream.write_all(&encode_frame(&reply)).await?;
                    stream.flush().await?;
                }
            }
        }
    }
    .await;
    receiver.abort_transfer();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn unit(seed: usize, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim)
            .map(|k| ((seed * 7 + k * 3) % 5) as f32 - 1.5)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn sample_set(version: u64, n_labels: usize) -> LabelSet {
        let dim = 4;
        LabelSet {
            calibration: None,
            version,
            dim: dim as u32,
            space_id: "test-space".into(),
            labels: (0..n_labels)
                .map(|c| Label {
                    name: format!("label_{c}"),
                    text: format!("a person does action {c}"),
                    tokens: (0..3).flat_map(|i| unit(i + c, dim)).collect(),
                    token_weights: vec![1.0 / 3.0; 3],
                    pooled: unit(c + 11, dim),
                    threshold: None,
                })
                .collect(),
        }
    }

    fn key() -> PreSharedKey {
        PreSharedKey::new(*b"0123456789abcdef0123").unwrap()
    }

    fn receiver(dir: &tempfile::TempDir) -> Receiver {
        let config = ReceiverConfig {
            dim: 4,
            space_id: "test-space".into(),
            path: dir.path().join("labels.cls"),
            key: Some(key()),
        };
        Receiver::new(config, Some(&sample_set(1, 1)))
    }

    /// Runs a whole transfer through `rx` and returns its last reply.
    fn transfer(rx: &mut Receiver, sender: &Sender) -> Option<Message> {
        let mut replies = vec![rx.handle(sender.begin())];
        replies.extend(sender.chunks().map(|c| rx.handle(c)));
        let last = rx.handle(sender.commit());
        for reply in &replies {
            assert!(matches!(reply, Some(Message::Ack { .. })), "{reply:?}");
        }
        last
    }

    fn reason(reply: Option<Message>) -> String {
        match reply {
            Some(Message::Rejected { reason, .. }) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn frames_round_trip_and_match_postcard_crc32() {
        let messages = [
            Message::Status,
            Message::Chunk {
                transfer_id: 7,
                index: 3,
                data: (0..=255).chain(0..=255).collect(),
            },
            Message::rejected(9, "x".repeat(5000)),
            Message::StatusReply(DeviceStatus {
                version: None,
                dim: 512,
                space_id: "s".repeat(128),
                n_labels: 0,
            }),
        ];
        for message in messages {
            let frame = encode_frame(&message);
            assert!(frame.len() <= MAX_FRAME_LEN, "{} bytes", frame.len());
            assert_eq!(frame.iter().position(|&b| b == 0), Some(frame.len() - 1));
            let raw = cobs::decode_vec(&frame[..frame.len() - 1]).unwrap();
            let (version, decoded): (u8, Message) =
                postcard::from_bytes_crc32(&raw, CRC32.digest()).unwrap();
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(decoded, message);
            let mut decoder = FrameDecoder::new();
            let out = decoder.feed(&frame);
            assert_eq!(out.len(), 1);
            assert_eq!(out.into_iter().next().unwrap().unwrap(), message);
        }
    }

    #[test]
    fn rejected_reasons_are_cut_on_a_char_boundary() {
        let Message::Rejected { reason, .. } = Message::rejected(1, "é".repeat(MAX_REASON_LEN))
        else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON_LEN && reason.len() >= MAX_REASON_LEN - 1);
    }

    #[test]
    fn decoder_reports_and_skips_bad_frames() {
        let good = encode_frame(&Message::Status);
        let mut bad_crc = good.clone();
        bad_crc[2] ^= 0x40;
        let other_version = {
            let raw = postcard::to_stdvec_crc32(&(2u8, Message::Status), CRC32.digest()).unwrap();
            let mut f = cobs::encode_vec(&raw);
            f.push(0);
            f
        };
        let mut stream = Vec::new();
        stream.extend_from_slice(&[0, 0, 0]); // empty frames: ignored
        stream.extend_from_slice(&bad_crc);
        stream.extend_from_slice(&other_version);
        stream.extend_from_slice(&[7; 3000]); // too long
        stream.push(0);
        stream.extend_from_slice(&[3, 1, 2, 0]); // valid COBS, too short
        stream.extend_from_slice(&good);
        let mut decoder = FrameDecoder::new();
        let out = decoder.feed(&stream);
        let kinds: Vec<String> = out
            .iter()
            .map(|r| match r {
                Ok(m) => format!("{m:?}"),
                Err(e) => e.to_string(),
            })
            .collect();
        assert_eq!(kinds.len(), 5, "{kinds:?}");
        assert!(kinds[0].contains("CRC-32 mismatch"), "{kinds:?}");
        assert!(kinds[1].contains("protocol version 2"), "{kinds:?}");
        assert!(kinds[2].contains("longer than"), "{kinds:?}");
        assert!(kinds[3].contains("too short"), "{kinds:?}");
        assert_eq!(kinds[4], "Status");
        assert_eq!(decoder.bad_frames(), 4);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decoder_resyncs_after_an_over_long_frame_fed_bytewise() {
        let mut decoder = FrameDecoder::with_max_len(64);
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend(decoder.feed(&[0x55]));
            assert!(decoder.buffered() <= 64);
        }
        out.extend(decoder.feed(&[0]));
        for byte in encode_frame(&Message::Status) {
            out.extend(decoder.feed(&[byte]));
        }
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0], Err(FrameError::TooLong { max: 64 })));
        assert_eq!(out[1].as_ref().unwrap(), &Message::Status);
    }

    #[test]
    fn accepts_a_valid_transfer_and_persists_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        let set = sample_set(2, 20);
        let sender = Sender::for_set(&set, false, Some(&key())).unwrap();
        assert!(sender.n_chunks() > 1);
        let reply = transfer(&mut rx, &sender);
        assert_eq!(
            reply,
            Some(Message::Accepted {
                transfer_id: sender.transfer_id(),
                version: 2
            })
        );
        assert_eq!(rx.take_accepted(), Some(set.clone()));
        assert_eq!(rx.take_accepted(), None);
        assert_eq!(LabelSet::load(&dir.path().join("labels.cls")).unwrap(), set);
        assert_eq!(rx.status().version, Some(2));
        assert_eq!(rx.status().n_labels, 20);
        // A repeated Commit (its answer was lost) gets the same answer again.
        assert_eq!(rx.handle(sender.commit()), reply);
        assert_eq!(rx.take_accepted(), None);
    }

    #[test]
    fn repeated_chunks_are_acked_again_and_gaps_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        let sender = Sender::for_set(&sample_set(2, 20), false, Some(&key())).unwrap();
        let id = sender.transfer_id();
        let chunks: Vec<Message> = sender.chunks().collect();
        rx.handle(sender.begin());
        rx.handle(chunks[0].clone());
        let ack = rx.handle(chunks[0].clone());
        assert_eq!(
            ack,
            Some(Message::Ack {
                transfer_id: id,
                next_index: 1
            })
        );
        let gap = reason(rx.handle(chunks[2].clone()));
        assert_eq!(gap, "chunk 2 out of order: expected chunk 1");
        // The transfer is gone.
        let gone = reason(rx.handle(chunks[1].clone()));
        assert_eq!(gone, format!("no transfer {id} in progress"));
    }

    #[test]
    fn a_new_begin_abandons_a_stale_transfer() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        let set = sample_set(2, 20);
        let stale = Sender::new(set.encode().unwrap(), 2, false, Some(&key()), 1).unwrap();
        let fresh = Sender::new(set.encode().unwrap(), 2, false, Some(&key()), 2).unwrap();
        rx.handle(stale.begin());
        rx.handle(stale.chunks().next().unwrap());
        assert!(matches!(
            transfer(&mut rx, &fresh),
            Some(Message::Accepted { version: 2, .. })
        ));
        assert_eq!(
            reason(rx.handle(stale.commit())),
            "no transfer 1 in progress"
        );
    }

    #[test]
    fn begin_checks_size_chunking_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        let begin = |total_len, n_chunks, version| Message::Begin {
            transfer_id: 5,
            total_len,
            n_chunks,
            version,
            force: false,
        };
        let too_large = reason(rx.handle(begin(MAX_SET_LEN + 1, u32::MAX, 2)));
        assert!(too_large.contains("exceeds the limit"), "{too_large}");
        for (len, n) in [(0, 0), (0, 1), (1000, 1), (10, 11)] {
            let msg = reason(rx.handle(begin(len, n, 2)));
            assert!(msg.contains("cannot carry"), "{len}/{n}: {msg}");
        }
        let old = reason(rx.handle(begin(1000, 2, 1)));
        assert!(old.contains("not newer"), "{old}");
        assert!(matches!(
            rx.handle(begin(1000, 2, 2)),
            Some(Message::Ack { next_index: 0, .. })
        ));
    }

    #[test]
    fn commit_checks_completeness_mac_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.cls");
        let mut rx = receiver(&dir);
        let bytes = sample_set(2, 20).encode().unwrap();

        let sender = Sender::new(bytes.clone(), 2, false, Some(&key()), 10).unwrap();
        rx.handle(sender.begin());
        rx.handle(sender.chunks().next().unwrap());
        let msg = reason(rx.handle(sender.commit()));
        assert!(msg.starts_with("transfer incomplete"), "{msg}");

        let other = PreSharedKey::new(*b"another key, also long").unwrap();
        let sender = Sender::new(bytes.clone(), 2, false, Some(&other), 11).unwrap();
        assert!(reason(transfer(&mut rx, &sender)).contains("authentication failed"));
        let sender = Sender::new(bytes.clone(), 2, false, None, 12).unwrap();
        assert!(reason(transfer(&mut rx, &sender)).contains("authentication failed"));

        // The MAC covers `force`: turning a plain update into a forced one breaks it.
        let sender = Sender::new(bytes.clone(), 2, false, Some(&key()), 13).unwrap();
        let Message::Commit { mac, .. } = sender.commit() else {
            unreachable!()
        };
        let Message::Begin {
            total_len,
            n_chunks,
            ..
        } = sender.begin()
        else {
            unreachable!()
        };
        rx.handle(Message::Begin {
            transfer_id: 13,
            total_len,
            n_chunks,
            version: 2,
            force: true,
        });
        sender.chunks().for_each(|c| drop(rx.handle(c)));
        let msg = reason(rx.handle(Message::Commit {
            transfer_id: 13,
            mac,
        }));
        assert!(msg.contains("authentication failed"), "{msg}");

        let sender = Sender::new(bytes, 3, false, Some(&key()), 14).unwrap();
        let msg = reason(transfer(&mut rx, &sender));
        assert_eq!(
            msg,
            "Begin announced version 3, the label set holds version 2"
        );
        assert!(!path.exists());
        assert_eq!(rx.current_version(), Some(1));
        assert_eq!(rx.take_accepted(), None);
    }

    #[test]
    fn a_failed_save_is_a_rejection() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        rx.config.path = dir.path().join("missing-dir").join("labels.cls");
        let sender = Sender::for_set(&sample_set(2, 2), false, Some(&key())).unwrap();
        let msg = reason(transfer(&mut rx, &sender));
        assert!(msg.starts_with("label set not applied"), "{msg}");
        assert_eq!(rx.current_version(), Some(1));
        assert_eq!(rx.take_accepted(), None);
    }

    #[test]
    fn host_messages_are_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        assert_eq!(
            rx.handle(Message::Ack {
                transfer_id: 1,
                next_index: 1
            }),
            None
        );
        assert_eq!(rx.handle(Message::rejected(1, "no")), None);
        assert_eq!(rx.handle(Message::Abort { transfer_id: 1 }), None);
    }

    #[test]
    fn short_keys_are_refused_and_not_printed() {
        assert!(PreSharedKey::new(*b"short").is_err());
        assert_eq!(format!("{:?}", key()), "PreSharedKey(20 bytes)");
    }
}
