//! The operations of the IR, their attributes, and their typing rules.
//!
//! Every activation is a row-major matrix `[n, d]` (one row per token of the step) unless noted.
//! Weights are `[out, in]` like `torch.nn.Linear`. Token ids, positions and sequences are
//! `i32[n]`.
//!
//! A step's rows may belong to several sequences (a batch): row `t` is token `tokens[t]` at
//! `positions[t]` of sequence `seqs[t]`. A sequence's rows are contiguous and in position order;
//! each sequence has its own per-layer state (KV caches, Mamba2 conv window and SSM state), and
//! every stateful op takes `seqs` as its last operand and reads and writes row `t`'s sequence's
//! state only. `take_last` gives one row per sequence (`[s, d]`). Rows never mix otherwise.

use crate::types::{DType, Dim, Shape, Type};

/// Which step input an `input` node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Token ids of the step: `i32[n]`.
    Tokens,
    /// Absolute position of each token in its sequence: `i32[n]`.
    Positions,
    /// The sequence of each token (its index among the step's sequences, each one's state its
    /// own): `i32[n]`; a sequence's rows are contiguous.
    Seqs,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Tokens => "tokens",
            InputKind::Positions => "positions",
            InputKind::Seqs => "seqs",
        }
    }
}

/// Frequency scaling of rotary embeddings (HF `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum RopeScaling {
    /// Plain `theta^(-2i/d)` frequencies.
    None,
    /// `rope_type: linear`: positions divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type: llama3`: wavelength-dependent frequency scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: usize },
}

