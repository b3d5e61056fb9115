//! The intake file's format: one zstd frame (RFC 8878) made of *raw* blocks (and *RLE* blocks for
//! runs of one byte value), with the content checksum on.
//!
//! Ingest needs a file that every spool reader already reads (the zstd library's decoder) and that
//! tells a whole instance from one cut short by a power cut (the last-block flag and the checksum
//! do), but it does not want the bytes compressed on the acknowledgement path: the compactor does
//! that later. zstd's own encoder at its fastest level gave the same file (every block stored raw,
//! ratio 1.0) after copying each byte into its window and trying to match it, about 0.16 ms per
//! 0.5 MB CT slice on the store thread, which sits between the last PDV and the response. Here each
//! piece the caller hands over is written as it is, behind a 3-byte block header, in one `writev`.
//! A piece that repeats one byte value (a blank frame of a multi-frame instance, padding) becomes an
//! *RLE* block instead: 4 bytes on disk for up to 128 KiB of content, so a 2 GB cine of mostly
//! blank frames does not need 2 GB of spool before the compactor gets to it. The check stops at
//! the first byte that differs, which for image data is within the first few.
//! (No maintained crate writes raw blocks as they are pushed: ruzstd's uncompressed level pulls from
//! a reader and panics on an I/O error, such as a full disk. Decoding stays with the zstd library.)
//!
//! It must never write a frame that the zstd library would not decode to exactly the bytes given,
//! nor one that still decodes when cut short.
//!
//! The frame: magic number; a frame header descriptor with only the checksum flag; a window
//! descriptor of 128 KiB (blocks are at most that long); the raw and RLE blocks; an empty last block; the
//! low 32 bits of the XXH64 (seed 0) of the content, little-endian.
//!
//! The writer also computes the XXH3-128 of every byte it writes (headers included), the digest
//! the spool records for the file (`file_digest`): the uplink checks a file by it before sending
//! it, without decompressing it and hashing its content.

use std::io::{self, IoSlice, Write};

use xxhash_rust::xxh3::Xxh3;
use xxhash_rust::xxh64::Xxh64;

/// The zstd frame magic number, little-endian on disk.
const MAGIC: u32 = 0xFD2F_B528;
/// Frame header descriptor: no content size, not single-segment, checksum on, no dictionary.
const DESCRIPTOR: u8 = 0b0000_0100;
/// Window descriptor: exponent 7, mantissa 0, that is a 2^17 = 128 KiB window.
const WINDOW: u8 = 7 << 3;
/// The largest block: the smaller of the window and 128 KiB.
const MAX_BLOCK: usize = 128 * 1024;
/// The shortest piece written as an RLE block: a run shorter than a file-system block saves no
/// disk space, so shorter pieces stay raw.
const MIN_RUN: usize = 4096;

/// Writes one zstd frame of raw blocks into `inner`.
pub(crate) struct RawFrameWriter<W: Write> {
    inner: W,
    checksum: Xxh64,
    /// The XXH3-128 of the bytes written to `inner`, headers included.
    stored: Xxh3,
    /// Bytes written to `inner` so far (headers included): the file's length, with no buffer between.
    written: u64,
}

impl<W: Write> RawFrameWriter<W> {
    /// Writes the frame header.
    pub(crate) fn new(mut inner: W) -> io::Result<Self> {
        let mut header = [0u8; 6];
        header[..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4] = DESCRIPTOR;
        header[5] = WINDOW;
        inner.write_all(&header)?;
        let mut stored = Xxh3::new();
        stored.update(&header);
        Ok(RawFrameWriter {
            inner,
            checksum: Xxh64::new(0),
            stored,
            written: header.len() as u64,
        })
    }

