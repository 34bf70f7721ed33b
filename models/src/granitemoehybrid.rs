//! GraniteMoeHybrid (Granite 4.0-H): Mamba2 mixers (`layer_types` "mamba"/"linear_attention")
//! and attention layers without positional encoding, Granite's multipliers (embeddings ×
//! `embedding_multiplier`, every residual branch × `residual_multiplier`, attention scale
//! `attention_multiplier`, logits ÷ `logits_scaling`), and an MLP made of a top-k MoE plus a
//! shared SwiGLU expert on the same normed input.
//!
//! ```text
//! x = embed(tokens) · m_emb
//! per layer:  x += m_res · mixer(rms(x))                      (mamba2 or attention, no RoPE)
//!             x += m_res · (moe(h) + shared_mlp(h)),  h = rms(x)
//! logits = lm_head(rms(x)) / logits_scaling
//! ```

use std::path::Path;

use llmc_ir::{NodeId, Op};
use serde::Deserialize;
use serde_json::Value;

use crate::bamba::{mamba_mixer, MambaFields};
use crate::builder::{AttnParams, Builder, GateUp};
use crate::config::{check_dims, check_heads, field_err, typed};
use crate::error::Result;
use crate::weights::WeightSpec;

fn default_max_pos() -> usize {
    4096
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// `config.json` of GraniteMoeHybrid, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct GraniteMoeHybridConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub layer_types: Vec<String>,
    #[serde(default = "crate::config::defaults::eps_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default = "one_f")]
    pub embedding_multiplier: f64,
    #[serde(default = "one_f")]
    pub residual_multiplier: f64,
    #[serde(default = "one_f")]
    pub attention_multiplier: f64,
    #[serde(default = "one_f")]
    pub logits_scaling: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub num_local_experts: usize,
    #[serde(default)]
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub shared_intermediate_size: usize,
    #[serde(flatten)]
    pub mamba: MambaFields,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
}

impl GraniteMoeHybridConfig {
    pub fn parse(path: &Path, v: &Value) -> Result<GraniteMoeHybridConfig> {
        let c: GraniteMoeHybridConfig = typed(path, v)?;
        check_dims(
            path,
            &[
                ("vocab_size", c.vocab_size),
                ("hidden_size", c.hidden_size),
                ("intermediate_size", c.intermediate_size),
                ("num_hidden_layers", c.num_hidden_layers),
                ("num_attention_heads", c.num_attention_heads),
            ],
        )?;
        c.mamba.check(path)?;
        if c.layer_types.len() != c.num_hidden_layers {
            return Err(field_err(path, "layer_types", "must have one entry per layer"));
        }
        if let Some(t) = c
            .layer_types
            .iter()
            .find(|t| !matches!(t.as_str(), "mamba" | "linear_attention" | "attention" | "full_attention"))
        {
            return Err(field_err(path, "layer_types", format!("unknown layer type `{t}`")));
        }
        if c.position_embedding_type.as_deref().is_some_and(|p| p != "nope") {
            return Err(field_err(path, "position_embedding_type", "only `nope` is supported"));
        }
        if c.num_local_experts > 0 && (c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_local_experts) {
            return Err(field_err(path, "num_experts_per_tok", "must be in 1..=num_local_experts"));
        }
        if c.intermediate_size % 8 != 0 || c.shared_intermediate_size % 8 != 0 {
            return Err(field_err(path, "intermediate_size", "must be a multiple of 8"));
        }
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        check_heads(path, c.hidden_size, c.num_attention_heads, kv)?;
        Ok(c)
    }

    /// `silu(x·Wgᵀ) · (x·Wuᵀ)` then `W_out`, with `W_in = [gate | up]` stored as one tensor.
    fn shared_mlp(&self, b: &mut Builder, x: NodeId, p: &str) -> Result<NodeId> {
        let (d, ff) = (self.hidden_size, self.shared_intermediate_size);
        let gate_up = format!("{p}.input_linear");
        b.swiglu_mlp(x, GateUp::Fused(&gate_up), &format!("{p}.output_linear"), d, ff, false)
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let d = self.hidden_size;
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads.unwrap_or(self.num_attention_heads));
        let hd = d / h;
        let eps = self.rms_norm_eps as f32;
        let m_res = self.residual_multiplier as f32;
        let m = self.mamba.dims(eps);
        let mut b = Builder::new("granitemoehybrid");
        let embed = b.weight("model.embed_tokens.weight", &[self.vocab_size, d]);
        let tokens = b.tokens;
        let x0 = b.op(Op::Embedding, &[embed, tokens])?;
        let mut x = b.op(Op::Scale { factor: self.embedding_multiplier as f32 }, &[x0])?;
        for (i, kind) in self.layer_types.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let hn = b.rms_norm(x, &format!("{p}.input_layernorm"), d, eps)?;
            let mixed = if matches!(kind.as_str(), "attention" | "full_attention") {
                let attn = AttnParams {
                    heads: h,
                    kv_heads: kv,
                    head_dim: hd,
                    window: None,
                    scale: self.attention_multiplier as f32,
                    rope: None,
                };
                b.self_attention(hn, &format!("{p}.self_attn"), i, d, attn, false, false)?
            } else {
                mamba_mixer(&mut b, hn, &format!("{p}.mamba"), i, d, &m, self.mamba.mamba_proj_bias)?
            };
            let mixed = b.op(Op::Scale { factor: m_res }, &[mixed])?;
            x = b.op(Op::Add, &[x, mixed])?;
            let hn = b.rms_norm(x, &format!("{p}.post_attention_layernorm"), d, eps)?;
            let mut mlp = self.shared_mlp(&mut b, hn, &format!("{p}.shared_mlp"))?;
            if self.num_local_experts > 0 {
                let (e, ff) = (self.num_local_experts, self.intermediate_size);
                let q = format!("{p}.block_sparse_moe");
                let router = b.weight(&format!("{q}.router.layer.weight"), &[e, d]);
                let w_in = b.weight(&format!("{q}.input_linear.weight"), &[e, 2 * ff, d]);
                let gu = b.op(Op::InterleaveHalves8, &[w_in])?;
                let down = b.weight(&format!("{q}.output_linear.weight"), &[e, d, ff]);
                let moe = b.op(Op::Moe { experts: e, top_k: self.num_experts_per_tok }, &[hn, router, gu, down])?;
                mlp = b.op(Op::Add, &[moe, mlp])?;
            }
            let mlp = b.op(Op::Scale { factor: m_res }, &[mlp])?;
            x = b.op(Op::Add, &[x, mlp])?;
        }
        let last = b.last_row(x)?;
        let xn = b.rms_norm(last, "model.norm", d, eps)?;
        let head = if self.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let w = b.weight(head, &[self.vocab_size, d]);
        let logits = b.op(Op::MatMul, &[xn, w])?;
        let logits = b.op(Op::Scale { factor: (1.0 / self.logits_scaling) as f32 }, &[logits])?;
        b.g.output("logits", logits);
        b.finish()
    }
}
