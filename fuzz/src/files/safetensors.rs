//! safetensors: a batch as a safetensors file (`StPlan`, its entries `StEntry`), with
//! random mutations (`StMutation`) of the entries, the header JSON and the header
//! length.

use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::batch::Batch;
use super::check::one_line;
use super::generate::{Reads, pick};
use super::mutate::{
    Applied, BOTH, EITHER, FileBytes, hostile_shape, read_by, required_by, shape_refused,
};
use super::runner::ST;

/// A tensor's entry in a safetensors header, before it is encoded.
#[derive(Clone, Debug)]
pub(super) struct StEntry {
    /// The array it holds (its data is that array's).
    array: String,
    name: String,
    pub(super) dtype: String,
    /// Decimal dims, possibly negative or beyond 2^64.
    pub(super) shape: Vec<String>,
    pub(super) start: u64,
    pub(super) end: u64,
    /// Replaces the entry's JSON object.
    json: Option<String>,
}

impl StEntry {
    /// The entry's JSON object, its fields followed by `extra`.
    fn body(&self, extra: &str) -> String {
        format!(
            "{{\"dtype\": {}, \"shape\": [{}], \"data_offsets\": [{}, {}]{extra}}}",
            serde_json::Value::from(self.dtype.as_str()),
            self.shape.join(", "),
            self.start,
            self.end
        )
    }
}

/// A safetensors file before it is encoded.
pub(super) struct StPlan {
    pub(super) entries: Vec<StEntry>,
    /// The `__metadata__` value, as JSON.
    metadata: Option<String>,
    data: Vec<u8>,
    /// Whether the header is padded with spaces to a multiple of 8 bytes.
    pad: bool,
    /// Replaces the header JSON.
    header: Option<String>,
    /// Replaces the header's length.
    header_len: Option<u64>,
}

impl StPlan {
    /// The batch as `safetensors` writes it: the tensors in order, no metadata.
    pub(super) fn plain(batch: &Batch) -> Self {
        let order: Vec<usize> = (0..batch.arrays.len()).collect();
        Self::laid_out(batch, &order, None, true)
    }

    /// The batch with its data in a random order, sometimes metadata.
    fn random(r: &mut StdRng, batch: &Batch) -> Self {
        let mut order: Vec<usize> = (0..batch.arrays.len()).collect();
        order.shuffle(r);
        let metadata = r
            .random_bool(0.5)
            .then(|| r#"{"format": "pt"}"#.to_string());
        Self::laid_out(batch, &order, metadata, r.random_bool(0.7))
    }

    /// The header lists the arrays in the batch's order; their data follow in `order`.
    fn laid_out(batch: &Batch, order: &[usize], metadata: Option<String>, pad: bool) -> Self {
        let mut data = Vec::new();
        let mut ranges = vec![(0, 0); batch.arrays.len()];
        for &j in order {
            let start = data.len() as u64;
            data.extend(batch.arrays[j].bytes(false, false));
            ranges[j] = (start, data.len() as u64);
        }
        let entries = batch
            .arrays
            .iter()
            .zip(ranges)
            .map(|(a, (start, end))| StEntry {
                array: a.name.clone(),
                name: a.name.clone(),
                dtype: a.dt.st().into(),
                shape: a.dims(),
                start,
                end,
                json: None,
            })
            .collect();
        Self {
            entries,
            metadata,
            data,
            pad,
            header: None,
            header_len: None,
        }
    }

    fn header(&self) -> String {
        if let Some(h) = &self.header {
            return h.clone();
        }
        let json = |s: &str| serde_json::Value::from(s).to_string();
        let mut items = Vec::new();
        if let Some(m) = &self.metadata {
            items.push(format!("\"__metadata__\": {m}"));
        }
        for e in &self.entries {
            let body = e.json.clone().unwrap_or_else(|| e.body(""));
            items.push(format!("{}: {body}", json(&e.name)));
        }
        format!("{{{}}}", items.join(", "))
    }

    /// The 8-byte little-endian header length, the header, the data.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut header = self.header().into_bytes();
        if self.pad {
            while !header.len().is_multiple_of(8) {
                header.push(b' ');
            }
        }
        let len = self.header_len.unwrap_or(header.len() as u64);
        let mut out = len.to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&self.data);
        out
    }
}

/// Bits per element of a safetensors dtype the `safetensors` crate knows.
fn st_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// The bytes `dims` of `dtype` take, if they can be counted.
fn st_bytes(dims: &[String], dtype: &str) -> Option<u128> {
    let count = dims.iter().try_fold(1u128, |n, d| {
        let d: u64 = d.parse().ok()?;
        n.checked_mul(u128::from(d))
    })?;
    Some((count.checked_mul(u128::from(st_bits(dtype)?))?).div_ceil(8))
}

/// The mask dtypes the safetensors reader accepts.
const ST_MASK_DTYPES: [&str; 11] = [
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F32", "F64",
];

