//! Label-set updates: the wire protocol that carries a new [`LabelSet`] from a host to a device.
//!
//! The same protocol runs over serial lines and TCP (`DESIGN.md` § Updates and events). It has
//! three layers, each usable on its own:
//!
//! - **Frames** ([`encode_frame`], [`FrameDecoder`]): a [`Message`] is encoded with postcard,
//!   led by [`PROTOCOL_VERSION`] and followed by a CRC-32, then COBS-encoded and terminated by
//!   `0x00`. A receiver can therefore resynchronise at the next `0x00` after any line noise,
//!   and drops every frame whose CRC fails.
//! - **The device's state machine** ([`Receiver`]): sans-IO, one reply per request, one per
//!   line. It answers `Begin` with a fresh nonce, collects chunks within the device's bounds and
//!   hands the complete transfer to the device's [`UpdateGate`], the one door every transport
//!   shares: it authenticates, checks, persists and applies one set at a time. Any failure is
//!   answered with [`Message::Rejected`] naming the problem, and the set in use stays untouched.
//! - **Transport glue** ([`Sender::push`] on the host, [`serve`] on the device) over any tokio
//!   `AsyncRead + AsyncWrite`.
//!
//! # A transfer
//!
//! ```text
//! host                                          device
//! Begin { transfer_id, total_len, n_chunks, version, force }
//!                                               Challenge { nonce, device } | Rejected
//! Chunk { index: 0, data }                      Ack { next_index: 1 }  | Rejected
//! ...                                           ...
//! Commit { mac over nonce, device, … }         Accepted { version }   | Rejected
//! ```
//!
//! The host sends one chunk at a time and waits for its acknowledgement (stop-and-wait): a
//! serial line has tiny buffers and no flow control, and a lost frame is found by a timeout
//! and resent. The device answers a repeated `Begin` with the same challenge (until the first
//! chunk), acknowledges a repeated chunk again without storing it twice, and answers a repeated
//! `Commit` with the outcome it already sent, so every retry is harmless.
//!
//! # Authentication
//!
//! `Commit` carries an HMAC-SHA256, under a pre-shared key, of the device's nonce and name, the
//! transfer's metadata and the whole encoded set ([`transfer_mac`]). A device configured with a
//! key ([`ReceiverConfig::key`]) refuses every transfer whose MAC does not verify; updates
//! arriving over a network must use one. A device without a key ignores the MAC: acceptable
//! only where whoever can reach the transport could also replace the files (a serial console
//! on the board).
//!
//! # Freshness
//!
//! The nonce is drawn by the device for each `Begin` and used once, so a recorded transfer is
//! worth nothing a second time, on this device or another. The device also persists the
//! highest version it ever accepted (its high-water mark, [`UpdateGate`]): a set that is not
//! forced must be newer than that, even after the persisted set was lost. A rollback is a new
//! transfer with `force`, signed for a fresh nonce.
//!
//! Message transports (MQTT, HTTP) have no back channel within one message; they ask first:
//! a message holding only `Begin` is answered with the challenge, and the next message carries
//! `Begin`, the chunks and `Commit` signed for it ([`crate::events::remote`]).
//!
//! # Compatibility
//!
//! postcard is not self-describing: [`Message`] variants and fields keep their order, new
//! variants are only ever appended, and anything else needs a new [`PROTOCOL_VERSION`].

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::labels::{LabelSet, LabelSetError};

pub mod gate;
pub use gate::{recover_store, Recovery, Reservation, UpdateGate, UpdateLimits};

/// Version of the frame layout and message set; the first byte of every frame.
///
/// 2: `Begin` is answered with [`Message::Challenge`]; the MAC covers its nonce and device name.
pub const PROTOCOL_VERSION: u8 = 2;
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
/// Length of a device's nonce, in bytes.
pub const NONCE_LEN: usize = 16;
/// Longest device name a [`Message::Challenge`] carries, in bytes (a config checks it).
pub const MAX_DEVICE_NAME_LEN: usize = 128;

/// A device's one-time challenge for a transfer.
pub type Nonce = [u8; NONCE_LEN];

/// Domain separation for [`transfer_mac`]: a MAC made for anything else never verifies here.
const MAC_DOMAIN: &[u8] = b"clipact label-set update v2\0";
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
    /// Answer to `Begin`: the transfer may go on, and its `Commit` must be signed for this
    /// nonce and device name.
    Challenge {
        /// The transfer accepted to begin.
        transfer_id: u32,
        /// Drawn by the device for this transfer only.
        nonce: Nonce,
        /// The device's `device_name`.
        device: String,
    },
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
        Message::Rejected { transfer_id, reason }
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
    /// The highest version this device ever accepted; a set that is not forced must be newer.
    pub high_water: u64,
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
        Self { buf: Vec::new(), max_len, discarding: false, bad_frames: 0 }
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