impl RopeScaling {
    fn print(&self) -> String {
        match self {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear:{factor:?}"),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                format!("llama3:{factor:?}:{low_freq_factor:?}:{high_freq_factor:?}:{original_max_position}")
            }
        }
    }

    fn parse(s: &str) -> Option<RopeScaling> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["none"] => Some(RopeScaling::None),
            ["linear", f] => Some(RopeScaling::Linear { factor: f.parse().ok()? }),
            ["llama3", f, lo, hi, orig] => Some(RopeScaling::Llama3 {
                factor: f.parse().ok()?,
                low_freq_factor: lo.parse().ok()?,
                high_freq_factor: hi.parse().ok()?,
                original_max_position: orig.parse().ok()?,
            }),
            _ => None,
        }
    }

    /// Inverse frequencies for the `rotary_dim / 2` rotated pairs, as transformers computes them.
    pub fn inv_freq(&self, theta: f32, rotary_dim: usize) -> Vec<f32> {
        let half = rotary_dim / 2;
        (0..half)
            .map(|i| {
                // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), in float32.
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                let base = 1.0f32 / theta.powf(exponent);
                match *self {
                    RopeScaling::None | RopeScaling::Linear { .. } => base,
                    RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                        let low_wavelen = original_max_position as f32 / low_freq_factor;
                        let high_wavelen = original_max_position as f32 / high_freq_factor;
                        let wavelen = 2.0 * std::f32::consts::PI / base;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / factor
                        } else {
                            let smooth = (original_max_position as f32 / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                }
            })
            .collect()
    }

    /// Factors finite and positive, `low_freq_factor < high_freq_factor` for llama3 (the
    /// interpolation divides by their difference): anything else gives NaN angles.
    pub fn check(&self) -> Result<(), String> {
        let pos = |what: &str, v: f32| -> Result<(), String> {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("rope scaling {what} = {v} must be finite and positive"));
            }
            Ok(())
        };
        match *self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => pos("factor", factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                pos("factor", factor)?;
                pos("low_freq_factor", low_freq_factor)?;
                pos("high_freq_factor", high_freq_factor)?;
                if low_freq_factor >= high_freq_factor {
                    return Err(format!(
                        "rope scaling low_freq_factor {low_freq_factor} must be below high_freq_factor {high_freq_factor}"
                    ));
                }
                if original_max_position == 0 || original_max_position > MAX_DIM {
                    return Err(format!(
                        "rope scaling original_max_position_embeddings {original_max_position} must be in 1..={MAX_DIM}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// Factor positions are divided by before the angle is taken.
    pub fn position_divisor(&self) -> f32 {
        match *self {
            RopeScaling::Linear { factor } => factor,
            _ => 1.0,
        }
    }
}

/// The largest size any dim or size attribute of a graph may have (16M): a vocabulary, a
/// hidden size or a context. Products of two stay far below `usize::MAX`.
pub const MAX_DIM: usize = 1 << 24;
/// Layer indices (cache slots) are below this.
pub const MAX_LAYERS: usize = 1 << 16;
/// The most elements one value or weight may have (2^36 f32 = 256 GiB).
pub const MAX_NUMEL: u64 = 1 << 36;

/// How an op uses a layer's per-sequence state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateUse {
    /// The KV cache of `layer`: `[positions, kv_heads, head_dim]`, written by `attention` and
    /// `qkv_rope`, read by `attention` and `attend`.
    Kv { layer: usize, kv_heads: usize, head_dim: usize, window: Option<usize>, writes: bool },
    /// The conv window and SSM state of a Mamba2 layer.
    Mamba { layer: usize, conv_channels: usize, d_conv: usize, ssm_floats: usize },
}

/// One IR operation. Operand order is fixed per op and documented on each variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A step input (`tokens`, `positions` or `seqs`), `i32[n]`.
    Input(InputKind),
    /// A named weight tensor, supplied at run time; never copied into the IR.
    Weight { name: String },
    /// `(table [vocab, d], ids i32[n]) -> [n, d]`: row gather.
    Embedding,
    /// `(x [n, k], w [m, k], bias? [m]) -> [n, m]`: `x · wᵀ (+ bias)`.
    MatMul,
    /// `(x [n, d], w [d]) -> [n, d]`: `x / sqrt(mean(x²) + eps) * w`.
    RmsNorm { eps: f32 },
    /// `(x [n, d], w [d], b [d]) -> [n, d]`: `(x - mean) / sqrt(var + eps) * w + b`; with the
    /// single operand `x`, no scale and no bias.
    LayerNorm { eps: f32 },
    /// `(x [n, heads*head_dim], positions) -> same`: rotate-half (NeoX) rotary embedding on the
    /// first `rotary_dim` dims of each head.
    Rope { heads: usize, head_dim: usize, rotary_dim: usize, theta: f32, scaling: RopeScaling },
    /// `(q [n, heads*hd], k [n, kv_heads*hd], v [n, kv_heads*hd], positions, seqs) -> [n,
    /// heads*hd]`. Appends k and v of every token to its sequence's KV cache of `layer` at its
    /// position, then each query attends causally over its sequence's cached positions `p` with
    /// `pos - window < p <= pos`.
    Attention { layer: usize, heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>, scale: f32 },
    /// Row-wise softmax over the last dim.
    Softmax,
    /// `x * sigmoid(x)`.
    Silu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    Gelu,
    /// GELU, exact (erf) form.
    GeluErf,
    /// Elementwise add of two values of the same shape.
    Add,
    /// Elementwise multiply of two values of the same shape.
    Mul,
    /// Multiply by a constant.
    Scale { factor: f32 },
    /// Columns `start .. start+len` of the last dim.
    Slice { start: usize, len: usize },
    /// Concatenation along the last dim (any number of operands).
    Concat,
    /// `(x [n, d], seqs) -> [s, d]`: the last row of each sequence, in the order of the rows
    /// (the logits that sampling needs).
    TakeLast,
    /// `[n, k] -> [n, k]` (`k` a multiple of 32): each row rounded to int8 blocks of 32 and
    /// back, `x = d · q` (`quant::quantize_act_q8`): the activation quantization of the int8
    /// dot-product kernels. It only feeds the input of projections whose weight is `q8_0` or
    /// `q4_0`, and lowers into their prologue (no kernel of its own).
    QuantQ8,
    /// `quant_q8` with its rounding residual: `r = rt(x)`, then `r + rt(x − r)` (`rt` is
    /// `quant_q8`; `quant::round_trip_act_q8x2`), about 15 bits per value. Int8 kernels take
    /// it as two quantized rows per input row, each weight load feeding both, and add the two
    /// sums: for the logits projection, whose argmax the int8 rounding of one row moves.
    QuantQ8x2,
    /// `[n, k] -> [n, k]`: each value rounded to bf16 (to nearest, ties to even; NaN stays
    /// NaN) and widened back: the bf16 activations of the projections over bf16 weights
    /// (`llmc compile --activations bf16`), which hosts with AVX512_BF16 multiply with
    /// `vdpbf16ps`. A kernel of its own; the projection it feeds knows its input is bf16-exact.
    RoundBf16,

    // ---- fused ops, created by passes ----
    /// `(x [n, k], w [r, k], bias? [r], residual? [n, m]) -> [n, m]`: a projection with a fused
    /// prologue and epilogue: `y = (x · wᵀ) · s + bias`, where `s = 1/sqrt(mean(x²) + eps)` with
    /// `rms_eps` (an RMSNorm whose scale was folded into `w`) and 1 otherwise; then `act`; then
    /// `+ residual`. With `act = swiglu`, `w` holds gate and up rows interleaved in blocks of 8
    /// (`interleave_rows8`) and `m = r / 2`: `out[j] = silu(y[g(j)]) · y[g(j) + 8]`,
    /// `g(j) = 16·(j / 8) + j % 8`.
    Linear { rms_eps: Option<f32>, act: Act, bias: bool, residual: bool },
    /// `(x [n, k], w [(h+2kv)·hd, k], bias?, positions, seqs) -> q [n, h·hd]`: the fused Q/K/V
    /// projection (with the optional RMS prologue of `linear`), RoPE applied in its epilogue to
    /// q and k in *pair-interleaved* order (the rows of `w` were permuted by `rope_interleave`,
    /// so dims `2i, 2i+1` of a head are a rotated pair), and k, v appended to the KV cache of
    /// `layer` of each row's sequence. Returns the rotated q; an `attend` reads the cache.
    QkvRope {
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
        scaling: RopeScaling,
        rms_eps: Option<f32>,
        bias: bool,
    },
    /// `(q [n, h·hd], positions, seqs) -> [n, h·hd]`: attention over the KV cache of `layer` of
    /// each row's sequence, which a `qkv_rope` of the same step filled.
    Attend { layer: usize, heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>, scale: f32 },

    // ---- compile-time ops on weights (the compiler evaluates them once) ----
    /// Rows of every operand stacked (matrices `[r_i, k]` or vectors `[r_i]`).
    ConcatRows,
    /// Columns stacked: `[m, k_i]` operands → `[m, Σ k_i]`.
    ConcatCols,
    /// `(a [r, ...], b [r, ...]) -> [2r, ...]`: blocks of 8 rows of a, then of b, alternating.
    InterleaveRows8,
    /// `(w [m, k], s [k]) -> [m, k]`: `w[o, i] · s[i]` (a norm scale folded into a projection).
    ScaleCols,
    /// `(w [m, k], v [k]) -> [m]`: `w · v` (a norm bias folded into a projection bias).
    WeightMatVec,
    /// Permutes the rows of a fused `[q | k | v]` weight (or bias) so that in each q and k head
    /// the rotary dims `i` and `i + rotary_dim/2` become neighbours `2i, 2i+1`.
    RopeInterleave { heads: usize, kv_heads: usize, head_dim: usize, rotary_dim: usize },
    /// `(w_0 [r, c], ..., w_{E-1}) -> [E, r, c]`: per-expert weights stacked.
    Stack,
    /// `(w [..., 2f, c]) -> same`: in every matrix, rows `[gate (f) | up (f)]` become blocks
    /// of 8 gate rows and 8 up rows alternating (the `interleave_rows8` layout).
    InterleaveHalves8,

    /// `relu(x)²` (BitNet's `relu2`).
    Relu2,
    /// BitNet b1.58 linear: `(x [n, k], w u8[m/4, k], scale f32[1]) -> [n, m]`. Weights are
    /// ternary, four per byte in row blocks: `W[r + i·m/4, c] = ((w[r, c] >> 2i) & 3) - 1`.
    /// Per token, `s = 127 / max(max|x|, 1e-5)`, `x_q = clamp(round_half_even(x·s), -128, 127)`,
    /// `y = (x_q · Wᵀ) / (scale · s)` — an integer dot product.
    BitLinear,
    /// A Mamba2 mixer after its input projection:
    /// `(zxbcdt [n, 2·I + 2·G·S + H], conv_w [C, 1, K], conv_b [C], dt_bias [H], a_log [H],
    /// d [H], norm_w [I], seqs) -> [n, I]` with `I = heads·head_dim`, `C = I + 2·G·S` conv
    /// channels. Each sequence's rows run through its own conv window and SSM state. Per token,
    /// in order: causal depthwise conv (window of the last K inputs, kept in the
    /// layer's conv state) + SiLU on `xBC`; `dt = softplus(dt + dt_bias)`; per head
    /// `state = state·exp(dt·A) + dt·x ⊗ B` (`A = -exp(a_log)`, `B`, `C` of the head's group),
    /// `y = state·C + D·x`; then the gated RMSNorm `norm_w · rms(y · silu(z))`, one mean of
    /// squares over all `I` channels even when `G > 1`, as transformers' Bamba and
    /// GraniteMoeHybrid gated norms do (mamba_ssm's `RMSNormGated(group_size = I/G)`, llama.cpp
    /// and vLLM normalize each group of `I/G` channels on its own; the two agree at `G = 1`).
    /// Multi-token steps run the SSM in its chunked (SSD) form, `chunk` tokens at a time:
    /// within a chunk, `y_t = Σ_{τ≤t} (C_t·B_τ)·e^{s_t - s_τ}·dt_τ·x_τ + e^{s_t}·C_t·h + D·x_t`
    /// with `s` the running sum of `dt·A`, and the state is carried from chunk to chunk — the
    /// same function as the one-token recurrence (tests check they agree).
    Mamba2 {
        layer: usize,
        heads: usize,
        head_dim: usize,
        d_state: usize,
        groups: usize,
        d_conv: usize,
        chunk: usize,
        eps: f32,
    },
    /// Mixture of experts with SwiGLU experts:
    /// `(x [n, d], router [E, d], gate_up [E, 2ff, d], down [E, d, ff]) -> [n, d]`.
    /// `p = softmax(x · routerᵀ)` over all experts, the `top_k` largest (lowest index first on
    /// ties), weights `p / Σ p_top` (renormalized), and `out = Σ w_e · down_e(swiglu_e(x))`, where
    /// `gate_up[e]` holds the gate and up rows interleaved in blocks of 8 (as `linear`'s swiglu).
    Moe { experts: usize, top_k: usize },
}

/// The activation fused into a `linear` epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Act {
    None,
    Gelu,
    GeluErf,
    SwiGlu,
}

