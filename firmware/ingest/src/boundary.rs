//! Where a data set's elements begin and end, followed as its bytes stream in, so that a data set
//! cut short (a modality that sets the last-fragment bit too early, or that fails reading its own
//! file and still marks its last PDV) is refused instead of acknowledged.
//!
//! [`Walker`] reads element headers only: tag, VR (explicit syntaxes), length. A value of defined
//! length is skipped by its length without being looked at, however large (multi-GB instances
//! exist), so a CT slice costs the few hundred headers it has, not its half megabyte of pixels. An
//! element of undefined length (a sequence, UN per CP-246, encapsulated pixel data) is followed
//! item by item up to its sequence delimiter; an item of undefined length is walked as a nested
//! data set up to its item delimiter. At the end of the data set the walker must be at an element
//! boundary at the top level: anything else means bytes are missing.
//!
//! It allocates nothing: its state is a fixed array of open sequences and items (at most
//! [`MAX_SEQUENCE_DEPTH`] sequences deep), a 12-byte header buffer and a count of value bytes still
//! to skip. Headers may cross chunk boundaries anywhere.
//!
//! The native syntaxes are walked as such (implicit VR little endian, explicit VR little and big
//! endian); every encapsulated (compressed) syntax has an explicit VR little endian data set. A
//! deflated data set (PS3.5 A.5: explicit VR little endian, then raw DEFLATE) is inflated as it
//! arrives, into a buffer of [`INFLATE_BUFFER`] bytes allocated once per instance (beside the
//! inflater's own 32 KiB window), and the inflated bytes are walked; they are only looked at,
//! never kept (the bytes stored are the deflated ones, as received). It is whole only if its
//! deflate stream ends and the walker is then at a top-level element boundary. After the stream
//! may come the NULL byte A.5 pads an odd stream with, and a gzip trailer (the CRC-32 and length
//! of the inflated bytes), which a real-world file carries; nothing else. A stream that inflates
//! to more than [`inflation_limit`] allows for its size (a decompression bomb, or a large sparse
//! instance) is checked that far only ([`Walk::unchecked_beyond`]), not refused.

use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use flate2::{Decompress, FlushDecompress, Status};

use crate::error::WalkError;
use crate::negotiate::trim_uid;

/// Sequences (of undefined length) nested deeper than this are refused: no real data set comes
/// close, and the walker's state stays a fixed size.
pub(crate) const MAX_SEQUENCE_DEPTH: usize = 64;

/// The top-level data set, then for each open sequence its items frame and, in an item of
/// undefined length, that item's data set.
const MAX_FRAMES: usize = 1 + 2 * MAX_SEQUENCE_DEPTH;

const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITER: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;
const PIXEL_DATA: u32 = 0x7FE0_0010;
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// How a data set is sent: its elements as they are, or deflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Plain(Syntax),
    /// Explicit VR little endian, deflated (PS3.5 A.5).
    Deflated,
}

impl Encoding {
    /// The encoding of a data set sent in transfer syntax `uid` (padding allowed).
    pub(crate) fn of_transfer_syntax(uid: &str) -> Encoding {
        let uid = trim_uid(uid);
        match uid {
            "1.2.840.10008.1.2" => Encoding::Plain(Syntax::ImplicitLittle),
            "1.2.840.10008.1.2.2" => Encoding::Plain(Syntax::ExplicitBig),
            // Deflated explicit VR little endian and the JPIP referenced deflate syntaxes.
            _ if TransferSyntaxRegistry
                .get(uid)
                .is_some_and(|ts| matches!(ts.codec(), Codec::Dataset(_))) =>
            {
                Encoding::Deflated
            }
            // Explicit VR little endian, and every encapsulated syntax: negotiation accepts only
            // syntaxes the registry knows, and those are all of these.
            _ => Encoding::Plain(Syntax::ExplicitLittle),
        }
    }
}

/// How a data set's element headers are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    ImplicitLittle,
    ExplicitLittle,
    ExplicitBig,
}

impl Syntax {
    fn explicit(self) -> bool {
        self != Syntax::ImplicitLittle
    }

    fn u16(self, b: [u8; 2]) -> u16 {
        match self {
            Syntax::ExplicitBig => u16::from_be_bytes(b),
            _ => u16::from_le_bytes(b),
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            Syntax::ExplicitBig => u32::from_be_bytes(b),
            _ => u32::from_le_bytes(b),
        }
    }
}

/// What the walker is inside of.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// A data set: the top level, or an item of undefined length of sequence `tag` (which ends at
    /// an item delimiter).
    Elements { syntax: Syntax, tag: u32 },
    /// The items of element `tag`, of undefined length, up to its sequence delimiter. `fragments`:
    /// encapsulated pixel data, whose items are byte fragments of defined length.
    Items {
        syntax: Syntax,
        tag: u32,
        fragments: bool,
    },
}

/// The element whose header was read last, for messages.
#[derive(Debug, Clone, Copy)]
struct Last {
    tag: u32,
    vr: Option<[u8; 2]>,
    len: u32,
    /// Data set offset of its header.
    at: u64,
}

/// Follows a data set's element structure as its bytes arrive ([`Walker::feed`]), then says
/// whether it ended at an element boundary ([`Walker::finish`]).
#[derive(Debug)]
pub(crate) struct Walker {
    frames: [Frame; MAX_FRAMES],
    /// Frames in use; `frames[0]` is the top-level data set.
    depth: usize,
    header: [u8; 12],
    /// Header bytes gathered so far.
    have: usize,
    /// Bytes of the header being read: 8 until its tag and VR are known, then 8 or 12.
    need: usize,
    /// Value bytes still to skip.
    skip: u64,
    /// Data set bytes consumed.
    pos: u64,
    last: Option<Last>,
}

impl Walker {
    /// A walker at the start of a data set encoded in `syntax`.
    pub(crate) fn new(syntax: Syntax) -> Walker {
        let top = Frame::Elements { syntax, tag: 0 };
        Walker {
            frames: [top; MAX_FRAMES],
            depth: 1,
            header: [0; 12],
            have: 0,
            need: 8,
            skip: 0,
            pos: 0,
            last: None,
        }
    }

    fn frame(&self) -> Frame {
        // `depth` is always 1..=MAX_FRAMES.
        self.frames[self.depth - 1]
    }

