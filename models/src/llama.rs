//! The Llama family: `llama` (Llama 2/3, SmolLM), `mistral` (sliding window), `qwen2`
//! (QKV bias) and `mixtral` (Mistral with a mixture-of-experts MLP: a router picks the top-k of
//! `num_local_experts` SwiGLU experts per token). Pre-RMSNorm blocks, GQA attention with RoPE.
//!
//! ```text
//! x = embed(tokens)
//! per layer:  x += o_proj(attn(rope(q(h)), rope(k(h)), v(h)))   with h = rms_norm(x)
//!             x += down(silu(gate(h)) * up(h))                  with h = rms_norm(x)
//! logits = lm_head(rms_norm(x)[last])
//! ```

use std::path::Path;

use llmc_ir::Op;
use serde::Deserialize;
use serde_json::Value;

use crate::builder::{AttnParams, Builder, GateUp};
use crate::config::{check_dim, check_dims, field_err, typed, RopeParams};
use crate::error::Result;
use crate::weights::WeightSpec;

fn default_act() -> String {
    "silu".into()
}

/// `config.json` of the Llama family, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "crate::config::defaults::eps_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "crate::config::defaults::max_pos_2048")]
    pub max_position_embeddings: usize,
    /// Mixtral: experts per MoE layer and experts per token.
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(skip)]
    pub rope: Option<RopeParams>,
}

