//! gzip for the wire, shared by the clients and the reference server.
//!
//! Compression is always negotiated (docs/PROTOCOL.md, "Compression"): a
//! body or message is compressed only for a peer that said it can decode it,
//! and only when it is larger than [`MIN_COMPRESS_BYTES`]. Decoding is always
//! bounded, so a small compressed message cannot expand without limit.

use std::io::{Read, Write};

use flate2::read::GzDecoder;
use flate2::write::{DeflateEncoder, GzEncoder};
use flate2::Compression;
use thiserror::Error;

/// Bodies and messages up to this size are sent as they are: compressing
/// them saves too little to be worth the header and the CPU.
pub const MIN_COMPRESS_BYTES: usize = 1024;

/// How much of a payload [`looks_compressible`] tries.
pub const SAMPLE_BYTES: usize = 64 * 1024;

/// The content coding this crate speaks (`Content-Encoding`, WebSocket `auth`).
pub const GZIP: &str = "gzip";

#[derive(Debug, Error)]
pub enum CompressionError {
    #[error("decompressed data is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("invalid gzip data: {0}")]
    Corrupt(std::io::Error),
    #[error("gzip encoding failed: {0}")]
    Encode(std::io::Error),
}

/// `data` gzip-compressed at the default level (about 6: JSON shrinks 5–10×).
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, CompressionError> {
    gzip_at(data, Compression::default())
}

/// `data` gzip-compressed at the fastest level, for large binary payloads.
pub fn gzip_fast(data: &[u8]) -> Result<Vec<u8>, CompressionError> {
    gzip_at(data, Compression::fast())
}

fn gzip_at(data: &[u8], level: Compression) -> Result<Vec<u8>, CompressionError> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), level);
    encoder.write_all(data).map_err(CompressionError::Encode)?;
    encoder.finish().map_err(CompressionError::Encode)
}

/// Decompresses gzip `data`, failing once the output would exceed `limit` bytes.
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    let read = GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(CompressionError::Corrupt)?;
    if read > limit {
        return Err(CompressionError::TooLarge { limit });
    }
    Ok(out)
}

/// Whether `data` is worth compressing: its first [`SAMPLE_BYTES`] shrink by
/// at least 10% at the fastest level. Media (images, audio, archives) is
/// already compressed and fails this at once, costing well under a millisecond.
pub fn looks_compressible(data: &[u8]) -> bool {
    let sample = &data[..data.len().min(SAMPLE_BYTES)];
    if sample.len() < MIN_COMPRESS_BYTES {
        return false;
    }
    let mut encoder = DeflateEncoder::new(Vec::with_capacity(sample.len()), Compression::fast());
    match encoder.write_all(sample).and_then(|()| encoder.finish()) {
        Ok(compressed) => compressed.len() * 10 < sample.len() * 9,
        Err(_) => false,
    }
}

/// Whether a header value listing codings (`Accept-Encoding: gzip, br`)
/// includes gzip with a non-zero quality.
pub fn lists_gzip(value: &str) -> bool {
    value.split(',').any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        (coding.eq_ignore_ascii_case(GZIP) || coding == "*") && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limit() {
        let text = br#"{"passages":["a long passage"]}"#.repeat(200);
        let packed = gzip(&text).unwrap();
        assert!(packed.len() * 10 < text.len());
        assert_eq!(gunzip(&packed, text.len()).unwrap(), text);
        assert!(matches!(
            gunzip(&packed, text.len() - 1),
            Err(CompressionError::TooLarge { .. })
        ));
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(CompressionError::Corrupt(_))
        ));
        assert_eq!(
            gunzip(&gzip_fast(&text).unwrap(), text.len()).unwrap(),
            text
        );
    }

    #[test]
    fn sniffing() {
        assert!(looks_compressible(&b"hello world ".repeat(1000)));
        assert!(!looks_compressible(b"short"));
        // A pseudo-random sequence does not compress.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!looks_compressible(&noise));
    }

    #[test]
    fn accept_encoding_lists() {
        assert!(lists_gzip("gzip"));
        assert!(lists_gzip("br, GZIP;q=0.5"));
        assert!(lists_gzip("*"));
        assert!(!lists_gzip("gzip;q=0"));
        assert!(!lists_gzip("identity"));
        assert!(!lists_gzip(""));
    }
}
