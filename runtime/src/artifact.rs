//! Loading an artifact: mmap the file, check the header against it, parse the IR.
//! Weights are used in place from the map, never copied.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use llmc_compiler::artifact::{Header, Section, ALIGN, FORMAT_VERSION, MAGIC, MAX_HEADER, PREAMBLE};
use llmc_compiler::pack;
use llmc_compiler::program::Layout;
use llmc_ir::interp::WeightSource;
use llmc_ir::Graph;
use memmap2::Mmap;

use crate::error::RuntimeError;

/// An opened, validated artifact.
pub struct Artifact {
    pub path: PathBuf,
    pub header: Header,
    pub graph: Graph,
    pub ir_text: String,
    map: Mmap,
    /// name → (index into `header.tensors`)
    index: HashMap<String, usize>,
    /// Row-major copies of packed tensors, made on demand for the interpreter only.
    unpacked: Vec<OnceLock<Vec<f32>>>,
    /// What the verified IR allows as step inputs.
    pub limits: Limits,
}

/// Bounds on a step's inputs that follow from the verified graph: token ids index every
/// embedding table gathered by token, positions every table gathered by position (GPT-2's
/// learned positions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub token_rows: usize,
    pub position_rows: Option<usize>,
}

impl Limits {
    pub fn of(g: &Graph) -> Result<Limits, String> {
        use llmc_ir::{InputKind, Op};
        let (mut tokens, mut positions) = (None::<usize>, None::<usize>);
        for id in g.node_ids() {
            if !matches!(g.node(id).op, Op::Embedding) {
                continue;
            }
            let ops = g.operands(id);
            let (Some(&table), Some(&ids)) = (ops.first(), ops.get(1)) else { continue };
            let rows = g.node(table).ty.shape.resolve(0).first().copied().unwrap_or(0);
            let slot = match g.node(ids).op {
                Op::Input(InputKind::Tokens) => &mut tokens,
                Op::Input(InputKind::Positions) => &mut positions,
                _ => return Err("an embedding gathers by ids that are not a step input".into()),
            };
            *slot = Some(slot.map_or(rows, |r| r.min(rows)));
        }
        let token_rows = tokens.ok_or("the IR has no token embedding")?;
        Ok(Limits { token_rows, position_rows: positions })
    }
}