    /// The next bytes of the data set, in order. An `Err` means the data set does not decode; the
    /// walker must not be fed again.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), WalkError> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).map_or(bytes.len(), |s| s.min(bytes.len()));
                self.skip -= n as u64;
                self.pos += n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let take = (self.need - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            self.pos += take as u64;
            bytes = &bytes[take..];
            if self.have == self.need {
                // The first 8 bytes say how long the header is (the VR is looked up once).
                if self.need == 8 {
                    self.need = self.header_len()?;
                }
                if self.have == self.need {
                    self.on_header()?;
                    self.have = 0;
                    self.need = 8;
                }
            }
        }
        Ok(())
    }

    /// How many bytes the header being read has (8 or 12), once its first 8 bytes are in.
    fn header_len(&self) -> Result<usize, WalkError> {
        let Frame::Elements { syntax, .. } = self.frame() else {
            return Ok(8);
        };
        let tag = self.tag(syntax);
        if !syntax.explicit() || tag >> 16 == 0xFFFE {
            return Ok(8);
        }
        let vr = [self.header[4], self.header[5]];
        match vr_kind(vr) {
            Some(VrKind::Long) => Ok(12),
            Some(VrKind::Short) => Ok(8),
            None => Err(WalkError::UnknownVr {
                tag,
                vr,
                at: self.header_at(),
            }),
        }
    }

    fn tag(&self, syntax: Syntax) -> u32 {
        let group = syntax.u16([self.header[0], self.header[1]]);
        let element = syntax.u16([self.header[2], self.header[3]]);
        (u32::from(group) << 16) | u32::from(element)
    }

    /// Data set offset of the header being read.
    fn header_at(&self) -> u64 {
        self.pos - self.have as u64
    }

    fn push(&mut self, frame: Frame, tag: u32) -> Result<(), WalkError> {
        if self.depth >= MAX_FRAMES {
            return Err(WalkError::TooDeep {
                tag,
                at: self.header_at(),
                max: MAX_SEQUENCE_DEPTH,
            });
        }
        self.frames[self.depth] = frame;
        self.depth += 1;
        Ok(())
    }

    /// A complete header (`self.have` bytes of `self.header`).
    fn on_header(&mut self) -> Result<(), WalkError> {
        let at = self.header_at();
        match self.frame() {
            Frame::Elements {
                syntax,
                tag: item_of,
            } => {
                let tag = self.tag(syntax);
                let (vr, len) = if tag >> 16 == 0xFFFE || !syntax.explicit() {
                    let len = syntax.u32([
                        self.header[4],
                        self.header[5],
                        self.header[6],
                        self.header[7],
                    ]);
                    (None, len)
                } else if self.have == 12 {
                    let len = syntax.u32([
                        self.header[8],
                        self.header[9],
                        self.header[10],
                        self.header[11],
                    ]);
                    (Some([self.header[4], self.header[5]]), len)
                } else {
                    let len = syntax.u16([self.header[6], self.header[7]]);
                    (Some([self.header[4], self.header[5]]), u32::from(len))
                };
                self.last = Some(Last { tag, vr, len, at });
                match tag {
                    ITEM_DELIMITER if self.depth > 1 => self.depth -= 1,
                    // A sequence delimiter where an item's delimiter was due ends both.
                    SEQUENCE_DELIMITER if self.depth > 1 => self.depth -= 2,
                    ITEM | ITEM_DELIMITER | SEQUENCE_DELIMITER => {
                        return Err(WalkError::Misplaced {
                            tag,
                            at,
                            inside: item_of,
                        })
                    }
                    _ if len == UNDEFINED => {
                        let frame = match vr {
                            // CP-246: the items of a UN of undefined length are implicit VR
                            // little endian, whatever the data set's syntax.
                            Some(vr) if &vr == b"UN" => Frame::Items {
                                syntax: Syntax::ImplicitLittle,
                                tag,
                                fragments: false,
                            },
                            Some(vr) if &vr == b"SQ" => Frame::Items {
                                syntax,
                                tag,
                                fragments: false,
                            },
                            Some(vr) if &vr == b"OB" || &vr == b"OW" => Frame::Items {
                                syntax,
                                tag,
                                fragments: true,
                            },
                            Some(vr) => return Err(WalkError::UndefinedLength { tag, vr, at }),
                            // Implicit VR: a sequence, or encapsulated pixel data.
                            None => Frame::Items {
                                syntax,
                                tag,
                                fragments: tag == PIXEL_DATA,
                            },
                        };
                        self.push(frame, tag)?;
                    }
                    _ => self.skip = u64::from(len),
                }
            }
            Frame::Items {
                syntax,
                tag: of,
                fragments,
            } => {
                let tag = self.tag(syntax);
                let len = syntax.u32([
                    self.header[4],
                    self.header[5],
                    self.header[6],
                    self.header[7],
                ]);
                self.last = Some(Last {
                    tag,
                    vr: None,
                    len,
                    at,
                });
                match tag {
                    ITEM if len == UNDEFINED && fragments => {
                        return Err(WalkError::FragmentWithoutLength { tag: of, at })
                    }
                    ITEM if len == UNDEFINED => {
                        self.push(Frame::Elements { syntax, tag: of }, of)?
                    }
                    ITEM => self.skip = u64::from(len),
                    SEQUENCE_DELIMITER => self.depth -= 1,
                    // An item delimiter after an item of defined length: harmless, skipped.
                    ITEM_DELIMITER => {}
                    _ => return Err(WalkError::NotAnItem { tag, of, at }),
                }
            }
        }
        Ok(())
    }

    /// The data set has ended: `Ok` only if it ended at an element boundary at the top level.
    pub(crate) fn finish(&self) -> Result<(), WalkError> {
        let at = self.pos;
        if self.skip > 0 {
            let last = self.last.unwrap_or(Last {
                tag: 0,
                vr: None,
                len: 0,
                at: 0,
            });
            return Err(WalkError::EndsInValue {
                tag: last.tag,
                vr: last.vr,
                len: last.len,
                header_at: last.at,
                missing: self.skip,
            });
        }
        if self.have > 0 {
            let tag = (self.have >= 4).then(|| {
                let syntax = match self.frame() {
                    Frame::Elements { syntax, .. } | Frame::Items { syntax, .. } => syntax,
                };
                self.tag(syntax)
            });
            return Err(WalkError::EndsInHeader {
                tag,
                have: self.have,
                at: self.header_at(),
            });
        }
        match self.frame() {
            Frame::Elements { .. } if self.depth == 1 => Ok(()),
            Frame::Elements { tag, .. } => Err(WalkError::EndsInItem { tag, at }),
            Frame::Items { tag, .. } => Err(WalkError::EndsInSequence { tag, at }),
        }
    }

    /// Data set bytes consumed so far.
    #[cfg(test)]
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }
}

