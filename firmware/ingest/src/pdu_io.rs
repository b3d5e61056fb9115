//! Strict, bounded PDU reading and PDU writing over tokio streams.
//!
//! The 6-byte header is read first; a PDU whose announced length exceeds our limit is refused before
//! a single byte of its body is buffered. Only then is the body read and decoded by dicom-ul.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dicom_ul::pdu::{self, AbortRQServiceProviderReason, AbortRQSource, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{IngestError, Result};

/// Largest non-P-DATA PDU we read (an A-ASSOCIATE-RQ with many presentation contexts fits easily).
pub(crate) const MAX_CONTROL_PDU: u32 = 64 * 1024;

/// Body bytes allocated before any arrived; the buffer grows as more come.
const INITIAL_BODY_CAPACITY: usize = 16 * 1024;

/// PDU type of P-DATA-TF.
pub(crate) const PDATA_TF: u8 = 0x04;

/// The largest body we accept for a PDU of this type; `None` for a type we do not know.
pub(crate) fn limit_for(pdu_type: u8, max_pdata: u32) -> Option<u32> {
    match pdu_type {
        PDATA_TF => Some(max_pdata),
        0x01..=0x07 => Some(MAX_CONTROL_PDU),
        _ => None,
    }
}

/// Reads one PDU. `Ok(None)` when the peer closed the connection cleanly between PDUs.
pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    max_pdata: u32,
) -> Result<Option<Pdu>> {
    read_pdu_into(r, peer, max_pdata, &mut BytesMut::new(), None).await
}

/// [`read_pdu`] through a caller's buffer, which keeps its allocation from one PDU to the next.
///
/// The PDU goes to dicom-ul's decoder as [`Bytes`] split off this buffer, not as a slice: the decoder
/// then takes the PDU and its items as views of these bytes instead of copying the whole PDU first
/// (for a `&[u8]` it copies every PDU into a new buffer before copying each PDV's data out of it).
/// Once the decoded PDU no longer refers to them (each PDV's data is its own `Vec`), the buffer is
/// the only owner of its allocation again and the next PDU reuses it.
///
/// With `idle`, every read must bring bytes within that time, or the read fails with
/// [`IngestError::WaitForPeer`]: a peer that stops sending is told from one whose large PDU
/// crosses a slow link, which may take longer than `idle` as a whole while it keeps progressing.
pub(crate) async fn read_pdu_into<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    max_pdata: u32,
    buf: &mut BytesMut,
    idle: Option<Duration>,
) -> Result<Option<Pdu>> {
    let mut header = [0u8; 6];
    let n = within(idle, peer, "the next PDU", r.read(&mut header[..1])).await?;
    if n == 0 {
        return Ok(None);
    }
    within(
        idle,
        peer,
        "the rest of a PDU",
        r.read_exact(&mut header[1..]),
    )
    .await?;
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let Some(max) = limit_for(pdu_type, max_pdata) else {
        return Err(IngestError::DecodePdu {
            peer,
            pdu_type,
            detail: "unknown PDU type".into(),
        });
    };
    if length > max {
        return Err(IngestError::PduTooLarge {
            peer,
            pdu_type,
            length,
            max,
        });
    }
    // `length <= max`: bounded by our configuration, never by the peer. The buffer grows with the
    // bytes that actually arrive (at most doubling), so a peer announcing a large PDU and sending
    // little (slowloris) pins only what it sent (and a reused buffer only what earlier PDUs really
    // brought).
    let whole = 6 + length as usize;
    buf.clear();
    buf.reserve(whole.min(6 + INITIAL_BODY_CAPACITY));
    buf.extend_from_slice(&header);
    let mut body = r.take(u64::from(length));
    while buf.len() < whole {
        if buf.len() == buf.capacity() {
            buf.reserve((whole - buf.len()).min(buf.len()));
        }
        let got = within(idle, peer, "the rest of a PDU", body.read_buf(buf)).await?;
        if got == 0 {
            return Err(IngestError::ReadPdu {
                peer,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the connection closed {} bytes into a PDU body of {length} bytes",
                        buf.len() - 6
                    ),
                ),
            });
        }
    }
    decode(buf.split().freeze(), peer).map(Some)
}