    /// Appends `bytes` as blocks of at most [`MAX_BLOCK`] bytes: raw, or RLE where a piece of at
    /// least [`MIN_RUN`] bytes repeats one byte value (a blank frame, padding).
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        for piece in bytes.chunks(MAX_BLOCK) {
            match run_of(piece) {
                Some(value) => self.rle_block(value, piece.len())?,
                None => self.raw_block(piece)?,
            }
            self.checksum.update(piece);
        }
        Ok(())
    }

    /// Ends the frame (an empty last block, then the checksum) and returns the writer and the
    /// XXH3-128 of every byte written to it.
    pub(crate) fn finish(mut self) -> io::Result<(W, u128)> {
        // One write on the acknowledgement path: the empty last block's header, then the low 32
        // bits of the XXH64, which is what zstd keeps.
        let checksum = (self.checksum.digest() & 0xFFFF_FFFF) as u32;
        let (last, checksum) = (
            block_header(BlockType::Raw, true, 0),
            checksum.to_le_bytes(),
        );
        write_all_two(&mut self.inner, &last, &checksum)?;
        self.stored.update(&last);
        self.stored.update(&checksum);
        Ok((self.inner, self.stored.digest128()))
    }

    /// The writer the frame goes to.
    pub(crate) fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// One RLE block that is not the last: its 3-byte header and the byte repeated `len` times.
    fn rle_block(&mut self, value: u8, len: usize) -> io::Result<()> {
        self.block(block_header(BlockType::Rle, false, len), &[value])
    }

    /// One raw block that is not the last: its 3-byte header and its bytes.
    fn raw_block(&mut self, payload: &[u8]) -> io::Result<()> {
        self.block(block_header(BlockType::Raw, false, payload.len()), payload)
    }

    /// A block's header and its stored bytes, in one `writev`, counted in both digests' input.
    fn block(&mut self, header: [u8; 3], payload: &[u8]) -> io::Result<()> {
        write_all_two(&mut self.inner, &header, payload)?;
        self.stored.update(&header);
        self.stored.update(payload);
        self.written += 3 + payload.len() as u64;
        Ok(())
    }
}

/// The block types this writer uses (RFC 8878, 3.1.1.2.2).
#[derive(Clone, Copy)]
enum BlockType {
    /// The bytes as they are.
    Raw = 0,
    /// One byte, repeated block-size times.
    Rle = 1,
}

/// A block's 3-byte header: last-block flag, block type, size (for RLE, the repeat count).
fn block_header(kind: BlockType, last: bool, len: usize) -> [u8; 3] {
    debug_assert!(len <= MAX_BLOCK);
    let word = (len as u32) << 3 | (kind as u32) << 1 | u32::from(last);
    let [a, b, c, _] = word.to_le_bytes();
    [a, b, c]
}

/// The byte that all of `piece` repeats, if it is at least [`MIN_RUN`] bytes long. The scan stops
/// at the first byte that differs: for image data, within the first few bytes.
fn run_of(piece: &[u8]) -> Option<u8> {
    let (&first, rest) = piece.split_first()?;
    (piece.len() >= MIN_RUN && rest.iter().all(|&b| b == first)).then_some(first)
}

