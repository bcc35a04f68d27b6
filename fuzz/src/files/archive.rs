//! The zip archive of an npz file: its members written with the zip crate, then the
//! headers written patched (`ZipPatch`: names, sizes, CRC, method and flags that lie),
//! and the inflate bomb.

use std::io::{Cursor, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::npy::{Member, NpyPlan};

/// A change to an archive once written, in the local and the central header of an
/// entry.
#[derive(Clone, Debug)]
pub(super) enum ZipPatch {
    /// Renames the entry `from` (a name of the same length).
    Name {
        from: String,
        to: String,
    },
    /// Sets an entry's uncompressed size, in either header or both.
    Size {
        entry: usize,
        size: u32,
        local: bool,
        central: bool,
    },
    /// Sets an entry's compressed size.
    Packed {
        entry: usize,
        size: u32,
    },
    Crc {
        entry: usize,
        crc: u32,
    },
    /// Sets an entry's compression method.
    Method {
        entry: usize,
        method: u16,
    },
    /// Sets an entry's general-purpose flags.
    Flags {
        entry: usize,
        flags: u16,
    },
}

/// Where each entry's local and central header are, in an archive without comments.
fn entry_headers(zip: &[u8]) -> Option<Vec<(usize, usize)>> {
    let eocd = zip.len().checked_sub(22)?;
    if zip.get(eocd..eocd + 4)? != b"PK\x05\x06" {
        return None;
    }
    let count = u16_at(zip, eocd + 10)?;
    let mut at = u32_at(zip, eocd + 16)? as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if zip.get(at..at + 4)? != b"PK\x01\x02" {
            return None;
        }
        let local = u32_at(zip, at + 42)? as usize;
        out.push((local, at));
        at += 46
            + usize::from(u16_at(zip, at + 28)?)
            + usize::from(u16_at(zip, at + 30)?)
            + usize::from(u16_at(zip, at + 32)?);
    }
    Some(out)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(slot) = b.get_mut(at..at + bytes.len()) {
        slot.copy_from_slice(bytes);
    }
}

/// Writes the members with the zip crate, then applies the patches.
pub(super) fn zip_members(members: &[Member], patches: &[ZipPatch]) -> Result<Vec<u8>, String> {
    let mut z = ZipWriter::new(Cursor::new(Vec::new()));
    for m in members {
        let method = if m.deflate {
            CompressionMethod::Deflated
        } else {
            CompressionMethod::Stored
        };
        let options = SimpleFileOptions::default().compression_method(method);
        z.start_file(m.entry.as_str(), options)
            .map_err(|e| format!("zip: {}: {e}", m.entry))?;
        z.write_all(&m.bytes)
            .map_err(|e| format!("zip: {}: {e}", m.entry))?;
    }
    let mut zip = z.finish().map_err(|e| format!("zip: {e}"))?.into_inner();
    if patches.is_empty() {
        return Ok(zip);
    }
    let headers = entry_headers(&zip).ok_or("zip: cannot find the entries just written")?;
    for patch in patches {
        let at = |entry: usize| {
            headers
                .get(entry)
                .copied()
                .ok_or_else(|| format!("zip: no entry {entry}"))
        };
        match patch {
            ZipPatch::Name { from, to } => {
                let entry = members
                    .iter()
                    .position(|m| &m.entry == from)
                    .ok_or_else(|| format!("zip: no entry {from}"))?;
                let (local, central) = at(entry)?;
                put(&mut zip, local + 30, to.as_bytes());
                put(&mut zip, central + 46, to.as_bytes());
            }
            &ZipPatch::Size {
                entry,
                size,
                local,
                central,
            } => {
                let (l, c) = at(entry)?;
                if local {
                    put(&mut zip, l + 22, &size.to_le_bytes());
                }
                if central {
                    put(&mut zip, c + 24, &size.to_le_bytes());
                }
            }
            &ZipPatch::Packed { entry, size } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 18, &size.to_le_bytes());
                put(&mut zip, c + 20, &size.to_le_bytes());
            }
            &ZipPatch::Crc { entry, crc } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 14, &crc.to_le_bytes());
                put(&mut zip, c + 16, &crc.to_le_bytes());
            }
            &ZipPatch::Method { entry, method } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 8, &method.to_le_bytes());
                put(&mut zip, c + 10, &method.to_le_bytes());
            }
            &ZipPatch::Flags { entry, flags } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 6, &flags.to_le_bytes());
                put(&mut zip, c + 8, &flags.to_le_bytes());
            }
        }
    }
    Ok(zip)
}

pub(super) fn zip_plans(plans: &[NpyPlan], patches: &[ZipPatch]) -> Result<Vec<u8>, String> {
    let members: Vec<Member> = plans.iter().map(NpyPlan::member).collect();
    zip_members(&members, patches)
}

/// Makes member `index` a deflated one whose data inflates to `extra` zero bytes more
/// than it declares: the patches set its declared size and CRC back to its own.
pub(super) fn bomb(m: &mut Member, index: usize, extra: usize) -> Vec<ZipPatch> {
    let size = u32::try_from(m.bytes.len()).unwrap_or(u32::MAX);
    let crc = crc32(&m.bytes);
    m.bytes.resize(m.bytes.len() + extra, 0);
    m.deflate = true;
    vec![
        ZipPatch::Size {
            entry: index,
            size,
            local: true,
            central: true,
        },
        ZipPatch::Crc { entry: index, crc },
    ]
}

/// CRC-32 (IEEE), bit by bit: only the few members of a bomb need it.
pub(super) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