impl Artifact {
    pub fn open(path: &Path) -> Result<Artifact, RuntimeError> {
        let bad = |msg: String| RuntimeError::BadArtifact { path: path.to_path_buf(), msg };
        let file = File::open(path).map_err(|source| RuntimeError::Io { path: path.into(), source })?;
        catch_sigbus();
        // SAFETY: read-only map of a file llmc wrote atomically (temp + rename) and never
        // modifies in place; every range read below is checked against the map's length.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| RuntimeError::Io { path: path.into(), source })?;
        if map.len() < PREAMBLE || &map[..8] != MAGIC {
            return Err(bad("missing the LLMCART magic (not an artifact, or truncated)".into()));
        }
        let version = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
        if version != FORMAT_VERSION {
            return Err(RuntimeError::Version { path: path.into(), found: version, expected: FORMAT_VERSION });
        }
        let mut hl = [0u8; 8];
        hl.copy_from_slice(&map[12..20]);
        let header_len = u64::from_le_bytes(hl);
        if header_len > MAX_HEADER {
            return Err(bad(format!("header length {header_len} is over the {MAX_HEADER}-byte limit")));
        }
        let header_end =
            (PREAMBLE as u64).checked_add(header_len).filter(|&e| e <= map.len() as u64).ok_or_else(|| {
                bad(format!("header length {header_len} runs past the end of the {}-byte file", map.len()))
            })?;
        let header_bytes = &map[PREAMBLE..header_end as usize];
        let crc = u32::from_le_bytes([map[20], map[21], map[22], map[23]]);
        if crc32fast::hash(header_bytes) != crc {
            return Err(bad("the header's checksum does not match (corrupt)".into()));
        }
        let header: Header =
            serde_json::from_slice(header_bytes).map_err(|e| bad(format!("header is not valid: {e}")))?;
        if header.file_size != map.len() as u64 {
            return Err(bad(format!(
                "header says the file has {} bytes but it has {} (truncated or corrupt)",
                header.file_size,
                map.len()
            )));
        }
        let in_file = |what: &str, off: u64, len: u64| -> Result<(), RuntimeError> {
            match off.checked_add(len) {
                Some(end) if off >= header_end && end <= map.len() as u64 => Ok(()),
                _ => Err(bad(format!("{what} at offset {off} (+{len} bytes) lies outside the file"))),
            }
        };
        in_file("the IR section", header.ir.offset, header.ir.len)?;
        if let Some(t) = &header.text.tokenizer {
            in_file("the tokenizer section", t.offset, t.len)?;
        }
        let section = |sec: &Section| &map[sec.offset as usize..(sec.offset + sec.len) as usize];
        if crc32fast::hash(section(&header.ir)) != header.ir.crc32 {
            return Err(bad("the IR section's checksum does not match (corrupt)".into()));
        }
        if let Some(t) = &header.text.tokenizer {
            if crc32fast::hash(section(t)) != t.crc32 {
                return Err(bad("the tokenizer section's checksum does not match (corrupt)".into()));
            }
        }
        let ir_text = std::str::from_utf8(section(&header.ir))
            .map_err(|_| bad("the IR section is not UTF-8".into()))?
            .to_string();
        let graph = llmc_ir::text::parse(&ir_text)?;
        // The one trust boundary: the program the JIT runs is lowered again from the verified
        // IR; the stored copy must be exactly that (an edited program is refused, never run).
        let program = llmc_compiler::lower::lower(&graph).map_err(|e| bad(format!("the IR cannot be lowered: {e}")))?;
        if program != header.program {
            return Err(bad("the stored program does not match the program of its IR (edited or corrupt)".into()));
        }
        let limits = Limits::of(&graph).map_err(bad)?;
        if header.vocab_size == 0 || header.vocab_size > limits.token_rows {
            return Err(bad(format!(
                "vocab_size {} does not fit the token embedding's {} rows",
                header.vocab_size, limits.token_rows
            )));
        }
        if header.max_positions == 0 || header.max_positions > llmc_ir::op::MAX_DIM {
            return Err(bad(format!("max_positions {} is not a valid context", header.max_positions)));
        }
        if let Some(rows) = limits.position_rows {
            if !header.hard_context_limit || header.max_positions > rows {
                return Err(bad(format!(
                    "the model has {rows} learned positions but the header says max_positions {} (hard limit: {})",
                    header.max_positions, header.hard_context_limit
                )));
            }
        }
        let mut index = HashMap::new();
        for (i, t) in header.tensors.iter().enumerate() {
            in_file(&format!("tensor `{}`", t.name), t.offset, t.len)?;
            let dtype = match llmc_ir::DType::parse(&t.dtype) {
                Some(d) if d == llmc_ir::DType::F32 || d == llmc_ir::DType::U8 || llmc_ir::quant::is_storage(d) => d,
                _ => return Err(bad(format!("tensor `{}` has unsupported dtype {}", t.name, t.dtype))),
            };
            // The kernels read each weight in the layout the program asks for.
            let layout = if t.dtype == "u8" { Layout::RowMajor } else { program.layout_of(&t.name) };
            if t.layout != layout {
                return Err(bad(format!(
                    "tensor `{}` is stored {:?}, its kernels read {:?}",
                    t.name, t.layout, layout
                )));
            }
            if index.contains_key(&t.name) {
                return Err(bad(format!("tensor `{}` is listed twice", t.name)));
            }
            // The stored length follows from the shape and the layout (packed tensors are padded).
            let dims_ok = match t.layout {
                Layout::Panel16 | Layout::Dot16 => t.shape.len() >= 2,
                Layout::Padded16 => t.shape.len() == 1,
                Layout::RowMajor => true,
            };
            let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let want = numel.filter(|&n| dims_ok && n < (1u64 << 40)).map(|n| match t.dtype.as_str() {
                "u8" if t.layout == Layout::RowMajor => n,
                "u8" => u64::MAX,
                _ => pack::packed_bytes(t.layout, dtype, &t.shape).map_or(u64::MAX, |b| b as u64),
            });
            if want != Some(t.len) {
                return Err(bad(format!("tensor `{}`: {} bytes do not match shape {:?}", t.name, t.len, t.shape)));
            }
            if t.offset % ALIGN != 0 {
                return Err(bad(format!("tensor `{}` is not 64-byte aligned", t.name)));
            }
            index.insert(t.name.clone(), i);
        }
        for (name, ty) in graph.weights() {
            let i =
                index.get(&name).ok_or_else(|| bad(format!("the IR reads weight `{name}` which the file lacks")))?;
            if header.tensors[*i].dtype != ty.dtype.name() || ty.dtype == llmc_ir::DType::I32 {
                return Err(bad(format!(
                    "tensor `{name}` is stored as {}, the IR reads {}",
                    header.tensors[*i].dtype,
                    ty.dtype.name()
                )));
            }
            if header.tensors[*i].shape != ty.shape.resolve(0) {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, the IR expects {}",
                    header.tensors[*i].shape, ty.shape
                )));
            }
        }
        check_target(path, &header)?;
        let unpacked = header.tensors.iter().map(|_| OnceLock::new()).collect();
        Ok(Artifact { path: path.to_path_buf(), header, graph, ir_text, map, index, unpacked, limits })
    }

    /// The address of a weight's data in the map, whatever its dtype (for the JIT).
    pub fn tensor_ptr(&self, name: &str) -> Option<*const u8> {
        let t = &self.header.tensors[*self.index.get(name)?];
        self.map.get(t.offset as usize..).map(|b| b.as_ptr())
    }

    /// A `u8` weight's bytes, in place in the map.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = &self.header.tensors[*self.index.get(name)?];
        if t.dtype != "u8" {
            return None;
        }
        self.map.get(t.offset as usize..(t.offset + t.len) as usize)
    }

    /// A weight's f32 data as stored (packed layouts included), in place in the map.
    pub fn tensor(&self, name: &str) -> Option<(&[f32], &[usize])> {
        let t = &self.header.tensors[*self.index.get(name)?];
        if t.dtype != "f32" {
            return None;
        }
        let bytes = &self.map[t.offset as usize..(t.offset + t.len) as usize];
        // SAFETY: `bytes` lies inside the map (checked at open), its start is 64-byte aligned
        // within a page-aligned map (so aligned for f32), its length is a multiple of 4 (checked
        // against shape and layout at open), and any bit pattern is a valid f32. The map is read-only and lives as long as
        // `self`.
        let data = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4) };
        Some((data, t.shape.as_slice()))
    }

    /// The bundled `tokenizer.json`, if the model had one.
    pub fn tokenizer_json(&self) -> Option<&[u8]> {
        let s = self.header.text.tokenizer.as_ref()?;
        self.map.get(s.offset as usize..(s.offset + s.len) as usize)
    }

    /// Checks every weight's bytes against its checksum (`llmc inspect --verify`); returns the
    /// names of the tensors that do not match.
    pub fn verify_weights(&self) -> Vec<String> {
        self.header
            .tensors
            .iter()
            .filter(|t| {
                let bytes = &self.map[t.offset as usize..(t.offset + t.len) as usize];
                crc32fast::hash(bytes) != t.crc32
            })
            .map(|t| t.name.clone())
            .collect()
    }

    /// Total bytes of weights.
    pub fn weight_bytes(&self) -> u64 {
        self.header.tensors.iter().map(|t| t.len).sum()
    }
}

