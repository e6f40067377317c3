//! The label-set update protocol over real transports: a pty pair (what a serial line looks like
//! to both ends) and TCP on 127.0.0.1. Every wait is bounded, so a broken protocol fails the test
//! instead of hanging it.

mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clipact::labels::LabelSet;
use clipact::update::{
    encode_frame, query_status, serve, FrameDecoder, Line, Message, PreSharedKey, PushError, PushOptions, Receiver,
    ReceiverConfig, Sender, UpdateGate, UpdateLimits, MAX_FRAME_LEN,
};
use proptest::prelude::*;
use support::random::{label_set, Rng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_serial::SerialStream;

const DIM: u32 = 16;
const SPACE: &str = "test-space";
/// Bound on any one test's protocol run.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn key() -> PreSharedKey {
    PreSharedKey::new(*b"a pre-shared key for the tests").unwrap()
}

/// Generous reply deadlines: on a loaded machine (or under qemu) a reply may be slow, and a
/// test must fail only on a hang.
fn options() -> PushOptions {
    PushOptions { timeout: Duration::from_secs(10), commit_timeout: Duration::from_secs(10), retries: 3 }
}

/// A valid set of several chunks.
fn set(seed: u64, version: u64, dim: u32, space: &str) -> LabelSet {
    let mut set = label_set(&mut Rng::new(seed), 6, 6, dim as usize, false);
    set.version = version;
    set.space_id = space.into();
    set
}

/// A device: an update gate persisting to `path`, with the sets it handed to its pipeline.
struct Device {
    path: PathBuf,
    gate: Arc<UpdateGate>,
    applied: Arc<Mutex<Vec<LabelSet>>>,
}

impl Device {
    /// A device already running `initial`, saved to its file.
    fn new(dir: &Path, key: Option<PreSharedKey>, initial: &LabelSet) -> Self {
        let path = dir.join("labels.cls");
        initial.save_atomic(&path).unwrap();
        let config = ReceiverConfig {
            device_name: "test-device".into(),
            dim: DIM,
            space_id: SPACE.into(),
            path: path.clone(),
            key,
            limits: UpdateLimits::default(),
        };
        let applied: Arc<Mutex<Vec<LabelSet>>> = Arc::default();
        let sink = applied.clone();
        let gate = UpdateGate::new(config, Some(initial), initial.version, move |set| {
            sink.lock().unwrap().push(set);
            Ok(())
        });
        Device { path, gate, applied }
    }

    /// Serves `stream` (a serial line: never closed when idle) with a new receiver on a task
    /// that ends with the stream.
    fn serve<S>(&self, stream: S) -> tokio::task::JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut receiver = Receiver::new(self.gate.clone(), Line::Stream);
        tokio::spawn(async move {
            // Errors end the connection, as they would on the device.
            let _ = serve(stream, &mut receiver, false).await;
        })
    }

    fn on_disk(&self) -> LabelSet {
        LabelSet::load(&self.path).unwrap()
    }

    fn applied_versions(&self) -> Vec<u64> {
        self.applied.lock().unwrap().iter().map(|s| s.version).collect()
    }
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(TEST_TIMEOUT, f).await.unwrap_or_else(|_| panic!("{what} did not finish in {TEST_TIMEOUT:?}"))
}