/// What a transfer's MAC covers besides the set: the device's challenge and the transfer's
/// metadata.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The device's nonce for this transfer.
    pub nonce: &'a Nonce,
    /// The device's name, as its challenge gave it.
    pub device: &'a str,
    /// The transfer id.
    pub transfer_id: u32,
    /// The set's version.
    pub version: u64,
    /// Whether the set may replace a newer one.
    pub force: bool,
}

/// Feeds the authenticated data into `mac`: everything that decides what the device does with
/// the set (its bytes, version and `force`), tied to the device's challenge and the transfer.
fn mac_input(mac: &mut HmacSha256, what: Signed<'_>, set: &[u8]) {
    let Signed { nonce, device, transfer_id, version, force } = what;
    mac.update(MAC_DOMAIN);
    mac.update(nonce);
    mac.update(&(device.len() as u32).to_le_bytes());
    mac.update(device.as_bytes());
    mac.update(&transfer_id.to_le_bytes());
    mac.update(&version.to_le_bytes());
    mac.update(&[u8::from(force)]);
    mac.update(&(set.len() as u64).to_le_bytes());
    mac.update(set);
}

/// The MAC a [`Message::Commit`] carries: HMAC-SHA256 under `key` of a domain string, the
/// nonce, the device name's length and bytes, the transfer id, version, `force` flag and the
/// set's length (little-endian), then the encoded set.
pub fn transfer_mac(key: &PreSharedKey, what: Signed<'_>, set: &[u8]) -> [u8; 32] {
    let mut mac = key.hmac();
    mac_input(&mut mac, what, set);
    mac.finalize().into_bytes().into()
}

/// Checks `mac` against `key` in constant time.
fn verify_mac(key: &PreSharedKey, what: Signed<'_>, set: &[u8], mac: &[u8; 32]) -> bool {
    let mut hmac = key.hmac();
    mac_input(&mut hmac, what, set);
    hmac.verify_slice(mac).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Device side

/// Why a device refused a transfer; its text is the reason sent in [`Message::Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The announced set is larger than this device takes.
    #[error("label set of {len} bytes exceeds this device's limit of {limit} bytes (`[updates] max_buffered_bytes`)")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The device's limit.
        limit: usize,
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
    /// A message transport's transfer for which no challenge was issued (or it was used or
    /// expired).
    #[error("no challenge issued for transfer {transfer_id}, or it was used or expired: send Begin alone first and sign the transfer for the nonce the device answers")]
    NoChallenge {
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
    #[error("transfer incomplete: {received} of {total_len} bytes in {chunks} of {n_chunks} chunks")]
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
    /// The MAC does not verify under the device's key (or was made for another nonce).
    #[error(
        "authentication failed: the HMAC does not match this device's pre-shared key and this transfer's challenge"
    )]
    BadMac,
    /// The set's version differs from the one `Begin` announced.
    #[error("Begin announced version {announced}, the label set holds version {found}")]
    VersionMismatch {
        /// Version in `Begin`.
        announced: u64,
        /// Version in the set.
        found: u64,
    },
    /// A set that is not forced must be newer than every version the device ever accepted.
    #[error("label set version {offered} is not above this device's high-water version {high_water} (the highest it ever accepted); use a higher version, or --force for a rollback")]
    BelowHighWater {
        /// Version offered.
        offered: u64,
        /// The device's high-water mark.
        high_water: u64,
    },
    /// A bound on unauthenticated data was reached; the same transfer may succeed later.
    #[error("busy: {what}; try again")]
    Busy {
        /// Which bound.
        what: String,
    },
    /// The set itself was refused: corrupt, wrong format, dim or space, or not newer.
    #[error(transparent)]
    LabelSet(LabelSetError),
    /// The set was fine but could not be persisted, so it was not applied either.
    #[error("label set not applied: {0}")]
    Persist(LabelSetError),
    /// The set was persisted but the pipeline could not take it (it is shutting down).
    #[error("label set saved but not applied: {0}")]
    NotApplied(String),
}

/// What a device checks sets against, and where it keeps them.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The device's name: signed into every transfer, sent in its challenges.
    pub device_name: String,
    /// Embedding dimension of the device's encoder.
    pub dim: u32,
    /// Embedding-space id of the device's encoder.
    pub space_id: String,
    /// File an accepted set is saved to, atomically, before it is applied.
    pub path: PathBuf,
    /// When set, every transfer must carry a valid [`transfer_mac`] under this key. Required
    /// for updates from a network; `None` trusts the transport (a local serial console).
    pub key: Option<PreSharedKey>,
    /// Bounds on unauthenticated data.
    pub limits: UpdateLimits,
}

/// How a [`Receiver`]'s line carries a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// A connection or a serial line: `Begin` gets a fresh nonce in its answer.
    Stream,
    /// One message of a message transport (MQTT, HTTP): `Begin` uses the challenge the
    /// device issued for its transfer id to an earlier message, and the message's bytes are
    /// already held by its transport.
    Message,
}

/// A transfer in progress.
#[derive(Debug)]
struct Transfer {
    id: u32,
    total_len: u32,
    n_chunks: u32,
    version: u64,
    force: bool,
    nonce: Nonce,
    next_index: u32,
    data: Vec<u8>,
    reservation: Reservation,
}

