//! GGUF v2/v3 reader (the file format of llama.cpp / ggml), memory-mapped and checked.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; the metadata
//! key/value pairs (string key, u32 value type, value); the tensor infos (name, u32 `n_dims`,
//! `n_dims` × u64 `ne` with `ne[0]` the fastest-varying dim, u32 ggml type, u64 offset
//! relative to the data section); then the data section, starting at the next multiple of
//! `general.alignment` (default 32). All integers little-endian.
//!
//! Every file is hostile until checked (the checks follow llama.cpp's GGUF CVE fixes, see
//! ARCHITECTURE): counts, string and array lengths are capped and checked against the bytes
//! left before anything is allocated; `1 ≤ n_dims ≤ 4`, every `ne ≥ 1`; element and byte
//! counts use checked arithmetic and must be whole blocks of the tensor's type; every tensor
//! lies inside the file, aligned, without overlapping another; names are unique; the
//! alignment is a power of two of at most 1 MiB; arrays do not nest deeper than 8.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Caps on what one file may declare (far above any real model).
pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_KV: u64 = 1 << 20;
pub const MAX_STRING: u64 = 1 << 26;
pub const MAX_ARRAY: u64 = 1 << 26;
const MAX_DEPTH: usize = 8;
const MAX_ALIGN: u64 = 1 << 20;

