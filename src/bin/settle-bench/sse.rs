//! Just enough of the SSE wire format (WHATWG HTML, "server-sent events") to time
//! events: a full parser for the one observing subscriber, and an id-only scanner for
//! the thousands of fan-out subscribers, which must stay cheap in CPU and memory.
//!
//! The server sends `\n` line endings; `\r\n` is accepted too.

use std::net::SocketAddr;
use tokio::time::Instant;

use anyhow::Context;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client;
use crate::sys;

/// One dispatched event.
#[derive(Clone, Debug, Default)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub name: String,
    pub data: String,
}

/// Assembles events from arbitrary chunks of the stream.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: SseEvent,
    has_field: bool,
}

impl SseParser {
    /// Feeds one chunk; calls `dispatch` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut dispatch: impl FnMut(SseEvent)) {
        for &byte in chunk {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.is_empty() {
                if self.has_field {
                    dispatch(std::mem::take(&mut self.event));
                    self.has_field = false;
                }
            } else if self.line[0] != b':' {
                let line = String::from_utf8_lossy(&self.line);
                let (field, value) = match line.split_once(':') {
                    Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                    None => (line.as_ref(), ""),
                };
                match field {
                    "id" => self.event.id = value.trim().parse().ok(),
                    "event" => self.event.name = value.to_owned(),
                    "data" => {
                        if !self.event.data.is_empty() {
                            self.event.data.push('\n');
                        }
                        self.event.data.push_str(value);
                    }
                    _ => {}
                }
                self.has_field = true;
            }
            self.line.clear();
        }
    }
}

/// Finds `id:` lines and nothing else. Keeps at most one short id line across chunk
/// boundaries: every other line is skipped byte by byte without being stored.
#[derive(Default)]
pub struct IdScanner {
    /// Bytes of the current line so far, while it may still be an `id:` line.
    candidate: Vec<u8>,
    /// The current line is known not to be an id line: skip to its end.
    skipping: bool,
}

/// An id line is `id: ` plus at most 20 digits; anything longer is not one of ours.
const ID_LINE_MAX: usize = 32;

impl IdScanner {
    /// Feeds one chunk; calls `found` with every event id it completes.
    pub fn feed(&mut self, chunk: &[u8], mut found: impl FnMut(u64)) {
        for &byte in chunk {
            if byte == b'\n' {
                if !self.skipping {
                    if let Some(id) = parse_id_line(&self.candidate) {
                        found(id);
                    }
                }
                self.candidate.clear();
                self.skipping = false;
            } else if !self.skipping {
                self.candidate.push(byte);
                let prefix_ok = b"id:".starts_with(&self.candidate[..self.candidate.len().min(3)]);
                if !prefix_ok || self.candidate.len() > ID_LINE_MAX {
                    self.candidate.clear();
                    self.skipping = true;
                }
            }
        }
    }
}

fn parse_id_line(line: &[u8]) -> Option<u64> {
    let value = line.strip_prefix(b"id:")?;
    let value = value.strip_suffix(b"\r").unwrap_or(value);
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// An event as the observing subscriber received it.
#[derive(Debug)]
pub struct Observed {
    pub event: SseEvent,
    /// On this process's monotonic clock.
    pub at: Instant,
    /// On the wall clock, comparable with other processes and the server's timestamps.
    pub wall_ns: u64,
}

/// A subscriber in the bench process that parses every event in full and hands it
/// over a channel. Unbounded because every phase bounds how many events it causes.
pub struct Observer {
    pub events: mpsc::UnboundedReceiver<Observed>,
    task: JoinHandle<()>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observer {
    /// Connects and returns once the subscription is live.
    ///
    /// # Errors
    /// When the stream cannot be opened.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut conn = client::connect(addr).await?;
        let mut body = conn
            .subscribe()
            .await
            .context("opening the observing event stream")?;
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            // The connection lives as long as this task reads from it.
            let _conn = conn;
            let mut parser = SseParser::default();
            while let Some(Ok(frame)) = body.frame().await {
                let Some(chunk) = frame.data_ref() else {
                    continue;
                };
                let at = Instant::now();
                let wall_ns = sys::wall_ns();
                parser.feed(chunk, |event| {
                    let _ = sender.send(Observed { event, at, wall_ns });
                });
            }
        });
        Ok(Self { events, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAMES: &[u8] = b": settle\nretry: 1000\n\nid: 7\nevent: projection:settled\ndata: {\"a\":1}\n\n: keep-alive\n\nid: 8\r\nevent: command:failed\r\ndata: {}\r\n\r\n";

    #[test]
    fn the_parser_finds_every_event_whatever_the_chunking() {
        for split in 1..FRAMES.len() {
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            for chunk in FRAMES.chunks(split) {
                parser.feed(chunk, |event| events.push(event));
            }
            // The retry-only block counts as an event with no id (a field was set).
            let ids: Vec<Option<u64>> = events.iter().map(|event| event.id).collect();
            assert_eq!(ids, vec![None, Some(7), Some(8)], "chunks of {split}");
            assert_eq!(events[1].name, "projection:settled");
            assert_eq!(events[1].data, "{\"a\":1}");
            assert_eq!(events[2].name, "command:failed");
        }
    }

    #[test]
    fn the_scanner_finds_ids_whatever_the_chunking() {
        for split in 1..FRAMES.len() {
            let mut scanner = IdScanner::default();
            let mut ids = Vec::new();
            for chunk in FRAMES.chunks(split) {
                scanner.feed(chunk, |id| ids.push(id));
            }
            assert_eq!(ids, vec![7, 8], "chunks of {split}");
        }
    }

    #[test]
    fn the_scanner_ignores_data_that_mentions_ids() {
        let mut scanner = IdScanner::default();
        let mut ids = Vec::new();
        scanner.feed(b"data: id: 5\nidx: 6\nid: 9\n", |id| ids.push(id));
        assert_eq!(ids, vec![9]);
    }
}
