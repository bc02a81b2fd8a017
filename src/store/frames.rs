//! The framing shared by the store's own logs (the intake log and the apply log): a
//! sequence of records `[payload length: u32 LE][CRC-32 of the file's number (u64 LE)
//! and the payload: u32 LE][payload: JSON]` in files named by a number. Keying the
//! checksum by the number makes the stale records of a recycled file invalid in its new
//! life, and a reader stops at the first record that is short, empty or damaged: the
//! torn end of a write cut short by a crash.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

/// Length and checksum before each payload.
pub(super) const FRAME_HEADER: usize = 8;

/// The numbers of the files in `dir` with this suffix, in order.
pub(super) fn list_files(dir: &Path, suffix: &str) -> io::Result<Vec<u64>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let number = name
            .to_str()
            .and_then(|name| name.strip_suffix(suffix))
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(number) = number {
            segments.push(number);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

fn checksum(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record of file `segment` to `buffer`; answers the frame's size.
pub(super) fn encode_frame(
    buffer: &mut Vec<u8>,
    segment: u64,
    record: &impl Serialize,
) -> serde_json::Result<usize> {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; FRAME_HEADER]);
    serde_json::to_writer(&mut *buffer, record)?;
    let payload = &buffer[start + FRAME_HEADER..];
    let length = u32::try_from(payload.len())
        .expect("a record is far below 4 GiB: a command, or one apply step of a bounded batch");
    let checksum = checksum(segment, payload);
    buffer[start..start + 4].copy_from_slice(&length.to_le_bytes());
    buffer[start + 4..start + FRAME_HEADER].copy_from_slice(&checksum.to_le_bytes());
    Ok(buffer.len() - start)
}

/// The intact records of `segment`, in order, and the length they cover: the first
/// short, empty or damaged frame (or one of an earlier life of the file) ends it.
pub(super) fn decode_frames(bytes: &[u8], segment: u64) -> (Vec<&[u8]>, usize) {
    let mut payloads = Vec::new();
    let mut offset = 0;
    while let Some(header) = bytes.get(offset..offset + FRAME_HEADER) {
        let length = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let start = offset + FRAME_HEADER;
        let Some(payload) = bytes.get(start..start + length) else {
            break;
        };
        if length == 0 || self::checksum(segment, payload) != checksum {
            break;
        }
        payloads.push(payload);
        offset = start + length;
    }
    (payloads, offset)
}