/// ggml tensor types llmc knows by name (the ids are ggml's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => BF16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            Iq2Xxs => (256, 66),
            Iq2Xs => (256, 74),
            Iq3Xxs => (256, 98),
            Iq1S => (256, 50),
            Iq4Nl => (32, 18),
            Iq3S => (256, 110),
            Iq2S => (256, 82),
            Iq4Xs => (256, 136),
            Iq1M => (256, 56),
            Tq1_0 => (256, 54),
            Tq2_0 => (256, 66),
            Mxfp4 => (32, 17),
        }
    }

    /// ggml's name for the type (`Q4_K`, `IQ2_XXS`, ...).
    pub fn name(self) -> String {
        let d = format!("{self:?}").to_uppercase();
        let d = match d.strip_suffix('K') {
            Some(p) if p.starts_with('Q') => format!("{p}_K"),
            _ => d,
        };
        if d.starts_with("IQ") && d.len() > 3 {
            // IQ2XXS -> IQ2_XXS
            let (a, b) = d.split_at(3);
            if b.is_empty() {
                d
            } else {
                format!("{a}_{b}")
            }
        } else {
            d
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An integer value of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor of the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (ggml's `ne` reversed: the last dim is the contiguous one).
    pub shape: Vec<usize>,
    /// The ggml type id as stored, and its name when llmc knows it.
    pub type_id: u32,
    pub ty: Option<GgmlType>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A parsed GGUF header (the data stays in the caller's bytes or map).
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let left = (self.b.len() - self.at) as u64;
        if n > left {
            return Err(format!("{what} needs {n} bytes at offset {}, the file has {left} left (truncated?)", self.at));
        }
        let s = &self.b[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> std::result::Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(format!("{what}: a string of {n} bytes is over the {MAX_STRING}-byte limit"));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }

    /// A value of type `ty`; `depth` counts array nesting.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                if n > MAX_ARRAY {
                    return Err(format!("{what}: an array of {n} items is over the {MAX_ARRAY}-item limit"));
                }
                // every item takes at least one byte: refuse a count the file cannot hold
                // before allocating for it
                let left = (self.b.len() - self.at) as u64;
                if n > left {
                    return Err(format!("{what}: an array of {n} items in {left} bytes (truncated?)"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

impl Gguf {
    /// Parses and checks the header of the GGUF file `bytes` (its path names it in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Gguf> {
        Gguf::parse_inner(bytes).map_err(|msg| ModelError::Gguf { path: path.to_path_buf(), msg })
    }

    fn parse_inner(bytes: &[u8]) -> std::result::Result<Gguf, String> {
        let mut c = Cursor { b: bytes, at: 0 };
        if c.take(4, "the magic")? != b"GGUF" {
            return Err("not a GGUF file (no `GGUF` magic)".into());
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 and 3 are)"));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        if n_tensors > MAX_TENSORS {
            return Err(format!("{n_tensors} tensors is over the {MAX_TENSORS} limit"));
        }
        if n_kv > MAX_KV {
            return Err(format!("{n_kv} metadata keys is over the {MAX_KV} limit"));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            if key.is_empty() {
                return Err(format!("metadata key {i} is empty"));
            }
            let ty = c.u32(&format!("metadata `{key}`"))?;
            let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(format!("metadata key `{key}` appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGN => a,
                _ => return Err(format!("general.alignment {v:?} must be a power of two of at most {MAX_ALIGN}")),
            },
        };
        struct Raw {
            name: String,
            shape: Vec<usize>,
            type_id: u32,
            ty: Option<GgmlType>,
            offset: u64,
            bytes: u64,
        }
        let mut raw: Vec<Raw> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor {i}'s name"))?;
            let what = format!("tensor `{name}`");
            if name.is_empty() {
                return Err(format!("tensor {i} has an empty name"));
            }
            if !names.insert(name.clone()) {
                return Err(format!("{what} appears twice"));
            }
            let n_dims = c.u32(&what)?;
            if !(1..=4).contains(&n_dims) {
                return Err(format!("{what} has {n_dims} dims (1 to 4 are allowed)"));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&what)?;
                if d == 0 || d > (1 << 40) {
                    return Err(format!("{what} has a dim of {d}"));
                }
                ne.push(d);
            }
            let type_id = c.u32(&what)?;
            let ty = GgmlType::from_id(type_id);
            let offset = c.u64(&what)?;
            let numel = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= 1 << 40);
            let Some(numel) = numel else {
                return Err(format!("{what}: {ne:?} is too many elements"));
            };
            let bytes = match ty {
                Some(t) => {
                    let (be, bb) = t.block();
                    if ne[0] % be != 0 {
                        return Err(format!("{what}: rows of {} are not whole {:?} blocks of {be}", ne[0], t));
                    }
                    (numel / be).checked_mul(bb).ok_or_else(|| format!("{what}: byte count overflows"))?
                }
                None => 0,
            };
            if offset % alignment != 0 {
                return Err(format!("{what}: offset {offset} is not a multiple of the alignment {alignment}"));
            }
            let shape = ne.iter().rev().map(|&d| d as usize).collect();
            raw.push(Raw { name, shape, type_id, ty, offset, bytes });
        }
        let data = (c.at as u64).div_ceil(alignment) * alignment;
        let len = bytes.len() as u64;
        if data > len && n_tensors > 0 {
            return Err(format!("the data section would start at {data}, past the end of the {len}-byte file"));
        }
        let mut tensors = Vec::with_capacity(raw.len());
        for r in raw {
            let start = data.checked_add(r.offset);
            let end = start.and_then(|s| s.checked_add(r.bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= len => tensors.push(TensorInfo {
                    name: r.name,
                    shape: r.shape,
                    type_id: r.type_id,
                    ty: r.ty,
                    start: s as usize,
                    end: e as usize,
                }),
                _ => {
                    return Err(format!(
                        "tensor `{}`: {} bytes at offset {} lie outside the {len}-byte file (truncated?)",
                        r.name, r.bytes, r.offset
                    ))
                }
            }
        }
        let mut spans: Vec<(usize, usize, &str)> =
            tensors.iter().filter(|t| t.end > t.start).map(|t| (t.start, t.end, t.name.as_str())).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2));
            }
        }
        Ok(Gguf { version, alignment, metadata, tensors })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A GGUF file, memory-mapped, with its checked header.
pub struct GgufFile {
    pub path: PathBuf,
    pub map: memmap2::Mmap,
    pub header: Gguf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        if !std::fs::metadata(path).map_err(io)?.is_file() {
            return Err(ModelError::NotAFile { path: path.to_path_buf() });
        }
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map of a regular file llmc never writes; every read is checked
        // against the header validated below. A file truncated by another process while
        // mapped would fault (the documented mmap caveat).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = Gguf::parse(path, &map)?;
        Ok(GgufFile { path: path.to_path_buf(), map, header })
    }

    /// The bytes of tensor `t` (a tensor of this file's header).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.end]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GGUF file from metadata `(key, type, value bytes)` and tensors `(name, ne, type, data)`.
    pub fn build(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        for (k, t, v) in kv {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (name, ne, ty, data) in tensors {
            s(&mut b, name);
            b.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
            offs.push(off);
            off += (data.len() as u64).div_ceil(32) * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for (i, (_, _, _, data)) in tensors.iter().enumerate() {
            let base = b.len() as u64;
            assert_eq!(base % 32, 0);
            let _ = offs[i];
            b.extend(data);
            while b.len() % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    pub fn str_val(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let f: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut arr = 4u32.to_le_bytes().to_vec(); // array of u32
        arr.extend(2u64.to_le_bytes());
        arr.extend(7u32.to_le_bytes());
        arr.extend(9u32.to_le_bytes());
        let bytes = build(
            &[
                ("general.architecture", 8, str_val("llama")),
                ("x.list", 9, arr),
                ("x.eps", 6, 1e-5f32.to_le_bytes().to_vec()),
            ],
            &[("w", vec![3, 2], 0, f.clone())],
        );
        let g = Gguf::parse(Path::new("t.gguf"), &bytes).unwrap();
        assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(g.get("x.list"), Some(&Value::Array(vec![Value::U32(7), Value::U32(9)])));
        let t = g.tensor("w").unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.ty, Some(GgmlType::F32));
        assert_eq!(&bytes[t.start..t.end], &f[..]);
    }

    #[test]
    fn refuses_hostile_headers() {
        let f = vec![0u8; 24];
        let good = build(&[], &[("w", vec![3, 2], 0, f.clone())]);
        let err = |b: &[u8]| Gguf::parse(Path::new("t.gguf"), b).unwrap_err().to_string();
        // truncated data
        assert!(err(&good[..good.len() - 16]).contains("outside"), "{}", err(&good[..good.len() - 16]));
        // 5 dims, a zero dim, a dim product that overflows
        assert!(err(&build(&[], &[("w", vec![1, 1, 1, 1, 1], 0, f.clone())])).contains("5 dims"));
        assert!(err(&build(&[], &[("w", vec![3, 0], 0, f.clone())])).contains("a dim of 0"));
        assert!(err(&build(&[], &[("w", vec![1 << 40, 1 << 40], 0, f.clone())])).contains("too many elements"));
        // duplicate names, a row that is not whole blocks
        assert!(err(&build(&[], &[("w", vec![6], 0, f.clone()), ("w", vec![6], 0, f.clone())])).contains("twice"));
        assert!(err(&build(&[], &[("q", vec![16], 8, vec![0; 34])])).contains("whole"));
        // huge counts and lengths are refused before allocating
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("over the"));
        let mut arr = 0u32.to_le_bytes().to_vec();
        arr.extend((1u64 << 25).to_le_bytes());
        assert!(err(&build(&[("a", 9, arr)], &[])).contains("truncated"));
        let bad_align = build(&[("general.alignment", 4, 3u32.to_le_bytes().to_vec())], &[]);
        assert!(err(&bad_align).contains("power of two"));
        assert!(err(b"GGUF\x01\0\0\0").contains("version 1"));
        assert!(err(b"GGML").contains("magic"));
    }
}
