//! Bamba: a Mamba2 hybrid. Most layers are Mamba2 mixers (a recurrent state instead of a KV
//! cache); the layers in `attn_layer_indices` are GQA attention with partial RoPE. Every layer:
//! pre-RMSNorm mixer + residual, pre-RMSNorm SwiGLU MLP + residual.
//!
//! ```text
//! mamba layer:  x += out_proj(mamba2(in_proj(rms(x))))       (state: conv window + SSM)
//! attn layer:   x += o_proj(attn(rope(q), rope(k), v))        (rotary on the first half)
//! every layer:  x += down(silu(gate(h)) · up(h)),  h = rms(x)
//! ```

use std::path::Path;

use llmc_ir::{NodeId, Op};
use serde::Deserialize;
use serde_json::Value;

use crate::builder::{AttnParams, Builder, GateUp};
use crate::config::{check_dims, check_heads, field_err, typed, RopeParams};
use crate::error::Result;
use crate::weights::WeightSpec;

pub(crate) fn default_chunk() -> usize {
    256
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}

/// The `mamba_*` fields both hybrid families share (HF names).
#[derive(Clone, Debug, Deserialize)]
pub struct MambaFields {
    pub mamba_n_heads: usize,
    pub mamba_d_head: usize,
    pub mamba_d_state: usize,
    #[serde(default = "one")]
    pub mamba_n_groups: usize,
    #[serde(default = "four")]
    pub mamba_d_conv: usize,
    #[serde(default = "default_chunk")]
    pub mamba_chunk_size: usize,
    #[serde(default)]
    pub mamba_conv_bias: Option<bool>,
    #[serde(default)]
    pub mamba_proj_bias: bool,
}

impl MambaFields {
    pub fn check(&self, path: &Path) -> Result<()> {
        check_dims(
            path,
            &[
                ("mamba_n_heads", self.mamba_n_heads),
                ("mamba_d_head", self.mamba_d_head),
                ("mamba_d_state", self.mamba_d_state),
                ("mamba_n_groups", self.mamba_n_groups),
                ("mamba_d_conv", self.mamba_d_conv),
                ("mamba_chunk_size", self.mamba_chunk_size),
            ],
        )?;
        if !self.mamba_n_heads.is_multiple_of(self.mamba_n_groups) {
            return Err(field_err(path, "mamba_n_groups", "must divide mamba_n_heads"));
        }
        if self.mamba_conv_bias == Some(false) {
            return Err(field_err(path, "mamba_conv_bias", "conv without bias is not supported"));
        }
        Ok(())
    }

    pub fn dims(&self, eps: f32) -> MambaDims {
        MambaDims {
            chunk: self.mamba_chunk_size,
            heads: self.mamba_n_heads,
            head_dim: self.mamba_d_head,
            d_state: self.mamba_d_state,
            groups: self.mamba_n_groups,
            d_conv: self.mamba_d_conv,
            eps,
        }
    }
}

/// `config.json` of Bamba, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct BambaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub attn_layer_indices: Vec<usize>,
    #[serde(default = "crate::config::defaults::eps_1e5")]
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub mamba: MambaFields,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::config::defaults::max_pos_2048")]
    pub max_position_embeddings: usize,
    #[serde(skip)]
    pub rope: Option<RopeParams>,
}

/// The Mamba2 mixer shared by the hybrid families: `in_proj`, the mixer op, `out_proj`.
pub struct MambaDims {
    /// `mamba_chunk_size`: tokens per chunk of the chunked scan.
    pub chunk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub d_state: usize,
    pub groups: usize,
    pub d_conv: usize,
    pub eps: f32,
}

