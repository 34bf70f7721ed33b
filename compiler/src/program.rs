//! The lowered form of a graph: kernel specs with every model dim constant, a linear schedule
//! of kernel calls, and the buffers of a liveness-based memory plan. Stored in the artifact
//! header; the runtime JITs the kernels and walks the schedule.

pub use llmc_ir::Act;
use llmc_ir::DType;
use llmc_ir::RopeScaling;
use serde::{Deserialize, Serialize};

/// How a weight is stored in the artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Layout {
    /// Row-major, as the IR's logical shape.
    RowMajor,
    /// A `[rows, cols]` matrix in panels of 16 rows, k-major inside a panel:
    /// `panel[p][k][r] = W[16p + r][k]`, rows padded with zeros to a multiple of 16. One
    /// broadcast activation feeds 16 output rows from one 64-byte cache line.
    Panel16,
    /// A vector padded with zeros to a multiple of 16 (matmul biases).
    Padded16,
    /// `q8_0`/`q4_0` matrices read by the int8 dot-product kernels: panels of 16 rows as in
    /// `Panel16`, but inside each block of 32 columns the quantized values are grouped by 4
    /// consecutive columns of one row, so one 16-byte load holds 4 rows × 4 columns, what
    /// `vpdpbusd` sums (`pack::panel_bytes` gives the bytes).
    Dot16,
}

/// Elementwise unary functions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Unary {
    Silu,
    /// tanh approximation
    Gelu,
    /// erf form
    GeluErf,
    Scale(f32),
    /// `relu(x)²`
    Relu2,
    /// rounded to bf16 (nearest, ties to even; NaN kept) and widened back
    RoundBf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Binary {
    Add,
    Mul,
}