fn rejected(result: Result<u64, PushError>) -> String {
    match result {
        Err(PushError::Rejected { reason }) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The whole story over one host connection: accepted, refused for each reason with the file
/// untouched, accepted again.
async fn updates_over<S: AsyncRead + AsyncWrite + Unpin>(host: &mut S, device: &Device) {
    let v1 = set(1, 1, DIM, SPACE);
    let v2 = set(2, 2, DIM, SPACE);
    let opts = options();
    let push = |set: &LabelSet, force: bool| Sender::for_set(set, force, Some(&key())).unwrap();

    let status = query_status(host, &opts).await.unwrap();
    assert_eq!(status.version, Some(1));
    assert_eq!((status.dim, status.space_id.as_str()), (DIM, SPACE));
    assert_eq!(status.n_labels, 6);

    assert!(push(&v2, false).n_chunks() > 3, "the set must span several chunks");
    assert_eq!(push(&v2, false).push(host, &opts).await.unwrap(), 2);
    assert_eq!(device.on_disk(), v2);
    assert_eq!(device.applied.lock().unwrap().last(), Some(&v2));

    let again = rejected(push(&v2, false).push(host, &opts).await);
    assert!(again.contains("not newer"), "{again}");
    let older = rejected(push(&v1, false).push(host, &opts).await);
    assert!(older.contains("version 1 is not newer than the current version 2"), "{older}");
    assert_eq!(push(&v2, true).push(host, &opts).await.unwrap(), 2);
    assert_eq!(device.on_disk(), v2);

    let wrong_dim = rejected(push(&set(3, 3, 8, SPACE), false).push(host, &opts).await);
    assert!(wrong_dim.contains("embedding dim 8, the encoder produces 16"), "{wrong_dim}");
    let wrong_space = rejected(push(&set(3, 3, DIM, "other"), false).push(host, &opts).await);
    assert!(wrong_space.contains("embedding space \"other\""), "{wrong_space}");

    let v3 = set(3, 3, DIM, SPACE);
    let other_key = PreSharedKey::new(*b"not the device's key at all").unwrap();
    let sender = Sender::for_set(&v3, false, Some(&other_key)).unwrap();
    let bad_key = rejected(sender.push(host, &opts).await);
    assert!(bad_key.contains("authentication failed"), "{bad_key}");
    let unsigned = Sender::for_set(&v3, false, None).unwrap();
    let unsigned = rejected(unsigned.push(host, &opts).await);
    assert!(unsigned.contains("authentication failed"), "{unsigned}");

    // A flipped byte in the set, with nothing recomputed but the MAC: the set's own CRC
    // catches it.
    let mut corrupt = v3.encode().unwrap();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x10;
    let sender = Sender::new(corrupt, 3, false, Some(&key()), 77).unwrap();
    let crc = rejected(sender.push(host, &opts).await);
    assert!(crc.contains("CRC-32 mismatch"), "{crc}");

    assert_eq!(device.on_disk(), v2, "every rejection leaves the file alone");
    assert_eq!(device.applied_versions(), [2, 2]);

    assert_eq!(push(&v3, false).push(host, &opts).await.unwrap(), 3);
    assert_eq!(device.on_disk(), v3);
    assert_eq!(device.applied_versions(), [2, 2, 3]);
    assert_eq!(query_status(host, &opts).await.unwrap().version, Some(3));
}

#[tokio::test]
async fn updates_over_a_pty() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new(dir.path(), Some(key()), &set(1, 1, DIM, SPACE));
    let (mut host, board) = SerialStream::pair().expect("a pty pair");
    let task = device.serve(board);
    bounded("updates over a pty", updates_over(&mut host, &device)).await;
    task.abort();
}

#[tokio::test]
async fn updates_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new(dir.path(), Some(key()), &set(1, 1, DIM, SPACE));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = device.gate.clone();
    // One connection after another, each with its own receiver on the device's gate.
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut receiver = Receiver::new(gate.clone(), Line::Stream);
            let _ = serve(stream, &mut receiver, true).await;
        }
    });
    bounded("updates over TCP", async {
        let mut host = TcpStream::connect(addr).await.unwrap();
        updates_over(&mut host, &device).await;
        drop(host);
        // A new connection sees the state the last one left.
        let mut host = TcpStream::connect(addr).await.unwrap();
        let status = query_status(&mut host, &options()).await.unwrap();
        assert_eq!(status.version, Some(3));
        let v4 = set(4, 4, DIM, SPACE);
        let sender = Sender::for_set(&v4, false, Some(&key())).unwrap();
        assert_eq!(sender.push(&mut host, &options()).await.unwrap(), 4);
        assert_eq!(device.on_disk(), v4);
    })
    .await;
    task.abort();
}

