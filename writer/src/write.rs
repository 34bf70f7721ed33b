//! `llmc compile`: model folder → optimized graph → artifact file, written atomically.

use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use llmc_ir::interp::{self, KvCache, StepInput, Tensor};
use llmc_ir::passes::{self, Pass};
use llmc_ir::quant::QBlock;
use llmc_ir::{DType, Graph, NodeId, Op};
use std::sync::atomic::{AtomicBool, Ordering};

use llmc_models::safetensors_io::GgufRows;
use llmc_models::{Model, WeightSpec};

use crate::error::CompileError;
use llmc_compiler::artifact::{
    align_up, preamble, Header, Section, Target, TensorEntry, TextInfo, FORMAT_VERSION, PREAMBLE,
};
use llmc_compiler::pack;
use llmc_compiler::program::Layout;

/// What `compile` reports while it works (the CLI draws a progress bar from it).
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    Stage(&'static str),
    Bytes { done: u64, total: u64 },
}

/// What `compile` did, for the CLI to report.
#[derive(Debug)]
pub struct CompileReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    pub nodes: usize,
}

/// The target description of this host: its architecture and the ISA features Cranelift
/// detects (the kernels are specialized for them at load).
pub fn host_target() -> Result<Target, CompileError> {
    let isa = llmc_compiler::jit::cpu_isa().map_err(|e| CompileError::Jit(e.to_string()))?;
    Ok(Target { arch: std::env::consts::ARCH.to_string(), features: llmc_compiler::jit::isa_features(&*isa) })
}

/// Compiles `model` into an artifact at `out`. The file is written to a temporary name beside
/// `out` and renamed into place only when complete, so `out` never holds a partial artifact;
/// on any error the temporary file is removed.
pub fn compile(
    model: &Model,
    out: &Path,
    pipeline: &[Box<dyn Pass>],
    storage: Storage,
    activations: Activations,
    progress: &mut dyn FnMut(Progress),
) -> Result<CompileReport, CompileError> {
    check_output(model, out)?;
    progress(Progress::Stage("optimizing the graph"));
    let mut graph = model.graph.clone();
    passes::run_pipeline(&mut graph, pipeline)?;
    let mut derived = plan_derived(&mut graph)?;
    assign_storage(&mut graph, model, &derived, storage);
    set_activations(&mut graph, activations)?;
    let ir_text = llmc_ir::text::print(&graph);
    let program = llmc_compiler::lower::lower(&graph)?;

    // Layout: header, IR text, then the tensors the optimized graph reads: checkpoint tensors
    // (by spec) and tensors computed at compile time (folded norms, fused weights).
    let used: Vec<_> = graph.weights();
    let specs: Vec<Source> = used
        .iter()
        .map(|(name, ty)| match derived.remove(name) {
            Some(sub) => Some(Source::Derived { name: name.clone(), shape: ty.shape.resolve(0), graph: sub }),
            None => model.specs.iter().find(|s| &s.name == name).map(Source::Checkpoint),
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| CompileError::Materialize("the graph reads a weight with no spec".into()))?;
    let mut header = Header {
        format_version: FORMAT_VERSION,
        llmc_version: env!("CARGO_PKG_VERSION").to_string(),
        model_type: graph.name.clone(),
        config: model.raw_config.clone(),
        max_positions: model.config.max_positions(),
        hard_context_limit: model.config.hard_context_limit(),
        vocab_size: model.config.vocab_size(),
        target: host_target()?,
        passes: pipeline.iter().map(|p| p.name().to_string()).collect(),
        program: program.clone(),
        ir: Section { offset: 0, len: ir_text.len() as u64, crc32: crc32fast::hash(ir_text.as_bytes()) },
        text: TextInfo {
            tokenizer: model.text.tokenizer_json.as_ref().map(|t| Section {
                offset: 0,
                len: t.len() as u64,
                crc32: crc32fast::hash(t),
            }),
            chat_template: model.text.chat_template.clone(),
            bos_token: model.text.bos_token.clone(),
            eos_token: model.text.eos_token.clone(),
            bos_token_id: model.text.bos_token_id,
            eos_token_ids: model.text.eos_token_ids.clone(),
            pad_token_id: model.text.pad_token_id,
            generation: model.text.generation.clone(),
        },
        tensors: Vec::new(),
        file_size: 0,
    };
    // The header's length depends on the offsets it contains: lay out with a generous estimate
    // of the header size, then fix it (offsets only grow, so one retry suffices). The header
    // is written last, padded to its room, once the tensors' checksums are known.
    let mut reserve = 4096u64;
    loop {
        let mut at = align_up(PREAMBLE as u64 + reserve);
        header.ir.offset = at;
        at = align_up(at + header.ir.len);
        if let Some(t) = header.text.tokenizer.as_mut() {
            t.offset = at;
            at = align_up(at + t.len);
        }
        header.tensors = specs
            .iter()
            .map(|s| {
                let bytes = s.is_bytes();
                let layout = if bytes { Layout::RowMajor } else { program.layout_of(s.name()) };
                let dtype = used.iter().find(|(n, _)| n == s.name()).map_or(DType::F32, |(_, t)| t.dtype);
                let len = if bytes {
                    s.shape().iter().product::<usize>() as u64
                } else {
                    pack::packed_bytes(layout, dtype, s.shape()).unwrap_or(0) as u64
                };
                let e = TensorEntry {
                    name: s.name().to_string(),
                    dtype: if bytes { "u8" } else { dtype.name() }.into(),
                    shape: s.shape().to_vec(),
                    layout,
                    offset: at,
                    len,
                    // the widest value, so the header does not grow when the real one is set
                    crc32: u32::MAX,
                };
                at = align_up(at + len);
                e
            })
            .collect();
        header.file_size = at;
        let json = serde_json::to_vec(&header).map_err(|e| CompileError::Header(e.to_string()))?;
        if json.len() as u64 <= reserve {
            break;
        }
        reserve = json.len() as u64 * 2;
    }

    let tmp = temp_path(out);
    remove_stale_temps(out);
    progress(Progress::Stage("packing and writing weights"));
    let result = write_file(&tmp, &mut header, &ir_text, model, &specs, progress);
    match result {
        Ok(()) => std::fs::rename(&tmp, out).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            CompileError::Io { path: out.to_path_buf(), source }
        })?,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(CompileReport {
        path: out.to_path_buf(),
        bytes: header.file_size,
        tensors: specs.len(),
        nodes: graph.node_count(),
    })
}