/// One kernel, specialized for constant dims. The comment gives its arguments (pointers, in
/// order) and its unit of work (what `lo..hi` counts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum KernelSpec {
    /// `[table, ids, out]`, units: rows. `layout`: the table's (`Panel16` when it is also a
    /// matmul weight or has a storage type `w` other than f32; `Dot16` when an int8 matmul
    /// reads it).
    Embedding { d: usize, layout: Layout, w: DType },
    /// `[x, w (Panel16), bias (Padded16)?, residual?, out]`, units: 16-row panels of `w`
    /// (`m` rows). Prologue: with `rms_eps`, each output row is scaled by `1/rms(x row)`.
    /// Epilogue: bias, `act` (`swiglu`: panels hold 8 gate then 8 up rows, `m/2` outputs), then
    /// `+ residual`.
    /// `w`: the weight's storage type (`pack::panel_bytes` gives its panel layout). `xq`: the
    /// input's int8 terms: 0 (f32 activations), 1 (`quant_q8`: int8 dot products; `w` is blocked, in
    /// `Dot16`) or 2 (`quant_q8x2`: each row quantized twice, value then residual, and the two
    /// sums added). `xbf16`: the input is bf16-exact (`round_bf16` made it) and `w` is bf16, so
    /// hosts with AVX512_BF16 may multiply with `vdpbf16ps`.
    MatMul {
        k: usize,
        m: usize,
        bias: bool,
        rms_eps: Option<f32>,
        act: Act,
        residual: bool,
        w: DType,
        xq: u8,
        // (written only when true: artifacts without bf16 activations stay as before)
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        xbf16: bool,
    },
    /// `[x, w (Panel16), bias (Padded16)?, positions, table, kv_rows, q_out]`, units:
    /// panels. The fused QKV projection: RoPE on the pair-interleaved q and k rows (table:
    /// per position `rotary_dim` cosines, each twice, then `rotary_dim` signed sines
    /// `-s, +s`), q to `q_out`, k and v into the cache slot of each token's position (in the
    /// caches its `KvRows` entry names).
    QkvRope {
        k: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        rms_eps: Option<f32>,
        bias: bool,
        w: DType,
        /// int8 activations, as for `MatMul`
        xq: u8,
        /// bf16-exact input, as for `MatMul`
        // (written only when true: artifacts without bf16 activations stay as before)
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        xbf16: bool,
    },
    /// `[x, w, out]`, units: rows.
    RmsNorm { d: usize, eps: f32 },
    /// `[x, w, b, out]` (`affine`) or `[x, out]`, units: rows.
    LayerNorm { d: usize, eps: f32, affine: bool },
    /// `[x, positions, table, out]`, units: rows. `table[pos][0..rd/2]` = cos, `[rd/2..rd]` = sin.
    Rope { heads: usize, head_dim: usize, rotary_dim: usize },
    /// `[k, v, positions, kcache, vcache]`, units: rows. Cache layout `[kv_heads, cap, head_dim]`,
    /// slot `pos % cap` (a ring when the layer has a window).
    KvAppend { kv_heads: usize, head_dim: usize },
    /// `[q, positions, kcache, vcache, out]`, units: `kv_heads × n` (kv head, token) pairs.
    /// Online softmax in one pass over the cached positions; the query heads of a group share
    /// every K and V load.
    Attention { heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>, scale: f32 },
    /// `[x, out]`, units: rows.
    Unary { op: Unary, d: usize },
    /// `[a, b, out]`, units: rows.
    Binary { op: Binary, d: usize },
    /// `[x, out]`, units: rows. Columns `start..start+len` of a `d`-wide row.
    Slice { d: usize, start: usize, len: usize },
    /// `[x0, x1, ..., out]`, units: rows.
    Concat { widths: Vec<usize> },
    /// `[x, out]`, units: 1. Copies row `n - 1`.
    TakeLast { d: usize },
    /// `[x, out]`, units: rows.
    Softmax { d: usize },
    /// `[logits, route]`, units: rows. Softmax over `experts` logits, top-k (lowest index first
    /// on ties), renormalized: `route[t] = [k expert indices (as f32), k weights]`.
    MoeRoute { experts: usize, top_k: usize },
    /// `[x, gate_up (Panel16, per expert 2ff rows interleaved by 8), route, h]`, units: panels
    /// of one expert's 2ff rows. `h[t, j·ff ..]` = SwiGLU of the j-th selected expert: only the
    /// selected experts' weights are read, each by the rows that picked it together.
    MoeGateUp { d: usize, ff: usize, experts: usize, top_k: usize, w: DType },
    /// `[h, down (Panel16, per expert d rows), route, out]`, units: panels of d. `out[t] =
    /// Σ_j w_j · down_{e_j} · h[t, j·ff ..]`, summed in expert order.
    MoeDown { d: usize, ff: usize, experts: usize, top_k: usize, w: DType },
    /// The Mamba2 mixer between its projections, in three kernels over `zxbcdt` rows of
    /// `width` f32 (z: `inner`, then x, B, C: `ch`, then dt: one per head).
    /// `[zxbcdt, conv_w, conv_b, conv_state, act]`, units: blocks of 16 channels: causal
    /// depthwise conv + SiLU, each channel walking the tokens in order through its window.
    Mamba2Conv { ch: usize, d_conv: usize, inner: usize, width: usize },
    /// `[zxbcdt, act, dt_bias, a_log, d, ssm_state, y]`, units: heads: the SSM recurrence,
    /// each head through the step's tokens in order.
    Mamba2Scan { heads: usize, head_dim: usize, d_state: usize, groups: usize, width: usize },
    /// `[zxbcdt, y, norm_w, out]`, units: rows: `norm_w · rms-normalized(y · silu(z))`.
    Mamba2Norm { inner: usize, width: usize, eps: f32 },
    /// `[x, q]`, units: rows. BitNet activation quantization: `q[t] = [k i32 values
    /// clamp(round_half_even(x·s)), s as f32]` with `s = 127 / max(max|x|, 1e-5)`.
    ActQuant { k: usize },
    /// `[q, w (u8 [m/4, k]), scale, out]`, units: byte rows of w (each gives 4 outputs). An
    /// integer dot product of the quantized activations with the ternary weights, decoded from
    /// their 2-bit fields in registers; `out = dot / (scale · s)`.
    BitMatMul { k: usize, m: usize },
}

/// A kernel name's part for its int8 activation terms.
fn xq_suffix(xq: u8) -> &'static str {
    match xq {
        0 => "",
        1 => "_xq8",
        _ => "_xq8x2",
    }
}

/// What an int8 projection quantizes: its input's columns, RMS prologue, weight type and
/// int8 terms (`KernelSpec::int8_input`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Int8Input {
    pub k: usize,
    pub rms_eps: Option<f32>,
    pub w: DType,
    pub terms: usize,
}

impl KernelSpec {
    /// For a projection over int8 activations (`xq` > 0), what its prologue quantizes: the
    /// executor may have the step's workers quantize the rows once, together, before the
    /// projection's calls (the pre-pass `jit::Kernels::shared` holds).
    pub fn int8_input(&self) -> Option<Int8Input> {
        match *self {
            KernelSpec::MatMul { k, rms_eps, w, xq, .. } | KernelSpec::QkvRope { k, rms_eps, w, xq, .. } if xq > 0 => {
                Some(Int8Input { k, rms_eps, w, terms: xq as usize })
            }
            _ => None,
        }
    }