/// One read of a PDU's bytes, within `idle` if given.
async fn within<T>(
    idle: Option<Duration>,
    peer: SocketAddr,
    waiting_for: &'static str,
    read: impl Future<Output = std::io::Result<T>>,
) -> Result<T> {
    let done = match idle {
        None => read.await,
        Some(idle) => {
            tokio::time::timeout(idle, read)
                .await
                .map_err(|_| IngestError::WaitForPeer {
                    peer,
                    secs: idle.as_secs(),
                    waiting_for,
                })?
        }
    };
    done.map_err(|source| IngestError::ReadPdu { peer, source })
}

/// Decodes one complete PDU (header included) with dicom-ul.
pub(crate) fn decode(buf: Bytes, peer: SocketAddr) -> Result<Pdu> {
    let pdu_type = buf.first().copied().unwrap_or(0);
    match pdu::read_pdu(buf, pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(IngestError::DecodePdu {
            peer,
            pdu_type,
            detail: "the PDU is truncated".into(),
        }),
        Err(e) => Err(IngestError::DecodePdu {
            peer,
            pdu_type,
            detail: e.to_string(),
        }),
    }
}

/// Encodes a PDU with dicom-ul.
pub(crate) fn encode(pdu: &Pdu, peer: SocketAddr, what: &'static str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    pdu::write_pdu(&mut out, pdu).map_err(|e| IngestError::EncodePdu {
        peer,
        what,
        detail: e.to_string(),
    })?;
    Ok(out)
}

/// Encodes and sends a PDU.
pub(crate) async fn write_pdu<W: AsyncWrite + Unpin>(
    w: &mut W,
    pdu: &Pdu,
    peer: SocketAddr,
    what: &'static str,
) -> Result<()> {
    let bytes = encode(pdu, peer, what)?;
    w.write_all(&bytes)
        .await
        .map_err(|source| IngestError::WritePdu { peer, source })?;
    w.flush()
        .await
        .map_err(|source| IngestError::WritePdu { peer, source })
}