/// The temporary file this process writes before renaming it to `out`:
/// `.NAME.tmp-PID` beside it.
pub fn temp_path(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}{}", temp_prefix(out), std::process::id()))
}

fn temp_prefix(out: &Path) -> String {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "artifact".into());
    format!(".{name}.tmp-")
}

/// Refuses an output that is not a regular file (a device, a FIFO, a folder: renaming onto it
/// would replace it) or that is one of the files the model is read from.
fn check_output(model: &Model, out: &Path) -> Result<(), CompileError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |msg: String| Err(CompileError::Output { path: out.to_path_buf(), msg });
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(CompileError::Io { path: out.to_path_buf(), source }),
    };
    if meta.is_dir() {
        return refuse("is a folder; give the artifact's file name".into());
    }
    if !meta.is_file() {
        return refuse("exists and is not a regular file (a device, FIFO or socket); refusing to replace it".into());
    }
    let out_canon = std::fs::canonicalize(out).ok();
    for input in model.inputs() {
        let same_inode = std::fs::metadata(&input).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
        let same_path = out_canon.is_some() && std::fs::canonicalize(&input).ok() == out_canon;
        if same_inode || same_path {
            let what = if input == out { String::new() } else { format!(" ({})", input.display()) };
            return refuse(format!("is one of the model's input files{what}; refusing to overwrite it"));
        }
    }
    Ok(())
}