/// The device's side of the protocol for one line, without any I/O: feed it messages, send
/// its replies. Accepted sets go through the device's [`UpdateGate`], which every line
/// shares.
///
/// It holds at most one transfer; a new `Begin` abandons the old one. Every refusal leaves
/// the set in use, and the file at [`ReceiverConfig::path`], untouched.
#[derive(Debug)]
pub struct Receiver {
    gate: Arc<UpdateGate>,
    line: Line,
    transfer: Option<Transfer>,
    /// The last transfer's id and outcome, resent when the host repeats its `Commit` because
    /// the first answer was lost.
    last_outcome: Option<(u32, Message)>,
}

impl Receiver {
    /// A receiver for one line of the device behind `gate`.
    pub fn new(gate: Arc<UpdateGate>, line: Line) -> Self {
        Self { gate, line, transfer: None, last_outcome: None }
    }

    /// What [`Message::Status`] answers.
    pub fn status(&self) -> DeviceStatus {
        self.gate.status()
    }

    /// Whether a transfer is in progress on this line.
    pub fn in_transfer(&self) -> bool {
        self.transfer.is_some()
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
            Message::Begin { transfer_id, total_len, n_chunks, version, force } => {
                Some(self.begin(transfer_id, total_len, n_chunks, version, force))
            }
            Message::Chunk { transfer_id, index, data } => Some(self.chunk(transfer_id, index, &data)),
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
            | Message::StatusReply(_)
            | Message::Challenge { .. } => None,
        }
    }

    fn begin(&mut self, id: u32, total_len: u32, n_chunks: u32, version: u64, force: bool) -> Message {
        if let Some(t) = &self.transfer {
            // A Begin resent because its answer was lost: the same challenge again.
            if t.id == id
                && t.next_index == 0
                && (t.total_len, t.n_chunks, t.version, t.force) == (total_len, n_chunks, version, force)
            {
                return Message::Challenge {
                    transfer_id: id,
                    nonce: t.nonce,
                    device: self.gate.config().device_name.clone(),
                };
            }
        }
        self.transfer = None;
        let checked = (|| {
            self.gate.check_begin(total_len, version, force)?;
            // Chunks carry 1 to MAX_CHUNK bytes: the count is bounded on both sides, which
            // also refuses an empty set.
            let fewest = total_len.div_ceil(MAX_CHUNK as u32);
            if n_chunks == 0 || n_chunks < fewest || n_chunks > total_len {
                return Err(UpdateError::BadChunkCount { total_len, n_chunks });
            }
            // Reserve first: a transfer refused as busy keeps its challenge for a retry.
            let reservation = self.gate.reserve()?;
            let nonce = match self.line {
                Line::Stream => gate::fresh_nonce(),
                Line::Message => self.gate.take_challenge(id).ok_or(UpdateError::NoChallenge { transfer_id: id })?,
            };
            Ok((nonce, reservation))
        })();
        match checked {
            Ok((nonce, reservation)) => {
                self.transfer = Some(Transfer {
                    id,
                    total_len,
                    n_chunks,
                    version,
                    force,
                    nonce,
                    next_index: 0,
                    data: Vec::new(),
                    reservation,
                });
                Message::Challenge { transfer_id: id, nonce, device: self.gate.config().device_name.clone() }
            }
            Err(e) => self.reject(id, e),
        }
    }

    fn chunk(&mut self, id: u32, index: u32, data: &[u8]) -> Message {
        let line = self.line;
        let Some(t) = self.transfer.as_mut().filter(|t| t.id == id) else {
            return self.reject(id, UpdateError::NoTransfer { transfer_id: id });
        };
        if index < t.next_index {
            // A retry after a lost Ack: the bytes are already stored.
            return Message::Ack { transfer_id: id, next_index: t.next_index };
        }
        let error = if index > t.next_index {
            UpdateError::OutOfOrder { index, expected: t.next_index }
        } else if data.is_empty() || data.len() > MAX_CHUNK {
            UpdateError::BadChunkLen { index, len: data.len() }
        } else if index >= t.n_chunks || t.data.len() + data.len() > t.total_len as usize {
            UpdateError::Overrun { index, n_chunks: t.n_chunks, total_len: t.total_len }
        } else {
            // A message's bytes are held by its transport already.
            let held = match line {
                Line::Stream => t.reservation.grow(data.len()),
                Line::Message => Ok(()),
            };
            match held {
                Ok(()) => {
                    if t.data.is_empty() {
                        // Pages are touched only as chunks fill them, and the buffer never
                        // moves: what it holds is what the budget counts.
                        t.data.reserve_exact(t.total_len as usize);
                    }
                    t.data.extend_from_slice(data);
                    t.next_index += 1;
                    return Message::Ack { transfer_id: id, next_index: t.next_index };
                }
                Err(e) => e,
            }
        };
        self.transfer = None;
        self.reject(id, error)
    }

    fn commit(&mut self, id: u32, mac: &[u8; 32]) -> Message {
        let Some(t) = self.transfer.take_if(|t| t.id == id) else {
            return match &self.last_outcome {
                Some((last, outcome)) if *last == id => outcome.clone(),
                _ => self.reject(id, UpdateError::NoTransfer { transfer_id: id }),
            };
        };
        let outcome = if t.next_index != t.n_chunks || t.data.len() != t.total_len as usize {
            Err(UpdateError::Incomplete {
                received: t.data.len(),
                total_len: t.total_len,
                chunks: t.next_index,
                n_chunks: t.n_chunks,
            })
        } else {
            let signed = Signed {
                nonce: &t.nonce,
                device: &self.gate.config().device_name,
                transfer_id: t.id,
                version: t.version,
                force: t.force,
            };
            self.gate.commit(signed, &t.data, mac)
        };
        let outcome = match outcome {
            Ok(set) => {
                tracing::info!(version = set.version, labels = set.labels.len(), "label set accepted");
                Message::Accepted { transfer_id: id, version: set.version }
            }
            Err(e) => self.reject(id, e),
        };
        self.last_outcome = Some((id, outcome.clone()));
        outcome
    }

    fn reject(&self, transfer_id: u32, error: UpdateError) -> Message {
        let reason = error.to_string();
        self.gate.log_rejection(Some(transfer_id), &reason);
        Message::rejected(transfer_id, reason)
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
        Self { timeout: Duration::from_secs(2), commit_timeout: Duration::from_secs(30), retries: 3 }
    }
}