/// Follows a data set in the encoding it is sent in: [`Walker`] alone, or behind an inflater.
#[derive(Debug)]
pub(crate) enum Walk {
    Plain(Walker),
    Deflated(Inflating),
}

impl Walk {
    /// A walk at the start of a data set sent in `encoding`. A deflated one allocates its inflater
    /// and [`INFLATE_BUFFER`] here, once.
    pub(crate) fn new(encoding: Encoding) -> Walk {
        match encoding {
            Encoding::Plain(syntax) => Walk::Plain(Walker::new(syntax)),
            Encoding::Deflated => Walk::Deflated(Inflating::new()),
        }
    }

    /// The next bytes of the data set, as received. An `Err` means the data set does not decode;
    /// the walk must not be fed again.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), WalkError> {
        match self {
            Walk::Plain(walker) => walker.feed(bytes),
            Walk::Deflated(inflating) => inflating.feed(bytes),
        }
    }

    /// The data set has ended: `Ok` only if it is whole (as far as it was checked, see
    /// [`Walk::unchecked_beyond`]).
    pub(crate) fn finish(&mut self) -> Result<(), WalkError> {
        match self {
            Walk::Plain(walker) => walker.finish(),
            Walk::Deflated(inflating) => inflating.finish(),
        }
    }

    /// For a deflated data set that inflates further than [`inflation_limit`] allows: the inflated
    /// bytes walked before the check stopped. The rest was neither inflated nor walked, and
    /// `finish` could not tell whether it is whole.
    pub(crate) fn unchecked_beyond(&self) -> Option<u64> {
        match self {
            Walk::Plain(_) => None,
            Walk::Deflated(inflating) => inflating.unchecked_beyond,
        }
    }
}

/// Inflated bytes go to the walker through a buffer of this size, whatever the instance's size.
const INFLATE_BUFFER: usize = 32 * 1024;

/// A deflate stream may always inflate to this many bytes, whatever its own size: a blank image
/// (every pixel alike) deflates about 1000 to 1 (a 0.5 MB CT slice to 525 bytes), and so may a
/// sparse object (a segmentation's bit planes, mostly zero); such instances pass up to 256 MiB.
/// Walking 256 MiB costs at most about 0.8 s of CPU (8-byte elements, the densest headers).
const INFLATION_FLOOR: u64 = 256 << 20;

/// Beyond [`INFLATION_FLOOR`], a deflate stream may inflate to at most this many times its own
/// size. Raw DEFLATE reaches at most about 1032 to 1 (a 258-byte match coded in 2 bits), so a
/// bound near 1000 would stop nothing: zlib deflates 64 MiB of 8-byte elements 687 to 1, and
/// walking them costs about 2 s of CPU per MB received (a run of zeros: 0.15 s). Real data sets
/// stay far below 250: pydicom's sample files deflate at most 61 to 1 (`image_dfl.dcm`, a real
/// deflated file), most 3 to 20. Past the bound the check stops and the instance is taken
/// unchecked (with a WARN), not refused: a real instance over 256 MiB that is nearly all one value
/// (a large sparse segmentation) must still reach the PACS; a decompression bomb then costs what
/// the bound allows, and no more. Many small bombs still cost what the floor allows each.
const INFLATION_RATIO: u64 = 250;

/// The most a deflate stream of `deflated` bytes may inflate to.
fn inflation_limit(deflated: u64) -> u64 {
    INFLATION_FLOOR.saturating_add(INFLATION_RATIO.saturating_mul(deflated))
}

/// What may follow a deflate stream: a gzip trailer (CRC-32 and length of the inflated bytes, as
/// in pydicom's real-world `image_dfl.dcm`, deflated by some gzip writer with its header cut off),
/// then the NULL byte that makes the whole even. The trailer is recognised by its length; its
/// CRC-32 is not checked (the walk reads no values, and would have to hash every inflated byte).
const MAX_TAIL: usize = 8 + 1;

/// A deflated data set's walk: the received bytes are inflated (raw DEFLATE, no zlib header)
/// through a fixed buffer, and the inflated bytes fed to a [`Walker`] as explicit VR little
/// endian.
pub(crate) struct Inflating {
    inflater: Decompress,
    /// Inflated bytes on their way to the walker ([`INFLATE_BUFFER`] bytes, reused).
    out: Box<[u8]>,
    walker: Walker,
    /// Deflated bytes received.
    received: u64,
    /// Where the deflate stream ended (in deflated bytes), once it has.
    end: Option<u64>,
    /// The bytes after the end, checked in `finish`.
    tail: [u8; MAX_TAIL],
    tail_len: usize,
    /// Set once the stream inflated beyond [`inflation_limit`]: the inflated bytes walked by then.
    /// Nothing more is inflated or checked.
    unchecked_beyond: Option<u64>,
}