/// Removes `.NAME.tmp-PID` files beside `out` left by compiles that were killed (SIGKILL, a
/// crash): those whose PID is not a running process. Best effort; needs /proc.
fn remove_stale_temps(out: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let prefix = temp_prefix(out);
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn write_file(
    tmp: &Path,
    header: &mut Header,
    ir_text: &str,
    model: &Model,
    specs: &[Source<'_>],
    progress: &mut dyn FnMut(Progress),
) -> Result<(), CompileError> {
    let io = |source| CompileError::Io { path: tmp.to_path_buf(), source };
    // A new file, never one that is there already (a link planted at the temp name, a file
    // left by an earlier process with this PID, which is removed first).
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).open(tmp);
    let file = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(tmp).map_err(io)?;
            create().map_err(io)?
        }
        r => r.map_err(io)?,
    };
    let mut w = BufWriter::with_capacity(1 << 20, file);
    // the preamble and header are written last (they hold the tensors' checksums)
    pad_to(&mut w, header.ir.offset).map_err(io)?;
    w.write_all(ir_text.as_bytes()).map_err(io)?;
    if let (Some(sec), Some(bytes)) = (&header.text.tokenizer, &model.text.tokenizer_json) {
        pad_to(&mut w, sec.offset).map_err(io)?;
        w.write_all(bytes).map_err(io)?;
    }
    let total: u64 = header.tensors.iter().map(|t| t.len).sum();
    let mut done = 0;
    // A few tensors at a time (one per core): read (or compute), pack, checksum in parallel,
    // then write in file order and drop. Memory stays a few tensors above one.
    let window = rayon::current_num_threads().clamp(1, 4);
    for (entries, group) in header.tensors.chunks_mut(window).zip(specs.chunks(window)) {
        use rayon::prelude::*;
        let packed: Vec<Result<(Vec<u8>, u32), CompileError>> = entries
            .par_iter()
            .zip(group.par_iter())
            .map(|(entry, spec)| {
                let bytes = materialize(entry, spec, model)?;
                let crc = crc32fast::hash(&bytes);
                Ok((bytes, crc))
            })
            .collect();
        for (entry, result) in entries.iter_mut().zip(packed) {
            let (bytes, crc) = result?;
            pad_to(&mut w, entry.offset).map_err(io)?;
            w.write_all(&bytes).map_err(io)?;
            entry.crc32 = crc;
            done += entry.len;
            progress(Progress::Bytes { done, total });
        }
    }
    pad_to(&mut w, header.file_size).map_err(io)?;
    let mut json = serde_json::to_vec(&*header).map_err(|e| CompileError::Header(e.to_string()))?;
    let room = header.ir.offset as usize - PREAMBLE;
    if json.len() > room {
        return Err(io(std::io::Error::other("layout error: the header outgrew its room")));
    }
    json.resize(room, b' ');
    w.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    w.write_all(&preamble(&json)).map_err(io)?;
    w.write_all(&json).map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// The bytes of one tensor in the artifact: its checkpoint bytes (`u8` tensors), or its values
