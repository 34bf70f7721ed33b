//! The operations of the IR, their attributes, and their typing rules.
//!
//! Every activation is a row-major matrix `[n, d]` (one row per token of the step) unless noted.
//! Weights are `[out, in]` like `torch.nn.Linear`. Token ids and positions are `i32[n]`.

use crate::types::{DType, Dim, Shape, Type};

/// Which step input an `input` node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Token ids of the step: `i32[n]`.
    Tokens,
    /// Absolute position of each token in its sequence: `i32[n]`.
    Positions,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Tokens => "tokens",
            InputKind::Positions => "positions",
        }
    }
}

/// Frequency scaling of rotary embeddings (HF `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// Plain `theta^(-2i/d)` frequencies.
    None,
    /// `rope_type: linear`: positions divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type: llama3`: wavelength-dependent frequency scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
}

impl RopeScaling {
    fn print(&self) -> String {
        match self {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear:{factor:?}"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                format!("llama3:{factor:?}:{low_freq_factor:?}:{high_freq_factor:?}:{original_max_position}")
            }
        }
    }

    fn parse(s: &str) -> Option<RopeScaling> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["none"] => Some(RopeScaling::None),
            ["linear", f] => Some(RopeScaling::Linear {
                factor: f.parse().ok()?,
            }),
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
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position,
                    } => {
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

    /// Factor positions are divided by before the angle is taken.
    pub fn position_divisor(&self) -> f32 {
        match *self {
            RopeScaling::Linear { factor } => factor,
            _ => 1.0,
        }
    }
}

