//! The device page (`GET /`) and its live feed (`GET /events`, Server-Sent Events).
//!
//! The page is one HTML file compiled into the binary (`page.html`: vanilla JS and CSS, nothing
//! fetched from elsewhere). It reads `/status` and `/labels` twice a second for the bars (each
//! label's score against its threshold, `data-label` / `data-score` as DESIGN.md's DOM contract
//! says) and listens on `/events` for detections as they start, rise and end.
//!
//! [`LiveFeed`] fans each event out to every open `/events` stream through a small bounded
//! queue per client: a client that does not keep up loses events (the page says so), and never
//! slows the device. Nothing is sent, or allocated, while no page is open.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::sync::mpsc;

/// The page, served as is.
pub const PAGE_HTML: &str = include_str!("page.html");

/// Events queued per `/events` client before it loses some.
const CLIENT_QUEUE: usize = 64;

/// Most `/events` streams open at once (each holds a connection slot too).
const MAX_CLIENTS: usize = 16;

/// Detections on their way to the open `/events` streams.
#[derive(Debug, Default)]
pub struct LiveFeed {
    clients: Mutex<Vec<mpsc::Sender<Bytes>>>,
}

impl LiveFeed {
    /// An empty feed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any stream is open (callers skip serializing events when not).
    pub fn is_watched(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Sends `json` as one `event: detection` message to every open stream; a full stream
    /// loses it, a closed one is forgotten.
    pub fn publish(&self, json: &[u8]) {
        let mut clients = self.lock();
        if clients.is_empty() {
            return;
        }
        let mut message = Vec::with_capacity(json.len() + 32);
        message.extend_from_slice(b"event: detection\ndata: ");
        message.extend_from_slice(json);
        message.extend_from_slice(b"\n\n");
        let message = Bytes::from(message);
        clients.retain(|client| match client.try_send(message.clone()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// A new stream, or `None` when [`MAX_CLIENTS`] are open.
    pub fn subscribe(&self) -> Option<EventStream> {
        let mut clients = self.lock();
        clients.retain(|c| !c.is_closed());
        if clients.len() >= MAX_CLIENTS {
            return None;
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        // The first bytes tell the browser the stream is up (and how soon to reconnect).
        let _ = tx.try_send(Bytes::from_static(b"retry: 2000\n: clipact events\n\n"));
        clients.push(tx);
        Some(EventStream { rx })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::Sender<Bytes>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The body of one `/events` response: never ends while the device runs.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|message| message.map(|bytes| Ok(Frame::data(bytes))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn events_reach_every_stream_and_closed_ones_are_forgotten() {
        let feed = LiveFeed::new();
        assert!(!feed.is_watched());
        let mut a = feed.subscribe().unwrap();
        let b = feed.subscribe().unwrap();
        assert!(feed.is_watched());
        drop(b);
        feed.publish(br#"{"label":"waves"}"#);
        assert_eq!(feed.lock().len(), 1, "the closed stream is dropped");
        let hello = a.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(hello.starts_with(b"retry:"));
        let event = a.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&event[..], b"event: detection\ndata: {\"label\":\"waves\"}\n\n");
    }

    #[test]
    fn a_slow_stream_loses_events_and_the_count_of_streams_is_bounded() {
        let feed = LiveFeed::new();
        let streams: Vec<_> = (0..MAX_CLIENTS).map(|_| feed.subscribe().unwrap()).collect();
        assert!(feed.subscribe().is_none());
        for _ in 0..CLIENT_QUEUE * 2 {
            feed.publish(b"{}");
        }
        assert_eq!(feed.lock().len(), MAX_CLIENTS, "full streams stay open");
        drop(streams);
        assert!(feed.subscribe().is_some());
    }
}