/// (read or computed), checked finite and packed in its layout and storage type.
fn materialize(entry: &TensorEntry, spec: &Source<'_>, model: &Model) -> Result<Vec<u8>, CompileError> {
    if spec.is_bytes() {
        return Ok(match spec {
            Source::Checkpoint(s) => s.load_bytes(&model.files)?,
            Source::Derived { .. } => Vec::new(),
        });
    }
    let dtype = DType::parse(&entry.dtype).unwrap_or(DType::F32);
    if llmc_ir::quant::is_blocked(dtype) {
        // A GGUF tensor's own blocks, or a derived tensor whose graph only moves their rows.
        // Their values are what the graph would compute from `read_f32` (both come from
        // `ggml_quants::to_blocks`); finite scales keep every value finite.
        if let Some(rows) = gguf_blocks(spec, model, dtype)? {
            let bad = AtomicBool::new(false);
            let packed = pack::pack_block_rows(entry.layout, dtype, &entry.shape, &|r, out| {
                rows.row_into(r, out);
                if !out.iter().all(|b| b.d.iter().chain([&b.m]).all(|x| x.is_finite())) {
                    bad.store(true, Ordering::Relaxed);
                }
            });
            if bad.into_inner() {
                return Err(CompileError::Materialize(format!(
                    "weight `{}` has a block with a non-finite scale: the checkpoint is corrupt",
                    spec.name()
                )));
            }
            return Ok(packed);
        }
    }
    let (name, values) = match spec {
        Source::Checkpoint(s) => (&s.name, s.load(&model.files)?),
        Source::Derived { name, graph, .. } => (name, evaluate(graph, model)?),
    };
    // NaN or Inf in a checkpoint makes every output NaN: refuse it by name.
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CompileError::NonFinite { tensor: name.clone(), index, value });
    }
    if dtype == DType::F16 && values.iter().any(|v| v.abs() > 65504.0) {
        return Err(CompileError::Materialize(format!("weight `{name}` has values beyond the f16 range")));
    }
    if dtype == DType::F32 {
        let packed = pack::pack(entry.layout, &entry.shape, &values);
        drop(values);
        return Ok(packed.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    if matches!(dtype, DType::Q5_1 | DType::Q6K | DType::Q4K | DType::Q5K) {
        // `assign_storage` gives these types only to tensors a GGUF file brings in them
        return Err(CompileError::Materialize(format!(
            "weight `{name}`: {} weights can only be taken from a GGUF file's blocks",
            dtype.name()
        )));
    }
    Ok(pack::pack_bytes(entry.layout, dtype, &entry.shape, &values))
}

/// The rows of a tensor made of quantized GGUF tensors whose storage type is `dtype`, as the
/// file stores them: a checkpoint tensor, or a derived one whose graph only moves rows
/// (`concat_rows`, `interleave_rows8`, `rope_interleave`, `stack`). Which source row each row comes
/// from is found by running the graph on row tags (leaf `i`, row `r` ↦ `i · 2^20 + r`, exact
/// in f32), one column wide. `None` when the tensor is not such a tensor.
fn gguf_blocks<'a>(spec: &Source<'_>, model: &'a Model, dtype: DType) -> Result<Option<BlockRows<'a>>, CompileError> {
    let leaf_rows = |name: &str| {
        let spec = model.specs.iter().find(|s| s.name == name)?;
        let rows = spec.gguf_rows(&model.files)?;
        (llmc_models::ggml_quants::storage_type(rows.ty) == dtype).then_some(rows)
    };
    let graph = match spec {
        Source::Checkpoint(s) => return Ok(leaf_rows(&s.name).map(BlockRows::Direct)),
        Source::Derived { graph, .. } if moves_rows_only(graph) => graph,
        Source::Derived { .. } => return Ok(None),
    };
    // Row moves do not look at columns: the tags run through the graph narrowed to one column.
    let mut narrow = graph.clone();
    for id in narrow.node_ids() {
        if let Some(last) = narrow.node_mut(id).ty.shape.0.last_mut() {
            *last = llmc_ir::Dim::C(1);
        }
    }
    let mut leaves = Vec::new();
    let mut tags: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, ty)) in graph.weights().into_iter().enumerate() {
        let (rows, cols) = pack::matrix_dims(&ty.shape.resolve(0));
        let Some(src) = leaf_rows(&name) else { return Ok(None) };
        if i >= 16 || rows >= 1 << 20 || src.rows != rows || src.cols != cols {
            return Ok(None);
        }
        let data = (0..rows).map(|r| ((i << 20) | r) as f32).collect();
        tags.insert(name, Tensor { shape: vec![rows, 1], data });
        leaves.push(src);
    }
    let cols = match spec {
        Source::Derived { shape, .. } => pack::matrix_dims(shape).1,
        Source::Checkpoint(_) => 0,
    };
    let (out, _) = run_derived(&narrow, &tags)?;
    let mut from = Vec::with_capacity(out.len());
    for &t in &out {
        let (i, r) = ((t as usize) >> 20, (t as usize) & 0xF_FFFF);
        match leaves.get(i) {
            Some(l) if t == ((i << 20) | r) as f32 && l.cols == cols && r < l.rows => from.push((i, r)),
            _ => return Ok(None),
        }
    }
    Ok(Some(BlockRows::Gathered { leaves, from }))
}