/// The kinds of safetensors mutations, in the order they apply: entries, header text,
/// header length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum StMutation {
    Shape,
    Dtype,
    Offsets,
    Duplicate,
    Drop,
    Rename,
    EntryJson,
    Metadata,
    JsonCut,
    JsonChar,
    JsonTrailing,
    NotObject,
    HeaderLen,
}

/// `count` random mutations of the batch as a safetensors file.
pub(super) fn st_file(
    r: &mut StdRng,
    batch: &Batch,
    reads: [Reads; 2],
    count: usize,
) -> Result<(FileBytes, Vec<Applied>), String> {
    use StMutation as M;
    let mut plan = StPlan::random(r, batch);
    let kinds = [
        M::Shape,
        M::Shape,
        M::Dtype,
        M::Offsets,
        M::Offsets,
        M::Duplicate,
        M::Drop,
        M::Rename,
        M::EntryJson,
        M::Metadata,
        M::JsonCut,
        M::JsonChar,
        M::JsonTrailing,
        M::NotObject,
        M::HeaderLen,
    ];
    let mut chosen: Vec<StMutation> = (0..count).map(|_| pick(r, &kinds)).collect();
    chosen.sort();
    let mut applied = Vec::new();
    let data_len = plan.data.len() as u64;
    for kind in chosen {
        if plan.entries.is_empty() && kind < M::Metadata {
            continue;
        }
        let i = r.random_range(0..plan.entries.len().max(1));
        match kind {
            M::Shape => {
                let e = &plan.entries[i];
                let Some(a) = batch.get(&e.array) else {
                    continue;
                };
                let dims = hostile_shape(r, batch, &a.shape);
                let read = read_by(reads, &e.array);
                let refused = shape_refused(&e.array, &a.shape, &dims, batch);
                let mut label = format!("{} declares shape [{}]", e.name, dims.join(", "));
                // The offsets stay, or follow the shape (then they may pass the end).
                let moved = st_bytes(&dims, &e.dtype)
                    .and_then(|b| b.checked_add(u128::from(e.start)))
                    .and_then(|end| u64::try_from(end).ok())
                    .filter(|_| r.random_bool(0.5));
                let end = moved.unwrap_or(e.end);
                let holds = end.checked_sub(e.start).map(u128::from) == st_bytes(&dims, &e.dtype);
                let refuse = if holds && end <= data_len {
                    read.map(|x| x && refused)
                } else {
                    BOTH
                };
                if let Some(end) = moved {
                    label.push_str(&format!(" with data_offsets [{}, {end}]", e.start));
                }
                let e = &mut plan.entries[i];
                e.shape = dims;
                e.end = end;
                applied.push(Applied::new(label, refuse));
            }
            M::Dtype => {
                let e = &plan.entries[i];
                let dtype = pick(
                    r,
                    &[
                        "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "BOOL", "U8",
                        "I8", "I16", "F8_E4M3", "F4", "C64", "XX", "float32", "bool", "",
                    ],
                );
                if dtype == e.dtype {
                    continue;
                }
                let read = read_by(reads, &e.array);
                let refuse = if st_bits(dtype).is_none()
                    || st_bytes(&e.shape, dtype) != st_bytes(&e.shape, &e.dtype)
                {
                    BOTH
                } else if e.array == "mask" {
                    read.map(|x| x && !ST_MASK_DTYPES.contains(&dtype))
                } else {
                    // A float array of another dtype of the same size: not logp's type.
                    read
                };
                let label = format!("{} has dtype {dtype:?}", e.name);
                plan.entries[i].dtype = dtype.into();
                applied.push(Applied::new(label, refuse));
            }
            M::Offsets => {
                let len = plan.entries.len();
                let e = &plan.entries[i];
                let (start, end, refuse) = match r.random_range(0..5) {
                    0 => (e.start, data_len + r.random_range(1..=64), BOTH),
                    // Past the end, unless the tensor is empty and lands on the end.
                    1 => {
                        let past = e.end > 0;
                        (
                            e.start + data_len,
                            e.end + data_len,
                            if past { BOTH } else { EITHER },
                        )
                    }
                    2 if e.start < e.end => (e.end, e.start, BOTH),
                    3 => (e.start, u64::MAX, BOTH),
                    _ => {
                        let other = &plan.entries[r.random_range(0..len)];
                        let same = other.end.checked_sub(other.start) == e.end.checked_sub(e.start);
                        (other.start, other.end, if same { EITHER } else { BOTH })
                    }
                };
                if (start, end) == (e.start, e.end) {
                    continue;
                }
                let label = format!("{} has data_offsets [{start}, {end}]", e.name);
                let e = &mut plan.entries[i];
                (e.start, e.end) = (start, end);
                applied.push(Applied::new(label, refuse));
            }
            M::Duplicate => {
                let mut twin = plan.entries[i].clone();
                if r.random_bool(0.5) {
                    let other = &plan.entries[r.random_range(0..plan.entries.len())];
                    (twin.start, twin.end) = (other.start, other.end);
                }
                let label = format!("{} twice", twin.name);
                let at = r.random_range(0..=plan.entries.len());
                plan.entries.insert(at, twin);
                applied.push(Applied::new(label, BOTH));
            }
            M::Drop => {
                let e = plan.entries.remove(i);
                let refuse = required_by(reads, &e.array);
                applied.push(Applied::new(format!("{} dropped", e.name), refuse));
            }
            M::Rename => {
                let e = &plan.entries[i];
                let name = pick(
                    r,
                    &[
                        e.name.to_uppercase(),
                        format!("{}_", e.name),
                        format!("{}.npy", e.name),
                        format!(" {}", e.name),
                        "__metadata__".into(),
                    ]
                    .each_ref()
                    .map(String::as_str),
                )
                .to_string();
                if plan.entries.iter().any(|x| x.name == name) {
                    continue;
                }
                let refuse = required_by(reads, &e.array);
                let label = format!("{} renamed {name:?}", e.name);
                plan.entries[i].name = name;
                applied.push(Applied::new(label, refuse));
            }
            M::EntryJson => {
                let e = &plan.entries[i];
                let dtype = serde_json::Value::from(e.dtype.as_str());
                let dims = e.shape.join(", ");
                let (start, end) = (e.start, e.end);
                let (body, refuse) = match r.random_range(0..6) {
                    0 => (e.body(r#", "extra": [1, {"x": null}]"#), EITHER),
                    1 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": [{dims}], "data_offsets": [{start}, {end}, {end}]}}"#
                        ),
                        BOTH,
                    ),
                    2 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": [{dims}], "data_offsets": [{start}.0, {end}.0]}}"#
                        ),
                        BOTH,
                    ),
                    3 => (
                        format!(r#"{{"shape": [{dims}], "data_offsets": [{start}, {end}]}}"#),
                        BOTH,
                    ),
                    4 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": "{dims}", "data_offsets": [{start}, {end}]}}"#
                        ),
                        BOTH,
                    ),
                    _ => ("[]".to_string(), BOTH),
                };
                let label = format!("{} is {}", e.name, one_line(&body, 80));
                plan.entries[i].json = Some(body);
                applied.push(Applied::new(label, refuse));
            }
            M::Metadata => {
                let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
                let m = pick(
                    r,
                    &[
                        r#"{"format": "pt", "x": [1, {"y": null}]}"#,
                        r#""a string""#,
                        "null",
                        "[1, 2, 3]",
                        "{}",
                        deep.as_str(),
                    ],
                );
                plan.metadata = Some(m.into());
                let label = format!("__metadata__ is {}", one_line(m, 40));
                applied.push(Applied::new(label, EITHER));
            }
            M::JsonCut => {
                let h = plan.header();
                let cut = r.random_range(0..h.len().saturating_sub(1).max(1));
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| h.is_char_boundary(c))
                    .unwrap_or(0);
                plan.header = Some(h[..cut].to_string());
                applied.push(Applied::new(
                    format!("header JSON cut to {cut} bytes"),
                    BOTH,
                ));
            }
            M::JsonChar => {
                let mut h = plan.header().into_bytes();
                if h.is_empty() {
                    continue;
                }
                let at = r.random_range(0..h.len());
                let c = pick(r, b"{}\",:x0 \\[");
                h[at] = c;
                plan.header = Some(String::from_utf8_lossy(&h).into_owned());
                let label = format!("header byte {at} set to {:?}", char::from(c));
                applied.push(Applied::new(label, EITHER));
            }
            M::JsonTrailing => {
                let junk = pick(r, &["x", "{}", ",", "}", "\0"]);
                plan.header = Some(format!("{}{junk}", plan.header()));
                applied.push(Applied::new(format!("header JSON then {junk:?}"), BOTH));
            }
            M::NotObject => {
                let h = pick(r, &["[]", "null", "\"s\"", "1", "[{}]", ""]);
                plan.header = Some(h.into());
                applied.push(Applied::new(format!("header is {h:?}"), BOTH));
            }
            M::HeaderLen => {
                let actual = plan.encode().len() as u64 - 8 - data_len;
                let file = actual + data_len;
                let (len, refuse) = pick(
                    r,
                    &[
                        (1 << 40, BOTH),
                        (u64::MAX, BOTH),
                        (100_000_001, BOTH),
                        (file + 1, BOTH),
                        (0, BOTH),
                        (actual.saturating_sub(1), EITHER),
                        (actual + 1, EITHER),
                    ],
                );
                plan.header_len = Some(len);
                let label = format!("header length {len} (of {actual})");
                applied.push(Applied::new(label, refuse));
            }
        }
    }
    let label = format!(
        "safetensors of {} tensors{}",
        plan.entries.len(),
        if plan.metadata.is_some() {
            " with __metadata__"
        } else {
            ""
        }
    );
    Ok((
        FileBytes {
            bytes: plan.encode(),
            ext: ST,
            label,
        },
        applied,
    ))
}
