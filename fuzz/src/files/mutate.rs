//! Mutations, whatever the format: a mutation applied and which commands must then
//! refuse the file (`Applied`), mutations of a file's bytes (`FileBytes`), and the
//! hostile shapes either format declares.

use rand::RngExt;
use rand::rngs::StdRng;

use super::batch::Batch;
use super::generate::{Reads, pick};
use super::runner::{NPZ, ST};

/// A mutation applied, and whether each command (eval, inspect) must then refuse the
/// file (when it is the file's only mutation).
pub(super) struct Applied {
    pub(super) label: String,
    pub(super) refuse: [bool; 2],
}

impl Applied {
    pub(super) fn new(label: impl Into<String>, refuse: [bool; 2]) -> Self {
        Self {
            label: label.into(),
            refuse,
        }
    }
}

pub(super) const EITHER: [bool; 2] = [false, false];
pub(super) const BOTH: [bool; 2] = [true, true];

/// For each command, whether it reads the array `name`.
pub(super) fn read_by(reads: [Reads; 2], name: &str) -> [bool; 2] {
    reads.map(|r| r.reads(name))
}

/// For each command, whether it refuses a file without the array `name`.
pub(super) fn required_by(reads: [Reads; 2], name: &str) -> [bool; 2] {
    reads.map(|r| r.requires(name))
}

/// A file's bytes and what it is.
pub(super) struct FileBytes {
    pub(super) bytes: Vec<u8>,
    pub(super) ext: &'static str,
    /// The encoding, for messages.
    pub(super) label: String,
}

impl FileBytes {
    /// One mutation of the bytes.
    pub(super) fn mutate(&mut self, r: &mut StdRng) -> Applied {
        let len = self.bytes.len();
        if len == 0 {
            self.bytes.push(0);
            return Applied::new("one zero byte", BOTH);
        }
        // Headers are at the start (safetensors, npy) or the end (the zip directory).
        let somewhere = |r: &mut StdRng| match r.random_range(0..3) {
            0 => r.random_range(0..len.min(128)),
            1 => r.random_range(len.saturating_sub(128)..len),
            _ => r.random_range(0..len),
        };
        match r.random_range(0..14) {
            0..=3 => {
                let n = r.random_range(1..=8);
                let mut at = Vec::new();
                for _ in 0..n {
                    let i = somewhere(r);
                    self.bytes[i] ^= r.random_range(1..=255u8);
                    at.push(i);
                }
                Applied::new(format!("bytes flipped at {at:?}"), EITHER)
            }
            4 | 5 => {
                let start = somewhere(r);
                let end = (start + r.random_range(1..=32)).min(len);
                let fill = pick(r, &[0x00, 0xff, 0x20, 0x7b]);
                self.bytes[start..end].fill(fill);
                Applied::new(format!("bytes {start}..{end} set to {fill:#04x}"), EITHER)
            }
            6 | 7 => {
                let keep = r.random_range(0..len);
                self.bytes.truncate(keep);
                Applied::new(format!("truncated to {keep} of {len} bytes"), BOTH)
            }
            8 | 9 => {
                let junk: Vec<u8> = if r.random_bool(0.5) {
                    (0..r.random_range(1..=64)).map(|_| r.random()).collect()
                } else {
                    self.bytes[..len.min(r.random_range(1..=256))].to_vec()
                };
                self.bytes.extend(&junk);
                Applied::new(format!("{} bytes appended", junk.len()), EITHER)
            }
            10 | 11 => {
                let at = somewhere(r);
                let junk: Vec<u8> = (0..r.random_range(1..=16)).map(|_| r.random()).collect();
                let n = junk.len();
                self.bytes.splice(at..at, junk);
                Applied::new(format!("{n} bytes inserted at {at}"), EITHER)
            }
            12 => {
                self.bytes.clear();
                Applied::new("emptied", BOTH)
            }
            _ => {
                self.ext = if self.ext == NPZ { ST } else { NPZ };
                Applied::new(format!("named .{}", self.ext), BOTH)
            }
        }
    }
}

/// A shape a mutation declares instead of an array's own, as decimal dims (which may
/// be negative or beyond 2^64).
pub(super) fn hostile_shape(r: &mut StdRng, batch: &Batch, own: &[usize]) -> Vec<String> {
    let (b, l, k) = (batch.rows, batch.cols, batch.k);
    let options: Vec<Vec<String>> = [
        vec!["50000".into(), "50000".into()],
        vec!["1099511627776".into(), "2".into()],
        vec!["9223372036854775808".into(), "2".into()],
        vec!["18446744073709551616".into()],
        vec!["99999999999999999999999".into(), "1".into()],
        vec!["-1".into(), l.to_string()],
        vec![b.to_string(), (l * 1000).to_string()],
        vec![(b + 1).to_string(), l.to_string()],
        vec![l.to_string(), b.to_string()],
        vec![(b * l).to_string()],
        vec![b.to_string(), l.to_string(), "1".into()],
        vec![b.to_string(), l.to_string(), (k + 1).to_string()],
        vec![],
        vec!["0".into(), l.to_string()],
        vec![b.to_string(), "0".into()],
    ]
    .into_iter()
    .filter(|dims| parse_dims(dims).as_deref() != Some(own))
    .collect();
    options[r.random_range(0..options.len())].clone()
}

/// Dims as sizes, or `None` if one is negative or beyond `usize`.
fn parse_dims(dims: &[String]) -> Option<Vec<usize>> {
    dims.iter().map(|d| d.parse().ok()).collect()
}

/// Whether a command that reads array `name` (of shape `own` in a B × L batch) must
/// refuse it declaring `dims` instead (with data for `own` only; the caller knows
/// whether the sizes agree).
pub(super) fn shape_refused(name: &str, own: &[usize], dims: &[String], batch: &Batch) -> bool {
    let Some(new) = parse_dims(dims) else {
        return true;
    };
    let count = |s: &[usize]| s.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let alternative = name == "advantages"
        && (new == [batch.rows] || new == [batch.rows, batch.cols])
        && count(&new) == count(own);
    new != own && !alternative
}