pub fn mamba_mixer(
    b: &mut Builder,
    x: NodeId,
    p: &str,
    layer: usize,
    d: usize,
    m: &MambaDims,
    proj_bias: bool,
) -> Result<NodeId> {
    let inner = m.heads * m.head_dim;
    let channels = inner + 2 * m.groups * m.d_state;
    let zxbcdt = b.linear(x, &format!("{p}.in_proj"), inner + channels + m.heads, d, proj_bias)?;
    let conv_w = b.weight(&format!("{p}.conv1d.weight"), &[channels, 1, m.d_conv]);
    let conv_b = b.weight(&format!("{p}.conv1d.bias"), &[channels]);
    let dt_bias = b.weight(&format!("{p}.dt_bias"), &[m.heads]);
    let a_log = b.weight(&format!("{p}.A_log"), &[m.heads]);
    let dd = b.weight(&format!("{p}.D"), &[m.heads]);
    let norm = b.weight(&format!("{p}.norm.weight"), &[inner]);
    let op = Op::Mamba2 {
        layer,
        heads: m.heads,
        head_dim: m.head_dim,
        d_state: m.d_state,
        groups: m.groups,
        d_conv: m.d_conv,
        chunk: m.chunk,
        eps: m.eps,
    };
    let seqs = b.seqs;
    let y = b.op(op, &[zxbcdt, conv_w, conv_b, dt_bias, a_log, dd, norm, seqs])?;
    b.linear(y, &format!("{p}.out_proj"), d, inner, proj_bias)
}

impl BambaConfig {
    pub fn parse(path: &Path, v: &Value) -> Result<BambaConfig> {
        let mut c: BambaConfig = typed(path, v)?;
        let mut rope = RopeParams::from_config(path, v, 10000.0)?;
        // BambaConfig hard-codes partial_rotary_factor 0.5 when the file does not say.
        if v.get("rope_parameters").and_then(|r| r.get("partial_rotary_factor")).is_none()
            && v.get("partial_rotary_factor").is_none()
        {
            rope.partial_rotary_factor = 0.5;
        }
        c.rope = Some(rope);
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
        if c.attn_layer_indices.iter().any(|&i| i >= c.num_hidden_layers) {
            return Err(field_err(path, "attn_layer_indices", "refers to a layer past num_hidden_layers"));
        }
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        check_heads(path, c.hidden_size, c.num_attention_heads, kv)?;
        Ok(c)
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let d = self.hidden_size;
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads.unwrap_or(self.num_attention_heads));
        let hd = d / h;
        let eps = self.rms_norm_eps as f32;
        let rope = self.rope.unwrap_or(RopeParams {
            theta: 10000.0,
            scaling: llmc_ir::RopeScaling::None,
            partial_rotary_factor: 0.5,
        });
        let m = self.mamba.dims(eps);
        let mut b = Builder::new("bamba");
        let embed = b.weight("model.embed_tokens.weight", &[self.vocab_size, d]);
        let tokens = b.tokens;
        let mut x = b.op(Op::Embedding, &[embed, tokens])?;
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let hn = b.rms_norm(x, &format!("{p}.input_layernorm"), d, eps)?;
            let mixed = if self.attn_layer_indices.contains(&i) {
                let rd = ((hd as f32 * rope.partial_rotary_factor) as usize) & !1;
                let attn = AttnParams {
                    heads: h,
                    kv_heads: kv,
                    head_dim: hd,
                    window: None,
                    scale: 1.0 / (hd as f32).sqrt(),
                    rope: Some((rope.theta, rope.scaling, rd)),
                };
                b.self_attention(hn, &format!("{p}.self_attn"), i, d, attn, false, false)?
            } else {
                mamba_mixer(&mut b, hn, &format!("{p}.mamba"), i, d, &m, self.mamba.mamba_proj_bias)?
            };
            x = b.op(Op::Add, &[x, mixed])?;
            let hn = b.rms_norm(x, &format!("{p}.pre_ff_layernorm"), d, eps)?;
            let ff = self.intermediate_size;
            let (gate, up) = (format!("{p}.feed_forward.gate_proj"), format!("{p}.feed_forward.up_proj"));
            let gate_up = GateUp::Separate { gate: &gate, up: &up };
            let down = b.swiglu_mlp(hn, gate_up, &format!("{p}.feed_forward.down_proj"), d, ff, false)?;
            x = b.op(Op::Add, &[x, down])?;
        }
        let last = b.last_row(x)?;
        let x = b.rms_norm(last, "model.final_layernorm", d, eps)?;
        let head = if self.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        b.logits(x, head, self.vocab_size, d)?;
        b.finish()
    }
}
