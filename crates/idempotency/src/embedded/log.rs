//! The embedded store's on-disk format: numbered segment files, each a
//! header and then checksummed records appended one after another.
//!
//! ```text
//! segment = magic "KEELIDX2" | base token u64 LE | checksum u64 LE | record*
//! record  = kind u8 | key length u8 | payload length u32 LE
//!         | token u64 LE | expires (ms since the epoch) u64 LE
//!         | lease end (ms since the epoch) u64 LE
//!         | fingerprint [32] | key | payload | checksum u64 LE
//! ```
//!
//! Checksums are the first 8 bytes of the BLAKE3 hash of everything before
//! them in the header or record, so a torn or zero-filled tail is told from
//! a record. The base token is the fencing-token counter when the segment
//! was started: tokens never go back even once every record that carried a
//! higher one has been compacted away.
//!
//! A claim record (written when a key is claimed, and again at each
//! renewal) carries both of its deadlines: the lease end, when the claim
//! lapses if its holder neither finished nor renewed it, and the expiry,
//! when the record itself ends: the lease end plus the lock time under a
//! locking lease, the lease end itself under a freeing one. Between the two
//! the key reads as abandoned, after a restart as before it. Other records
//! write 0 as their lease end.
//!
//! Version 1 segments (magic `KEELIDX1`, written by the previous keel) have
//! no lease field: their records are 8 bytes shorter, and a version 1
//! claim's expiry is its lease end, with a lapse that frees the key, which
//! is what that version meant. They are read as such and never appended to;
//! compaction rewrites their live records in the current version.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Fingerprint, StoreError};

/// Bytes before a segment's first record.
pub(super) const SEGMENT_HEADER: u64 = 24;
const CHECKSUM: usize = 8;
/// The largest payload one record can hold.
pub(super) const MAX_PAYLOAD: usize =
    u32::MAX as usize - Version::V2.record_header() - 256 - CHECKSUM;

/// A segment's format version, named by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Version {
    /// `KEELIDX1`: records without a lease field.
    V1,
    /// `KEELIDX2`: claim records carry their lease end.
    V2,
}

/// The version new segments are written in.
pub(super) const CURRENT: Version = Version::V2;

impl Version {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            Self::V1 => b"KEELIDX1",
            Self::V2 => b"KEELIDX2",
        }
    }

    /// Bytes of a record before its key.
    const fn record_header(self) -> usize {
        match self {
            Self::V1 => 1 + 1 + 4 + 8 + 8 + 32,
            Self::V2 => 1 + 1 + 4 + 8 + 8 + 8 + 32,
        }
    }
}

/// What a record says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A claim under a lease, or its renewal: the latest one holds.
    InFlight = 1,
    /// A stored result.
    Completed = 2,
    /// The claim was released: the key is free.
    Released = 3,
    /// An operator removed whatever the key held: the key is free.
    Removed = 4,
}

impl Kind {
    fn from_u8(b: u8, version: Version) -> Option<Self> {
        match b {
            1 => Some(Self::InFlight),
            2 => Some(Self::Completed),
            3 => Some(Self::Released),
            4 if version != Version::V1 => Some(Self::Removed),
            _ => None,
        }
    }

    /// The key is free from this record on.
    pub fn frees(self) -> bool {
        matches!(self, Self::Released | Self::Removed)
    }
}

/// Everything a record says besides its key and payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub kind: Kind,
    pub token: u64,
    /// When a claim lapses (ms since the epoch); 0 for other records.
    pub lease_ms: u64,
    /// When the record ends (ms since the epoch).
    pub expires_ms: u64,
    pub fingerprint: Fingerprint,
}

/// One decoded record, borrowing its key and payload from the buffer.
#[derive(Debug)]
pub(super) struct Record<'a> {
    pub meta: Meta,
    pub key: &'a str,
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

/// Appends one record in the [current](CURRENT) version to `buf`. `key` is
/// at most 255 bytes of ASCII (a [`crate::store::StoreKey`]) and `payload`
/// at most [`MAX_PAYLOAD`].
pub(super) fn encode(buf: &mut Vec<u8>, meta: &Meta, key: &str, payload: &[u8]) {
    encode_as(buf, CURRENT, meta, key, payload);
}

/// Appends one record in `version` to `buf` (a version 1 record drops the
/// lease end).
fn encode_as(buf: &mut Vec<u8>, version: Version, meta: &Meta, key: &str, payload: &[u8]) {
    let start = buf.len();
    buf.reserve(version.record_header() + key.len() + payload.len() + CHECKSUM);
    buf.push(meta.kind as u8);
    buf.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(&meta.token.to_le_bytes());
    buf.extend_from_slice(&meta.expires_ms.to_le_bytes());
    if version != Version::V1 {
        buf.extend_from_slice(&meta.lease_ms.to_le_bytes());
    }
    buf.extend_from_slice(meta.fingerprint.as_bytes());
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

/// Decodes the record at the start of `buf`, read from a segment of
/// `version`.
pub(super) fn decode(buf: &[u8], version: Version) -> Decoded<'_> {
    decode_with(buf, version, true)
}