impl Act {
    pub fn name(self) -> &'static str {
        match self {
            Act::None => "none",
            Act::Gelu => "gelu",
            Act::GeluErf => "gelu_erf",
            Act::SwiGlu => "swiglu",
        }
    }
    pub fn parse(s: &str) -> Option<Act> {
        Some(match s {
            "none" => Act::None,
            "gelu" => Act::Gelu,
            "gelu_erf" => Act::GeluErf,
            "swiglu" => Act::SwiGlu,
            _ => return None,
        })
    }
}

fn opt_f32(v: Option<f32>) -> String {
    v.map_or("none".to_string(), |e| format!("{e:?}"))
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Weight { .. } => "weight",
            Op::Embedding => "embedding",
            Op::MatMul => "matmul",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Softmax => "softmax",
            Op::Silu => "silu",
            Op::Gelu => "gelu",
            Op::GeluErf => "gelu_erf",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::Slice { .. } => "slice",
            Op::Concat => "concat",
            Op::TakeLast => "take_last",
            Op::QuantQ8 => "quant_q8",
            Op::QuantQ8x2 => "quant_q8x2",
            Op::Linear { .. } => "linear",
            Op::QkvRope { .. } => "qkv_rope",
            Op::Attend { .. } => "attend",
            Op::ConcatRows => "concat_rows",
            Op::ConcatCols => "concat_cols",
            Op::InterleaveRows8 => "interleave_rows8",
            Op::ScaleCols => "scale_cols",
            Op::WeightMatVec => "weight_matvec",
            Op::RopeInterleave { .. } => "rope_interleave",
            Op::Stack => "stack",
            Op::InterleaveHalves8 => "interleave_halves8",
            Op::Relu2 => "relu2",
            Op::RoundBf16 => "round_bf16",
            Op::Mamba2 { .. } => "mamba2",
            Op::BitLinear => "bit_linear",
            Op::Moe { .. } => "moe",
        }
    }

    /// Attributes as `(key, value)` pairs, in print order.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        match self {
            Op::Input(k) => vec![("kind", k.name().to_string())],
            Op::Weight { name } => vec![("name", format!("{name:?}"))],
            Op::RmsNorm { eps } | Op::LayerNorm { eps } => vec![("eps", format!("{eps:?}"))],
            Op::Rope { heads, head_dim, rotary_dim, theta, scaling } => vec![
                ("heads", heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("rotary_dim", rotary_dim.to_string()),
                ("theta", format!("{theta:?}")),
                ("scaling", scaling.print()),
            ],
            Op::Attention { layer, heads, kv_heads, head_dim, window, scale } => vec![
                ("layer", layer.to_string()),
                ("heads", heads.to_string()),
                ("kv_heads", kv_heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("window", window.map_or("none".to_string(), |w| w.to_string())),
                ("scale", format!("{scale:?}")),
            ],
            Op::Scale { factor } => vec![("factor", format!("{factor:?}"))],
            Op::Slice { start, len } => {
                vec![("start", start.to_string()), ("len", len.to_string())]
            }
            Op::Linear { rms_eps, act, bias, residual } => vec![
                ("rms_eps", opt_f32(*rms_eps)),
                ("act", act.name().to_string()),
                ("bias", bias.to_string()),
                ("residual", residual.to_string()),
            ],
            Op::QkvRope { layer, heads, kv_heads, head_dim, rotary_dim, theta, scaling, rms_eps, bias } => vec![
                ("layer", layer.to_string()),
                ("heads", heads.to_string()),
                ("kv_heads", kv_heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("rotary_dim", rotary_dim.to_string()),
                ("theta", format!("{theta:?}")),
                ("scaling", scaling.print()),
                ("rms_eps", opt_f32(*rms_eps)),
                ("bias", bias.to_string()),
            ],
            Op::Attend { layer, heads, kv_heads, head_dim, window, scale } => vec![
                ("layer", layer.to_string()),
                ("heads", heads.to_string()),
                ("kv_heads", kv_heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("window", window.map_or("none".to_string(), |w| w.to_string())),
                ("scale", format!("{scale:?}")),
            ],
            Op::RopeInterleave { heads, kv_heads, head_dim, rotary_dim } => vec![
                ("heads", heads.to_string()),
                ("kv_heads", kv_heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("rotary_dim", rotary_dim.to_string()),
            ],
            Op::Moe { experts, top_k } => vec![("experts", experts.to_string()), ("top_k", top_k.to_string())],
            Op::Mamba2 { layer, heads, head_dim, d_state, groups, d_conv, chunk, eps } => vec![
                ("layer", layer.to_string()),
                ("heads", heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("d_state", d_state.to_string()),
                ("groups", groups.to_string()),
                ("d_conv", d_conv.to_string()),
                ("chunk", chunk.to_string()),
                ("eps", format!("{eps:?}")),
            ],
            Op::ConcatRows
            | Op::ConcatCols
            | Op::InterleaveRows8
            | Op::ScaleCols
            | Op::WeightMatVec
            | Op::Stack
            | Op::InterleaveHalves8 => {
                vec![]
            }
            Op::Embedding
            | Op::MatMul
            | Op::Softmax
            | Op::Silu
            | Op::Gelu
            | Op::GeluErf
            | Op::Add
            | Op::Mul
            | Op::Concat
            | Op::Relu2
            | Op::BitLinear
            | Op::TakeLast
            | Op::QuantQ8
            | Op::QuantQ8x2
            | Op::RoundBf16 => vec![],
        }
    }

    /// Rebuilds an op from its name and attributes (the inverse of `name` + `attrs`).
    pub fn from_parts(name: &str, attrs: &Attrs) -> Result<Op, String> {
        let op = match name {
            "input" => Op::Input(match attrs.str("kind")? {
                "tokens" => InputKind::Tokens,
                "positions" => InputKind::Positions,
                "seqs" => InputKind::Seqs,
                other => return Err(format!("unknown input kind `{other}`")),
            }),
            "weight" => Op::Weight { name: attrs.quoted("name")? },
            "embedding" => Op::Embedding,
            "matmul" => Op::MatMul,
            "rms_norm" => Op::RmsNorm { eps: attrs.num("eps")? },
            "layer_norm" => Op::LayerNorm { eps: attrs.num("eps")? },
            "rope" => Op::Rope {
                heads: attrs.num("heads")?,
                head_dim: attrs.num("head_dim")?,
                rotary_dim: attrs.num("rotary_dim")?,
                theta: attrs.num("theta")?,
                scaling: RopeScaling::parse(attrs.str("scaling")?)
                    .ok_or_else(|| format!("bad rope scaling `{}`", attrs.str("scaling").unwrap_or("")))?,
            },
            "attention" => Op::Attention {
                layer: attrs.num("layer")?,
                heads: attrs.num("heads")?,
                kv_heads: attrs.num("kv_heads")?,
                head_dim: attrs.num("head_dim")?,
                window: match attrs.str("window")? {
                    "none" => None,
                    w => Some(w.parse().map_err(|_| format!("bad window `{w}`"))?),
                },
                scale: attrs.num("scale")?,
            },
            "softmax" => Op::Softmax,
            "silu" => Op::Silu,
            "gelu" => Op::Gelu,
            "gelu_erf" => Op::GeluErf,
            "add" => Op::Add,
            "mul" => Op::Mul,
            "scale" => Op::Scale { factor: attrs.num("factor")? },
            "slice" => Op::Slice { start: attrs.num("start")?, len: attrs.num("len")? },
            "concat" => Op::Concat,
            "take_last" => Op::TakeLast,
            "quant_q8" => Op::QuantQ8,
            "quant_q8x2" => Op::QuantQ8x2,
            "linear" => Op::Linear {
                rms_eps: attrs.opt_num("rms_eps")?,
                act: Act::parse(attrs.str("act")?).ok_or_else(|| "bad act".to_string())?,
                bias: attrs.num("bias")?,
                residual: attrs.num("residual")?,
            },
            "qkv_rope" => Op::QkvRope {
                layer: attrs.num("layer")?,
                heads: attrs.num("heads")?,
                kv_heads: attrs.num("kv_heads")?,
                head_dim: attrs.num("head_dim")?,
                rotary_dim: attrs.num("rotary_dim")?,
                theta: attrs.num("theta")?,
                scaling: RopeScaling::parse(attrs.str("scaling")?).ok_or_else(|| "bad rope scaling".to_string())?,
                rms_eps: attrs.opt_num("rms_eps")?,
                bias: attrs.num("bias")?,
            },
            "attend" => Op::Attend {
                layer: attrs.num("layer")?,
                heads: attrs.num("heads")?,
                kv_heads: attrs.num("kv_heads")?,
                head_dim: attrs.num("head_dim")?,
                window: attrs.opt_num("window")?,
                scale: attrs.num("scale")?,
            },
            "concat_rows" => Op::ConcatRows,
            "concat_cols" => Op::ConcatCols,
            "interleave_rows8" => Op::InterleaveRows8,
            "scale_cols" => Op::ScaleCols,
            "weight_matvec" => Op::WeightMatVec,
            "stack" => Op::Stack,
            "interleave_halves8" => Op::InterleaveHalves8,
            "relu2" => Op::Relu2,
            "round_bf16" => Op::RoundBf16,
            "mamba2" => Op::Mamba2 {
                layer: attrs.num("layer")?,
                heads: attrs.num("heads")?,
                head_dim: attrs.num("head_dim")?,
                d_state: attrs.num("d_state")?,
                groups: attrs.num("groups")?,
                d_conv: attrs.num("d_conv")?,
                chunk: attrs.num("chunk")?,
                eps: attrs.num("eps")?,
            },
            "bit_linear" => Op::BitLinear,
            "moe" => Op::Moe { experts: attrs.num("experts")?, top_k: attrs.num("top_k")? },
            "rope_interleave" => Op::RopeInterleave {
                heads: attrs.num("heads")?,
                kv_heads: attrs.num("kv_heads")?,
                head_dim: attrs.num("head_dim")?,
                rotary_dim: attrs.num("rotary_dim")?,
            },
            other => return Err(format!("unknown op `{other}`")),
        };
        Ok(op)
    }

    /// Whether operand `i` may be a weight with a storage type (bf16, f16, q8_0, q4_0): the
    /// weight matrices that kernels stream (projections, the embedding table, MoE experts).
    pub fn accepts_storage(&self, i: usize) -> bool {
        match self {
            Op::MatMul | Op::Linear { .. } | Op::QkvRope { .. } => i == 1,
            Op::Embedding => i == 0,
            Op::Moe { .. } => (1..=3).contains(&i),
            _ => false,
        }
    }

    /// The per-sequence state this op reads or writes (a layer's KV cache or Mamba2 state), if
    /// any. Stateful ops are never merged or reordered, and every consumer of layer state (the
    /// verifier, cache sizing, lowering) reads it from here.
    pub fn state(&self) -> Option<StateUse> {
        match *self {
            Op::Attention { layer, kv_heads, head_dim, window, .. } => {
                Some(StateUse::Kv { layer, kv_heads, head_dim, window, writes: true })
            }
            Op::QkvRope { layer, kv_heads, head_dim, .. } => {
                Some(StateUse::Kv { layer, kv_heads, head_dim, window: None, writes: true })
            }
            Op::Attend { layer, kv_heads, head_dim, window, .. } => {
                Some(StateUse::Kv { layer, kv_heads, head_dim, window, writes: false })
            }
            Op::Mamba2 { layer, heads, head_dim, d_state, groups, d_conv, .. } => Some(StateUse::Mamba {
                layer,
                conv_channels: heads * head_dim + 2 * groups * d_state,
                d_conv,
                ssm_floats: heads * head_dim * d_state,
            }),
            _ => None,
        }
    }

    pub fn is_stateful(&self) -> bool {
        self.state().is_some()
    }

    /// Checks the op's own attributes: every size in `1..=MAX_DIM` (layer indices below
    /// `MAX_LAYERS`), every float finite and in its domain. A graph from a file may carry any
    /// value here; nothing downstream (lowering, kernels, the interpreter) sees an op that fails
    /// this, so their size arithmetic on two attributes cannot overflow.
    pub fn check_attrs(&self) -> Result<(), String> {
        let size = |what: &str, v: usize| -> Result<(), String> {
            if v == 0 || v > MAX_DIM {
                return Err(format!("{what} = {v} must be in 1..={MAX_DIM}"));
            }
            Ok(())
        };
        let layer = |v: usize| -> Result<(), String> {
            if v >= MAX_LAYERS {
                return Err(format!("layer {v} must be below {MAX_LAYERS}"));
            }
            Ok(())
        };
        let eps = |what: &str, v: f32| -> Result<(), String> {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{what} = {v} must be finite and >= 0"));
            }
            Ok(())
        };
        let finite = |what: &str, v: f32| -> Result<(), String> {
            if !v.is_finite() {
                return Err(format!("{what} = {v} must be finite"));
            }
            Ok(())
        };
        let rope = |theta: f32, scaling: &RopeScaling| -> Result<(), String> {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(format!("rope theta {theta} must be positive"));
            }
            scaling.check()
        };
        let heads = |h: usize, kv: usize, hd: usize| -> Result<(), String> {
            size("heads", h)?;
            size("kv_heads", kv)?;
            size("head_dim", hd)?;
            if h % kv != 0 {
                return Err(format!("heads {h} must be a multiple of kv_heads {kv}"));
            }
            Ok(())
        };
        match self {
            Op::RmsNorm { eps: e } | Op::LayerNorm { eps: e } => eps("eps", *e),
            Op::Rope { heads, head_dim, rotary_dim, theta, scaling } => {
                size("heads", *heads)?;
                size("head_dim", *head_dim)?;
                size("rotary_dim", *rotary_dim)?;
                rope(*theta, scaling)
            }
            Op::Attention { layer: l, heads: h, kv_heads, head_dim, window, scale }
            | Op::Attend { layer: l, heads: h, kv_heads, head_dim, window, scale } => {
                layer(*l)?;
                heads(*h, *kv_heads, *head_dim)?;
                if let Some(w) = window {
                    size("window", *w)?;
                }
                finite("scale", *scale)
            }
            Op::Scale { factor } => finite("factor", *factor),
            Op::Slice { start, len } => {
                size("len", *len)?;
                if *start > MAX_DIM {
                    return Err(format!("start = {start} must be at most {MAX_DIM}"));
                }
                Ok(())
            }
            Op::Linear { rms_eps, .. } => rms_eps.map_or(Ok(()), |e| eps("rms_eps", e)),
            Op::QkvRope { layer: l, heads: h, kv_heads, head_dim, rotary_dim, theta, scaling, rms_eps, .. } => {
                layer(*l)?;
                heads(*h, *kv_heads, *head_dim)?;
                size("rotary_dim", *rotary_dim)?;
                rope(*theta, scaling)?;
                rms_eps.map_or(Ok(()), |e| eps("rms_eps", e))
            }
            Op::RopeInterleave { heads: h, kv_heads, head_dim, rotary_dim } => {
                heads(*h, *kv_heads, *head_dim)?;
                size("rotary_dim", *rotary_dim)
            }
            Op::Mamba2 { layer: l, heads, head_dim, d_state, groups, d_conv, chunk, eps: e } => {
                layer(*l)?;
                for (what, v) in [
                    ("heads", heads),
                    ("head_dim", head_dim),
                    ("d_state", d_state),
                    ("groups", groups),
                    ("d_conv", d_conv),
                    ("chunk", chunk),
                ] {
                    size(what, *v)?;
                }
                if *d_conv > 1024 {
                    return Err(format!("d_conv = {d_conv} must be at most 1024"));
                }
                eps("eps", *e)
            }
            Op::Moe { experts, top_k } => {
                size("experts", *experts)?;
                size("top_k", *top_k)?;
                if top_k > experts {
                    return Err(format!("top_k {top_k} must be at most experts {experts}"));
                }
                Ok(())
            }
            Op::Input(_)
            | Op::Weight { .. }
            | Op::Embedding
            | Op::MatMul
            | Op::Softmax
            | Op::Silu
            | Op::Gelu
            | Op::GeluErf
            | Op::Add
            | Op::Mul
            | Op::Concat
            | Op::TakeLast
            | Op::QuantQ8
            | Op::QuantQ8x2
            | Op::ConcatRows
            | Op::ConcatCols
            | Op::InterleaveRows8
            | Op::ScaleCols
            | Op::WeightMatVec
            | Op::Stack
            | Op::InterleaveHalves8
            | Op::Relu2
            | Op::RoundBf16
            | Op::BitLinear => Ok(()),
        }
    }

    /// The result type of this op applied to operands of the given types.
    pub fn infer(&self, ins: &[&Type]) -> Result<Type, String> {
        let arity = |lo: usize, hi: usize| -> Result<(), String> {
            if ins.len() < lo || ins.len() > hi {
                Err(format!("{} takes {lo}..={hi} operands, got {}", self.name(), ins.len()))
            } else {
                Ok(())
            }
        };
        let matrix = |t: &Type, what: &str| -> Result<(usize, usize), String> {
            match t.shape.0.as_slice() {
                [Dim::C(m), Dim::C(k)] => Ok((*m, *k)),
                _ => Err(format!("{what} must be a constant matrix, got {t}")),
            }
        };
        let rows = |t: &Type, what: &str| -> Result<usize, String> {
            match t.shape.0.as_slice() {
                [_, Dim::C(d)] if t.dtype == DType::F32 => Ok(*d),
                _ => Err(format!("{what} must be f32[rows, d], got {t}")),
            }
        };
        // rows paired with the step's positions and sequences: one per token
        let token_rows = |t: &Type, what: &str| -> Result<usize, String> {
            match t.shape.0.as_slice() {
                [Dim::N, Dim::C(d)] if t.dtype == DType::F32 => Ok(*d),
                _ => Err(format!("{what} must be f32[n, d] (a row per token), got {t}")),
            }
        };
        let ids = |t: &Type, what: &str| -> Result<(), String> {
            if t.dtype == DType::I32 && t.shape == Shape::vec_n() {
                Ok(())
            } else {
                Err(format!("{what} must be i32[n], got {t}"))
            }
        };
        let vector = |t: &Type, d: usize, what: &str| -> Result<(), String> {
            if t.shape == Shape::constant(&[d]) {
                Ok(())
            } else {
                Err(format!("{what} must be [{d}], got {t}"))
            }
        };
        let same_rows = |cols: usize| Type::new(DType::F32, Shape(vec![ins[0].shape.0[0], Dim::C(cols)]));
        match self {
            Op::Input(_) => {
                arity(0, 0)?;
                Ok(Type::new(DType::I32, Shape::vec_n()))
            }
            Op::Weight { .. } => Err("weight types are declared, not inferred".into()),
            Op::Embedding => {
                arity(2, 2)?;
                let d = match ins[0].shape.0.as_slice() {
                    [Dim::C(_), Dim::C(d)] => *d,
                    _ => return Err(format!("embedding table must be [vocab, d], got {}", ins[0])),
                };
                ids(ins[1], "embedding ids")?;
                Ok(Type::new(DType::F32, Shape::rows_n(d)))
            }
            Op::MatMul => {
                arity(2, 3)?;
                let k = rows(ins[0], "matmul input")?;
                let (m, kw) = match ins[1].shape.0.as_slice() {
                    [Dim::C(m), Dim::C(k)] => (*m, *k),
                    _ => return Err(format!("matmul weight must be [out, in], got {}", ins[1])),
                };
                if kw != k {
                    return Err(format!("matmul input has {k} columns but weight {} expects {kw}", ins[1]));
                }
                if let Some(b) = ins.get(2) {
                    vector(b, m, "matmul bias")?;
                }
                Ok(same_rows(m))
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
                // RMSNorm: (x, w); LayerNorm: (x, w, b), or (x) alone once fold_norm moved its
                // scale and bias into the next projection.
                if matches!(self, Op::RmsNorm { .. }) {
                    arity(2, 2)?;
                } else if ins.len() != 1 {
                    arity(3, 3)?;
                }
                let d = rows(ins[0], "norm input")?;
                for w in &ins[1..] {
                    vector(w, d, "norm weight/bias")?;
                }
                Ok(ins[0].clone())
            }
            Op::Rope { heads, head_dim, rotary_dim, .. } => {
                arity(2, 2)?;
                let d = token_rows(ins[0], "rope input")?;
                if d != heads * head_dim {
                    return Err(format!("rope input has {d} columns, expected heads*head_dim = {}", heads * head_dim));
                }
                if *rotary_dim > *head_dim || rotary_dim % 2 != 0 {
                    return Err(format!("rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}"));
                }
                ids(ins[1], "rope positions")?;
                Ok(ins[0].clone())
            }
            Op::Attention { heads, kv_heads, head_dim, window, .. } => {
                arity(5, 5)?;
                if *kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(format!("heads {heads} must be a multiple of kv_heads {kv_heads}"));
                }
                if *window == Some(0) {
                    return Err("attention window must be positive".into());
                }
                let q = token_rows(ins[0], "attention q")?;
                let k = token_rows(ins[1], "attention k")?;
                let v = token_rows(ins[2], "attention v")?;
                if q != heads * head_dim || k != kv_heads * head_dim || v != k {
                    return Err(format!(
                        "attention q/k/v widths {q}/{k}/{v} do not match heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}"
                    ));
                }
                ids(ins[3], "attention positions")?;
                ids(ins[4], "attention seqs")?;
                Ok(ins[0].clone())
            }
            Op::Mamba2 { heads, head_dim, d_state, groups, d_conv, chunk, .. } => {
                arity(8, 8)?;
                ids(ins[7], "mamba2 seqs")?;
                if *chunk == 0 {
                    return Err("mamba2 chunk must be positive".into());
                }
                let (h, i) = (*heads, heads * head_dim);
                let gs = groups * d_state;
                let c = i + 2 * gs;
                let w = token_rows(ins[0], "mamba2 input")?;
                if w != 2 * i + 2 * gs + h {
                    return Err(format!("mamba2 input has {w} columns, expected 2·{i} + 2·{gs} + {h}"));
                }
                if *groups == 0 || h % groups != 0 || *d_conv == 0 {
                    return Err("mamba2 needs groups | heads and a positive d_conv".into());
                }
                if ins[1].shape != Shape::constant(&[c, 1, *d_conv]) {
                    return Err(format!("mamba2 conv weight must be [{c}, 1, {d_conv}], got {}", ins[1]));
                }
                vector(ins[2], c, "mamba2 conv bias")?;
                for (t, what) in ins[3..6].iter().zip(["dt_bias", "A_log", "D"]) {
                    vector(t, h, what)?;
                }
                vector(ins[6], i, "mamba2 norm weight")?;
                Ok(same_rows(i))
            }
            Op::BitLinear => {
                arity(3, 3)?;
                let k = rows(ins[0], "bit_linear input")?;
                let (r, c) = match (ins[1].dtype, ins[1].shape.0.as_slice()) {
                    (DType::U8, [Dim::C(r), Dim::C(c)]) => (*r, *c),
                    _ => return Err(format!("bit_linear weight must be u8[m/4, k], got {}", ins[1])),
                };
                if c != k {
                    return Err(format!("bit_linear input has {k} columns but weight {} expects {c}", ins[1]));
                }
                vector(ins[2], 1, "bit_linear scale")?;
                Ok(same_rows(4 * r))
            }
            Op::Softmax | Op::Silu | Op::Gelu | Op::GeluErf | Op::Relu2 | Op::RoundBf16 | Op::Scale { .. } => {
                arity(1, 1)?;
                rows(ins[0], self.name())?;
                Ok(ins[0].clone())
            }
            Op::Add | Op::Mul => {
                arity(2, 2)?;
                // rows of activations, or constant vectors (folded biases)
                let is_vec = matches!(ins[0].shape.0.as_slice(), [Dim::C(_)]) && ins[0].dtype == DType::F32;
                if !is_vec {
                    rows(ins[0], self.name())?;
                }
                if ins[0] != ins[1] {
                    return Err(format!("{} operands differ: {} vs {}", self.name(), ins[0], ins[1]));
                }
                Ok(ins[0].clone())
            }
            Op::Slice { start, len } => {
                arity(1, 1)?;
                let d = rows(ins[0], "slice input")?;
                if start + len > d || *len == 0 {
                    return Err(format!("slice {start}..{} out of {d} columns", start + len));
                }
                Ok(same_rows(*len))
            }
            Op::Concat => {
                arity(1, usize::MAX)?;
                let mut total = 0;
                for t in ins {
                    total += rows(t, "concat operand")?;
                    if t.shape.0[0] != ins[0].shape.0[0] {
                        return Err(format!("concat operands have different rows: {} vs {}", ins[0], t));
                    }
                }
                Ok(same_rows(total))
            }
            Op::QuantQ8 | Op::QuantQ8x2 => {
                arity(1, 1)?;
                let d = rows(ins[0], "quant_q8 input")?;
                if d % crate::quant::QK != 0 {
                    return Err(format!("{} needs a multiple of {} columns, got {d}", self.name(), crate::quant::QK));
                }
                Ok(ins[0].clone())
            }
            Op::TakeLast => {
                arity(2, 2)?;
                let d = rows(ins[0], "take_last input")?;
                if ins[0].shape.0[0] != Dim::N {
                    return Err(format!("take_last input must have a row per token, got {}", ins[0]));
                }
                ids(ins[1], "take_last seqs")?;
                Ok(Type::new(DType::F32, Shape(vec![Dim::S, Dim::C(d)])))
            }
            Op::Linear { act, bias, residual, .. } => {
                let want = 2 + *bias as usize + *residual as usize;
                arity(want, want)?;
                let k = rows(ins[0], "linear input")?;
                let r = matrix(ins[1], "linear weight")?;
                if r.1 != k {
                    return Err(format!("linear input has {k} columns but weight {} expects {}", ins[1], r.1));
                }
                if *bias {
                    vector(ins[2], r.0, "linear bias")?;
                }
                let m = if *act == Act::SwiGlu {
                    if r.0 % 16 != 0 {
                        return Err(format!("swiglu weight rows {} must be a multiple of 16", r.0));
                    }
                    r.0 / 2
                } else {
                    r.0
                };
                let out = same_rows(m);
                if *residual && *ins[ins.len() - 1] != out {
                    return Err(format!("linear residual {} does not match output {out}", ins[ins.len() - 1]));
                }
                Ok(out)
            }
            Op::QkvRope { heads, kv_heads, head_dim, rotary_dim, bias, .. } => {
                let want = 4 + *bias as usize;
                arity(want, want)?;
                let k = token_rows(ins[0], "qkv_rope input")?;
                let rows_w = (heads + 2 * kv_heads) * head_dim;
                if matrix(ins[1], "qkv_rope weight")? != (rows_w, k) {
                    return Err(format!("qkv_rope weight must be [{rows_w}, {k}], got {}", ins[1]));
                }
                if *bias {
                    vector(ins[2], rows_w, "qkv_rope bias")?;
                }
                ids(ins[want - 2], "qkv_rope positions")?;
                ids(ins[want - 1], "qkv_rope seqs")?;
                if *kv_heads == 0
                    || heads % kv_heads != 0
                    || rotary_dim % 4 != 0
                    || rotary_dim > head_dim
                    || head_dim % 4 != 0
                {
                    return Err("qkv_rope needs kv_heads | heads and head_dim, rotary_dim multiples of 4".into());
                }
                Ok(same_rows(heads * head_dim))
            }
            Op::Attend { heads, kv_heads, head_dim, window, .. } => {
                arity(3, 3)?;
                if *kv_heads == 0 || heads % kv_heads != 0 || *window == Some(0) {
                    return Err("attend needs kv_heads | heads and a positive window".into());
                }
                let q = token_rows(ins[0], "attend q")?;
                if q != heads * head_dim {
                    return Err(format!("attend q has {q} columns, expected {}", heads * head_dim));
                }
                ids(ins[1], "attend positions")?;
                ids(ins[2], "attend seqs")?;
                Ok(ins[0].clone())
            }
            Op::ConcatRows => {
                arity(1, usize::MAX)?;
                let first = &ins[0].shape.0;
                let mut total = 0;
                for t in ins {
                    let s = &t.shape.0;
                    // (A scalar has no rows: `s[1..]` would panic on it.)
                    if s.is_empty() || s.len() != first.len() || s[1..] != first[1..] || t.dtype != DType::F32 {
                        return Err(format!("concat_rows operands differ or are scalars: {} vs {}", ins[0], t));
                    }
                    match s[0] {
                        Dim::C(r) => total += r,
                        Dim::N | Dim::S => return Err("concat_rows is for weights".into()),
                    }
                }
                let mut shape = first.clone();
                shape[0] = Dim::C(total);
                Ok(Type::new(DType::F32, Shape(shape)))
            }
            Op::ConcatCols => {
                arity(1, usize::MAX)?;
                let m = matrix(ins[0], "concat_cols operand")?.0;
                let mut total = 0;
                for t in ins {
                    let (r, k) = matrix(t, "concat_cols operand")?;
                    if r != m {
                        return Err(format!("concat_cols operands differ in rows: {} vs {}", ins[0], t));
                    }
                    total += k;
                }
                Ok(Type::new(DType::F32, Shape::constant(&[m, total])))
            }
            Op::InterleaveRows8 => {
                arity(2, 2)?;
                if ins[0] != ins[1] || ins[0].shape.is_symbolic() {
                    return Err(format!("interleave_rows8 operands differ: {} vs {}", ins[0], ins[1]));
                }
                match ins[0].shape.0.first() {
                    Some(Dim::C(r)) if r % 8 == 0 => {
                        let mut shape = ins[0].shape.0.clone();
                        shape[0] = Dim::C(2 * r);
                        Ok(Type::new(DType::F32, Shape(shape)))
                    }
                    _ => Err(format!("interleave_rows8 needs a multiple of 8 rows, got {}", ins[0])),
                }
            }
            Op::ScaleCols | Op::WeightMatVec => {
                arity(2, 2)?;
                let (m, k) = matrix(ins[0], self.name())?;
                vector(ins[1], k, self.name())?;
                Ok(if matches!(self, Op::ScaleCols) {
                    ins[0].clone()
                } else {
                    Type::new(DType::F32, Shape::constant(&[m]))
                })
            }
            Op::InterleaveHalves8 => {
                arity(1, 1)?;
                let dims = ins[0].shape.0.as_slice();
                match dims {
                    [.., Dim::C(r), Dim::C(_)] if r % 16 == 0 && dims.iter().all(|d| matches!(d, Dim::C(_))) => {
                        Ok(ins[0].clone())
                    }
                    _ => Err(format!("interleave_halves8 needs [..., 2f, c] with f a multiple of 8, got {}", ins[0])),
                }
            }
            Op::Stack => {
                arity(1, usize::MAX)?;
                let (r, c) = matrix(ins[0], "stack operand")?;
                if ins.iter().any(|t| *t != ins[0]) {
                    return Err("stack operands must have one shape".into());
                }
                Ok(Type::new(DType::F32, Shape::constant(&[ins.len(), r, c])))
            }
            Op::Moe { experts, top_k } => {
                arity(4, 4)?;
                let d = rows(ins[0], "moe input")?;
                let e = *experts;
                if *top_k == 0 || top_k > experts {
                    return Err(format!("top_k {top_k} must be in 1..={e}"));
                }
                if matrix(ins[1], "moe router")? != (e, d) {
                    return Err(format!("moe router must be [{e}, {d}], got {}", ins[1]));
                }
                let (gu, down) = (&ins[2].shape.0, &ins[3].shape.0);
                let ff = match (gu.as_slice(), down.as_slice()) {
                    ([Dim::C(e1), Dim::C(r), Dim::C(c)], [Dim::C(e2), Dim::C(dd), Dim::C(ff)])
                        if *e1 == e && *e2 == e && *c == d && *dd == d && *r == 2 * ff && ff % 8 == 0 =>
                    {
                        *ff
                    }
                    _ => {
                        return Err(format!(
                            "moe experts must be [E, 2ff, d] and [E, d, ff], got {} and {}",
                            ins[2], ins[3]
                        ))
                    }
                };
                let _ = ff;
                Ok(ins[0].clone())
            }
            Op::RopeInterleave { heads, kv_heads, head_dim, rotary_dim } => {
                arity(1, 1)?;
                let r = match ins[0].shape.0.first() {
                    Some(Dim::C(r)) => *r,
                    _ => return Err("rope_interleave is for weights".into()),
                };
                if r != (heads + 2 * kv_heads) * head_dim || rotary_dim % 2 != 0 || rotary_dim > head_dim {
                    return Err(format!("rope_interleave: {} rows do not match the heads", r));
                }
                Ok(ins[0].clone())
            }
        }
    }
}