impl std::fmt::Debug for Inflating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflating")
            .field("walker", &self.walker)
            .field("received", &self.received)
            .field("inflated", &self.inflater.total_out())
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Inflating {
    fn new() -> Inflating {
        Inflating {
            inflater: Decompress::new(false),
            out: vec![0; INFLATE_BUFFER].into_boxed_slice(),
            walker: Walker::new(Syntax::ExplicitLittle),
            received: 0,
            end: None,
            tail: [0; MAX_TAIL],
            tail_len: 0,
            unchecked_beyond: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), WalkError> {
        self.received += bytes.len() as u64;
        if self.unchecked_beyond.is_some() {
            return Ok(());
        }
        if let Some(end) = self.end {
            return self.after_end(end, bytes);
        }
        while !bytes.is_empty() {
            let (status, used, made) = self.inflate(bytes, FlushDecompress::None)?;
            if self.unchecked_beyond.is_some() {
                return Ok(());
            }
            bytes = bytes.get(used..).unwrap_or_default();
            if status == Status::StreamEnd {
                let end = self.inflater.total_in();
                self.end = Some(end);
                return self.after_end(end, bytes);
            }
            if used == 0 && made == 0 {
                // Unreachable with a buffer to fill: the inflater always moves or fails.
                return Err(WalkError::DoesNotInflate {
                    at: self.inflater.total_in(),
                    detail: "the inflater stopped taking bytes".into(),
                });
            }
        }
        // What the inflater holds back (output beyond a full buffer, its last bits) comes out
        // with the next bytes or in `finish`.
        Ok(())
    }

    fn finish(&mut self) -> Result<(), WalkError> {
        // No more input: the inflater is told so, and decodes its last bits (it may keep them
        // back while more input could follow).
        while self.end.is_none() {
            if self.unchecked_beyond.is_some() {
                return Ok(());
            }
            let (status, _, made) = self.inflate(&[], FlushDecompress::Finish)?;
            if self.unchecked_beyond.is_some() {
                return Ok(());
            }
            if status == Status::StreamEnd {
                self.end = Some(self.inflater.total_in());
            } else if made == 0 {
                return Err(WalkError::EndsInDeflateStream {
                    received: self.received,
                    inflated: self.inflater.total_out(),
                });
            }
        }
        let end = self.inflater.total_in();
        let tail = self.tail.get(..self.tail_len).unwrap_or_default();
        // gzip's ISIZE: the inflated length modulo 2^32.
        let length = (self.inflater.total_out() as u32).to_le_bytes();
        let trailer = |t: &[u8]| t.len() == 8 && t.get(4..) == Some(&length[..]);
        let whole = match tail {
            [] | [0] => true,
            [t @ .., 0] if trailer(t) => true,
            t => trailer(t),
        };
        if !whole {
            return Err(WalkError::AfterDeflateStream {
                end,
                extra: tail.len() as u64,
            });
        }
        self.walker.finish()
    }

    /// Bytes after the end of the deflate stream (at deflated byte `end`): kept for `finish`, at
    /// most [`MAX_TAIL`] of them.
    fn after_end(&mut self, end: u64, bytes: &[u8]) -> Result<(), WalkError> {
        let have = self.tail_len;
        match self.tail.get_mut(have..have + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.tail_len += bytes.len();
                Ok(())
            }
            None => Err(WalkError::AfterDeflateStream {
                end,
                extra: (have + bytes.len()) as u64,
            }),
        }
    }

    /// Inflates what it can of `input` into the buffer and walks it; returns the inflater's
    /// status and how many bytes it took and made.
    fn inflate(
        &mut self,
        input: &[u8],
        flush: FlushDecompress,
    ) -> Result<(Status, usize, usize), WalkError> {
        let (before_in, before_out) = (self.inflater.total_in(), self.inflater.total_out());
        let status = self
            .inflater
            .decompress(input, &mut self.out, flush)
            .map_err(|e| WalkError::DoesNotInflate {
                at: before_in,
                detail: e.to_string(),
            })?;
        let (deflated, inflated) = (self.inflater.total_in(), self.inflater.total_out());
        let made = (inflated - before_out) as usize;
        self.walker.feed(self.out.get(..made).unwrap_or_default())?;
        if inflated > inflation_limit(deflated) {
            self.unchecked_beyond = Some(inflated);
        }
        Ok((status, (deflated - before_in) as usize, made))
    }
}

enum VrKind {
    /// 2-byte length.
    Short,
    /// 2 reserved bytes, 4-byte length.
    Long,
}