/// A serial device without a key trusts the line, but a byte flipped on the way is still
/// caught (by the set's CRC).
#[tokio::test]
async fn a_keyless_serial_device_still_checks_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = set(1, 1, DIM, SPACE);
    let device = Device::new(dir.path(), None, &v1);
    let (mut host, board) = SerialStream::pair().unwrap();
    let task = device.serve(board);
    bounded("keyless pushes", async {
        let v2 = set(2, 2, DIM, SPACE);
        let mut bytes = v2.encode().unwrap();
        bytes[100] ^= 1;
        let sender = Sender::new(bytes, 2, false, None, 1).unwrap();
        let crc = rejected(sender.push(&mut host, &options()).await);
        assert!(crc.contains("CRC-32 mismatch"), "{crc}");
        assert_eq!(device.on_disk(), v1);
        let sender = Sender::for_set(&v2, false, None).unwrap();
        assert_eq!(sender.push(&mut host, &options()).await.unwrap(), 2);
        assert_eq!(device.on_disk(), v2);
    })
    .await;
    task.abort();
}

/// Reads frames from `stream` until one decodes, skipping nothing else.
async fn next_message<S: AsyncRead + Unpin>(stream: &mut S, decoder: &mut FrameDecoder) -> Message {
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "device closed the line");
        let mut out = decoder.feed(&buf[..n]).into_iter();
        if let Some(first) = out.next() {
            assert!(out.next().is_none(), "one reply per request");
            return first.expect("the device sends valid frames");
        }
    }
}

/// Line noise of several kinds, always ending in a 0x00 (as noise on a real line is eventually
/// followed by a frame delimiter: the host sends one before each push).
fn noise(rng: &mut Rng, kind: usize, valid: &[u8]) -> Vec<u8> {
    let mut out = match kind % 4 {
        // random bytes, zeros included: many tiny bad frames
        0 => (0..1 + rng.below(300)).map(|_| rng.next_u64() as u8).collect(),
        // the first half of a real frame
        1 => valid[..valid.len() / 2].to_vec(),
        // a whole frame with one bit flipped: fails its CRC
        2 => {
            let mut frame = valid.to_vec();
            let at = rng.below(frame.len() - 1);
            frame[at] ^= 1 << rng.below(8);
            if frame[at] == 0 {
                frame[at] = 0x5a;
            }
            frame
        }
        // far longer than any frame
        _ => vec![0xa5; MAX_FRAME_LEN * 3],
    };
    out.push(0);
    out
}

#[tokio::test]
async fn garbage_on_the_line_does_not_stop_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new(dir.path(), Some(key()), &set(1, 1, DIM, SPACE));
    let (mut host, board) = SerialStream::pair().unwrap();
    let task = device.serve(board);
    let v2 = set(2, 2, DIM, SPACE);
    let sender = Sender::for_set(&v2, false, Some(&key())).unwrap();
    let id = sender.transfer_id();
    let mut rng = Rng::new(42);
    bounded("a noisy push", async {
        let mut decoder = FrameDecoder::new();
        let n = sender.n_chunks() as usize + 2;
        let mut challenge: Option<([u8; 16], String)> = None;
        for i in 0..n {
            let message = match (i, &challenge) {
                (0, _) => sender.begin(),
                (i, Some((nonce, device))) if i + 1 == n => sender.commit(nonce, device.as_str()),
                (i, _) => sender.chunks().nth(i - 1).unwrap(),
            };
            let frame = encode_frame(&message);
            for kind in [i, i + 1] {
                host.write_all(&noise(&mut rng, kind, &frame)).await.unwrap();
            }
            host.write_all(&frame).await.unwrap();
            let reply = next_message(&mut host, &mut decoder).await;
            if i == 0 {
                let Message::Challenge { transfer_id, nonce, device } = reply else { panic!("{reply:?}") };
                assert_eq!((transfer_id, device.as_str()), (id, "test-device"));
                challenge = Some((nonce, device));
                continue;
            }
            let expected = if i + 1 == n {
                Message::Accepted { transfer_id: id, version: 2 }
            } else {
                Message::Ack { transfer_id: id, next_index: i as u32 }
            };
            assert_eq!(reply, expected);
        }
    })
    .await;
    assert_eq!(device.on_disk(), v2);
    task.abort();
}