/// Parsed `key=value` attributes of one line of IR text.
#[derive(Default, Debug)]
pub struct Attrs(pub Vec<(String, String)>);

impl Attrs {
    pub fn str(&self, key: &str) -> Result<&str, String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("missing attribute `{key}`"))
    }
    pub fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        let s = self.str(key)?;
        s.parse().map_err(|_| format!("attribute `{key}` has bad value `{s}`"))
    }
    /// `none` or a number.
    pub fn opt_num<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        match self.str(key)? {
            "none" => Ok(None),
            _ => self.num(key).map(Some),
        }
    }
    pub fn quoted(&self, key: &str) -> Result<String, String> {
        let s = self.str(key)?;
        s.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .and_then(unescape)
            .ok_or_else(|| format!("attribute `{key}` must be a quoted string, got `{s}`"))
    }
}

/// Undoes the escapes that Rust's `{:?}` writes in a string (the printer quotes names that
/// way): `\"`, `\'`, `\\`, `\n`, `\r`, `\t`, `\0` and `\u{HEX}`; `None` for any other escape.
/// (Unescaping only `\"` and `\\` made a name with a control character print differently
/// after a round trip.)
pub fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '"' => '"',
            '\'' => '\'',
            '\\' => '\\',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            '0' => '\0',
            'u' => {
                let body = chars.as_str().strip_prefix('{')?;
                let end = body.find('}')?;
                let c = u32::from_str_radix(&body[..end], 16).ok().and_then(char::from_u32)?;
                chars = body[end + 1..].chars();
                c
            }
            _ => return None,
        });
    }
    Some(out)
}
