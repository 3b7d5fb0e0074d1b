//! Holds a client's Close frame back until the replies it is owed are sent.
//!
//! tungstenite answers a Close frame the moment it reads it and refuses every later send, so a
//! client that sends purchases and then closes at once would lose the replies of purchases that
//! were committed. [`CloseGate`] sits between the upgraded connection and tungstenite: it follows
//! the client's frame boundaries (headers parsed by tungstenite's own [`FrameHeader::parse`]) and,
//! at the first byte of a Close frame, stops passing bytes on and raises [`CloseSignal::arrived`].
//! The connection sends what it owes, then calls [`CloseSignal::release`]; tungstenite then reads
//! the Close and echoes it. Bytes after the Close are never meaningful (RFC 6455 §5.5.1).

use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use hyper_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// The opcode of a Close frame (RFC 6455 §5.5.1), in the low nibble of a frame's first byte.
const OPCODE_CLOSE: u8 = 0x8;
/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Shared between a [`CloseGate`] and its connection.
#[derive(Default)]
pub struct CloseSignal {
    arrived: CancellationToken,
    released: AtomicBool,
    waker: AtomicWaker,
}

impl CloseSignal {
    /// Resolves once tungstenite has read every frame before the client's Close and waits at
    /// the gate for more: everything the client sent before closing has been handed out.
    pub async fn arrived(&self) {
        self.arrived.cancelled().await;
    }

    /// Lets the held Close frame (and anything after it) through.
    pub fn release(&self) {
        self.released.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }
}

/// Where the client's byte stream is, frame-wise.
#[derive(Default)]
struct Scanner {
    /// The header bytes read so far of the frame that starts next (empty at a boundary).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// A header tungstenite will refuse anyway: stop following, let everything through.
    lost: bool,
}

impl Scanner {
    /// The offset in `bytes` (which follow everything scanned before) where a Close frame starts.
    fn close_at(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() && !self.lost {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - at);
                at += skip;
                self.payload_left -= skip as u64;
                continue;
            }
            if self.header.is_empty() && bytes[at] & 0x0F == OPCODE_CLOSE {
                return Some(at);
            }
            self.header.push(bytes[at]);
            at += 1;
            match FrameHeader::parse(&mut Cursor::new(&self.header)) {
                Ok(Some((_, length))) => {
                    self.payload_left = length;
                    self.header.clear();
                }
                Ok(None) if self.header.len() < MAX_HEADER => {}
                Ok(None) | Err(_) => self.lost = true,
            }
        }
        None
    }
}

/// The client's side of one upgraded connection, with its Close frame held back (module docs).
pub struct CloseGate<S> {
    inner: S,
    scanner: Scanner,
    /// From the first byte of the client's Close frame on, until released.
    held: Vec<u8>,
    /// The client's Close frame has been seen (and held, until released).
    closing: bool,
    signal: Arc<CloseSignal>,
}

impl<S> CloseGate<S> {
    pub fn new(inner: S) -> (Self, Arc<CloseSignal>) {
        let signal = Arc::new(CloseSignal::default());
        let gate = CloseGate {
            inner,
            scanner: Scanner::default(),
            held: Vec::new(),
            closing: false,
            signal: signal.clone(),
        };
        (gate, signal)
    }
}

impl<S: AsyncRead + Unpin> CloseGate<S> {
    /// Serves the held bytes once released; pending until then.
    fn poll_held(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.signal.waker.register(cx.waker());
        if !self.signal.is_released() {
            // tungstenite asks for bytes past its buffer: every frame before the Close is out.
            self.signal.arrived.cancel();
            return Poll::Pending;
        }
        let n = self.held.len().min(buf.remaining());
        buf.put_slice(&self.held[..n]);
        self.held.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CloseGate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing {
            if !this.held.is_empty() || !this.signal.is_released() {
                return this.poll_held(cx, buf);
            }
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let Some(at) = this.scanner.close_at(&buf.filled()[before..]) else {
            return Poll::Ready(Ok(()));
        };
        this.held.extend_from_slice(&buf.filled()[before + at..]);
        buf.set_filled(before + at);
        this.closing = true;
        if at == 0 {
            // Nothing to pass on: an empty read would mean end of stream.
            return this.poll_held(cx, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseGate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame: FIN, `opcode`, and a payload of `length` bytes.
    fn frame(opcode: u8, length: usize) -> Vec<u8> {
        let mut bytes = vec![0x80 | opcode];
        match length {
            0..=125 => bytes.push(0x80 | length as u8),
            126..=0xFFFF => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(length as u16).to_be_bytes());
            }
            _ => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&(length as u64).to_be_bytes());
            }
        }
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        // Payload bytes that look like a Close opcode, so a scanner that loses track shows it.
        bytes.extend(std::iter::repeat_n(0x88, length));
        bytes
    }

    proptest! {
        /// However the stream is cut into reads, the Close is found exactly where it starts.
        #[test]
        fn the_close_frame_is_found_at_its_first_byte_across_any_split(
            frames in prop::collection::vec((prop::sample::select(vec![0x1u8, 0x2, 0x9, 0xA, 0x0]), 0usize..70_000), 0..6),
            cuts in prop::collection::vec(1usize..5_000, 1..40),
        ) {
            let mut stream: Vec<u8> = frames.iter().flat_map(|&(op, len)| frame(op, len)).collect();
            let close_at = stream.len();
            stream.extend(frame(OPCODE_CLOSE, 2));
            stream.extend(frame(0x1, 3));
            let mut scanner = Scanner::default();
            let mut offset = 0;
            let mut found = None;
            for cut in cuts.iter().cycle() {
                if offset >= stream.len() { break; }
                let end = (offset + cut).min(stream.len());
                if let Some(at) = scanner.close_at(&stream[offset..end]) {
                    found = Some(offset + at);
                    break;
                }
                offset = end;
            }
            prop_assert_eq!(found, Some(close_at));
        }
    }
}