impl LlamaConfig {
    pub fn parse(path: &Path, v: &Value) -> Result<LlamaConfig> {
        let mut c: LlamaConfig = typed(path, v)?;
        c.rope = Some(RopeParams::from_config(path, v, 10000.0)?);
        check_dims(
            path,
            &[
                ("vocab_size", c.vocab_size),
                ("hidden_size", c.hidden_size),
                ("intermediate_size", c.intermediate_size),
                ("num_hidden_layers", c.num_hidden_layers),
                ("num_attention_heads", c.num_attention_heads),
                ("num_key_value_heads", c.kv_heads()),
                ("head_dim", c.head_dim()),
                ("max_position_embeddings", c.max_position_embeddings),
            ],
        )?;
        if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(field_err(
                path,
                "num_attention_heads",
                "does not divide hidden_size and head_dim is not given",
            ));
        }
        if !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
            return Err(field_err(path, "num_key_value_heads", "must divide num_attention_heads"));
        }
        if c.hidden_act != "silu" {
            return Err(field_err(path, "hidden_act", format!("`{}` is not supported (silu only)", c.hidden_act)));
        }
        if !(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0) {
            return Err(field_err(path, "rms_norm_eps", format!("{} is not a valid epsilon", c.rms_norm_eps)));
        }
        if let Some(types) = &c.layer_types {
            if types.len() != c.num_hidden_layers {
                return Err(field_err(path, "layer_types", "must have one entry per layer"));
            }
        }
        if c.sliding_window == Some(0) {
            return Err(field_err(path, "sliding_window", "must be positive"));
        }
        if c.model_type == "mixtral" {
            let e = c.num_local_experts.ok_or_else(|| field_err(path, "num_local_experts", "missing"))?;
            let k = c.num_experts_per_tok.ok_or_else(|| field_err(path, "num_experts_per_tok", "missing"))?;
            check_dim(path, "num_local_experts", e)?;
            // One weight node per expert and layer: bound the product too.
            if e * c.num_hidden_layers > 64 * crate::config::COUNT_LIMIT {
                return Err(field_err(
                    path,
                    "num_local_experts",
                    format!("{e} experts in each of {} layers is more than llmc supports", c.num_hidden_layers),
                ));
            }
            if k == 0 || k > e {
                return Err(field_err(path, "num_experts_per_tok", format!("{k} must be in 1..={e}")));
            }
            if !c.intermediate_size.is_multiple_of(8) {
                return Err(field_err(path, "intermediate_size", "must be a multiple of 8 for MoE experts"));
            }
        }
        let rd = c.rotary_dim();
        if rd == 0 || !rd.is_multiple_of(2) {
            return Err(field_err(path, "partial_rotary_factor", "gives an odd or empty rotary dimension"));
        }
        Ok(c)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn rope(&self) -> RopeParams {
        self.rope.unwrap_or(RopeParams {
            theta: 10000.0,
            scaling: llmc_ir::RopeScaling::None,
            partial_rotary_factor: 1.0,
        })
    }

    fn rotary_dim(&self) -> usize {
        (self.head_dim() as f32 * self.rope().partial_rotary_factor) as usize
    }

    /// The sliding window of layer `i`, if it has one.
    fn window(&self, i: usize) -> Option<usize> {
        if let Some(types) = &self.layer_types {
            return (types[i] == "sliding_attention").then_some(self.sliding_window).flatten();
        }
        match self.model_type.as_str() {
            "mistral" | "mixtral" => self.sliding_window,
            "qwen2" if self.use_sliding_window == Some(true) => {
                (i >= self.max_window_layers.unwrap_or(0)).then_some(self.sliding_window).flatten()
            }
            _ => None,
        }
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let (d, hd) = (self.hidden_size, self.head_dim());
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        let eps = self.rms_norm_eps as f32;
        let qkv_bias = self.attention_bias || self.model_type == "qwen2";
        let rope = self.rope();
        let mut b = Builder::new(&self.model_type);
        let embed = b.weight("model.embed_tokens.weight", &[self.vocab_size, d]);
        let tokens = b.tokens;
        let mut x = b.op(Op::Embedding, &[embed, tokens])?;
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = AttnParams {
                heads: h,
                kv_heads: kv,
                head_dim: hd,
                window: self.window(i),
                scale: 1.0 / (hd as f32).sqrt(),
                rope: Some((rope.theta, rope.scaling, self.rotary_dim())),
            };
            let hn = b.rms_norm(x, &format!("{p}.input_layernorm"), d, eps)?;
            let o = b.self_attention(hn, &format!("{p}.self_attn"), i, d, attn, qkv_bias, self.attention_bias)?;
            x = b.op(Op::Add, &[x, o])?;
            let hn = b.rms_norm(x, &format!("{p}.post_attention_layernorm"), d, eps)?;
            let ff = self.intermediate_size;
            if let (Some(experts), Some(top_k)) = (self.num_local_experts, self.num_experts_per_tok) {
                let moe = moe_mlp(&mut b, hn, &format!("{p}.block_sparse_moe"), experts, top_k, d, ff)?;
                x = b.op(Op::Add, &[x, moe])?;
                continue;
            }
            let (gate, up) = (format!("{p}.mlp.gate_proj"), format!("{p}.mlp.up_proj"));
            let gate_up = GateUp::Separate { gate: &gate, up: &up };
            let down = b.swiglu_mlp(hn, gate_up, &format!("{p}.mlp.down_proj"), d, ff, self.mlp_bias)?;
            x = b.op(Op::Add, &[x, down])?;
        }
        let last = b.last_row(x)?;
        let x = b.rms_norm(last, "model.norm", d, eps)?;
        let head = if self.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        b.logits(x, head, self.vocab_size, d)?;
        b.finish()
    }
}

/// Mixtral's sparse MoE block from per-expert checkpoint tensors (`experts.E.w1/w3/w2`, gate =
/// w1, up = w3, down = w2): stacked at compile time into one gate|up tensor (rows interleaved by
/// 8 per expert) and one down tensor.
pub fn moe_mlp(
    b: &mut Builder,
    x: llmc_ir::NodeId,
    p: &str,
    experts: usize,
    top_k: usize,
    d: usize,
    ff: usize,
) -> Result<llmc_ir::NodeId> {
    let router = b.weight(&format!("{p}.gate.weight"), &[experts, d]);
    let mut gu = Vec::new();
    let mut down = Vec::new();
    for e in 0..experts {
        let w1 = b.weight(&format!("{p}.experts.{e}.w1.weight"), &[ff, d]);
        let w3 = b.weight(&format!("{p}.experts.{e}.w3.weight"), &[ff, d]);
        gu.push(b.op(Op::InterleaveRows8, &[w1, w3])?);
        down.push(b.weight(&format!("{p}.experts.{e}.w2.weight"), &[d, ff]));
    }
    let gu = b.op(Op::Stack, &gu)?;
    let down = b.op(Op::Stack, &down)?;
    b.op(Op::Moe { experts, top_k }, &[x, router, gu, down])
}
