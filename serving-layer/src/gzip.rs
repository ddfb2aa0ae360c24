//! gzip answers whose rows are compressed once: rows printed once are deflated once (the first
//! time a client asks for gzip) into byte-aligned blocks that end without the final bit, and
//! each response puts such parts, in one gzip member, between its own head (the request's
//! freshness, as a stored block) and the final stored block, with a CRC-32 combined from the
//! parts' (RFC 1951 §3.2.4, RFC 1952). A dashboard that accepts gzip is sent a sixth of the
//! bytes for no compression work per request beyond the rows new since the last answer.

use axum::body::Bytes;
use axum::http::HeaderMap;
use flate2::{Compress, CompressError, Compression, FlushCompress};

/// Bytes deflated into byte-aligned blocks, none final, ready to be joined with others into
/// one gzip member ([`member`]).
#[derive(Debug, Clone)]
pub struct Deflated {
    chunks: Vec<Bytes>,
    crc: crc32fast::Hasher,
    /// The length before deflating.
    len: u64,
}

impl Deflated {
    /// `bytes` deflated at the fastest level.
    pub fn new(bytes: &[u8]) -> Result<Self, CompressError> {
        let mut c = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(bytes.len() / 6 + 64);
        loop {
            let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
            out.reserve(1024);
            c.compress_vec(
                &bytes[consumed.min(bytes.len())..],
                &mut out,
                FlushCompress::Full,
            )?;
            // Done once every byte is in and the flush fitted with room to spare.
            if c.total_in() as usize == bytes.len() && out.len() < out.capacity() {
                break;
            }
        }
        Ok(Deflated {
            chunks: vec![out.into()],
            crc: crc(bytes),
            len: bytes.len() as u64,
        })
    }

    /// `bytes` as stored (not compressed) blocks: for a few bytes that differ per response.
    pub fn stored(bytes: &[u8]) -> Self {
        let mut out = Vec::with_capacity(bytes.len() + 5);
        for chunk in bytes.chunks(u16::MAX as usize) {
            let len = chunk.len() as u16;
            out.push(0);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        Deflated {
            chunks: vec![out.into()],
            crc: crc(bytes),
            len: bytes.len() as u64,
        }
    }

    /// Nothing.
    pub fn empty() -> Self {
        Deflated {
            chunks: Vec::new(),
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// `other` after these bytes (its chunks shared, not copied).
    pub fn append(&mut self, other: &Deflated) {
        self.chunks.extend(other.chunks.iter().cloned());
        self.crc.combine(&other.crc);
        self.len = self.len.wrapping_add(other.len);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }
}

fn crc(bytes: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h
}

/// One gzip member of `parts`, in order, as chunks to send.
pub fn member(parts: &[&Deflated]) -> Vec<Bytes> {
    // The gzip header: deflate, no name, no time, any OS.
    let mut out = vec![Bytes::from_static(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])];
    let mut all = Deflated::empty();
    for part in parts {
        all.append(part);
    }
    out.append(&mut all.chunks);
    // The final block (stored, empty), the CRC-32 and the length.
    let mut end = vec![1, 0, 0, 0xff, 0xff];
    end.extend_from_slice(&all.crc.finalize().to_le_bytes());
    end.extend_from_slice(&(all.len as u32).to_le_bytes());
    out.push(end.into());
    out
}

/// Whether the request accepts a gzip answer (`Accept-Encoding` names `gzip` or `*` with a
/// non-zero weight).
pub fn accepted(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn gunzip(parts: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&all[..])
            .read_to_end(&mut out)
            .expect("a valid gzip member");
        out
    }

    #[test]
    fn a_wrapped_member_inflates_to_head_rows_and_tail() {
        let rows: String = (0..5000)
            .map(|i| format!("{{\"bucket\":{i},\"n\":{}}},", i * 7 % 13))
            .collect();
        let head = "{\"meta\":{\"lag\":5},\"rows\":[".repeat(3000); // over 64 KiB
        let d = Deflated::new(rows.as_bytes()).unwrap();
        assert!(
            d.bytes() < rows.len() / 4,
            "{} of {}",
            d.bytes(),
            rows.len()
        );
        let stored = |s: &str| Deflated::stored(s.as_bytes());
        for head in [head.as_str(), "", "{"] {
            let mut joined = d.clone();
            joined.append(&stored(","));
            joined.append(&d);
            let got = gunzip(&member(&[&stored(head), &joined, &stored("]}")]));
            assert_eq!(got, format!("{head}{rows},{rows}]}}").into_bytes());
        }
        let empty = Deflated::new(b"").unwrap();
        assert_eq!(
            gunzip(&member(&[
                &stored("["),
                &empty,
                &Deflated::empty(),
                &stored("]")
            ])),
            b"[]"
        );
        assert_eq!(gunzip(&member(&[])), b"");
    }

    #[test]
    fn gzip_is_sent_only_when_accepted() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(axum::http::header::ACCEPT_ENCODING, v.parse().unwrap());
            m
        };
        assert!(accepted(&h("gzip, deflate, br")));
        assert!(accepted(&h("br;q=1.0, GZIP;q=0.5")));
        assert!(accepted(&h("*")));
        assert!(!accepted(&h("gzip;q=0")));
        assert!(!accepted(&h("br, identity")));
        assert!(!accepted(&HeaderMap::new()));
    }
}
