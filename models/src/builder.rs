//! Shared building blocks for the family files: a graph under construction plus the weight
//! specs it reads. Family files describe only what differs between architectures.

use std::collections::HashMap;

use llmc_ir::{Graph, InputKind, NodeId, Op, RopeScaling};

use crate::error::{ModelError, Result};
use crate::weights::{Transform, WeightSpec};

pub struct Builder {
    pub g: Graph,
    pub tokens: NodeId,
    pub positions: NodeId,
    /// Each row's sequence: the last operand of every stateful op and of `take_last`.
    pub seqs: NodeId,
    pub specs: Vec<WeightSpec>,
    /// Weight nodes by name (a weight read twice is one node), so a lookup does not scan the
    /// graph: building stays linear in the number of layers and experts.
    weights: HashMap<String, NodeId>,
}

/// Where a SwiGLU MLP's gate and up projections come from.
#[derive(Clone, Copy, Debug)]
pub enum GateUp<'a> {
    /// Two checkpoint tensors, `{gate}.weight` and `{up}.weight` (Llama, Bamba).
    Separate { gate: &'a str, up: &'a str },
    /// One tensor `{0}.weight` holding the gate rows then the up rows (Granite's
    /// `input_linear`): read as two weights, so the graph is the same as for `Separate`.
    Fused(&'a str),
}

/// The most nodes a model's step graph may have. The largest released models need well under
/// 2^17 (a few hundred experts in each of ~100 layers); a config asking for more (e.g. 2^24
/// layers, which passes the per-field checks) is refused instead of exhausting memory.
pub const MAX_NODES: usize = 1 << 20;

/// Attention hyper-parameters of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    pub scale: f32,
    /// `None` for models without rotary embeddings.
    pub rope: Option<(f32, RopeScaling, usize)>,
}

impl Builder {
    pub fn new(name: &str) -> Builder {
        let mut g = Graph::new(name);
        let tokens = g.input(InputKind::Tokens);
        let positions = g.input(InputKind::Positions);
        let seqs = g.input(InputKind::Seqs);
        Builder { g, tokens, positions, seqs, specs: Vec::new(), weights: HashMap::new() }
    }

    /// A weight read from the checkpoint tensor of the same name.
    pub fn weight(&mut self, name: &str, dims: &[usize]) -> NodeId {
        self.weight_from(name, dims, &[name], Transform::None)
    }

    /// A weight with explicit checkpoint names and layout transform.
    pub fn weight_from(&mut self, name: &str, dims: &[usize], candidates: &[&str], transform: Transform) -> NodeId {
        // A weight read twice (tied embeddings) is one node, with one spec.
        if let Some(&id) = self.weights.get(name) {
            return id;
        }
        self.specs.push(WeightSpec {
            name: name.to_string(),
            shape: dims.to_vec(),
            dtype: llmc_ir::DType::F32,
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            transform,
        });
        let id = self.g.weight(name, dims);
        self.weights.insert(name.to_string(), id);
        id
    }

    /// A raw-byte weight (BitNet's packed ternary matrix), read as stored.
    pub fn weight_u8(&mut self, name: &str, dims: &[usize]) -> NodeId {
        self.specs.push(WeightSpec {
            name: name.to_string(),
            shape: dims.to_vec(),
            dtype: llmc_ir::DType::U8,
            candidates: vec![name.to_string()],
            transform: Transform::None,
        });
        let id = self.g.weight_typed(name, llmc_ir::DType::U8, dims);
        self.weights.entry(name.to_string()).or_insert(id);
        id
    }

    /// A SwiGLU MLP, `down(silu(gate(x)) · up(x))`, `d → ff → d`, in the unfused form the
    /// `fuse_swiglu` pass recognizes (for every family, whatever the checkpoint layout).
    pub fn swiglu_mlp(
        &mut self,
        x: NodeId,
        gate_up: GateUp<'_>,
        down: &str,
        d: usize,
        ff: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let (gate, up) = match gate_up {
            GateUp::Separate { gate, up } => (self.linear(x, gate, ff, d, bias)?, self.linear(x, up, ff, d, bias)?),
            GateUp::Fused(prefix) => {
                let src = format!("{prefix}.weight");
                let mut half = |part: &str, start: usize| -> Result<NodeId> {
                    let name = format!("{src}#{part}");
                    let w =
                        self.weight_from(&name, &[ff, d], &[&src], Transform::RowRange { start, stored_rows: 2 * ff });
                    self.op(Op::MatMul, &[x, w])
                };
                (half("gate", 0)?, half("up", ff)?)
            }
        };
        let act = self.op(Op::Silu, &[gate])?;
        let prod = self.op(Op::Mul, &[act, up])?;
        self.linear(prod, down, d, ff, bias)
    }