    /// A plain matmul (no prologue, no activation, no residual).
    pub fn matmul(k: usize, m: usize, bias: bool) -> KernelSpec {
        KernelSpec::MatMul {
            k,
            m,
            bias,
            rms_eps: None,
            act: Act::None,
            residual: false,
            w: DType::F32,
            xq: 0,
            xbf16: false,
        }
    }

    pub fn name(&self) -> String {
        match self {
            KernelSpec::Embedding { d, layout, w } => {
                let l = match layout {
                    Layout::RowMajor => "",
                    Layout::Dot16 => "_dot",
                    _ => "_packed",
                };
                format!("embedding_d{d}{l}{}", wsuffix(*w))
            }
            KernelSpec::MatMul { k, m, bias, rms_eps, act, residual, w, xq, xbf16 } => format!(
                "matmul_k{k}_m{m}{}{}{}{}{}{}{}",
                wsuffix(*w),
                xq_suffix(*xq),
                if *xbf16 { "_xbf16" } else { "" },
                if rms_eps.is_some() { "_rms" } else { "" },
                if *bias { "_bias" } else { "" },
                if *act != Act::None { format!("_{}", act.name()) } else { String::new() },
                if *residual { "_res" } else { "" }
            ),
            KernelSpec::QkvRope { k, heads, kv_heads, head_dim, w, xq, xbf16, .. } => format!(
                "qkv_rope_k{k}_h{heads}_kv{kv_heads}_hd{head_dim}{}{}{}",
                wsuffix(*w),
                xq_suffix(*xq),
                if *xbf16 { "_xbf16" } else { "" }
            ),
            KernelSpec::RmsNorm { d, .. } => format!("rms_norm_d{d}"),
            KernelSpec::LayerNorm { d, .. } => format!("layer_norm_d{d}"),
            KernelSpec::Rope { heads, head_dim, rotary_dim } => format!("rope_h{heads}_hd{head_dim}_rd{rotary_dim}"),
            KernelSpec::KvAppend { kv_heads, head_dim } => {
                format!("kv_append_kv{kv_heads}_hd{head_dim}")
            }
            KernelSpec::Attention { heads, kv_heads, head_dim, window, .. } => {
                format!(
                    "attention_h{heads}_kv{kv_heads}_hd{head_dim}{}",
                    window.map_or(String::new(), |w| format!("_w{w}"))
                )
            }
            KernelSpec::Unary { op, d } => format!("{op:?}_d{d}").to_lowercase(),
            KernelSpec::Binary { op, d } => format!("{op:?}_d{d}").to_lowercase(),
            KernelSpec::Slice { d, start, len } => format!("slice_d{d}_{start}_{len}"),
            KernelSpec::Concat { widths } => format!("concat_{}", widths.len()),
            KernelSpec::TakeLast { d } => format!("take_last_d{d}"),
            KernelSpec::Softmax { d } => format!("softmax_d{d}"),
            KernelSpec::ActQuant { k } => format!("act_quant_k{k}"),
            KernelSpec::Mamba2Conv { ch, d_conv, .. } => format!("mamba2_conv_c{ch}_k{d_conv}"),
            KernelSpec::Mamba2Scan { heads, head_dim, d_state, .. } => {
                format!("mamba2_scan_h{heads}_hd{head_dim}_s{d_state}")
            }
            KernelSpec::Mamba2Norm { inner, .. } => format!("mamba2_norm_d{inner}"),
            KernelSpec::BitMatMul { k, m } => format!("bit_matmul_k{k}_m{m}"),
            KernelSpec::MoeRoute { experts, top_k } => format!("moe_route_e{experts}_k{top_k}"),
            KernelSpec::MoeGateUp { d, ff, experts, top_k, w } => {
                format!("moe_gate_up_d{d}_ff{ff}_e{experts}_k{top_k}{}", wsuffix(*w))
            }
            KernelSpec::MoeDown { d, ff, experts, top_k, w } => {
                format!("moe_down_d{d}_ff{ff}_e{experts}_k{top_k}{}", wsuffix(*w))
            }
        }
    }
}

/// `_bf16`, `_q8_0` ... in kernel names (nothing for f32).
fn wsuffix(w: DType) -> String {
    if w == DType::F32 {
        String::new()
    } else {
        format!("_{}", w.name())
    }
}

