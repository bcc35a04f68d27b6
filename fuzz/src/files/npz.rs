//! npz: a batch as an npz archive, with random mutations (`NpzMutation`) of its `.npy`
//! plans, of its members' bytes and of the zip archive around them.

use rand::RngExt;
use rand::rngs::StdRng;

use super::archive::{ZipPatch, bomb, crc32, put, zip_members};
use super::batch::Batch;
use super::check::one_line;
use super::generate::{Reads, pick};
use super::mutate::{Applied, BOTH, FileBytes, hostile_shape, read_by, required_by, shape_refused};
use super::npy::{Member, NpyPlan, npy_kind, py_shape};
use super::runner::NPZ;

/// The kinds of npz mutations, in the order they apply: plans, members, the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NpzMutation {
    Shape,
    Descr,
    Dict,
    Drop,
    Rename,
    Duplicate,
    DuplicateSuffix,
    Magic,
    Version,
    HeaderLen,
    DataShort,
    DataLong,
    Bomb,
    SizeLie,
    PackedLie,
    CrcLie,
    Method,
    Flags,
}

/// `count` random mutations of the batch as an npz archive.
pub(super) fn npz_file(
    r: &mut StdRng,
    batch: &Batch,
    reads: [Reads; 2],
    count: usize,
) -> Result<(FileBytes, Vec<Applied>), String> {
    use NpzMutation as M;
    let mut plans: Vec<NpyPlan> = batch.arrays.iter().map(|a| NpyPlan::random(r, a)).collect();
    let kinds = [
        M::Shape,
        M::Shape,
        M::Descr,
        M::Dict,
        M::Drop,
        M::Rename,
        M::Duplicate,
        M::DuplicateSuffix,
        M::Magic,
        M::Version,
        M::HeaderLen,
        M::DataShort,
        M::DataLong,
        M::Bomb,
        M::SizeLie,
        M::PackedLie,
        M::CrcLie,
        M::Method,
        M::Flags,
    ];
    let mut chosen: Vec<NpzMutation> = (0..count).map(|_| pick(r, &kinds)).collect();
    chosen.sort();
    let mut applied = Vec::new();
    let mut patches = Vec::new();
    let orig = |plan: &NpyPlan| batch.get(&plan.array);

    for &kind in chosen.iter().filter(|&&k| k <= M::DuplicateSuffix) {
        if plans.is_empty() {
            break;
        }
        let i = r.random_range(0..plans.len());
        let name = plans[i].array.clone();
        let read = read_by(reads, &name);
        match kind {
            M::Shape => {
                let Some(a) = orig(&plans[i]) else { continue };
                let dims = hostile_shape(r, batch, &a.shape);
                let refused = shape_refused(&name, &a.shape, &dims, batch);
                plans[i].shape = py_shape(&dims);
                let mut label = format!("{} declares shape {}", plans[i].entry, plans[i].shape);
                if dims.first().is_some_and(|d| d == "50000") && r.random_bool(0.5) {
                    plans[i].data = vec![0; 1 << 20];
                    plans[i].deflate = true;
                    label.push_str(" over 1 MB of zeros, deflated");
                }
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Descr => {
                let Some(a) = orig(&plans[i]) else { continue };
                let flipped = match plans[i].descr.chars().next() {
                    Some('<') => plans[i].descr.replacen('<', ">", 1),
                    Some('>') => plans[i].descr.replacen('>', "<", 1),
                    _ => plans[i].descr.clone(),
                };
                let options = [
                    "<f2", "<c16", "|O", "<U8", "<M8[ns]", "|f8", "float32", "<f8 ", "<f4", "<f8",
                    ">f8", "<i4", "<u8", "|u1", "|b1", "<i8", "|i1", &flipped,
                ];
                let descr = pick(r, &options).to_string();
                if descr == plans[i].descr {
                    continue;
                }
                // A float array must keep logp's type; any array whose element size
                // changes no longer matches its data, unless it holds no element.
                let holds_elements = a.shape.iter().product::<usize>() > 0;
                let refused = match npy_kind(&descr) {
                    None => true,
                    Some((kind, size)) => {
                        let wrong_type = name != "mask" && (kind != 'f' || size != a.dt.size());
                        wrong_type || (size != a.dt.size() && holds_elements)
                    }
                };
                let label = format!("{} has dtype {descr:?}", plans[i].entry);
                plans[i].descr = descr;
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Dict => {
                let p = &plans[i];
                let fortran = if p.fortran { "True" } else { "False" };
                let options = [
                    format!("{{'descr': '{}', 'fortran_order': {fortran}}}", p.descr),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': {}, 'x': 1}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{0}', 'descr': '{0}', 'fortran_order': {fortran}, 'shape': {1}}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': 0, 'shape': {}}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': [{}]}}",
                        p.descr,
                        p.shape.trim_matches(|c| c == '(' || c == ')')
                    ),
                    format!("{{'descr': '{}'", p.descr),
                    "[]".into(),
                    String::new(),
                    format!(
                        "{{'descr': {}{}, 'fortran_order': {fortran}, 'shape': {}}}",
                        "[".repeat(100),
                        "]".repeat(100),
                        p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': ({}9,)}}",
                        p.descr,
                        "9".repeat(2000)
                    ),
                ];
                let dict = options[r.random_range(0..options.len())].clone();
                let label = format!("{} has header {}", p.entry, one_line(&dict, 60));
                plans[i].dict = Some(dict);
                applied.push(Applied::new(label, read));
            }
            M::Drop => {
                let label = format!("{} dropped", plans[i].entry);
                plans.remove(i);
                applied.push(Applied::new(label, required_by(reads, &name)));
            }
            M::Rename => {
                let entry = pick(
                    r,
                    &[
                        format!("{}.npy", name.to_uppercase()),
                        format!("{name}_.npy"),
                        format!("dir/{name}.npy"),
                        format!("{name}.NPY"),
                        format!("{name}.npy.npy"),
                        format!(" {name}.npy"),
                    ]
                    .each_ref()
                    .map(String::as_str),
                )
                .to_string();
                if plans.iter().any(|p| p.entry == entry) {
                    continue;
                }
                let label = format!("{} renamed {entry:?}", plans[i].entry);
                plans[i].entry = entry;
                applied.push(Applied::new(label, required_by(reads, &name)));
            }
            M::Duplicate => {
                let mut twin = plans[i].clone();
                let from: String = std::iter::once('Q')
                    .chain(twin.entry.chars().skip(1))
                    .collect();
                if twin.entry.len() != from.len() || plans.iter().any(|p| p.entry == from) {
                    continue;
                }
                if r.random_bool(0.5) {
                    twin.data.iter_mut().for_each(|b| *b = 0);
                }
                let label = format!("{} twice", twin.entry);
                patches.push(ZipPatch::Name {
                    from: from.clone(),
                    to: twin.entry.clone(),
                });
                twin.entry = from;
                let at = r.random_range(0..=plans.len());
                plans.insert(at, twin);
                applied.push(Applied::new(label, BOTH));
            }
            M::DuplicateSuffix => {
                let mut twin = plans[i].clone();
                twin.entry = match twin.entry.strip_suffix(".npy") {
                    Some(bare) => bare.to_string(),
                    None => format!("{}.npy", twin.entry),
                };
                if plans.iter().any(|p| p.entry == twin.entry) {
                    continue;
                }
                let label = format!("{} and {} both", plans[i].entry, twin.entry);
                plans.push(twin);
                applied.push(Applied::new(label, BOTH));
            }
            _ => {}
        }
    }

    let mut members: Vec<Member> = plans.iter().map(NpyPlan::member).collect();
    for &kind in chosen.iter().filter(|&&k| k > M::DuplicateSuffix) {
        if members.is_empty() {
            break;
        }
        let i = r.random_range(0..members.len());
        let read = read_by(reads, &members[i].array);
        let m = &mut members[i];
        let entry = m.entry.clone();
        let header = m.bytes.len() >= 12;
        match kind {
            M::Magic if header => {
                m.bytes[r.random_range(0..6)] ^= 0x20;
                applied.push(Applied::new(format!("{entry} loses its magic"), read));
            }
            M::Version if header => {
                let (v, refused) = pick(
                    r,
                    &[
                        ((9, 9), true),
                        ((0, 0), true),
                        ((1, 1), true),
                        ((4, 0), true),
                        ((1, 0), false),
                        ((2, 0), false),
                        ((3, 0), false),
                    ],
                );
                if m.bytes[6..8] == [v.0, v.1] {
                    continue;
                }
                m.bytes[6] = v.0;
                m.bytes[7] = v.1;
                let label = format!("{entry} claims .npy version {}.{}", v.0, v.1);
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::HeaderLen if header => {
                let (len, refused) = if m.bytes[6] == 1 {
                    let any = r.random::<u16>();
                    let (len, refused) = pick(r, &[(0xffff, true), (0, true), (any, false)]);
                    put(&mut m.bytes, 8, &len.to_le_bytes());
                    (u32::from(len), refused)
                } else {
                    let any = r.random_range(0..4096);
                    let (len, refused) = pick(
                        r,
                        &[
                            (u32::MAX, true),
                            ((1 << 20) + 1, true),
                            (0, true),
                            (any, false),
                        ],
                    );
                    put(&mut m.bytes, 8, &len.to_le_bytes());
                    (len, refused)
                };
                let label = format!("{entry} declares a header of {len} bytes");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::DataShort if m.bytes.len() > 128 => {
                let cut = r.random_range(1..=8.min(m.bytes.len() - 128));
                m.bytes.truncate(m.bytes.len() - cut);
                applied.push(Applied::new(
                    format!("{entry} loses {cut} data bytes"),
                    read,
                ));
            }
            M::DataLong => {
                let n = r.random_range(1..=16);
                m.bytes.extend((0..n).map(|_| r.random::<u8>()));
                applied.push(Applied::new(
                    format!("{entry} has {n} bytes too many"),
                    read,
                ));
            }
            M::Bomb => {
                let extra = pick(r, &[1 << 20, 8 << 20]);
                patches.extend(bomb(m, i, extra));
                let label = format!("{entry} inflates to {extra} bytes more than it declares");
                applied.push(Applied::new(label, read));
            }
            M::SizeLie => {
                let size = u32::try_from(m.bytes.len()).unwrap_or(u32::MAX);
                let lie = pick(
                    r,
                    &[
                        size.saturating_sub(1),
                        size + 1,
                        size / 2,
                        size.saturating_mul(1000),
                        0xffff_fffe,
                        0,
                    ],
                );
                let (local, central) = pick(r, &[(true, true), (false, true), (true, false)]);
                patches.push(ZipPatch::Size {
                    entry: i,
                    size: lie,
                    local,
                    central,
                });
                let label = format!(
                    "{entry} declares {lie} bytes, not {size} (local header {local}, central {central})"
                );
                applied.push(Applied::new(label, read.map(|x| x && central)));
            }
            M::PackedLie => {
                // The deflated size is unknown here: lie by a factor, or past any file.
                let (size, refused) = pick(
                    r,
                    &[
                        (0xffff_fffe, true),
                        (50_000_000, true),
                        (0, false),
                        (1, false),
                    ],
                );
                patches.push(ZipPatch::Packed { entry: i, size });
                let label = format!("{entry} declares {size} compressed bytes");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::CrcLie => {
                let crc = crc32(&m.bytes) ^ (1 << r.random_range(0..32));
                patches.push(ZipPatch::Crc { entry: i, crc });
                applied.push(Applied::new(format!("{entry} has a wrong CRC"), read));
            }
            M::Method => {
                let (method, refused) = pick(r, &[(99, true), (12, true), (0, false), (8, false)]);
                let own = if m.deflate { 8 } else { 0 };
                if method == own {
                    continue;
                }
                patches.push(ZipPatch::Method { entry: i, method });
                let label = format!("{entry} claims compression method {method}");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Flags => {
                // Encrypted (bit 0) needs a password; a data descriptor (bit 3), strong
                // encryption (bit 6) or UTF-8 names (bit 11) may pass.
                let (bit, refused) = pick(r, &[(0, true), (3, false), (6, false), (11, false)]);
                let flags = 1u16 << bit;
                patches.push(ZipPatch::Flags { entry: i, flags });
                let label = format!("{entry} has flags {flags:#06x}");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            _ => {}
        }
    }
    let bytes = zip_members(&members, &patches)?;
    let stored = members.iter().filter(|m| !m.deflate).count();
    let label = format!(
        "npz of {} members ({stored} stored, {} deflated)",
        members.len(),
        members.len() - stored
    );
    Ok((
        FileBytes {
            bytes,
            ext: NPZ,
            label,
        },
        applied,
    ))
}