/// `Sender::push` itself recovers when noise lands in front of its frames: a frame glued to
/// noise fails its CRC at the device, the host times out and sends it again.
#[tokio::test]
async fn push_retries_frames_lost_to_noise() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new(dir.path(), Some(key()), &set(1, 1, DIM, SPACE));
    let (host, board) = SerialStream::pair().unwrap();
    let task = device.serve(board);
    let v2 = set(2, 2, DIM, SPACE);
    let mut host = Noisy { inner: host, writes: 0 };
    // Here the deadline is how the host notices a frame lost to noise: short enough to keep
    // the test quick, with retries enough that a slow reply only costs a resend.
    let opts = PushOptions { timeout: Duration::from_secs(1), retries: 10, ..options() };
    let sender = Sender::for_set(&v2, false, Some(&key())).unwrap();
    let version = bounded("a push through noise", sender.push(&mut host, &opts)).await.unwrap();
    assert_eq!(version, 2);
    // Delimiter, Begin, chunks, Commit, and at least one frame sent again.
    let frames = 3 + u64::from(sender.n_chunks());
    assert!(host.writes > frames, "{} writes: nothing was lost", host.writes);
    assert_eq!(device.on_disk(), v2);
    task.abort();
}

/// A transport that corrupts every third write by sending a few noise bytes (without a
/// delimiter) in front of it, so the frame that follows is lost.
struct Noisy<S> {
    inner: S,
    writes: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Noisy<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Noisy<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        // Push's frames go out in one write each (small enough for the pty buffer); the
        // noise is written first and must go through completely before the frame does.
        if self.writes % 3 == 1 && buf.len() > 1 {
            let noise = [0x13, 0x37, 0x42];
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &noise) {
                Poll::Ready(Ok(3)) => {}
                Poll::Ready(Ok(_)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                other => return other,
            }
        }
        self.writes += 1;
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn message_strategy() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(transfer_id, total_len, n_chunks, version, force)| {
                Message::Begin { transfer_id, total_len, n_chunks, version, force }
            }
        ),
        (any::<u32>(), any::<u32>(), prop::collection::vec(any::<u8>(), 0..=512))
            .prop_map(|(transfer_id, index, data)| Message::Chunk { transfer_id, index, data }),
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(transfer_id, mac)| Message::Commit { transfer_id, mac }),
        Just(Message::Status),
        (any::<u32>(), ".{0,40}").prop_map(|(id, reason)| Message::rejected(id, reason)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Valid frames in a soup of noise, cut at random points: every valid frame is recovered,
    /// in order, and nothing else decodes.
    #[test]
    fn decoder_recovers_every_valid_frame(
        items in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..3000), message_strategy()), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut stream = Vec::new();
        for (noise, message) in &items {
            stream.extend_from_slice(noise);
            stream.push(0);
            stream.extend_from_slice(&encode_frame(message));
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut recovered = Vec::new();
        for pair in cuts.windows(2) {
            recovered.extend(decoder.feed(&stream[pair[0]..pair[1]]).into_iter().flatten());
            prop_assert!(decoder.buffered() <= MAX_FRAME_LEN);
        }
        let sent: Vec<Message> = items.into_iter().map(|(_, m)| m).collect();
        prop_assert_eq!(recovered, sent);
    }

    /// Pure noise, with a tiny limit so over-long frames are common: no panic, bounded buffer.
    #[test]
    fn decoder_survives_any_bytes(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20),
    ) {
        let mut decoder = FrameDecoder::with_max_len(64);
        for chunk in &chunks {
            for result in decoder.feed(chunk) {
                prop_assert!(result.is_err(), "noise decoded as {:?}", result);
            }
            prop_assert!(decoder.buffered() <= 64);
        }
    }
}