/// Where the blocks of each row of a tensor kept as its GGUF blocks come from.
enum BlockRows<'a> {
    Direct(GgufRows<'a>),
    /// Row `r` is row `from[r].1` of `leaves[from[r].0]`.
    Gathered {
        leaves: Vec<GgufRows<'a>>,
        from: Vec<(usize, usize)>,
    },
}

impl BlockRows<'_> {
    fn row_into(&self, r: usize, out: &mut [QBlock]) {
        match self {
            BlockRows::Direct(rows) => rows.row_into(r, out),
            BlockRows::Gathered { leaves, from } => leaves[from[r].0].row_into(from[r].1, out),
        }
    }
}

/// Whether a derived weight's graph only moves whole rows of its weights.
fn moves_rows_only(sub: &Graph) -> bool {
    sub.node_ids().into_iter().all(|id| {
        matches!(
            sub.node(id).op,
            Op::Weight { .. } | Op::ConcatRows | Op::InterleaveRows8 | Op::RopeInterleave { .. } | Op::Stack
        )
    })
}

fn pad_to<W: Write + Seek>(w: &mut W, offset: u64) -> std::io::Result<()> {
    let pos = w.stream_position()?;
    if pos > offset {
        return Err(std::io::Error::other(format!("layout error: at {pos}, section starts at {offset}")));
    }
    w.write_all(&vec![0u8; (offset - pos) as usize])
}

/// Where a tensor of the artifact comes from.
enum Source<'a> {
    Checkpoint(&'a WeightSpec),
    /// Computed at compile time: `graph` (weights and weight-only ops) has one output, `w`.
    Derived {
        name: String,
        shape: Vec<usize>,
        graph: Graph,
    },
}

impl Source<'_> {
    /// Raw bytes (BitNet's packed ternary weights), stored as read.
    fn is_bytes(&self) -> bool {
        matches!(self, Source::Checkpoint(s) if s.dtype == llmc_ir::DType::U8)
    }
    fn name(&self) -> &str {
        match self {
            Source::Checkpoint(s) => &s.name,
            Source::Derived { name, .. } => name,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Source::Checkpoint(s) => &s.shape,
            Source::Derived { shape, .. } => shape,
        }
    }
}

/// How weight matrices are stored (`llmc compile --dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Every matrix in the checkpoint's own float type (a bf16 checkpoint stays bf16); folded
    /// matrices take the type of their first checkpoint tensor.
    Checkpoint,
    /// Every matrix a kernel streams in this type. For `q4_0`, the output projection (and a
    /// tied embedding, which is the same tensor) is `q8_0`, as llama.cpp keeps its output matrix
    /// at higher precision in its 4-bit presets. Matrices whose rows are not a multiple of 32
    /// values cannot be blocked and stay f32.
    All(DType),
}

/// Gives every weight matrix that only kernels read (`Op::accepts_storage`) its storage type.
/// Norm weights, biases and other vectors stay f32.
fn assign_storage(g: &mut Graph, model: &Model, derived: &HashMap<String, Graph>, storage: Storage) {
    let order = g.topo_order().unwrap_or_default();
    let output = g.outputs.iter().find(|(n, _)| n == "logits").map(|(_, id)| *id);
    for id in order {
        let Op::Weight { name } = &g.node(id).op else { continue };
        let ty = g.node(id).ty.clone();
        if ty.dtype != DType::F32 || ty.shape.rank() < 2 {
            continue;
        }
        let users = g.users(id);
        let only_kernels = !users.is_empty()
            && users
                .iter()
                .all(|&u| g.operands(u).iter().enumerate().all(|(i, &o)| o != id || g.node(u).op.accepts_storage(i)));
        if !only_kernels {
            continue;
        }
        let want = match storage {
            Storage::Checkpoint => {
                // the checkpoint tensor's own type; for a derived weight, its tensors' common
                // type when its graph only moves their rows (the GGUF blocks are kept), else
                // q8_0 if one of them is quantized, else the first one's float type
                let of = |src: &str| {
                    let spec = model.specs.iter().find(|s| s.name == src);
                    let cand = spec.and_then(|s| s.candidates.iter().find(|c| model.files.get(c).is_some()));
                    cand.and_then(|c| model.checkpoint_storage(c)).unwrap_or(DType::F32)
                };
                match derived.get(name) {
                    None => of(name),
                    Some(sub) => {
                        let types: Vec<DType> = sub.weights().iter().map(|(n, _)| of(n)).collect();
                        let first = types.first().copied().unwrap_or(DType::F32);
                        let same = types.iter().all(|&t| t == first);
                        if same && (moves_rows_only(sub) || matches!(first, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)) {
                            first
                        } else if types.iter().any(|&t| llmc_ir::quant::is_blocked(t)) {
                            DType::Q8_0
                        } else {
                            first
                        }
                    }
                }
            }
            Storage::All(DType::Q4_0) if feeds_logits(g, &users, output) => DType::Q8_0,
            Storage::All(d) => d,
        };
        let block = if llmc_ir::quant::is_k(want) { llmc_ir::quant::QK_K } else { llmc_ir::quant::QK };
        let blocked_ok = !llmc_ir::quant::is_blocked(want) || ty.shape.last_const().is_some_and(|c| c % block == 0);
        if want != DType::F32 && blocked_ok {
            g.node_mut(id).ty.dtype = want;
        }
    }
}

