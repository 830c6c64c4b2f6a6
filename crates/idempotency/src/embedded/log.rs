//! The embedded store's on-disk format: numbered segment files, each a
//! header and then checksummed records appended one after another.
//!
//! ```text
//! segment = magic "KEELIDX1" | base token u64 LE | checksum u64 LE | record*
//! record  = kind u8 | key length u8 | payload length u32 LE
//!         | token u64 LE | expires (ms since the epoch) u64 LE
//!         | fingerprint [32] | key | payload | checksum u64 LE
//! ```
//!
//! Checksums are the first 8 bytes of the BLAKE3 hash of everything before
//! them in the header or record, so a torn or zero-filled tail is told from
//! a record. The base token is the fencing-token counter when the segment
//! was started: tokens never go back even once every record that carried a
//! higher one has been compacted away.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Fingerprint, StoreError};

const MAGIC: &[u8; 8] = b"KEELIDX1";
/// Bytes before a segment's first record.
pub(super) const SEGMENT_HEADER: u64 = 24;
/// Bytes of a record before its key.
pub(super) const RECORD_HEADER: usize = 1 + 1 + 4 + 8 + 8 + 32;
const CHECKSUM: usize = 8;
/// The largest payload one record can hold.
pub(super) const MAX_PAYLOAD: usize = u32::MAX as usize - RECORD_HEADER - 256 - CHECKSUM;

/// What a record says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A live claim under a lease.
    InFlight = 1,
    /// A stored result.
    Completed = 2,
    /// The claim was released: the key is free.
    Released = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::InFlight),
            2 => Some(Self::Completed),
            3 => Some(Self::Released),
            _ => None,
        }
    }
}

/// One decoded record, borrowing its key and payload from the buffer.
#[derive(Debug)]
pub(super) struct Record<'a> {
    pub kind: Kind,
    pub key: &'a str,
    pub token: u64,
    pub expires_ms: u64,
    pub fingerprint: Fingerprint,
    pub payload: &'a [u8],
    /// Bytes the record takes, checksum included.
    pub len: usize,
}

/// What [`decode`] found at the start of a buffer.
pub(super) enum Decoded<'a> {
    Record(Record<'a>),
    /// The buffer ends inside a record (a torn append).
    Truncated,
    /// The bytes are not a record.
    Invalid(&'static str),
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM] {
    let mut out = [0; CHECKSUM];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..CHECKSUM]);
    out
}

/// Appends one record to `buf`. `key` is at most 255 bytes of ASCII (a
/// [`crate::store::StoreKey`]) and `payload` at most [`MAX_PAYLOAD`].
pub(super) fn encode(
    buf: &mut Vec<u8>,
    kind: Kind,
    key: &str,
    token: u64,
    expires_ms: u64,
    fingerprint: &Fingerprint,
    payload: &[u8],
) {
    let start = buf.len();
    buf.reserve(RECORD_HEADER + key.len() + payload.len() + CHECKSUM);
    buf.push(kind as u8);
    buf.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(&token.to_le_bytes());
    buf.extend_from_slice(&expires_ms.to_le_bytes());
    buf.extend_from_slice(&fingerprint.0);
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(payload);
    let sum = checksum(&buf[start..]);
    buf.extend_from_slice(&sum);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Decodes the record at the start of `buf`.
pub(super) fn decode(buf: &[u8]) -> Decoded<'_> {
    decode_with(buf, true)
}

/// Decodes a record this process encoded a moment ago and still holds in
/// memory: the same as [`decode`] without verifying the checksum.
pub(super) fn decode_own(buf: &[u8]) -> Decoded<'_> {
    decode_with(buf, false)
}

