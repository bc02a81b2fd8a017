//! Chunks: the values of consecutive ids as one sled value, under the first id. The
//! event log (`events`: each event's SSE frame) and the finished commands' records
//! (`records`, see `finished`) are kept this way.
//!
//! Why: a checkpoint's writes are most of what an apply costs (BENCHMARKS.md, section
//! 4), and a sled insert costs much the same whatever its size (sled 0.34 copies the
//! leaf it lands in, logs the change, and every tenth change to a leaf logs the whole
//! leaf). One insert per chunk instead of one per value (measured there for the
//! events: the checkpoint's writes per apply 4–12% lower). A chunk stays small, at
//! most [`CHUNK_BYTES`]: a leaf of 17 of them (sled splits a leaf past 16) is then
//! logged within sled's limit for an item in its log (a quarter of its 512 KiB
//! segment), where a larger one would go to a blob file of its own.
//!
//! A value is either a chunk ([`CHUNK_TAG`], then each entry as its length, 4 bytes
//! little-endian, and its bytes) or, in an event log written before chunks, a single
//! frame (SSE text: it begins with `id:`, never with the tag). Both are read; only
//! chunks are written.
//!
//! Retention cuts at an id: it removes the chunks wholly before it, and writes the
//! chunk that holds it again from it on, under that id.

/// The first byte of a chunk; no single frame begins with it.
const CHUNK_TAG: u8 = 0;
/// A chunk holds at most this many bytes of entries (one entry more than that is a
/// chunk of its own).
const CHUNK_BYTES: usize = 6 << 10;

/// The chunks of `entries` (their ids and bytes, in id order), each as its first id and
/// its value: runs of consecutive ids of at most [`CHUNK_BYTES`] (or one entry). A gap
/// in the ids starts a new chunk.
pub(super) fn chunks<'a>(
    entries: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Vec<(u64, Vec<u8>)> {
    let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next_id = None;
    for (id, entry) in entries {
        let fits = matches!(chunks.last(), Some((_, value))
            if next_id == Some(id) && value.len() + 4 + entry.len() <= CHUNK_BYTES + 1);
        if !fits {
            let mut chunk = Vec::with_capacity(CHUNK_BYTES + 1);
            chunk.push(CHUNK_TAG);
            chunks.push((id, chunk));
        }
        let (_, value) = chunks.last_mut().expect("pushed above");
        let length = u32::try_from(entry.len()).expect("an entry is far below 4 GiB");
        value.extend_from_slice(&length.to_le_bytes());
        value.extend_from_slice(entry);
        next_id = Some(id + 1);
    }
    chunks
}

/// The entries the value under `first` holds, with their ids, in order: a chunk's, or
/// the one frame of an event log's value written before chunks. A chunk cut short (it
/// never is: sled writes a value whole) answers the entries before the cut.
pub(super) fn entries(first: u64, value: &[u8]) -> Entries<'_> {
    match value.split_first() {
        Some((&CHUNK_TAG, rest)) => Entries::Chunk { id: first, rest },
        _ => Entries::Single(Some((first, value))),
    }
}

/// See [`entries`].
pub(super) enum Entries<'a> {
    /// A chunk's entries from `id` on, in `rest`.
    Chunk { id: u64, rest: &'a [u8] },
    /// The one frame of a value written before chunks, until it is answered.
    Single(Option<(u64, &'a [u8])>),
}

impl<'a> Iterator for Entries<'a> {
    type Item = (u64, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Chunk { id, rest } => {
                let (length, after) = rest.split_first_chunk::<4>()?;
                let length = u32::from_le_bytes(*length) as usize;
                let entry = after.get(..length)?;
                *rest = &after[length..];
                let entry_id = *id;
                *id += 1;
                Some((entry_id, entry))
            }
            Self::Single(single) => single.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64, size: usize) -> Vec<u8> {
        let mut frame = format!("id: {id}\nevent: e\ndata: ").into_bytes();
        frame.resize(size - 2, b'x');
        frame.extend_from_slice(b"\n\n");
        frame
    }

    #[test]
    fn chunks_hold_consecutive_frames_up_to_their_size_and_read_back_in_order() {
        let written: Vec<_> = (1..=40).map(|id| (id, frame(id, 700))).collect();
        let chunks = chunks(written.iter().map(|(id, frame)| (*id, frame.as_slice())));
        // 8 frames of 704 bytes fit in 6 KiB (and the tag), the ninth does not.
        let firsts: Vec<_> = chunks.iter().map(|(first, _)| *first).collect();
        assert_eq!(firsts, [1, 9, 17, 25, 33]);
        assert!(chunks
            .iter()
            .all(|(_, value)| value.len() <= CHUNK_BYTES + 1));
        let read: Vec<_> = chunks
            .iter()
            .flat_map(|(first, value)| entries(*first, value).map(|(id, f)| (id, f.to_vec())))
            .collect();
        assert_eq!(read, written);
    }

    #[test]
    fn a_gap_in_the_ids_or_a_large_frame_starts_a_chunk() {
        let (a, b, c, big) = (frame(1, 50), frame(2, 50), frame(5, 50), frame(6, 20000));
        let chunks = chunks([
            (1, a.as_slice()),
            (2, b.as_slice()),
            (5, c.as_slice()),
            (6, big.as_slice()),
        ]);
        let firsts: Vec<_> = chunks.iter().map(|(first, _)| *first).collect();
        assert_eq!(firsts, [1, 5, 6]);
        assert_eq!(
            entries(6, &chunks[2].1).collect::<Vec<_>>(),
            [(6, big.as_slice())]
        );
    }

    #[test]
    fn a_value_written_before_chunks_is_one_frame() {
        let old = frame(7, 60);
        assert_eq!(entries(7, &old).collect::<Vec<_>>(), [(7, old.as_slice())]);
    }

    #[test]
    fn a_chunk_cut_short_answers_the_frames_before_the_cut() {
        let (a, b) = (frame(1, 50), frame(2, 50));
        let chunks = chunks([(1, a.as_slice()), (2, b.as_slice())]);
        let value = &chunks[0].1;
        let cut = &value[..value.len() - 10];
        assert_eq!(entries(1, cut).collect::<Vec<_>>(), [(1, a.as_slice())]);
    }
}