/// The host's side of one transfer: an encoded set cut into the messages that carry it,
/// signed once the device's challenge is known.
#[derive(Debug, Clone)]
pub struct Sender {
    transfer_id: u32,
    version: u64,
    force: bool,
    set: Vec<u8>,
    key: Option<PreSharedKey>,
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
        Ok(Self { transfer_id, version, force, set, key: key.cloned() })
    }

    /// Prepares a transfer of `set` under a fresh transfer id.
    pub fn for_set(set: &LabelSet, force: bool, key: Option<&PreSharedKey>) -> Result<Self, PushError> {
        Self::new(set.encode()?, set.version, force, key, fresh_transfer_id())
    }

    /// The id naming this transfer.
    pub fn transfer_id(&self) -> u32 {
        self.transfer_id
    }

    /// Length of the encoded set, in bytes.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the encoded set is empty (a device refuses it).
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
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
        self.set.chunks(MAX_CHUNK).enumerate().map(|(index, data)| Message::Chunk {
            transfer_id: self.transfer_id,
            index: index as u32,
            data: data.to_vec(),
        })
    }

    /// The message that ends the transfer, signed for the device's challenge.
    pub fn commit(&self, nonce: &Nonce, device: &str) -> Message {
        let signed = Signed { nonce, device, transfer_id: self.transfer_id, version: self.version, force: self.force };
        Message::Commit {
            transfer_id: self.transfer_id,
            mac: self.key.as_ref().map_or([0; 32], |key| transfer_mac(key, signed, &self.set)),
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
            let (nonce, device) = link
                .exchange(&self.begin(), id, options.timeout, options.retries, |m| match m {
                    Message::Challenge { transfer_id, nonce, device } if *transfer_id == id => {
                        Some((*nonce, device.clone()))
                    }
                    _ => None,
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
            link.exchange(&self.commit(&nonce, &device), id, options.commit_timeout, options.retries, |m| match m {
                Message::Accepted { transfer_id, version } if *transfer_id == id => Some(*version),
                _ => None,
            })
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
pub async fn query_status<S>(stream: &mut S, options: &PushOptions) -> Result<DeviceStatus, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut link = Link::new(stream);
    link.write(&[0]).await?;
    // No transfer id: Rejected never matches one, since a device does not reject Status.
    link.exchange(&Message::Status, u32::MAX, options.timeout, options.retries, |m| match m {
        Message::StatusReply(status) => Some(status.clone()),
        _ => None,
    })
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
        Self { stream, decoder: FrameDecoder::new(), pending: VecDeque::new() }
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
                if let Message::Rejected { transfer_id, reason } = reply {
                    if transfer_id == id {
                        return Err(PushError::Rejected { reason });
                    }
                }
            }
        }
        Err(PushError::Timeout { what: describe(message), attempts: retries + 1 })
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

/// Runs `receiver` over `stream` until the peer closes it: decodes frames and answers each
/// message. The same loop serves a TCP connection and a serial port.
///
/// Bad frames are skipped. A transfer that goes quiet for the gate's `idle_timeout`, or
/// outlasts its `body_timeout`, is abandoned; a connection (`close_when_idle`) is then closed,
/// a serial line keeps being served. When the stream ends, a transfer in progress is
/// abandoned.
pub async fn serve<S>(stream: S, receiver: &mut Receiver, close_when_idle: bool) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    serve_line(stream, receiver, close_when_idle, None).await
}

/// [`serve`], telling `busy` whether a transfer is in progress.
async fn serve_line<S>(
    mut stream: S,
    receiver: &mut Receiver,
    close_when_idle: bool,
    busy: Option<&AtomicBool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = receiver.gate.config().limits.clone();
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let mut transfer_started: Option<Instant> = None;
    let result = async {
        loop {
            let deadline = match transfer_started {
                Some(start) => (Instant::now() + limits.idle_timeout).min(start + limits.body_timeout),
                None => Instant::now() + limits.idle_timeout,
            };
            let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(read) => read?,
                Err(_elapsed) => {
                    if receiver.in_transfer() {
                        tracing::debug!("update line quiet or slow: transfer abandoned");
                        receiver.abort_transfer();
                        transfer_started = None;
                    }
                    if close_when_idle {
                        return Ok(());
                    }
                    continue;
                }
            };
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
                let begins = matches!(message, Message::Begin { .. });
                let reply = receiver.handle(message);
                if begins && receiver.in_transfer() && transfer_started.is_none() {
                    transfer_started = Some(Instant::now());
                } else if !receiver.in_transfer() {
                    transfer_started = None;
                }
                if let Some(busy) = busy {
                    busy.store(receiver.in_transfer(), Ordering::Relaxed);
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

/// The open connections of one listener, at most `max`.
///
/// A new connection displaces the oldest one that is not busy (no transfer or request in
/// progress), so connections that sit idle cannot lock a sender out; only when every slot is
/// busy is the new one refused.
#[derive(Debug, Clone)]
pub struct Slots {
    inner: Arc<std::sync::Mutex<SlotList>>,
}

#[derive(Debug)]
struct SlotList {
    max: usize,
    next_id: u64,
    open: VecDeque<(u64, Arc<AtomicBool>, Arc<tokio::sync::Notify>)>,
}

impl Slots {
    /// Room for `max` connections (at least one).
    pub fn new(max: usize) -> Self {
        Self { inner: Arc::new(std::sync::Mutex::new(SlotList { max: max.max(1), next_id: 0, open: VecDeque::new() })) }
    }

    /// A slot for a new connection, displacing the oldest idle one when full; `None` when
    /// every slot is busy.
    pub fn admit(&self) -> Option<Slot> {
        let mut list = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if list.open.len() >= list.max {
            let idle = list.open.iter().position(|(_, busy, _)| !busy.load(Ordering::Relaxed))?;
            let (_, _, evict) = list.open.remove(idle)?;
            evict.notify_one();
        }
        let id = list.next_id;
        list.next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(tokio::sync::Notify::new());
        list.open.push_back((id, busy.clone(), evict.clone()));
        Some(Slot { slots: self.clone(), id, busy, evict })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).open.len()
    }
}

/// One connection's place in [`Slots`]; freed on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    id: u64,
    busy: Arc<AtomicBool>,
    evict: Arc<tokio::sync::Notify>,
}

impl Slot {
    /// Marks the connection busy (not to be displaced) or idle.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// The flag [`Slot::set_busy`] sets, for a service that outlives a borrow.
    pub fn busy_flag(&self) -> Arc<AtomicBool> {
        self.busy.clone()
    }

    /// Completes when a newer connection displaced this one.
    pub async fn displaced(&self) {
        self.evict.notified().await
    }

    /// [`serve`]s an update connection until it ends or is displaced.
    pub async fn serve<S>(&self, stream: S, receiver: &mut Receiver) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::select! {
            result = serve_line(stream, receiver, true, Some(&self.busy)) => result,
            () = self.displaced() => Ok(()),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut list = self.slots.inner.lock().unwrap_or_else(|e| e.into_inner());
        list.open.retain(|(id, _, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn unit(seed: usize, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|k| ((seed * 7 + k * 3) % 5) as f32 - 1.5).collect();
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

    fn config(dir: &tempfile::TempDir, limits: UpdateLimits) -> ReceiverConfig {
        ReceiverConfig {
            device_name: "cam-1".into(),
            dim: 4,
            space_id: "test-space".into(),
            path: dir.path().join("labels.cls"),
            key: Some(key()),
            limits,
        }
    }

    /// A gate for a device running version 1, and the sets it delivered.
    fn gate_with(
        dir: &tempfile::TempDir,
        limits: UpdateLimits,
    ) -> (Arc<UpdateGate>, Arc<std::sync::Mutex<Vec<LabelSet>>>) {
        let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = delivered.clone();
        let gate = UpdateGate::new(config(dir, limits), Some(&sample_set(1, 1)), 1, move |set| {
            sink.lock().unwrap().push(set);
            Ok(())
        });
        (gate, delivered)
    }

    fn receiver(dir: &tempfile::TempDir) -> Receiver {
        Receiver::new(gate_with(dir, UpdateLimits::default()).0, Line::Stream)
    }

    /// The nonce and device name of a challenge.
    fn challenge(reply: Option<Message>) -> (Nonce, String) {
        match reply {
            Some(Message::Challenge { nonce, device, .. }) => (nonce, device),
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Runs a whole transfer through `rx` and returns its last reply (a refused `Begin`'s).
    fn transfer(rx: &mut Receiver, sender: &Sender) -> Option<Message> {
        let (nonce, device) = match rx.handle(sender.begin()) {
            refused @ Some(Message::Rejected { .. }) => return refused,
            reply => challenge(reply),
        };
        for chunk in sender.chunks() {
            let reply = rx.handle(chunk);
            assert!(matches!(reply, Some(Message::Ack { .. })), "{reply:?}");
        }
        rx.handle(sender.commit(&nonce, &device))
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
            Message::Chunk { transfer_id: 7, index: 3, data: (0..=255).chain(0..=255).collect() },
            Message::rejected(9, "x".repeat(5000)),
            Message::StatusReply(DeviceStatus {
                version: None,
                dim: 512,
                space_id: "s".repeat(128),
                n_labels: 0,
                high_water: u64::MAX,
            }),
            Message::Challenge {
                transfer_id: u32::MAX,
                nonce: [0; NONCE_LEN],
                device: "d".repeat(MAX_DEVICE_NAME_LEN),
            },
        ];
        for message in messages {
            let frame = encode_frame(&message);
            assert!(frame.len() <= MAX_FRAME_LEN, "{} bytes", frame.len());
            assert_eq!(frame.iter().position(|&b| b == 0), Some(frame.len() - 1));
            let raw = cobs::decode_vec(&frame[..frame.len() - 1]).unwrap();
            let (version, decoded): (u8, Message) = postcard::from_bytes_crc32(&raw, CRC32.digest()).unwrap();
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
        let Message::Rejected { reason, .. } = Message::rejected(1, "é".repeat(MAX_REASON_LEN)) else {
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
            let raw = postcard::to_stdvec_crc32(&(PROTOCOL_VERSION + 1, Message::Status), CRC32.digest()).unwrap();
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
        assert!(kinds[1].contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)), "{kinds:?}");
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
        let (gate, delivered) = gate_with(&dir, UpdateLimits::default());
        let mut rx = Receiver::new(gate.clone(), Line::Stream);
        let set = sample_set(2, 20);
        let sender = Sender::for_set(&set, false, Some(&key())).unwrap();
        assert!(sender.n_chunks() > 1);
        let (nonce, device) = challenge(rx.handle(sender.begin()));
        assert_eq!(device, "cam-1");
        // A Begin resent after a lost answer gets the same challenge.
        assert_eq!(challenge(rx.handle(sender.begin())), (nonce, device.clone()));
        sender.chunks().for_each(|c| drop(rx.handle(c)));
        let reply = rx.handle(sender.commit(&nonce, &device));
        assert_eq!(reply, Some(Message::Accepted { transfer_id: sender.transfer_id(), version: 2 }));
        assert_eq!(*delivered.lock().unwrap(), std::slice::from_ref(&set));
        let path = dir.path().join("labels.cls");
        assert_eq!(LabelSet::load(&path).unwrap(), set);
        assert_eq!(LabelSet::load(&gate::last_good_path(&path)).unwrap(), set);
        assert_eq!(std::fs::read_to_string(gate::high_water_path(&path)).unwrap(), "2\n");
        assert_eq!(rx.status().version, Some(2));
        assert_eq!(rx.status().n_labels, 20);
        assert_eq!(gate.buffered_bytes(), 0, "the transfer's bytes are given back");
        // A repeated Commit (its answer was lost) gets the same answer again, applying nothing.
        assert_eq!(rx.handle(sender.commit(&nonce, &device)), reply);
        assert_eq!(delivered.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_recorded_transfer_is_worth_nothing_a_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, delivered) = gate_with(&dir, UpdateLimits::default());
        // A forced rollback, recorded on the wire.
        let sender = Sender::for_set(&sample_set(1, 3), true, Some(&key())).unwrap();
        let mut rx = Receiver::new(gate.clone(), Line::Stream);
        let (nonce, device) = challenge(rx.handle(sender.begin()));
        let recorded: Vec<Message> =
            std::iter::once(sender.begin()).chain(sender.chunks()).chain([sender.commit(&nonce, &device)]).collect();
        sender.chunks().for_each(|c| drop(rx.handle(c)));
        assert!(matches!(rx.handle(sender.commit(&nonce, &device)), Some(Message::Accepted { version: 1, .. })));
        // Played again, on a new line or the same one: a new nonce, so the old MAC fails.
        for mut line in [Receiver::new(gate.clone(), Line::Stream), rx] {
            let replies: Vec<Option<Message>> = recorded.iter().map(|m| line.handle(m.clone())).collect();
            assert!(reason(replies.last().unwrap().clone()).contains("authentication failed"));
        }
        assert_eq!(delivered.lock().unwrap().len(), 1);
        assert_eq!(gate.rejected_total(), 2);
    }

    #[test]
    fn the_high_water_mark_outlives_rollbacks() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, delivered) = gate_with(&dir, UpdateLimits::default());
        let mut rx = Receiver::new(gate.clone(), Line::Stream);
        let push = |rx: &mut Receiver, version, force| {
            transfer(rx, &Sender::for_set(&sample_set(version, 2), force, Some(&key())).unwrap())
        };
        assert!(matches!(push(&mut rx, 5, false), Some(Message::Accepted { version: 5, .. })));
        assert!(matches!(push(&mut rx, 3, true), Some(Message::Accepted { version: 3, .. })));
        assert_eq!(gate.status().high_water, 5);
        let msg = reason(push(&mut rx, 4, false));
        assert!(msg.contains("high-water version 5"), "{msg}");
        assert!(matches!(push(&mut rx, 6, false), Some(Message::Accepted { version: 6, .. })));
        let versions: Vec<u64> = delivered.lock().unwrap().iter().map(|s| s.version).collect();
        assert_eq!(versions, [5, 3, 6]);
    }

    #[test]
    fn transfers_and_unauthenticated_bytes_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limits = UpdateLimits { max_transfers: 1, max_buffered_bytes: 3 * MAX_CHUNK, ..UpdateLimits::default() };
        let (gate, _) = gate_with(&dir, limits);
        let small = Sender::for_set(&sample_set(2, 1), false, Some(&key())).unwrap();
        let large = Sender::new(vec![7; 4 * MAX_CHUNK], 2, false, Some(&key()), 9).unwrap();
        let mut first = Receiver::new(gate.clone(), Line::Stream);
        let mut second = Receiver::new(gate.clone(), Line::Stream);
        assert!(reason(first.handle(large.begin())).contains("exceeds this device's limit"));
        challenge(first.handle(small.begin()));
        assert!(reason(second.handle(small.begin())).contains("busy: 1 transfers already in progress"));
        first.abort_transfer();
        challenge(second.handle(small.begin()));
        // Bytes: a message transport holds its payload, the stream line its chunks.
        let held = gate.hold_bytes(3 * MAX_CHUNK - 10).unwrap();
        let msg = reason(second.handle(small.chunks().next().unwrap()));
        assert!(msg.contains("max_buffered_bytes"), "{msg}");
        drop(held);
        assert_eq!(gate.buffered_bytes(), 0);
        assert!(matches!(transfer(&mut second, &small), Some(Message::Accepted { .. })));
    }

    #[test]
    fn recovery_restores_the_last_good_copy_and_keeps_the_high_water() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.cls");
        // Nothing persisted yet: nothing to recover.
        assert_eq!(recover_store(&path), Recovery { high_water: 0, problem: None });
        let (gate, _) = gate_with(&dir, UpdateLimits::default());
        let mut rx = Receiver::new(gate, Line::Stream);
        for (version, force) in [(7, false), (4, true)] {
            let sender = Sender::for_set(&sample_set(version, 2), force, Some(&key())).unwrap();
            assert!(matches!(transfer(&mut rx, &sender), Some(Message::Accepted { .. })));
        }
        let stale = dir.path().join(".labels.cls.tmp-123-4");
        std::fs::write(&stale, b"half a set").unwrap();
        std::fs::write(&path, b"corrupt").unwrap();
        let recovery = recover_store(&path);
        assert_eq!(recovery.high_water, 7);
        assert!(recovery.problem.as_deref().unwrap().contains("restored version 4"), "{recovery:?}");
        assert_eq!(LabelSet::load(&path).unwrap().version, 4);
        assert!(!stale.exists());
        // A crash between a set and its mark: recovery writes the mark, so that a rollback
        // overwriting both copies cannot take it down.
        std::fs::write(gate::high_water_path(&path), "3\n").unwrap();
        assert_eq!(recover_store(&path).high_water, 4);
        let mark = std::fs::read_to_string(gate::high_water_path(&path)).unwrap();
        assert_eq!(mark, "4\n", "the sets' version, written back");
        std::fs::write(gate::high_water_path(&path), "7\n").unwrap();
        // Both copies gone: the high-water file still holds.
        std::fs::write(&path, b"x").unwrap();
        std::fs::write(gate::last_good_path(&path), b"y").unwrap();
        let recovery = recover_store(&path);
        assert_eq!(recovery.high_water, 7);
        assert!(recovery.problem.unwrap().contains("so is its copy"));
    }

    #[tokio::test]
    async fn a_full_listener_displaces_its_oldest_idle_connection() {
        let slots = Slots::new(2);
        let oldest = slots.admit().unwrap();
        let busy = slots.admit().unwrap();
        busy.set_busy(true);
        let newest = slots.admit().expect("room made by displacing the idle one");
        tokio::time::timeout(Duration::from_secs(5), oldest.displaced())
            .await
            .expect("the oldest idle connection is told to go");
        drop(oldest);
        assert_eq!(slots.open(), 2);
        newest.set_busy(true);
        assert!(slots.admit().is_none(), "every connection is transferring: the new one is refused");
        drop(busy);
        assert!(slots.admit().is_some());
    }

    #[test]
    fn rejections_are_counted_and_their_logging_limited() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, _) = gate_with(&dir, UpdateLimits::default());
        let mut rx = Receiver::new(gate.clone(), Line::Stream);
        for id in 0..1000 {
            rx.handle(Message::Commit { transfer_id: id, mac: [0; 32] });
        }
        assert_eq!(gate.rejected_total(), 1000);
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
        assert_eq!(ack, Some(Message::Ack { transfer_id: id, next_index: 1 }));
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
        let (nonce, device) = challenge(rx.handle(stale.begin()));
        rx.handle(stale.chunks().next().unwrap());
        assert!(matches!(transfer(&mut rx, &fresh), Some(Message::Accepted { version: 2, .. })));
        assert_eq!(reason(rx.handle(stale.commit(&nonce, &device))), "no transfer 1 in progress");
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
        let too_large = reason(rx.handle(begin(UpdateLimits::default().max_buffered_bytes as u32 + 1, u32::MAX, 2)));
        assert!(too_large.contains("exceeds this device's limit"), "{too_large}");
        for (len, n) in [(0, 0), (0, 1), (1000, 1), (10, 11)] {
            let msg = reason(rx.handle(begin(len, n, 2)));
            assert!(msg.contains("cannot carry"), "{len}/{n}: {msg}");
        }
        let old = reason(rx.handle(begin(1000, 2, 1)));
        assert!(old.contains("not newer"), "{old}");
        challenge(rx.handle(begin(1000, 2, 2)));
    }

    #[test]
    fn commit_checks_completeness_mac_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.cls");
        let (gate, delivered) = gate_with(&dir, UpdateLimits::default());
        let mut rx = Receiver::new(gate.clone(), Line::Stream);
        let bytes = sample_set(2, 20).encode().unwrap();

        let sender = Sender::new(bytes.clone(), 2, false, Some(&key()), 10).unwrap();
        let (nonce, device) = challenge(rx.handle(sender.begin()));
        rx.handle(sender.chunks().next().unwrap());
        let msg = reason(rx.handle(sender.commit(&nonce, &device)));
        assert!(msg.starts_with("transfer incomplete"), "{msg}");

        let other = PreSharedKey::new(*b"another key, also long").unwrap();
        let sender = Sender::new(bytes.clone(), 2, false, Some(&other), 11).unwrap();
        assert!(reason(transfer(&mut rx, &sender)).contains("authentication failed"));
        let sender = Sender::new(bytes.clone(), 2, false, None, 12).unwrap();
        assert!(reason(transfer(&mut rx, &sender)).contains("authentication failed"));

        // The MAC covers `force`, the nonce and the device name.
        let sender = Sender::new(bytes.clone(), 2, false, Some(&key()), 13).unwrap();
        let Message::Begin { total_len, n_chunks, .. } = sender.begin() else { unreachable!() };
        let forced = Message::Begin { transfer_id: 13, total_len, n_chunks, version: 2, force: true };
        let (nonce, device) = challenge(rx.handle(forced));
        sender.chunks().for_each(|c| drop(rx.handle(c)));
        let msg = reason(rx.handle(sender.commit(&nonce, &device)));
        assert!(msg.contains("authentication failed"), "{msg}");
        for (nonce_of, device_of) in [(true, false), (false, true)] {
            let (nonce, device) = challenge(rx.handle(sender.begin()));
            sender.chunks().for_each(|c| drop(rx.handle(c)));
            let nonce = if nonce_of { [0; NONCE_LEN] } else { nonce };
            let device = if device_of { "cam-2".to_owned() } else { device };
            let msg = reason(rx.handle(sender.commit(&nonce, &device)));
            assert!(msg.contains("authentication failed"), "{msg}");
        }

        let sender = Sender::new(bytes, 3, false, Some(&key()), 14).unwrap();
        let msg = reason(transfer(&mut rx, &sender));
        assert_eq!(msg, "Begin announced version 3, the label set holds version 2");
        assert!(!path.exists());
        assert_eq!(rx.status().version, Some(1));
        assert!(delivered.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failed_save_is_a_rejection() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir, UpdateLimits::default());
        config.path = dir.path().join("missing-dir").join("labels.cls");
        let gate = UpdateGate::new(config, Some(&sample_set(1, 1)), 1, |_| panic!("nothing is delivered"));
        let mut rx = Receiver::new(gate, Line::Stream);
        let sender = Sender::for_set(&sample_set(2, 2), false, Some(&key())).unwrap();
        let msg = reason(transfer(&mut rx, &sender));
        assert!(msg.starts_with("label set not applied"), "{msg}");
        assert_eq!(rx.status().version, Some(1));
    }

    #[test]
    fn host_messages_are_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = receiver(&dir);
        assert_eq!(rx.handle(Message::Ack { transfer_id: 1, next_index: 1 }), None);
        assert_eq!(rx.handle(Message::rejected(1, "no")), None);
        assert_eq!(rx.handle(Message::Abort { transfer_id: 1 }), None);
    }

    #[test]
    fn short_keys_are_refused_and_not_printed() {
        assert!(PreSharedKey::new(*b"short").is_err());
        assert_eq!(format!("{:?}", key()), "PreSharedKey(20 bytes)");
    }
}