/// Writes `a` then `b` with vectored writes (one `writev` when the kernel takes both at once).
fn write_all_two<W: Write>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file took no more bytes",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pieces: &[&[u8]]) -> Vec<u8> {
        let mut w = RawFrameWriter::new(Vec::new()).unwrap();
        for p in pieces {
            w.write_all(p).unwrap();
        }
        let (out, digest) = w.finish().unwrap();
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_128(&out));
        out
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A writer that takes at most `max` bytes per call, as a file may.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn zstd_decodes_the_frame_to_exactly_the_bytes_written_however_they_were_split() {
        let data = content(3 * MAX_BLOCK + 12_345);
        let splits: Vec<Vec<&[u8]>> = vec![
            vec![],
            vec![&data[..1]],
            vec![&data[..MAX_BLOCK]],
            vec![&data[..MAX_BLOCK + 1]],
            vec![&data[..]],
            vec![
                &data[..300],
                &data[300..MAX_BLOCK + 7],
                &data[MAX_BLOCK + 7..],
            ],
            data.chunks(1000).collect(),
            vec![&data[..10], &[], &data[10..]],
        ];
        for pieces in splits {
            let expected: Vec<u8> = pieces.concat();
            let decoded = zstd::stream::decode_all(&frame(&pieces)[..]).unwrap();
            assert_eq!(decoded, expected, "{} pieces", pieces.len());
        }
    }

    #[test]
    fn runs_of_one_byte_become_rle_blocks_that_decode_to_the_same_bytes() {
        let image = content(MAX_BLOCK + 5000);
        let blank = vec![0u8; 3 * MAX_BLOCK + 100];
        let padding = vec![0xFFu8; MIN_RUN];
        let short_run = vec![7u8; MIN_RUN - 1];
        let almost = {
            let mut v = vec![0u8; MAX_BLOCK];
            v[MAX_BLOCK - 1] = 1;
            v
        };
        let pieces: Vec<&[u8]> = vec![&image, &blank, &padding, &short_run, &almost, &image[..10]];
        let out = frame(&pieces);
        assert_eq!(zstd::stream::decode_all(&out[..]).unwrap(), pieces.concat());
        // The blank piece is three RLE blocks of 128 KiB and a raw one of 100 bytes (shorter than
        // MIN_RUN), the padding one RLE block: 4 × 4 bytes. Everything else is stored raw behind a
        // 3-byte header; then the last block's header and the checksum.
        let raw_pieces = [image.len(), 100, short_run.len(), almost.len(), 10];
        let raw_blocks = 2 + 1 + 1 + 1 + 1;
        let expected = 6 + raw_pieces.iter().sum::<usize>() + 3 * raw_blocks + 4 * 4 + 3 + 4;
        assert_eq!(out.len(), expected);
        let mut w = RawFrameWriter::new(Vec::new()).unwrap();
        w.write_all(&blank).unwrap();
        assert_eq!(w.written(), 6 + 3 * 4 + 3 + 100);
    }

    #[test]
    fn a_changed_rle_byte_or_count_fails_to_decode() {
        let blank = vec![0u8; MIN_RUN];
        let whole = frame(&[&content(100), &blank]);
        // The RLE block: its header at 6 + 3 + 100, its byte after it.
        let at = 6 + 3 + 100;
        let mut value = whole.clone();
        value[at + 3] = 1;
        assert!(zstd::stream::decode_all(&value[..]).is_err());
        let mut count = whole.clone();
        count[at + 1] ^= 0x01;
        assert!(zstd::stream::decode_all(&count[..]).is_err());
        for cut in 0..whole.len() {
            assert!(zstd::stream::decode_all(&whole[..cut]).is_err());
        }
    }

    #[test]
    fn short_writes_are_resumed_where_they_stopped() {
        let data = content(MAX_BLOCK + 999);
        let mut w = RawFrameWriter::new(Trickle {
            out: Vec::new(),
            max: 1000,
        })
        .unwrap();
        w.write_all(&data).unwrap();
        assert_eq!(w.written(), w.get_ref().out.len() as u64);
        let (out, digest) = w.finish().unwrap();
        let out = out.out;
        assert_eq!(out, frame(&[&data]));
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_128(&out));
        assert_eq!(zstd::stream::decode_all(&out[..]).unwrap(), data);
    }

    #[test]
    fn every_cut_short_frame_and_every_changed_byte_fails_to_decode() {
        // What start-up relies on to tell a whole intake file from one a power cut interrupted.
        let data = content(2 * 1000 + 17);
        let whole = frame(&[&data[..1000], &data[1000..2000], &data[2000..]]);
        for cut in 0..whole.len() {
            assert!(
                zstd::stream::decode_all(&whole[..cut]).is_err(),
                "a frame cut at {cut} of {} bytes decoded",
                whole.len()
            );
        }
        for at in [10, 500, 1500, whole.len() - 6, whole.len() - 1] {
            let mut bad = whole.clone();
            bad[at] ^= 0x40;
            assert!(
                zstd::stream::decode_all(&bad[..]).is_err(),
                "a frame with byte {at} changed decoded"
            );
        }
        // Unwritten blocks of a file read back as zeros: a hole in the middle is caught too.
        let mut holed = whole.clone();
        holed[600..900].fill(0);
        assert!(zstd::stream::decode_all(&holed[..]).is_err());
    }
}