/// Decodes a record this process encoded or checked a moment ago and
/// still holds in memory: the same as [`decode`] without verifying the
/// checksum.
pub(super) fn decode_own(buf: &[u8], version: Version) -> Decoded<'_> {
    decode_with(buf, version, false)
}

fn decode_with(buf: &[u8], version: Version, verify: bool) -> Decoded<'_> {
    let header = version.record_header();
    if buf.len() < header {
        return Decoded::Truncated;
    }
    let Some(kind) = Kind::from_u8(buf[0], version) else {
        return Decoded::Invalid("unknown record kind");
    };
    let key_len = usize::from(buf[1]);
    let mut pl = [0; 4];
    pl.copy_from_slice(&buf[2..6]);
    let payload_len = u32::from_le_bytes(pl) as usize;
    let len = header + key_len + payload_len + CHECKSUM;
    if buf.len() < len {
        return Decoded::Truncated;
    }
    let body = len - CHECKSUM;
    if verify && checksum(&buf[..body]) != buf[body..len] {
        return Decoded::Invalid("checksum mismatch");
    }
    let key_bytes = &buf[header..header + key_len];
    let Ok(key) = std::str::from_utf8(key_bytes) else {
        return Decoded::Invalid("key is not text");
    };
    let token = u64_at(buf, 6);
    let expires_ms = u64_at(buf, 14);
    let (lease_ms, fp_at) = match version {
        // What a version 1 claim meant: held until its expiry, then free.
        Version::V1 if kind == Kind::InFlight => (expires_ms, 22),
        Version::V1 => (0, 22),
        Version::V2 => (u64_at(buf, 22), 30),
    };
    let mut fp = [0; 32];
    fp.copy_from_slice(&buf[fp_at..fp_at + 32]);
    Decoded::Record(Record {
        meta: Meta {
            kind,
            token,
            lease_ms,
            expires_ms,
            fingerprint: Fingerprint::from_bytes(fp),
        },
        key,
        payload: &buf[header + key_len..body],
        len,
    })
}

/// The header of a new segment in the [current](CURRENT) version whose
/// token counter starts at `base`.
pub(super) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
    segment_header_as(CURRENT, base)
}

fn segment_header_as(version: Version, base: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(version.magic());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    let sum = checksum(&h[..16]);
    h[16..].copy_from_slice(&sum);
    h
}

/// Why [`parse_segment_header`] found no segment header it can use.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BadHeader {
    /// Not a segment header: garbage, or one whose write was cut short.
    Invalid,
    /// A whole header of a later version than this keel reads.
    Later,
}

/// The version and base token of a segment header.
pub(super) fn parse_segment_header(h: &[u8]) -> Result<(Version, u64), BadHeader> {
    if h.len() < SEGMENT_HEADER as usize || checksum(&h[..16]) != h[16..24] {
        return Err(BadHeader::Invalid);
    }
    match [Version::V1, Version::V2]
        .into_iter()
        .find(|v| &h[..8] == v.magic())
    {
        Some(version) => Ok((version, u64_at(h, 8))),
        None if h.starts_with(b"KEELIDX") => Err(BadHeader::Later),
        None => Err(BadHeader::Invalid),
    }
}

/// One segment file. Index entries hold an `Arc` of the segment their
/// record is in, so a replay can read it even after the file was
/// compacted away and unlinked.
#[derive(Debug)]
pub(super) struct Segment {
    pub seq: u64,
    pub version: Version,
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

/// Whether `e` says the disk (or the user's quota on it) has no room left.
pub(super) fn is_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// An I/O failure on `path`, as the store reports it: [`StoreError::Full`]
/// for a full disk or quota, [`StoreError::Unavailable`] for the rest.
pub(super) fn io_err(path: &Path, e: &std::io::Error) -> StoreError {
    if is_no_space(e) {
        StoreError::Full(format!(
            "embedded store {}: {e}; stored records are kept and answered, new claims are \
             refused until space is freed",
            path.display()
        ))
    } else {
        StoreError::Unavailable(format!("embedded store {}: {e}", path.display()))
    }
}

/// Writes segment files in the previous version, for the tests of reading
/// them.
#[cfg(test)]
pub(super) mod v1 {
    use super::*;

    /// A version 1 segment header.
    pub fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
        segment_header_as(Version::V1, base)
    }

