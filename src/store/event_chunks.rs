//! The event log in sled: the `events` tree holds the frames of consecutive events in
//! chunks, one sled value each, under the id of its first event.
//!
//! Why: a checkpoint's writes are most of what an apply costs (BENCHMARKS.md, section
//! 4), and a sled insert costs much the same whatever its size (sled 0.34 copies the
//! leaf it lands in, logs the change, and every tenth change to a leaf logs the whole
//! leaf). One insert per chunk instead of one per event (measured there: the
//! checkpoint's writes per apply 4–12% lower). A chunk stays small, at most [`CHUNK_BYTES`]: a leaf of 17 of them (sled
//! splits a leaf past 16) is then logged within sled's limit for an item in its log (a
//! quarter of its 512 KiB segment), where a larger one would go to a blob file of its
//! own.
//!
//! A value is either a chunk ([`CHUNK_TAG`], then each frame as its length, 4 bytes
//! little-endian, and its bytes) or, in a data directory written before chunks, a single
//! frame (SSE text: it begins with `id:`, never with the tag). Both are read; only
//! chunks are written.
//!
//! Retention keeps a number of events (`Store::compact`): it removes the chunks wholly
//! before the first event it keeps, and writes the chunk that holds that event again
//! from it on, under its id.

/// The first byte of a chunk; no single frame begins with it.
const CHUNK_TAG: u8 = 0;
/// A chunk holds at most this many bytes of frames (one frame more than that is a chunk
/// of its own).
const CHUNK_BYTES: usize = 6 << 10;

/// The chunks of the events `frames` (their ids and bytes, in id order), each as its
/// first id and its value: runs of consecutive ids of at most [`CHUNK_BYTES`] (or one
/// frame). A gap in the ids, which the log's writers never leave, starts a new chunk.
pub(super) fn chunks<'a>(frames: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<(u64, Vec<u8>)> {
    let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next_id = None;
    for (id, frame) in frames {
        let fits = matches!(chunks.last(), Some((_, value))
            if next_id == Some(id) && value.len() + 4 + frame.len() <= CHUNK_BYTES + 1);
        if !fits {
            chunks.push((id, vec![CHUNK_TAG]));
        }
        let (_, value) = chunks.last_mut().expect("pushed above");
        let length = u32::try_from(frame.len()).expect("a frame is far below 4 GiB");
        value.extend_from_slice(&length.to_le_bytes());
        value.extend_from_slice(frame);
        next_id = Some(id + 1);
    }
    chunks
}

/// The frames a value of the events tree under `first` holds, with their ids, in
/// order: a chunk's, or the one frame of a value written before chunks. A chunk cut
/// short (it never is: sled writes a value whole) answers the frames before the cut.
pub(super) fn frames(first: u64, value: &[u8]) -> Frames<'_> {
    match value.split_first() {
        Some((&CHUNK_TAG, rest)) => Frames {
            id: first,
            rest,
            single: None,
        },
        _ => Frames {
            id: first,
            rest: &[],
            single: Some(value),
        },
    }
}

/// See [`frames`].
pub(super) struct Frames<'a> {
    id: u64,
    rest: &'a [u8],
    single: Option<&'a [u8]>,
}

impl<'a> Iterator for Frames<'a> {
    type Item = (u64, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let frame = match self.single.take() {
            Some(frame) => frame,
            None => {
                let (length, rest) = self.rest.split_first_chunk::<4>()?;
                let length = u32::from_le_bytes(*length) as usize;
                let frame = rest.get(..length)?;
                self.rest = &rest[length..];
                frame
            }
        };
        let id = self.id;
        self.id += 1;
        Some((id, frame))
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
            .flat_map(|(first, value)| frames(*first, value).map(|(id, f)| (id, f.to_vec())))
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
            frames(6, &chunks[2].1).collect::<Vec<_>>(),
            [(6, big.as_slice())]
        );
    }

    #[test]
    fn a_value_written_before_chunks_is_one_frame() {
        let old = frame(7, 60);
        assert_eq!(frames(7, &old).collect::<Vec<_>>(), [(7, old.as_slice())]);
    }

    #[test]
    fn a_chunk_cut_short_answers_the_frames_before_the_cut() {
        let (a, b) = (frame(1, 50), frame(2, 50));
        let chunks = chunks([(1, a.as_slice()), (2, b.as_slice())]);
        let value = &chunks[0].1;
        let cut = &value[..value.len() - 10];
        assert_eq!(frames(1, cut).collect::<Vec<_>>(), [(1, a.as_slice())]);
    }
}
