//! The state file's framing, knowing nothing of what the body holds: one JSON header line
//! (magic, format version, the producing build, the host CPU, kind, body length and CRC32)
//! then the body bytes. One version for the whole file, a read limit, one checksum over the
//! header's fields and the body: what Firecracker's snapshot module does (with CRC64), not
//! per-struct versions.

use serde::{Deserialize, Serialize};

use super::host::HostCpu;

/// The first bytes of every state file.
pub const MAGIC: &str = "zygote-snapshot";
/// The one format version this build reads and writes (the whole file, not per struct).
/// 2: MMIO devices' state and the disk file. 3: diff disk files. 4: producer and host CPU in
/// the header, file names relative to the state file, per-run checksums.
pub const FORMAT_VERSION: u32 = 4;
/// Largest state file read (a 32-vCPU VM's state is well under 2 MiB of JSON): a state file
/// is read whole, so a larger one (or one that never ends) is refused before reading it.
pub const MAX_STATE_FILE_BYTES: u64 = 10 << 20;
/// Largest header line.
const MAX_HEADER_BYTES: usize = 4096;

/// Full: every RAM byte. Diff: the pages changed since the parent snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// The header line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub magic: String,
    pub format_version: u32,
    /// The build that wrote it ("zygote 0.1.0").
    pub producer: String,
    /// The CPU of the host it was taken on.
    pub host_cpu: HostCpu,
    pub kind: SnapshotKind,
    pub body_len: u64,
    /// CRC32 of this header serialized with `crc32` = 0, then the body: a flipped bit in the
    /// producer or CPU record is caught like one in the body.
    pub crc32: u32,
}

/// What is wrong with a state file's framing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a Zygote snapshot state file (bad header)")]
    NotASnapshot,
    #[error("format version {found} (written by {producer}), this build reads version {FORMAT_VERSION}")]
    Version { found: u32, producer: String },
    #[error("truncated: header says {expected} body bytes, file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("corrupted: CRC32 {actual:#010x}, header says {expected:#010x}")]
    Corrupted { expected: u32, actual: u32 },
    #[error("{size} bytes, the limit for a state file is {MAX_STATE_FILE_BYTES}")]
    TooLarge { size: u64 },
}

/// The name and version of this build, as headers record it.
pub fn producer() -> String {
    format!("zygote {}", env!("CARGO_PKG_VERSION"))
}

/// A state file: header line for `body` (taken on `host_cpu`), then `body`; and its CRC32.
pub fn encode(kind: SnapshotKind, host_cpu: HostCpu, body: &[u8]) -> (Vec<u8>, u32) {
    let header = Header {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        producer: producer(),
        host_cpu,
        kind,
        body_len: 0,
        crc32: 0,
    };
    let crc32 = checksum(&Header { body_len: body.len() as u64, ..header.clone() }, body);
    (seal(header, body), crc32)
}

/// A state file of `header` (its length and checksum set here) and `body`. Also what a test
/// uses to make a file whose content is wrong but whose checksum is right.
pub fn seal(mut header: Header, body: &[u8]) -> Vec<u8> {
    header.body_len = body.len() as u64;
    header.crc32 = checksum(&header, body);
    let mut bytes = serde_json::to_vec(&header).unwrap_or_default();
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    bytes
}

/// The CRC32 of `header` with `crc32` = 0, then `body`.
fn checksum(header: &Header, body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&serde_json::to_vec(&Header { crc32: 0, ..header.clone() }).unwrap_or_default());
    crc.update(body);
    crc.finalize()
}

/// Splits a state file into its checked header and its body (length and CRC32 checked).
pub fn decode(bytes: &[u8]) -> Result<(Header, &[u8]), FormatError> {
    if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(FormatError::TooLarge { size: bytes.len() as u64 });
    }
    let newline = bytes.iter().take(MAX_HEADER_BYTES).position(|&b| b == b'\n').ok_or(FormatError::NotASnapshot)?;
    // Magic and version first, so that a file of another version says so rather than "bad
    // header" when the header's fields changed.
    let loose: serde_json::Value = serde_json::from_slice(&bytes[..newline]).map_err(|_| FormatError::NotASnapshot)?;
    if loose.get("magic").and_then(serde_json::Value::as_str) != Some(MAGIC) {
        return Err(FormatError::NotASnapshot);
    }
    let found = loose.get("format_version").and_then(serde_json::Value::as_u64).ok_or(FormatError::NotASnapshot)?;
    if found != u64::from(FORMAT_VERSION) {
        let producer =
            loose.get("producer").and_then(serde_json::Value::as_str).unwrap_or("an older zygote").to_string();
        return Err(FormatError::Version { found: u32::try_from(found).unwrap_or(u32::MAX), producer });
    }
    let header: Header = serde_json::from_value(loose).map_err(|_| FormatError::NotASnapshot)?;
    let body = &bytes[newline + 1..];
    if body.len() as u64 != header.body_len {
        return Err(FormatError::Truncated { expected: header.body_len, actual: body.len() as u64 });
    }
    let actual = checksum(&header, body);
    if actual != header.crc32 {
        return Err(FormatError::Corrupted { expected: header.crc32, actual });
    }
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Vec<u8> {
        encode(SnapshotKind::Full, HostCpu { vendor: "GenuineIntel".into(), features: vec![1, 2] }, b"{\"x\":1}").0
    }

    #[test]
    fn a_file_decodes_to_its_header_and_body() {
        let bytes = file();
        let (header, body) = decode(&bytes).unwrap();
        assert_eq!(body, b"{\"x\":1}");
        assert_eq!(
            (header.kind, header.format_version, header.producer),
            (SnapshotKind::Full, FORMAT_VERSION, producer())
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = file();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(decode(&flipped).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn other_versions_and_oversized_files_are_named() {
        let text = String::from_utf8(file()).unwrap().replacen(
            &format!("\"format_version\":{FORMAT_VERSION}"),
            "\"format_version\":3",
            1,
        );
        assert!(matches!(decode(text.as_bytes()), Err(FormatError::Version { found: 3, .. })));
        let huge = vec![b' '; usize::try_from(MAX_STATE_FILE_BYTES).unwrap() + 1];
        assert_eq!(decode(&huge), Err(FormatError::TooLarge { size: MAX_STATE_FILE_BYTES + 1 }));
    }
}