/// An A-ABORT from us (the service provider) with the given reason.
pub(crate) fn abort_pdu(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn peer() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 104))
    }

    async fn read(bytes: &[u8], max: u32) -> Result<Option<Pdu>> {
        let mut r = bytes;
        read_pdu(&mut r, peer(), max).await
    }

    #[tokio::test]
    async fn a_pdata_announcing_more_than_our_maximum_is_refused_before_its_body_is_read() {
        // Header only: the body is never sent, and must never be waited for.
        let header = [0x04, 0, 0x00, 0x00, 0x40, 0x01];
        match read(&header, 16384).await {
            Err(IngestError::PduTooLarge { length, max, .. }) => {
                assert_eq!((length, max), (16385, 16384))
            }
            other => panic!("{other:?}"),
        }
        let huge_rq = [0x01, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            read(&huge_rq, 16384).await,
            Err(IngestError::PduTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn unknown_pdu_types_truncated_bodies_and_clean_eof_are_told_apart() {
        assert!(matches!(read(&[], 16384).await, Ok(None)));
        assert!(matches!(
            read(&[0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0], 16384).await,
            Err(IngestError::DecodePdu { pdu_type: 9, .. })
        ));
        assert!(matches!(
            read(&[0x05, 0, 0, 0, 0, 4, 0, 0], 16384).await,
            Err(IngestError::ReadPdu { .. })
        ));
        assert!(matches!(
            read(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0], 16384).await,
            Ok(Some(Pdu::ReleaseRQ))
        ));
    }

    /// A P-DATA-TF PDU of one PDV: presentation context 1, last fragment of a data set.
    fn pdata(data: &[u8]) -> Vec<u8> {
        let pdv = crate::dimse::tests::pdv(1, false, true, data);
        encode(&Pdu::PData { data: vec![pdv] }, peer(), "P-DATA-TF").unwrap()
    }

    fn pdv_data(pdu: Option<Pdu>) -> Vec<u8> {
        match pdu {
            Some(Pdu::PData { mut data }) if data.len() == 1 => data.remove(0).data,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn pdus_arriving_in_small_pieces_decode_whole_and_reuse_one_allocation() {
        let first: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = first.iter().rev().copied().collect();
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let stream = [pdata(&first), pdata(&second), pdata(&first)].concat();
        let writer = tokio::spawn(async move {
            for piece in stream.chunks(777) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut buf = BytesMut::new();
        let got = read_pdu_into(&mut rx, peer(), 1 << 20, &mut buf, None)
            .await
            .unwrap();
        assert_eq!(pdv_data(got), first);
        let after_first = buf.as_ptr();
        let got = read_pdu_into(&mut rx, peer(), 1 << 20, &mut buf, None)
            .await
            .unwrap();
        assert_eq!(pdv_data(got), second);
        // Same size, same allocation: the second PDU went where the first had been.
        assert_eq!(buf.as_ptr(), after_first);
        let got = read_pdu_into(&mut rx, peer(), 1 << 20, &mut buf, None)
            .await
            .unwrap();
        assert_eq!(pdv_data(got), first);
        assert_eq!(buf.as_ptr(), after_first);
        writer.await.unwrap();
        assert!(matches!(
            read_pdu_into(&mut rx, peer(), 1 << 20, &mut buf, None).await,
            Ok(None)
        ));
    }

    #[tokio::test]
    async fn a_pdu_announced_large_but_cut_short_holds_only_about_what_arrived() {
        // Announces 4 MiB (allowed), sends 100 bytes of it, then closes.
        let mut bytes = vec![0x04, 0, 0x00, 0x40, 0x00, 0x00];
        bytes.extend_from_slice(&[7u8; 100]);
        let mut r = bytes.as_slice();
        let mut buf = BytesMut::new();
        match read_pdu_into(&mut r, peer(), 4 << 20, &mut buf, None).await {
            Err(IngestError::ReadPdu { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
                assert!(source.to_string().contains("100 bytes into"), "{source}");
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.capacity() <= 64 * 1024, "{}", buf.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pdu_still_arriving_is_read_whole_however_long_it_takes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let stream = pdata(&data);
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        // Ten pieces, 4 s apart: 36 s in all, never 5 s without a byte.
        let writer = tokio::spawn(async move {
            for piece in stream.chunks(stream.len().div_ceil(10)) {
                tx.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        });
        let start = tokio::time::Instant::now();
        let idle = Some(Duration::from_secs(5));
        let got = read_pdu_into(&mut rx, peer(), 1 << 20, &mut BytesMut::new(), idle).await;
        assert_eq!(pdv_data(got.unwrap()), data);
        assert!(
            start.elapsed() >= Duration::from_secs(36),
            "{:?}",
            start.elapsed()
        );
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_silent_for_the_idle_time_between_or_within_pdus_is_given_up() {
        let idle = Some(Duration::from_secs(5));
        let stream = pdata(&[9u8; 50_000]);
        // Silent before a PDU.
        let (_tx, mut rx) = tokio::io::duplex(64 * 1024);
        let start = tokio::time::Instant::now();
        match read_pdu_into(&mut rx, peer(), 1 << 20, &mut BytesMut::new(), idle).await {
            Err(IngestError::WaitForPeer {
                secs, waiting_for, ..
            }) => assert_eq!((secs, waiting_for), (5, "the next PDU")),
            other => panic!("{other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Silent in the middle of one, the connection still open.
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        tx.write_all(&stream[..20_000]).await.unwrap();
        let start = tokio::time::Instant::now();
        match read_pdu_into(&mut rx, peer(), 1 << 20, &mut BytesMut::new(), idle).await {
            Err(IngestError::WaitForPeer { waiting_for, .. }) => {
                assert_eq!(waiting_for, "the rest of a PDU")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_pdv_longer_than_its_pdu_is_a_decode_error_not_a_panic() {
        // P-DATA of 6 bytes holding a PDV that claims 100 bytes.
        let bytes = [0x04, 0, 0, 0, 0, 6, 0, 0, 0, 100, 1, 3];
        assert!(matches!(
            read(&bytes, 16384).await,
            Err(IngestError::DecodePdu { .. })
        ));
    }
}