/// The header form of an explicit VR (PS3.5 7.1.2); `None` for bytes that are not a VR.
///
/// Our own table, checked against dicom-rs by a test (the same VRs as `dicom_core::VR`, the same
/// header lengths as dicom-encoding's explicit VR encoder): dicom-core has no call for the length
/// field's size (dicom-encoding keeps its table private), so a table of header forms is needed
/// anyway, and `VR::from_binary` (a UTF-8 check, then a string match) made the walk of a CT slice
/// 30-50% slower.
fn vr_kind(vr: [u8; 2]) -> Option<VrKind> {
    match &vr {
        b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR"
        | b"UT" | b"UV" => Some(VrKind::Long),
        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FD" | b"FL" | b"IS" | b"LO"
        | b"LT" | b"PN" | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US" => {
            Some(VrKind::Short)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- encoders for hand-made data sets ---

    fn tag_bytes(s: Syntax, tag: u32) -> Vec<u8> {
        let (g, e) = ((tag >> 16) as u16, tag as u16);
        match s {
            Syntax::ExplicitBig => [g.to_be_bytes(), e.to_be_bytes()].concat(),
            _ => [g.to_le_bytes(), e.to_le_bytes()].concat(),
        }
    }

    fn u32_bytes(s: Syntax, v: u32) -> [u8; 4] {
        match s {
            Syntax::ExplicitBig => v.to_be_bytes(),
            _ => v.to_le_bytes(),
        }
    }

    /// An element header with length `len`.
    fn header(s: Syntax, tag: u32, vr: &[u8; 2], len: u32) -> Vec<u8> {
        let mut out = tag_bytes(s, tag);
        if !s.explicit() {
            out.extend(u32_bytes(s, len));
        } else if matches!(vr_kind(*vr), Some(VrKind::Long)) {
            out.extend(vr);
            out.extend([0, 0]);
            out.extend(u32_bytes(s, len));
        } else {
            out.extend(vr);
            let len = len as u16;
            out.extend(match s {
                Syntax::ExplicitBig => len.to_be_bytes(),
                _ => len.to_le_bytes(),
            });
        }
        out
    }

    fn element(s: Syntax, tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        [header(s, tag, vr, value.len() as u32), value.to_vec()].concat()
    }

    /// An item or delimiter header.
    fn marker(s: Syntax, tag: u32, len: u32) -> Vec<u8> {
        [tag_bytes(s, tag), u32_bytes(s, len).to_vec()].concat()
    }

    fn item_undefined(s: Syntax, body: &[u8]) -> Vec<u8> {
        [
            marker(s, ITEM, UNDEFINED),
            body.to_vec(),
            marker(s, ITEM_DELIMITER, 0),
        ]
        .concat()
    }

    fn item_defined(s: Syntax, body: &[u8]) -> Vec<u8> {
        [marker(s, ITEM, body.len() as u32), body.to_vec()].concat()
    }

    fn sequence_undefined(s: Syntax, tag: u32, items: &[Vec<u8>]) -> Vec<u8> {
        [
            header(s, tag, b"SQ", UNDEFINED),
            items.concat(),
            marker(s, SEQUENCE_DELIMITER, 0),
        ]
        .concat()
    }

    const SYNTAXES: [Syntax; 3] = [
        Syntax::ImplicitLittle,
        Syntax::ExplicitLittle,
        Syntax::ExplicitBig,
    ];

    /// Top-level elements, each with nested structures, in `s`; returns the elements' bytes.
    fn elements(s: Syntax) -> Vec<Vec<u8>> {
        let inner = [
            element(s, 0x0008_1150, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
            element(s, 0x0008_1155, b"UI", b"1.2.3.4"), // odd length: skipped all the same
        ]
        .concat();
        let nested = sequence_undefined(
            s,
            0x0008_1250,
            &[item_undefined(
                s,
                &[
                    element(s, 0x0010_0020, b"LO", b"PAT-1 "),
                    sequence_undefined(s, 0x0040_A730, &[item_undefined(s, &inner)]),
                ]
                .concat(),
            )],
        );
        // A defined-length sequence: skipped by its length, like any value.
        let defined_items = [item_defined(s, &inner), item_defined(s, &inner)].concat();
        let defined_sq = element(s, 0x0008_1140, b"SQ", &defined_items);
        let empty_sq = sequence_undefined(s, 0x0008_1111, &[]);
        let mixed_sq = sequence_undefined(
            s,
            0x0008_1115,
            &[
                item_defined(s, &inner),
                item_undefined(s, &[]),
                item_undefined(s, &nested),
            ],
        );
        let pixels: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        vec![
            element(s, 0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
            element(s, 0x0008_0018, b"UI", b"1.2.3.4\0"),
            element(s, 0x0008_0060, b"CS", b"CT"),
            element(s, 0x0010_0010, b"PN", b""),
            defined_sq,
            empty_sq,
            nested,
            mixed_sq,
            element(s, 0x0028_0010, b"US", &[0, 1]),
            element(s, 0x0009_1001, b"UT", &[b'x'; 300]),
            element(s, PIXEL_DATA, b"OW", &pixels),
        ]
    }

    fn encapsulated_pixel_data() -> Vec<u8> {
        let s = Syntax::ExplicitLittle;
        [
            header(s, PIXEL_DATA, b"OB", UNDEFINED),
            item_defined(s, &[0, 0, 0, 0]), // basic offset table
            item_defined(s, &[0xFF; 1000]),
            item_defined(s, &[]),
            item_defined(s, &[0xD8; 2001]),
            marker(s, SEQUENCE_DELIMITER, 0),
        ]
        .concat()
    }

    fn walk(s: Syntax, bytes: &[u8], chunk: usize) -> Result<(), WalkError> {
        let mut w = Walker::new(s);
        for c in bytes.chunks(chunk.max(1)) {
            w.feed(c)?;
        }
        assert_eq!(w.position(), bytes.len() as u64);
        w.finish()
    }

    /// Every prefix of the data set made of `elements` ends at a boundary iff it ends between two
    /// top-level elements; a prefix cut anywhere else (inside a header, a value, a sequence, an
    /// item, a delimiter) is refused. Fed whole and in small chunks.
    fn every_cut_is_found(s: Syntax, elements: &[Vec<u8>]) {
        let data = elements.concat();
        let mut boundaries = vec![0usize];
        for e in elements {
            boundaries.push(boundaries.last().copied().unwrap_or(0) + e.len());
        }
        for cut in 0..=data.len() {
            for chunk in [usize::MAX, 7] {
                let r = walk(s, &data[..cut], chunk);
                assert_eq!(
                    r.is_ok(),
                    boundaries.contains(&cut),
                    "{s:?} cut at {cut} of {} (chunk {chunk}): {r:?}",
                    data.len()
                );
            }
        }
    }

    #[test]
    fn whole_data_sets_end_at_a_boundary_in_every_native_syntax_however_they_are_chunked() {
        for s in SYNTAXES {
            let data = elements(s).concat();
            for chunk in [1, 2, 3, 5, 8, 11, 12, 13, 100, 4096, usize::MAX] {
                assert_eq!(walk(s, &data, chunk), Ok(()), "{s:?} chunk {chunk}");
            }
        }
    }

    #[test]
    fn a_cut_anywhere_but_between_top_level_elements_is_refused_in_every_native_syntax() {
        for s in SYNTAXES {
            every_cut_is_found(s, &elements(s));
        }
    }

    #[test]
    fn encapsulated_pixel_data_is_followed_fragment_by_fragment_to_its_delimiter() {
        let s = Syntax::ExplicitLittle;
        let mut parts = elements(s);
        parts.pop(); // native pixel data
        parts.push(encapsulated_pixel_data());
        parts.push(element(s, 0xFFFC_FFFC, b"OB", &[0; 6])); // trailing padding
        every_cut_is_found(s, &parts);
        // In implicit VR, undefined-length pixel data is encapsulated too.
        let i = Syntax::ImplicitLittle;
        let implicit = [
            header(i, PIXEL_DATA, b"OB", UNDEFINED),
            item_defined(i, &[]),
            item_defined(i, &[1; 10]),
            marker(i, SEQUENCE_DELIMITER, 0),
        ]
        .concat();
        every_cut_is_found(i, &[element(i, 0x0028_0010, b"US", &[0, 1]), implicit]);
    }

    #[test]
    fn a_un_of_undefined_length_holds_implicit_little_endian_items_in_every_explicit_syntax() {
        for s in [Syntax::ExplicitLittle, Syntax::ExplicitBig] {
            let i = Syntax::ImplicitLittle;
            let body = [
                element(i, 0x0009_0010, b"LO", b"ACME"),
                sequence_undefined(i, 0x0009_1010, &[item_undefined(i, &[])]),
            ]
            .concat();
            let un = [
                header(s, 0x0009_1020, b"UN", UNDEFINED),
                item_undefined(i, &body),
                item_defined(i, &body),
                marker(i, SEQUENCE_DELIMITER, 0),
            ]
            .concat();
            every_cut_is_found(s, &[element(s, 0x0008_0060, b"CS", b"MR"), un]);
        }
    }

    #[test]
    fn a_value_crossing_chunks_is_skipped_by_its_length_and_a_huge_length_is_never_allocated() {
        let s = Syntax::ExplicitLittle;
        let pixels = vec![0xA5u8; 200_000];
        let data = [
            element(s, 0x0008_0060, b"CS", b"CT"),
            element(s, PIXEL_DATA, b"OW", &pixels),
        ]
        .concat();
        let mut w = Walker::new(s);
        for c in data.chunks(16_384) {
            w.feed(c).unwrap();
        }
        assert_eq!(w.finish(), Ok(()));
        // A value announced at 4 GiB - 2 and cut: the walker only counts what is missing.
        let mut w = Walker::new(s);
        w.feed(&header(s, PIXEL_DATA, b"OB", 0xFFFF_FFFE)).unwrap();
        w.feed(&[0; 1000]).unwrap();
        match w.finish() {
            Err(WalkError::EndsInValue { tag, missing, .. }) => {
                assert_eq!((tag, missing), (PIXEL_DATA, 0xFFFF_FFFE - 1000));
            }
            other => panic!("{other:?}"),
        }
    }

    /// `e` says the data set ends inside its Pixel Data, one byte short.
    fn assert_last_pixel_byte_missing(e: &WalkError) {
        assert!(
            matches!(
                e,
                WalkError::EndsInValue {
                    tag: PIXEL_DATA,
                    missing: 1,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn each_kind_of_cut_names_the_element_it_ends_in() {
        let s = Syntax::ExplicitLittle;
        let data = elements(s).concat();
        let pixel_header = data.len() - 3000 - 12;
        let end = |cut: usize| walk(s, &data[..cut], usize::MAX).unwrap_err();
        let e = end(data.len() - 1);
        assert_last_pixel_byte_missing(&e);
        assert!(
            e.to_string().contains("ends inside element (7FE0,0010)"),
            "{e}"
        );
        assert!(e.to_string().contains("last fragment too early"), "{e}");
        let e = end(pixel_header + 6);
        assert!(
            matches!(
                e,
                WalkError::EndsInHeader {
                    tag: Some(PIXEL_DATA),
                    have: 6,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("(7FE0,0010)"), "{e}");
        let e = end(pixel_header + 2);
        assert!(
            matches!(e, WalkError::EndsInHeader { tag: None, .. }),
            "{e:?}"
        );
        // Just after the opening of the nested sequence's first item.
        let nested_start = elements(s)[..6].concat().len();
        let e = end(nested_start + 12 + 8);
        assert!(
            matches!(
                e,
                WalkError::EndsInItem {
                    tag: 0x0008_1250,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = end(nested_start + 12);
        assert!(
            matches!(
                e,
                WalkError::EndsInSequence {
                    tag: 0x0008_1250,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_structures_are_refused_as_they_arrive() {
        let s = Syntax::ExplicitLittle;
        let refused = |bytes: &[u8]| {
            let mut w = Walker::new(s);
            w.feed(bytes).unwrap_err()
        };
        let garbage = b"Not a DICOM data set at all, just some text sent by mistake.\n";
        assert!(matches!(refused(garbage), WalkError::UnknownVr { .. }));
        let mut bad_vr = element(s, 0x0008_0060, b"CS", b"CT");
        bad_vr[4..6].copy_from_slice(b"\0\x01");
        let e = refused(&bad_vr);
        assert!(e.to_string().contains("0x0001"), "{e}");
        assert!(matches!(
            refused(&marker(s, ITEM, 0)),
            WalkError::Misplaced { tag: ITEM, .. }
        ));
        assert!(matches!(
            refused(&marker(s, SEQUENCE_DELIMITER, 0)),
            WalkError::Misplaced { .. }
        ));
        let not_an_item = [
            header(s, 0x0008_1115, b"SQ", UNDEFINED),
            element(s, 0x0008_0060, b"CS", b"CT"),
        ]
        .concat();
        assert!(matches!(
            refused(&not_an_item),
            WalkError::NotAnItem {
                of: 0x0008_1115,
                ..
            }
        ));
        assert!(matches!(
            refused(&header(s, 0x0008_0100, b"UT", UNDEFINED)),
            WalkError::UndefinedLength { .. }
        ));
        let fragment = [
            header(s, PIXEL_DATA, b"OB", UNDEFINED),
            marker(s, ITEM, UNDEFINED),
        ]
        .concat();
        assert!(matches!(
            refused(&fragment),
            WalkError::FragmentWithoutLength { .. }
        ));
    }

    #[test]
    fn nesting_is_capped() {
        let s = Syntax::ExplicitLittle;
        let level = [
            header(s, 0x0040_A730, b"SQ", UNDEFINED),
            marker(s, ITEM, UNDEFINED),
        ]
        .concat();
        let mut w = Walker::new(s);
        w.feed(&level.repeat(MAX_SEQUENCE_DEPTH)).unwrap();
        let mut deep = Walker::new(s);
        let e = deep
            .feed(&level.repeat(MAX_SEQUENCE_DEPTH + 1))
            .unwrap_err();
        assert!(matches!(e, WalkError::TooDeep { .. }), "{e:?}");
        // The deepest allowed nesting, closed again, ends at a boundary.
        let close = [
            marker(s, ITEM_DELIMITER, 0),
            marker(s, SEQUENCE_DELIMITER, 0),
        ]
        .concat();
        w.feed(&close.repeat(MAX_SEQUENCE_DEPTH)).unwrap();
        assert_eq!(w.finish(), Ok(()));
    }

    #[test]
    fn transfer_syntaxes_map_to_their_data_set_encoding_and_deflated_ones_are_inflated() {
        use dicom_dictionary_std::uids;
        use Encoding::{Deflated, Plain};
        let of = Encoding::of_transfer_syntax;
        assert_eq!(
            of(uids::IMPLICIT_VR_LITTLE_ENDIAN),
            Plain(Syntax::ImplicitLittle)
        );
        assert_eq!(of("1.2.840.10008.1.2\0"), Plain(Syntax::ImplicitLittle));
        assert_eq!(
            of(uids::EXPLICIT_VR_LITTLE_ENDIAN),
            Plain(Syntax::ExplicitLittle)
        );
        #[allow(deprecated)]
        let big = uids::EXPLICIT_VR_BIG_ENDIAN;
        assert_eq!(of(big), Plain(Syntax::ExplicitBig));
        assert_eq!(of(uids::JPEG_BASELINE8_BIT), Plain(Syntax::ExplicitLittle));
        assert_eq!(of(uids::JPEG2000_LOSSLESS), Plain(Syntax::ExplicitLittle));
        assert_eq!(of(uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN), Deflated);
        assert_eq!(of("1.2.840.10008.1.2.1.99\0"), Deflated);
        assert_eq!(of(uids::JPIP_REFERENCED_DEFLATE), Deflated);
        // Deflated image frames are encapsulated pixel data in a plain data set.
        assert_eq!(
            of(uids::DEFLATED_IMAGE_FRAME_COMPRESSION),
            Plain(Syntax::ExplicitLittle)
        );
    }

    /// The VR table says what dicom-rs says: the same 34 VRs as `dicom_core::VR` (a VR added there
    /// fails this test), each with the header length dicom-encoding writes for it.
    #[test]
    fn the_vr_table_matches_dicom_core_and_dicom_encoding() {
        use dicom_core::header::{DataElementHeader, Length};
        use dicom_core::{Tag, VR};
        use dicom_encoding::encode::explicit_le::ExplicitVRLittleEndianEncoder;
        use dicom_encoding::Encode;
        let mut known = 0;
        for b in 0..=u16::MAX {
            let bytes = b.to_be_bytes();
            let ours = vr_kind(bytes);
            let theirs = VR::from_binary(bytes);
            assert_eq!(ours.is_some(), theirs.is_some(), "{bytes:?}");
            let (Some(kind), Some(vr)) = (ours, theirs) else {
                continue;
            };
            known += 1;
            let mut header = Vec::new();
            let written = ExplicitVRLittleEndianEncoder::default()
                .encode_element_header(
                    &mut header,
                    DataElementHeader::new(Tag(0x0009, 0x1000), vr, Length(2)),
                )
                .unwrap();
            let ours = match kind {
                VrKind::Short => 8,
                VrKind::Long => 12,
            };
            assert_eq!(written, ours, "{vr:?}");
        }
        assert_eq!(known, 34);
    }

    /// Data sets written by dicom-object (another encoder than the helpers above) walk to the end,
    /// and their cuts are found.
    #[test]
    fn data_sets_written_by_dicom_object_walk_to_their_end() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_dictionary_std::tags;
        use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
        use dicom_object::InMemDicomObject;
        let item = InMemDicomObject::from_element_iter([DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.4\0"),
        )]);
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3\0"),
        ));
        obj.put(DataElement::new(
            tags::REFERENCED_IMAGE_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![item.clone(), item]),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(vec![7u8; 5000]),
        ));
        #[allow(deprecated)]
        let syntaxes = [
            dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN,
            dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN,
            dicom_dictionary_std::uids::EXPLICIT_VR_BIG_ENDIAN,
        ];
        for uid in syntaxes {
            let ts = TransferSyntaxRegistry.get(uid).unwrap();
            let mut bytes = Vec::new();
            obj.write_dataset_with_ts(&mut bytes, ts).unwrap();
            let Encoding::Plain(s) = Encoding::of_transfer_syntax(uid) else {
                panic!("{uid} is not deflated");
            };
            assert_eq!(walk(s, &bytes, 5), Ok(()), "{uid}");
            for cut in [1, 9, bytes.len() / 2, bytes.len() - 1] {
                assert!(walk(s, &bytes[..cut], 5).is_err(), "{uid} cut at {cut}");
            }
        }
    }

    // --- deflated data sets ---

    /// `data` deflated as PS3.5 A.5 says (raw DEFLATE), as dicom-rs and dcmtk write it: no padding.
    fn deflate(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// `deflate`, then the NULL byte that makes an odd stream even (pydicom and dcm4che add it).
    fn deflate_padded(data: &[u8]) -> Vec<u8> {
        let mut out = deflate(data);
        if out.len() % 2 == 1 {
            out.push(0);
        }
        out
    }

    fn walk_deflated(bytes: &[u8], chunk: usize) -> Result<(), WalkError> {
        let mut w = Walk::new(Encoding::Deflated);
        for c in bytes.chunks(chunk.max(1)) {
            w.feed(c)?;
        }
        w.finish()
    }

    /// Explicit VR little endian data sets, as deflated ones hold: nested sequences, a native
    /// pixel data set, and one with encapsulated pixel data.
    fn inflated_data_sets() -> Vec<Vec<u8>> {
        let s = Syntax::ExplicitLittle;
        let mut encapsulated = elements(s);
        encapsulated.pop();
        encapsulated.push(encapsulated_pixel_data());
        vec![elements(s).concat(), encapsulated.concat()]
    }

    #[test]
    fn whole_deflated_data_sets_walk_to_their_end_however_they_are_chunked_padded_or_not() {
        for data in inflated_data_sets() {
            for stream in [deflate(&data), deflate_padded(&data), {
                let mut even = deflate(&data);
                even.push(0); // a NULL byte after an even stream too: harmless, taken
                even
            }] {
                for chunk in [1, 2, 3, 7, 13, 100, 4096, usize::MAX] {
                    assert_eq!(walk_deflated(&stream, chunk), Ok(()), "chunk {chunk}");
                }
            }
        }
        // Large enough to go through the inflate buffer many times, in PDV-like chunks.
        let s = Syntax::ExplicitLittle;
        let pixels: Vec<u8> = (0..3 * INFLATE_BUFFER as u32 + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let big = [
            element(s, 0x0008_0060, b"CS", b"CT"),
            element(s, PIXEL_DATA, b"OW", &pixels),
        ]
        .concat();
        for chunk in [1, 16_384, usize::MAX] {
            assert_eq!(
                walk_deflated(&deflate(&big), chunk),
                Ok(()),
                "chunk {chunk}"
            );
        }
        // Inflating to about a multiple of the buffer: the inflater holds output back once the
        // buffer is full, even with all the input taken, and must be drained.
        for n in [INFLATE_BUFFER, 2 * INFLATE_BUFFER] {
            for len in n - 2..n + 3 {
                let run = element(s, PIXEL_DATA, b"OB", &vec![0; len - 12]);
                for chunk in [1, usize::MAX] {
                    assert_eq!(
                        walk_deflated(&deflate(&run), chunk),
                        Ok(()),
                        "{len} {chunk}"
                    );
                }
            }
        }
    }

    /// A deflated data set cut anywhere is refused: its deflate stream has not ended.
    #[test]
    fn a_deflated_data_set_cut_at_any_byte_is_refused() {
        for data in inflated_data_sets() {
            let stream = deflate(&data);
            for cut in 0..stream.len() {
                for chunk in [usize::MAX, 7, 1] {
                    let r = walk_deflated(&stream[..cut], chunk);
                    assert!(
                        matches!(r, Err(WalkError::EndsInDeflateStream { .. })),
                        "cut at {cut} of {} (chunk {chunk}): {r:?}",
                        stream.len()
                    );
                }
            }
        }
        let e = walk_deflated(&deflate(&inflated_data_sets()[0])[..20], usize::MAX).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("ends inside its deflate stream, after 20 deflated bytes"));
        assert!(e.to_string().contains("last fragment too early"), "{e}");
        assert!(walk_deflated(&[], 1).is_err(), "no bytes at all");
    }

    /// A data set cut, then deflated whole (a modality that deflates what it managed to read): the
    /// stream ends, the walk of what it inflates to finds the cut as in a plain data set.
    #[test]
    fn a_data_set_cut_before_it_was_deflated_is_refused_where_it_is_cut() {
        let s = Syntax::ExplicitLittle;
        let parts = elements(s);
        let data = parts.concat();
        let mut boundaries = vec![0usize];
        for e in &parts {
            boundaries.push(boundaries.last().copied().unwrap_or(0) + e.len());
        }
        for cut in (0..=data.len())
            .step_by(5)
            .chain(boundaries.iter().copied())
        {
            let r = walk_deflated(&deflate(&data[..cut]), 7);
            assert_eq!(r.is_ok(), boundaries.contains(&cut), "cut at {cut}: {r:?}");
        }
        let e = walk_deflated(&deflate(&data[..data.len() - 1]), usize::MAX).unwrap_err();
        assert_last_pixel_byte_missing(&e);
    }

    #[test]
    fn a_corrupt_deflate_stream_or_bytes_after_its_end_are_refused() {
        let data = &inflated_data_sets()[0];
        let stream = deflate(data);
        // Block type 3 is reserved (RFC 1951 3.2.3).
        let mut reserved = stream.clone();
        reserved[0] |= 0b110;
        for chunk in [1, usize::MAX] {
            let e = walk_deflated(&reserved, chunk).unwrap_err();
            assert!(
                matches!(e, WalkError::DoesNotInflate { at: 0, .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains("sent a corrupt file"), "{e}");
        }
        // A zlib stream (RFC 1950 header and checksum), which A.5 does not allow.
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut zlib, data).unwrap();
        assert!(walk_deflated(&zlib.finish().unwrap(), 100).is_err());
        // After the end: a NULL byte of padding, a gzip trailer of the inflated bytes (CRC-32,
        // length), or both; nothing else. The trailer is told by its length, not its CRC.
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let trailer = [crc.sum().to_le_bytes(), crc.amount().to_le_bytes()].concat();
        let (mut other_crc, mut bad_len) = (trailer.clone(), trailer.clone());
        other_crc[0] ^= 1;
        bad_len[4] ^= 1;
        let padded_trailer = [trailer.clone(), vec![0]].concat();
        for (extra, whole) in [
            (vec![], true),
            (vec![0], true),
            (trailer.clone(), true),
            (padded_trailer.clone(), true),
            (other_crc, true),
            (vec![0, 0], false),
            (vec![1], false),
            (vec![0x20], false),
            (vec![0; 8], false),
            (bad_len, false),
            (trailer[..7].to_vec(), false),
            ([vec![0], trailer.clone()].concat(), false),
            ([padded_trailer, vec![0]].concat(), false),
        ] {
            let bytes = [stream.as_slice(), &extra].concat();
            for chunk in [1, 7, usize::MAX] {
                let r = walk_deflated(&bytes, chunk);
                if whole {
                    assert_eq!(r, Ok(()), "{extra:?} chunk {chunk}");
                    continue;
                }
                assert!(
                    matches!(r, Err(WalkError::AfterDeflateStream { end, extra: n })
                        if end == stream.len() as u64 && n == extra.len() as u64),
                    "{extra:?} chunk {chunk}: {r:?}"
                );
            }
        }
        let e = walk_deflated(&[stream.as_slice(), &[1]].concat(), 100).unwrap_err();
        assert!(e.to_string().contains("sent a corrupt file"), "{e}");
        // A gzip member with its 10-byte header cut off, as pydicom's real-world `image_dfl.dcm`
        // is deflated.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, data).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(walk_deflated(&gz[10..], 7), Ok(()));
        // Another data set after the first: garbage too, refused as it arrives.
        let twice = [stream.clone(), stream].concat();
        let mut w = Walk::new(Encoding::Deflated);
        assert!(matches!(
            w.feed(&twice),
            Err(WalkError::AfterDeflateStream { .. })
        ));
    }

    /// A deflate stream of `n` MiB of zeros behind an OB header: a blank image, or a bomb. Made of
    /// one flushed 1 MiB segment repeated (a debug build would take long to deflate it all).
    fn zeros_deflated(n: usize) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let s = Syntax::ExplicitLittle;
        let header = header(s, PIXEL_DATA, b"OB", (n << 20) as u32);
        let mut z = Compress::new(Compression::best(), false);
        let mut segment = |input: &[u8], flush| {
            let mut out = Vec::with_capacity(64 << 10);
            let start = z.total_in();
            while z.total_in() - start < input.len() as u64 || out.is_empty() {
                let done = (z.total_in() - start) as usize;
                z.compress_vec(&input[done..], &mut out, flush).unwrap();
                out.reserve(64 << 10);
                if flush == FlushCompress::Finish && out.len() < out.capacity() {
                    break;
                }
            }
            out
        };
        let zeros = vec![0u8; 1 << 20];
        let first = segment(&[header, zeros.clone()].concat(), FlushCompress::Sync);
        let next = segment(&zeros, FlushCompress::Sync);
        let last = segment(&[], FlushCompress::Finish);
        [first, next.repeat(n - 1), last].concat()
    }

    #[test]
    fn a_blank_image_is_checked_but_a_decompression_bomb_only_up_to_its_bound() {
        // 8 MiB of zeros from about 8 KB: more than 1000 to 1, within the floor, checked whole.
        let blank = zeros_deflated(8);
        assert!(blank.len() < 10_000, "{}", blank.len());
        assert_eq!(walk_deflated(&blank, 16_384), Ok(()));
        let mut w = Walk::new(Encoding::Deflated);
        blank.chunks(16_384).try_for_each(|c| w.feed(c)).unwrap();
        w.finish().unwrap();
        assert_eq!(w.unchecked_beyond(), None);
        // 400 MiB from about 400 KB: over 256 MiB + 250 times the deflated bytes. Inflating stops
        // at the bound, whole or cut: taken unchecked (it may be a real sparse instance), not
        // refused, and not inflated further.
        let bomb = zeros_deflated(400);
        for bytes in [&bomb[..], &bomb[..bomb.len() * 9 / 10]] {
            for chunk in [16_384, usize::MAX] {
                let mut w = Walk::new(Encoding::Deflated);
                bytes.chunks(chunk).try_for_each(|c| w.feed(c)).unwrap();
                w.finish().unwrap();
                let Some(walked) = w.unchecked_beyond() else {
                    panic!("checked to the end");
                };
                let Walk::Deflated(inflating) = &w else {
                    panic!("not inflating");
                };
                let deflated = inflating.inflater.total_in();
                assert!(deflated < bytes.len() as u64, "stopped before the end");
                let limit = inflation_limit(deflated);
                assert!(walked > limit && walked <= limit + INFLATE_BUFFER as u64);
                assert_eq!(inflating.inflater.total_out(), walked);
            }
        }
    }
}