    /// Appends a version 1 record (no lease end) to `buf`.
    pub fn encode(buf: &mut Vec<u8>, meta: &Meta, key: &str, payload: &[u8]) {
        encode_as(buf, Version::V1, meta, key, payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind) -> Meta {
        Meta {
            kind,
            token: 7,
            lease_ms: if kind == Kind::InFlight { 42 } else { 0 },
            expires_ms: 99,
            fingerprint: Fingerprint::from_bytes([3; 32]),
        }
    }

    fn record(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, &meta(kind), "t:POST:/x:k", payload);
        buf
    }

    #[test]
    fn records_round_trip() {
        for kind in [
            Kind::InFlight,
            Kind::Completed,
            Kind::Released,
            Kind::Removed,
        ] {
            let buf = record(kind, b"hello");
            let Decoded::Record(r) = decode(&buf, CURRENT) else {
                panic!("a record")
            };
            assert_eq!(
                (r.meta, r.key, r.payload, r.len),
                (meta(kind), "t:POST:/x:k", &b"hello"[..], buf.len())
            );
        }
    }

    #[test]
    fn version_1_records_read_as_freeing_claims() {
        for kind in [Kind::InFlight, Kind::Completed, Kind::Released] {
            let mut buf = Vec::new();
            v1::encode(&mut buf, &meta(kind), "k", b"p");
            assert_eq!(buf.len(), record(kind, b"p").len() - 8 - "t:POST:/x:".len());
            let Decoded::Record(r) = decode(&buf, Version::V1) else {
                panic!("a version 1 record")
            };
            // A version 1 claim held until its expiry, and then freed.
            let lease = if kind == Kind::InFlight { 99 } else { 0 };
            assert_eq!(
                (
                    r.meta.kind,
                    r.meta.token,
                    r.meta.lease_ms,
                    r.meta.expires_ms
                ),
                (kind, 7, lease, 99)
            );
            assert_eq!((r.key, r.payload, r.len), ("k", &b"p"[..], buf.len()));
            assert_eq!(r.meta.fingerprint, Fingerprint::from_bytes([3; 32]));
        }
        // Removal records did not exist in version 1.
        let mut buf = Vec::new();
        v1::encode(&mut buf, &meta(Kind::Removed), "k", b"");
        assert!(matches!(
            decode(&buf, Version::V1),
            Decoded::Invalid("unknown record kind")
        ));
    }

    #[test]
    fn every_torn_prefix_is_truncated_and_every_flipped_byte_is_caught() {
        let buf = record(Kind::Completed, b"payload bytes");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut], CURRENT), Decoded::Truncated),
                "prefix of {cut} bytes"
            );
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(decode(&bad, CURRENT), Decoded::Record(_)),
                "flipped byte {i} went unnoticed"
            );
        }
        assert!(matches!(
            decode(&[0; 80], CURRENT),
            Decoded::Invalid("unknown record kind")
        ));
    }

    #[test]
    fn own_records_decode_without_the_checksum() {
        let mut buf = record(Kind::InFlight, b"");
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(
            decode(&buf, CURRENT),
            Decoded::Invalid("checksum mismatch")
        ));
        assert!(matches!(decode_own(&buf, CURRENT), Decoded::Record(r) if r.meta.token == 7));
    }

    #[test]
    fn segment_headers_round_trip_and_reject_garbage() {
        let h = segment_header(41);
        assert_eq!(parse_segment_header(&h), Ok((Version::V2, 41)));
        assert_eq!(
            parse_segment_header(&v1::segment_header(40)),
            Ok((Version::V1, 40))
        );
        assert_eq!(parse_segment_header(&h[..20]), Err(BadHeader::Invalid));
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(parse_segment_header(&bad), Err(BadHeader::Invalid));
        assert_eq!(parse_segment_header(&[0; 24]), Err(BadHeader::Invalid));
        let mut unknown = segment_header_as(Version::V2, 1);
        unknown[7] = b'9';
        let sum = checksum(&unknown[..16]);
        unknown[16..].copy_from_slice(&sum);
        assert_eq!(
            parse_segment_header(&unknown),
            Err(BadHeader::Later),
            "a later version"
        );
    }

    #[test]
    fn a_full_disk_is_told_from_other_failures() {
        let full = std::io::Error::from_raw_os_error(28); // ENOSPC
        let quota = std::io::Error::from_raw_os_error(122); // EDQUOT on Linux
        let eio = std::io::Error::from_raw_os_error(5);
        assert!(is_no_space(&full));
        assert!(is_no_space(&std::io::Error::from(
            std::io::ErrorKind::StorageFull
        )));
        assert!(!is_no_space(&eio));
        let p = Path::new("/x");
        assert!(matches!(io_err(p, &full), StoreError::Full(_)));
        assert!(matches!(io_err(p, &eio), StoreError::Unavailable(_)));
        if cfg!(target_os = "linux") {
            assert!(is_no_space(&quota));
        }
    }
}