/// Whether a value has one row per token of the step, one per sequence of the step (what
/// follows `take_last`), or a single row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Rows {
    N,
    Seqs,
    One,
}

/// How many units of work a call has, given the rows `n` it is called with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Units {
    Rows,
    Panels(usize),
    KvHeadsByRows(usize),
    Single,
}

impl Units {
    pub fn count(self, n: usize) -> usize {
        match self {
            Units::Rows => n,
            Units::Panels(p) => p,
            Units::KvHeadsByRows(kv) => kv * n,
            Units::Single => 1,
        }
    }
}

/// A kernel argument.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Arg {
    /// An activation buffer of the arena.
    Buf(usize),
    /// A weight tensor of the artifact, by name.
    Weight(String),
    Tokens,
    Positions,
    /// Each row's sequence (`i32` per row, the IR's `seqs` input): a sequence's rows are
    /// contiguous.
    Seqs,
    KCache(usize),
    VCache(usize),
    /// Where each row of a step writes its K and V for this layer: per row (up to the step's
    /// row capacity) three words, the K cache's address, the V cache's and the cache's slot
    /// count. A sequence's rows all name its own caches; a batched step's rows name their
    /// sequences' (so the fused QKV projection runs once over all the batch's rows).
    KvRows(usize),
    /// A cos/sin table, by index into `Program::rope_tables`.
    RopeTable(usize),
    /// The conv window / SSM state of a Mamba2 layer.
    MambaConv(usize),
    MambaSsm(usize),
}

/// One call of the schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub kernel: usize,
    pub args: Vec<Arg>,
    pub units: Units,
    pub rows: Rows,
    /// The attention layer whose cache capacity is passed (KV kernels only; `qkv_rope` reads
    /// each row's from its `KvRows` entry, and its fifth argument is its shared int8 rows).
    pub layer: Option<usize>,
    /// Rough work per unit, in floats touched: the executor splits big calls over threads.
    pub work_per_unit: usize,
}

/// An activation buffer: `width` floats per row; placed at `offset × n_cap` floats in the arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    pub width: usize,
    pub rows: Rows,
    /// In floats per row of capacity (multiples of 16 floats, so every buffer is 64-byte aligned).
    pub offset: usize,
}

/// A table of RoPE cos/sin values, computed by the runtime for its context size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeTable {
    pub theta: f32,
    pub scaling: RopeScaling,
    pub rotary_dim: usize,
    /// The `qkv_rope` layout (cos twice, then signed sin, per pair) instead of `rope`'s.
    pub interleaved: bool,
}

/// The KV cache of one attention layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvLayer {
    pub layer: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
}

/// The lowered program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub kernels: Vec<KernelSpec>,
    pub calls: Vec<Call>,
    pub buffers: Vec<Buffer>,
    /// Arena size in floats per row of capacity.
    pub arena_width: usize,
    pub outputs: Vec<(String, usize)>,
    pub rope_tables: Vec<RopeTable>,
    pub kv_layers: Vec<KvLayer>,
    /// Mamba2 layers: `(layer, conv state floats, ssm state floats)`.
    #[serde(default)]
    pub mamba_layers: Vec<(usize, usize, usize)>,
    /// Storage layout of each weight the program reads.
    pub layouts: Vec<(String, Layout)>,
}

impl Program {
    pub fn layout_of(&self, name: &str) -> Layout {
        self.layouts.iter().find(|(n, _)| n == name).map_or(Layout::RowMajor, |(_, l)| *l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `xbf16` is written only when set, so an artifact without bf16 activations has the
    /// header older builds read; one without the field reads as `false`.
    #[test]
    fn xbf16_only_when_set() {
        let plain = serde_json::to_string(&KernelSpec::matmul(64, 32, false)).unwrap();
        assert!(!plain.contains("xbf16"), "{plain}");
        let back: KernelSpec = serde_json::from_str(&plain).unwrap();
        assert_eq!(back, KernelSpec::matmul(64, 32, false));
        let KernelSpec::MatMul { k, m, bias, rms_eps, act, residual, w, xq, .. } = KernelSpec::matmul(64, 32, false)
        else {
            unreachable!()
        };
        let set = KernelSpec::MatMul { k, m, bias, rms_eps, act, residual, w, xq, xbf16: true };
        let text = serde_json::to_string(&set).unwrap();
        assert!(text.contains("\"xbf16\":true"), "{text}");
        assert_eq!(serde_json::from_str::<KernelSpec>(&text).unwrap(), set);
    }
}