/// The precision of the activations the projections over quantized weights read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// f32 everywhere: quantized weights are widened in registers, so the logits are those of
    /// the f32 model on the dequantized weights.
    F32,
    /// The input of every projection over q8_0/q4_0 weights (`linear`, `qkv_rope`, `matmul`)
    /// is rounded to int8 blocks (`quant_q8`), and the kernels use integer dot products.
    /// Other weights, and MoE experts, keep f32 activations.
    Q8,
    /// As `Q8`, and the input of every projection over bf16 weights is rounded to bf16
    /// (`round_bf16`), which hosts with AVX512_BF16 multiply with `vdpbf16ps` (as llama.cpp
    /// runs BF16 weights). The logits projection keeps f32 inputs.
    Bf16,
}

/// Puts the op `activations` asks for before the input of the projections (`linear`,
/// `qkv_rope`, `matmul`) it applies to, one per input value and op, shared by its
/// projections:
/// - unless `F32`, a `quant_q8` before every projection whose weight is blocked; before the
///   logits projection a `quant_q8x2` (int8 plus its rounding residual): the argmax reads
///   those logits directly, and where two are close the single rounding decides it
///   (SmolLM2's Q4_1 GGUF followed transformers at 29 of 32 teacher-forced steps with
///   `quant_q8` there, 31 with `quant_q8x2`);
/// - with `Bf16`, a `round_bf16` before every projection whose weight is bf16 but the logits
///   projection.
fn set_activations(g: &mut Graph, activations: Activations) -> Result<(), CompileError> {
    let pick = |w: DType, logits: bool| {
        if activations != Activations::F32 && llmc_ir::quant::is_blocked(w) {
            Some(if logits { Op::QuantQ8x2 } else { Op::QuantQ8 })
        } else if activations == Activations::Bf16 && w == DType::BF16 && !logits {
            Some(Op::RoundBf16)
        } else {
            None
        }
    };
    let output = g.outputs.iter().find(|(n, _)| n == "logits").map(|(_, id)| *id);
    let mut made: HashMap<(NodeId, &'static str), NodeId> = HashMap::new();
    for id in g.topo_order()? {
        if !matches!(g.node(id).op, Op::MatMul | Op::Linear { .. } | Op::QkvRope { .. }) {
            continue;
        }
        let ops = g.operands(id);
        let (Some(&x), Some(&w)) = (ops.first(), ops.get(1)) else { continue };
        let Some(op) = pick(g.node(w).ty.dtype, feeds_logits(g, &[id], output)) else { continue };
        let a = match made.get(&(x, op.name())) {
            Some(&a) => a,
            None => {
                let key = (x, op.name());
                let a = g.add(op, &[x])?;
                made.insert(key, a);
                a
            }
        };
        g.set_operand(id, 0, a);
    }
    Ok(())
}

/// Whether one of `users` is the projection that produces the logits output.
fn feeds_logits(g: &Graph, users: &[NodeId], output: Option<NodeId>) -> bool {
    let Some(out) = output else { return false };
    users.iter().any(|&u| u == out || g.users(u).contains(&out))
}

/// Finds every value the passes left computable from weights alone (`scale_cols`,
/// `concat_rows`, ...) and replaces it by a weight named after its first checkpoint tensor and
/// op (e.g. `model.layers.0.self_attn.q_proj.weight#rope_interleave`). Returns, per new weight,
/// the small graph that computes it: the writer evaluates each one with the interpreter when
/// it writes that tensor, so only one tensor's inputs are in memory at a time.
fn plan_derived(g: &mut Graph) -> Result<HashMap<String, Graph>, CompileError> {
    let order = g.topo_order()?;
    let mut is_const: HashMap<NodeId, bool> = HashMap::new();
    for &id in &order {
        let c = match g.node(id).op {
            Op::Input(_) => false,
            Op::Weight { .. } => true,
            _ => g.operands(id).iter().all(|o| is_const[o]),
        };
        is_const.insert(id, c);
    }
    let roots: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| {
            is_const[&id]
                && !matches!(g.node(id).op, Op::Weight { .. })
                && (g.users(id).iter().any(|u| !is_const[u]) || g.outputs.iter().any(|(_, o)| *o == id))
        })
        .collect();
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut out = HashMap::new();
    for (i, &root) in roots.iter().enumerate() {
        let sub = extract(g, root, &position);
        let mut name = format!("{}#{}", first_leaf(g, root), g.node(root).op.name());
        if out.contains_key(&name) {
            name = format!("{name}.{i}");
        }
        let shape = g.node(root).ty.shape.resolve(0);
        let w = g.weight(name.clone(), &shape);
        g.replace_uses(root, w);
        out.insert(name, sub);
    }
    passes::Dce.run(g)?;
    Ok(out)
}