fn decode_with(buf: &[u8], verify: bool) -> Decoded<'_> {
    if buf.len() < RECORD_HEADER {
        return Decoded::Truncated;
    }
    let Some(kind) = Kind::from_u8(buf[0]) else {
        return Decoded::Invalid("unknown record kind");
    };
    let key_len = usize::from(buf[1]);
    let mut pl = [0; 4];
    pl.copy_from_slice(&buf[2..6]);
    let payload_len = u32::from_le_bytes(pl) as usize;
    let len = RECORD_HEADER + key_len + payload_len + CHECKSUM;
    if buf.len() < len {
        return Decoded::Truncated;
    }
    let body = len - CHECKSUM;
    if verify && checksum(&buf[..body]) != buf[body..len] {
        return Decoded::Invalid("checksum mismatch");
    }
    let key_bytes = &buf[RECORD_HEADER..RECORD_HEADER + key_len];
    let Ok(key) = std::str::from_utf8(key_bytes) else {
        return Decoded::Invalid("key is not text");
    };
    let mut fp = [0; 32];
    fp.copy_from_slice(&buf[22..54]);
    Decoded::Record(Record {
        kind,
        key,
        token: u64_at(buf, 6),
        expires_ms: u64_at(buf, 14),
        fingerprint: Fingerprint(fp),
        payload: &buf[RECORD_HEADER + key_len..body],
        len,
    })
}

/// The header of a new segment whose token counter starts at `base`.
pub(super) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&base.to_le_bytes());
    let sum = checksum(&h[..16]);
    h[16..].copy_from_slice(&sum);
    h
}

/// The base token of a segment header, or `None` if `h` is not one.
pub(super) fn parse_segment_header(h: &[u8]) -> Option<u64> {
    if h.len() < SEGMENT_HEADER as usize || &h[..8] != MAGIC || checksum(&h[..16]) != h[16..24] {
        return None;
    }
    Some(u64_at(h, 8))
}

/// One segment file. Index entries hold an `Arc` of the segment their
/// record is in, so a replay can read it even after the file was
/// compacted away and unlinked.
#[derive(Debug)]
pub(super) struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub file: File,
    /// Bytes written, header included.
    pub len: AtomicU64,
    /// Bytes of records that no longer say anything (superseded, released,
    /// purged): what compacting the segment would free.
    pub dead: AtomicU64,
}

impl Segment {
    /// Counts `bytes` of this segment as dead.
    pub fn bury(&self, bytes: u32) {
        self.dead.fetch_add(u64::from(bytes), Ordering::Relaxed);
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// The file name of segment `seq`.
pub(super) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.log"))
}

/// The sequence numbers of the segment files in `dir`, ascending.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, &e))?;
    let mut seqs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, &e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_suffix(".log")
            .filter(|s| s.len() == 20)
            .and_then(|s| s.parse::<u64>().ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Flushes a directory's entries (a created, renamed or removed file) to
/// disk.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An I/O failure on `path`, as the store reports it.
pub(super) fn io_err(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("embedded store {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            kind,
            "t:POST:/x:k",
            7,
            99,
            &Fingerprint([3; 32]),
            payload,
        );
        buf
    }

    #[test]
    fn records_round_trip() {
        for kind in [Kind::InFlight, Kind::Completed, Kind::Released] {
            let buf = record(kind, b"hello");
            let Decoded::Record(r) = decode(&buf) else {
                panic!("a record")
            };
            assert_eq!(
                (r.kind, r.key, r.token, r.expires_ms, r.payload, r.len),
                (kind, "t:POST:/x:k", 7, 99, &b"hello"[..], buf.len())
            );
            assert_eq!(r.fingerprint, Fingerprint([3; 32]));
        }
    }

    #[test]
    fn every_torn_prefix_is_truncated_and_every_flipped_byte_is_caught() {
        let buf = record(Kind::Completed, b"payload bytes");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut]), Decoded::Truncated),
                "prefix of {cut} bytes"
            );
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(decode(&bad), Decoded::Record(_)),
                "flipped byte {i} went unnoticed"
            );
        }
        assert!(matches!(
            decode(&[0; 80]),
            Decoded::Invalid("unknown record kind")
        ));
    }

    #[test]
    fn own_records_decode_without_the_checksum() {
        let mut buf = record(Kind::InFlight, b"");
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(
            decode(&buf),
            Decoded::Invalid("checksum mismatch")
        ));
        assert!(matches!(decode_own(&buf), Decoded::Record(r) if r.token == 7));
    }

    #[test]
    fn segment_headers_round_trip_and_reject_garbage() {
        let h = segment_header(41);
        assert_eq!(parse_segment_header(&h), Some(41));
        assert_eq!(parse_segment_header(&h[..20]), None);
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(parse_segment_header(&bad), None);
        assert_eq!(parse_segment_header(&[0; 24]), None);
    }
}