/// One IR operation. Operand order is fixed per op and documented on each variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A step input (`tokens` or `positions`), `i32[n]`.
    Input(InputKind),
    /// A named weight tensor, supplied at run time; never copied into the IR.
    Weight { name: String },
    /// `(table [vocab, d], ids i32[n]) -> [n, d]`: row gather.
    Embedding,
    /// `(x [n, k], w [m, k], bias? [m]) -> [n, m]`: `x · wᵀ (+ bias)`.
    MatMul,
    /// `(x [n, d], w [d]) -> [n, d]`: `x / sqrt(mean(x²) + eps) * w`.
    RmsNorm { eps: f32 },
    /// `(x [n, d], w [d], b [d]) -> [n, d]`: `(x - mean) / sqrt(var + eps) * w + b`.
    LayerNorm { eps: f32 },
    /// `(x [n, heads*head_dim], positions) -> same`: rotate-half (NeoX) rotary embedding on the
    /// first `rotary_dim` dims of each head.
    Rope {
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
        scaling: RopeScaling,
    },
    /// `(q [n, heads*hd], k [n, kv_heads*hd], v [n, kv_heads*hd], positions) -> [n, heads*hd]`.
    /// Appends k and v of every token to the KV cache of `layer` at its position, then each query
    /// attends causally over the cached positions `p` with `pos - window < p <= pos`.
    Attention {
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        scale: f32,
    },
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
    /// `[n, d] -> [1, d]`: the last row (the logits that sampling needs).
    TakeLast,
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
        }
    }

    /// Attributes as `(key, value)` pairs, in print order.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        match self {
            Op::Input(k) => vec![("kind", k.name().to_string())],
            Op::Weight { name } => vec![("name", format!("{name:?}"))],
            Op::RmsNorm { eps } | Op::LayerNorm { eps } => vec![("eps", format!("{eps:?}"))],
            Op::Rope {
                heads,
                head_dim,
                rotary_dim,
                theta,
                scaling,
            } => vec![
                ("heads", heads.to_string()),
                ("head_dim", head_dim.to_string()),
                ("rotary_dim", rotary_dim.to_string()),
                ("theta", format!("{theta:?}")),
                ("scaling", scaling.print()),
            ],
            Op::Attention {
                layer,
                heads,
                kv_heads,
                head_dim,
                window,
                scale,
            } => vec![
                ("layer", layer.to_string()),
                ("heads", heads.to_string()),
                ("kv_heads", kv_heads.to_string()),
                ("head_dim", head_dim.to_string()),
                (
                    "window",
                    window.map_or("none".to_string(), |w| w.to_string()),
                ),
                ("scale", format!("{scale:?}")),
            ],
            Op::Scale { factor } => vec![("factor", format!("{factor:?}"))],
            Op::Slice { start, len } => {
                vec![("start", start.to_string()), ("len", len.to_string())]
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
            | Op::TakeLast => vec![],
        }
    }

    /// Rebuilds an op from its name and attributes (the inverse of `name` + `attrs`).
    pub fn from_parts(name: &str, attrs: &Attrs) -> Result<Op, String> {
        let op = match name {
            "input" => Op::Input(match attrs.str("kind")? {
                "tokens" => InputKind::Tokens,
                "positions" => InputKind::Positions,
                other => return Err(format!("unknown input kind `{other}`")),
            }),
            "weight" => Op::Weight {
                name: attrs.quoted("name")?,
            },
            "embedding" => Op::Embedding,
            "matmul" => Op::MatMul,
            "rms_norm" => Op::RmsNorm {
                eps: attrs.num("eps")?,
            },
            "layer_norm" => Op::LayerNorm {
                eps: attrs.num("eps")?,
            },
            "rope" => Op::Rope {
                heads: attrs.num("heads")?,
                head_dim: attrs.num("head_dim")?,
                rotary_dim: attrs.num("rotary_dim")?,
                theta: attrs.num("theta")?,
                scaling: RopeScaling::parse(attrs.str("scaling")?).ok_or_else(|| {
                    format!("bad rope scaling `{}`", attrs.str("scaling").unwrap_or(""))
                })?,
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
            "scale" => Op::Scale {
                factor: attrs.num("factor")?,
            },
            "slice" => Op::Slice {
                start: attrs.num("start")?,
                len: attrs.num("len")?,
            },
            "concat" => Op::Concat,
            "take_last" => Op::TakeLast,
            other => return Err(format!("unknown op `{other}`")),
        };
        Ok(op)
    }

    /// The result type of this op applied to operands of the given types.
    pub fn infer(&self, ins: &[&Type]) -> Result<Type, String> {
        let arity = |lo: usize, hi: usize| -> Result<(), String> {
            if ins.len() < lo || ins.len() > hi {
                Err(format!(
                    "{} takes {lo}..={hi} operands, got {}",
                    self.name(),
                    ins.len()
                ))
            } else {
                Ok(())
            }
        };
        let rows = |t: &Type, what: &str| -> Result<usize, String> {
            match t.shape.0.as_slice() {
                [_, Dim::C(d)] if t.dtype == DType::F32 => Ok(*d),
                _ => Err(format!("{what} must be f32[rows, d], got {t}")),
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
        let same_rows =
            |cols: usize| Type::new(DType::F32, Shape(vec![ins[0].shape.0[0], Dim::C(cols)]));
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
                    _ => {
                        return Err(format!(
                            "embedding table must be [vocab, d], got {}",
                            ins[0]
                        ))
                    }
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
                    return Err(format!(
                        "matmul input has {k} columns but weight {} expects {kw}",
                        ins[1]
                    ));
                }
                if let Some(b) = ins.get(2) {
                    vector(b, m, "matmul bias")?;
                }
                Ok(same_rows(m))
            }
            Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
                arity(
                    if matches!(self, Op::RmsNorm { .. }) {
                        2
                    } else {
                        3
                    },
                    if matches!(self, Op::RmsNorm { .. }) {
                        2
                    } else {
                        3
                    },
                )?;
                let d = rows(ins[0], "norm input")?;
                for w in &ins[1..] {
                    vector(w, d, "norm weight/bias")?;
                }
                Ok(ins[0].clone())
            }
            Op::Rope {
                heads,
                head_dim,
                rotary_dim,
                ..
            } => {
                arity(2, 2)?;
                let d = rows(ins[0], "rope input")?;
                if d != heads * head_dim {
                    return Err(format!(
                        "rope input has {d} columns, expected heads*head_dim = {}",
                        heads * head_dim
                    ));
                }
                if *rotary_dim > *head_dim || rotary_dim % 2 != 0 {
                    return Err(format!(
                        "rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}"
                    ));
                }
                ids(ins[1], "rope positions")?;
                Ok(ins[0].clone())
            }
            Op::Attention {
                heads,
                kv_heads,
                head_dim,
                window,
                ..
            } => {
                arity(4, 4)?;
                if *kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(format!(
                        "heads {heads} must be a multiple of kv_heads {kv_heads}"
                    ));
                }
                if *window == Some(0) {
                    return Err("attention window must be positive".into());
                }
                let q = rows(ins[0], "attention q")?;
                let k = rows(ins[1], "attention k")?;
                let v = rows(ins[2], "attention v")?;
                if q != heads * head_dim || k != kv_heads * head_dim || v != k {
                    return Err(format!(
                        "attention q/k/v widths {q}/{k}/{v} do not match heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}"
                    ));
                }
                ids(ins[3], "attention positions")?;
                Ok(ins[0].clone())
            }
            Op::Softmax | Op::Silu | Op::Gelu | Op::GeluErf | Op::Scale { .. } => {
                arity(1, 1)?;
                rows(ins[0], self.name())?;
                Ok(ins[0].clone())
            }
            Op::Add | Op::Mul => {
                arity(2, 2)?;
                rows(ins[0], self.name())?;
                if ins[0] != ins[1] {
                    return Err(format!(
                        "{} operands differ: {} vs {}",
                        self.name(),
                        ins[0],
                        ins[1]
                    ));
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
                        return Err(format!(
                            "concat operands have different rows: {} vs {}",
                            ins[0], t
                        ));
                    }
                }
                Ok(same_rows(total))
            }
            Op::TakeLast => {
                arity(1, 1)?;
                let d = rows(ins[0], "take_last input")?;
                Ok(Type::new(DType::F32, Shape::constant(&[1, d])))
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
        s.parse()
            .map_err(|_| format!("attribute `{key}` has bad value `{s}`"))
    }
    pub fn quoted(&self, key: &str) -> Result<String, String> {
        let s = self.str(key)?;
        s.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .map(|s| s.replace("\\\"", "\"").replace("\\\\", "\\"))
            .ok_or_else(|| format!("attribute `{key}` must be a quoted string, got `{s}`"))
    }
}