    /// Adds an op node; refuses to grow the graph past [`MAX_NODES`] (every family adds ops
    /// in each layer and expert loop, so this bounds the whole graph).
    pub fn op(&mut self, op: Op, args: &[NodeId]) -> Result<NodeId> {
        if self.g.node_count() >= MAX_NODES {
            return Err(ModelError::GraphTooLarge { limit: MAX_NODES });
        }
        Ok(self.g.add(op, args)?)
    }

    /// `x · Wᵀ (+ b)` with `W` named `{prefix}.weight` of shape `[out, in]`.
    pub fn linear(&mut self, x: NodeId, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<NodeId> {
        let w = self.weight(&format!("{prefix}.weight"), &[out, inp]);
        let mut args = vec![x, w];
        if bias {
            args.push(self.weight(&format!("{prefix}.bias"), &[out]));
        }
        self.op(Op::MatMul, &args)
    }

    pub fn rms_norm(&mut self, x: NodeId, name: &str, d: usize, eps: f32) -> Result<NodeId> {
        let w = self.weight(&format!("{name}.weight"), &[d]);
        self.op(Op::RmsNorm { eps }, &[x, w])
    }

    pub fn layer_norm(&mut self, x: NodeId, name: &str, d: usize, eps: f32) -> Result<NodeId> {
        let w = self.weight(&format!("{name}.weight"), &[d]);
        let b = self.weight(&format!("{name}.bias"), &[d]);
        self.op(Op::LayerNorm { eps }, &[x, w, b])
    }

    /// RoPE on q and k (if the model has it), then attention over the cache of `layer`.
    pub fn attention(&mut self, layer: usize, q: NodeId, k: NodeId, v: NodeId, p: AttnParams) -> Result<NodeId> {
        let (q, k) = match p.rope {
            Some((theta, scaling, rotary_dim)) => {
                let rope = |heads| Op::Rope { heads, head_dim: p.head_dim, rotary_dim, theta, scaling };
                let pos = self.positions;
                (self.op(rope(p.heads), &[q, pos])?, self.op(rope(p.kv_heads), &[k, pos])?)
            }
            None => (q, k),
        };
        let (pos, seqs) = (self.positions, self.seqs);
        self.op(
            Op::Attention {
                layer,
                heads: p.heads,
                kv_heads: p.kv_heads,
                head_dim: p.head_dim,
                window: p.window,
                scale: p.scale,
            },
            &[q, k, v, pos, seqs],
        )
    }

    /// HF's `{prefix}.{q,k,v,o}_proj` around attention over the cache of `layer`:
    /// `o_proj(attention(q_proj(x), k_proj(x), v_proj(x)))`.
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention(
        &mut self,
        x: NodeId,
        prefix: &str,
        layer: usize,
        d: usize,
        p: AttnParams,
        qkv_bias: bool,
        o_bias: bool,
    ) -> Result<NodeId> {
        let (qw, kw) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
        let q = self.linear(x, &format!("{prefix}.q_proj"), qw, d, qkv_bias)?;
        let k = self.linear(x, &format!("{prefix}.k_proj"), kw, d, qkv_bias)?;
        let v = self.linear(x, &format!("{prefix}.v_proj"), kw, d, qkv_bias)?;
        let a = self.attention(layer, q, k, v, p)?;
        self.linear(a, &format!("{prefix}.o_proj"), d, qw, o_bias)
    }

    /// Splits a fused `[n, (h + 2·kv)·hd]` projection into q, k, v.
    pub fn split_qkv(&mut self, qkv: NodeId, p: &AttnParams) -> Result<(NodeId, NodeId, NodeId)> {
        let (qw, kw) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
        let q = self.op(Op::Slice { start: 0, len: qw }, &[qkv])?;
        let k = self.op(Op::Slice { start: qw, len: kw }, &[qkv])?;
        let v = self.op(Op::Slice { start: qw + kw, len: kw }, &[qkv])?;
        Ok((q, k, v))
    }

    /// The last row of each sequence's rows in the residual stream: only they need logits.
    pub fn last_row(&mut self, x: NodeId) -> Result<NodeId> {
        let seqs = self.seqs;
        self.op(Op::TakeLast, &[x, seqs])
    }

    /// Final projection of the (normed) last row to the vocabulary; the graph's output.
    pub fn logits(&mut self, x: NodeId, lm_head: &str, vocab: usize, d: usize) -> Result<()> {
        let w = self.weight(lm_head, &[vocab, d]);
        let logits = self.op(Op::MatMul, &[x, w])?;
        self.g.output("logits", logits);
        Ok(())
    }

    pub fn finish(self) -> Result<(Graph, Vec<WeightSpec>)> {
        self.g.verify()?;
        Ok((self.g, self.specs))
    }
}