/// A graph of `root` and everything it depends on (weights and weight-only ops), with `root`
/// as its one output `w`.
fn extract(g: &Graph, root: NodeId, position: &HashMap<NodeId, usize>) -> Graph {
    let mut nodes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            nodes.push(id);
            stack.extend(g.operands(id));
        }
    }
    // operands first: the order of the whole graph (node indices are reused after removals)
    nodes.sort_unstable_by_key(|n| position[n]);
    let mut sub = Graph::new("derived");
    let mut map = HashMap::new();
    for id in nodes {
        let node = g.node(id);
        let ops: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
        map.insert(id, sub.add_typed(node.op.clone(), &ops, node.ty.clone()));
    }
    sub.output("w", map[&root]);
    sub
}

/// Computes one derived weight: loads the checkpoint tensors its graph reads and runs the
/// interpreter once.
fn evaluate(sub: &Graph, model: &Model) -> Result<Vec<f32>, CompileError> {
    let mut leaves: HashMap<String, Tensor> = HashMap::new();
    for (name, ty) in sub.weights() {
        let spec = model
            .specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| CompileError::Materialize(format!("weight `{name}` has no checkpoint tensor")))?;
        let data = spec.load(&model.files)?;
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CompileError::NonFinite { tensor: name, index, value });
        }
        leaves.insert(name, Tensor { shape: ty.shape.resolve(0), data });
    }
    Ok(run_derived(sub, &leaves)?.0)
}

/// Runs a derived weight's graph on `leaves`: its values and shape.
fn run_derived(sub: &Graph, leaves: &HashMap<String, Tensor>) -> Result<(Vec<f32>, Vec<usize>), CompileError> {
    let mut cache = KvCache::new(sub, 1);
    let mut values = interp::run(sub, StepInput { tokens: &[], positions: &[] }, leaves, &mut cache)?;
    values
        .remove("w")
        .map(|t| (t.data, t.shape))
        .ok_or_else(|| CompileError::Materialize("a derived weight was not computed".into()))
}

/// The first checkpoint weight under a node (depth first, operand order).
fn first_leaf(g: &Graph, id: NodeId) -> String {
    match &g.node(id).op {
        Op::Weight { name } => name.clone(),
        _ => g.operands(id).first().map_or_else(|| "const".to_string(), |&o| first_leaf(g, o)),
    }
}