impl WeightSource for Artifact {
    fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor_bytes(name)
    }

    /// Row-major weights for the interpreter: packed tensors are unpacked once, on first use;
    /// a storage type (bf16, f16, q8_0, q4_0) is given as the f32 values it means.
    fn weight(&self, name: &str) -> Option<(&[f32], &[usize])> {
        let i = *self.index.get(name)?;
        let t = &self.header.tensors[i];
        let dtype = llmc_ir::DType::parse(&t.dtype)?;
        if llmc_ir::quant::is_storage(dtype) {
            let bytes = self.map.get(t.offset as usize..(t.offset + t.len) as usize)?;
            let data = self.unpacked[i].get_or_init(|| pack::unpack_bytes(t.layout, dtype, &t.shape, bytes));
            return Some((data.as_slice(), t.shape.as_slice()));
        }
        let (raw, shape) = self.tensor(name)?;
        if t.layout == Layout::RowMajor {
            return Some((raw, shape));
        }
        let data = self.unpacked[i].get_or_init(|| pack::unpack(t.layout, &t.shape, raw));
        Some((data.as_slice(), shape))
    }
}

/// The artifact must target this CPU: same architecture, and every ISA feature its header
/// lists present on the host.
fn check_target(path: &Path, header: &Header) -> Result<(), RuntimeError> {
    let bad = |msg: String| RuntimeError::BadArtifact { path: path.to_path_buf(), msg };
    if header.target.arch != std::env::consts::ARCH {
        return Err(bad(format!("compiled for {}, this CPU is {}", header.target.arch, std::env::consts::ARCH)));
    }
    let isa = llmc_compiler::jit::cpu_isa().map_err(|e| bad(e.to_string()))?;
    let host = llmc_compiler::jit::isa_features(&*isa);
    let missing: Vec<&str> = header.target.features.iter().filter(|f| !host.contains(f)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "compiled for ISA features this CPU lacks: {}; recompile on this machine",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// A mapped file that is truncated while llmc runs (`cp other.llmc live.llmc` rewrites it in
/// place; `llmc compile` itself always renames a complete file into place, which is safe)
/// makes the next read of a lost page raise SIGBUS. Instead of dying by the signal, llmc
/// prints one error line and exits 1. Installed once, by the first `Artifact::open`.
fn catch_sigbus() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        extern "C" fn on_sigbus(_: libc::c_int) {
            const MSG: &[u8] = b"error: the artifact file was truncated or rewritten while llmc was reading it (replace artifacts by renaming a new file into place, as `llmc compile` does)\n";
            // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
            unsafe {
                libc::write(2, MSG.as_ptr() as *const libc::c_void, MSG.len());
                libc::_exit(1);
            }
        }
        // SAFETY: installs a handler that only calls async-signal-safe functions and never
        // returns into the faulting code; `sa` is fully initialized (zeroed, then set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}
