//! Reading and editing snapshot state files the way an attacker would: the body rewritten
//! with a valid header (length and CRC32 recomputed), so the edit reaches validation.

use std::path::Path;

use serde_json::Value;
use vmm::snapshot::format::{seal, Header};

/// The header line and body of the state file at `path`, as JSON.
pub fn read_state(path: &Path) -> (Value, Value) {
    let bytes = std::fs::read(path).unwrap();
    let newline = bytes.iter().position(|&b| b == b'\n').unwrap();
    (serde_json::from_slice(&bytes[..newline]).unwrap(), serde_json::from_slice(&bytes[newline + 1..]).unwrap())
}

/// The body of the state file at `path`.
pub fn body_of(path: &Path) -> Value {
    read_state(path).1
}

/// `header` and `body` as a state file's bytes, with the body's length and the CRC32
/// recomputed (`format::seal`).
pub fn state_bytes(header: Value, body: &Value) -> Vec<u8> {
    let header: Header = serde_json::from_value(header).unwrap();
    seal(header, &serde_json::to_vec(body).unwrap())
}

/// Rewrites the body of the state file at `path` with `edit`, with a valid header: what a file
/// whose content is wrong, not damaged, looks like.
pub fn rewrite_body(path: &Path, edit: impl FnOnce(&mut Value)) {
    let (header, mut body) = read_state(path);
    edit(&mut body);
    std::fs::write(path, state_bytes(header, &body)).unwrap();
}

/// Rewrites the header of the state file at `path` with `edit` (the body unchanged).
pub fn rewrite_header(path: &Path, edit: impl FnOnce(&mut Value)) {
    let (mut header, body) = read_state(path);
    edit(&mut header);
    std::fs::write(path, state_bytes(header, &body)).unwrap();
}
