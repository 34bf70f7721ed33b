//! Falcon: fused `query_key_value`, RoPE, LayerNorm, exact-GELU MLP, MQA/GQA, and parallel
//! attention + MLP blocks. Two layouts:
//! - Falcon-7B (`new_decoder_architecture: false`): `multi_query` (one kv head) and
//!   `parallel_attn` with ONE `input_layernorm` feeding both branches; QKV rows are
//!   `[q heads | k | v]` (or per-head `[q,k,v]` triples without `multi_query`).
//! - Falcon-40B/180B (`new_decoder_architecture: true`): `num_kv_heads` groups, QKV rows grouped
//!   per kv head as `[q × (heads/kv) | k | v]`, separate `ln_attn`/`ln_mlp`.
//!
//! Grouped QKV rows are permuted at load time to `[all q | all k | all v]`, so the graph splits
//! one fused projection the same way for every layout.
//!
//! ```text
//! parallel:    x = x + dense(attn(qkv(ln_a(x)))) + mlp(ln_m(x))      (ln_a = ln_m for Falcon-7B)
//! sequential:  x = x + dense(attn(qkv(ln(x)))); x = x + mlp(post_attention_layernorm(x))
//! ```

use std::path::Path;

use llmc_ir::Op;
use serde::Deserialize;
use serde_json::Value;

use crate::builder::{AttnParams, Builder};
use crate::config::{check_dims, field_err, typed, RopeParams};
use crate::error::Result;
use crate::weights::{Transform, WeightSpec};

fn yes() -> bool {
    true
}
fn default_act() -> String {
    "gelu".into()
}

/// `config.json` of Falcon, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct FalconConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    #[serde(default)]
    pub multi_query: bool,
    #[serde(default)]
    pub new_decoder_architecture: bool,
    #[serde(default = "yes")]
    pub parallel_attn: bool,
    #[serde(default)]
    pub num_ln_in_parallel_attn: Option<usize>,
    #[serde(default)]
    pub bias: bool,
    #[serde(default)]
    pub alibi: bool,
    #[serde(default)]
    pub ffn_hidden_size: Option<usize>,
    #[serde(default = "default_act")]
    pub activation: String,
    #[serde(default = "crate::config::defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::config::defaults::max_pos_2048")]
    pub max_position_embeddings: usize,
    #[serde(skip)]
    pub rope: Option<RopeParams>,
}

impl FalconConfig {
    pub fn parse(path: &Path, v: &Value) -> Result<FalconConfig> {
        let mut c: FalconConfig = typed(path, v)?;
        c.rope = Some(RopeParams::from_config(path, v, 10000.0)?);
        check_dims(
            path,
            &[
                ("vocab_size", c.vocab_size),
                ("hidden_size", c.hidden_size),
                ("num_hidden_layers", c.num_hidden_layers),
                ("num_attention_heads", c.num_attention_heads),
                ("num_kv_heads", c.kv_heads()),
                ("ffn_hidden_size", c.ffn()),
                ("max_position_embeddings", c.max_position_embeddings),
            ],
        )?;
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(field_err(path, "num_attention_heads", "must divide hidden_size"));
        }
        if !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
            return Err(field_err(path, "num_kv_heads", "must divide num_attention_heads"));
        }
        if c.alibi {
            return Err(field_err(path, "alibi", "ALiBi Falcon models are not supported (rotary only)"));
        }
        if c.new_decoder_architecture && !c.parallel_attn && c.num_ln() == 1 {
            return Err(field_err(path, "parallel_attn", "sequential blocks need the old decoder architecture"));
        }
        c.act(path)?;
        Ok(c)
    }

    /// Kv heads: `num_kv_heads` for the new layout, 1 for multi-query, else one per head
    /// (`num_kv_heads` in config.json is ignored by transformers unless the new layout is used).
    pub fn kv_heads(&self) -> usize {
        if self.new_decoder_architecture {
            self.num_kv_heads.unwrap_or(self.num_attention_heads)
        } else if self.multi_query {
            1
        } else {
            self.num_attention_heads
        }
    }

    fn ffn(&self) -> usize {
        self.ffn_hidden_size.unwrap_or(4 * self.hidden_size)
    }

    fn num_ln(&self) -> usize {
        if self.new_decoder_architecture {
            self.num_ln_in_parallel_attn.unwrap_or(2)
        } else {
            1
        }
    }

    fn act(&self, path: &Path) -> Result<Op> {
        match self.activation.as_str() {
            "gelu" => Ok(Op::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Op::Gelu),
            other => Err(field_err(path, "activation", format!("`{other}` is not supported"))),
        }
    }

    /// Checkpoint row of each IR row of the fused QKV weight (IR: all q, all k, all v).
    fn qkv_permutation(&self) -> Option<Vec<usize>> {
        let (h, kv, hd) = (self.num_attention_heads, self.kv_heads(), self.hidden_size / self.num_attention_heads);
        if !self.new_decoder_architecture && self.multi_query {
            return None; // already [q | k | v]
        }
        let qpg = h / kv; // query heads per group
        let row = |g: usize, slot: usize, j: usize| (g * (qpg + 2) + slot) * hd + j;
        let mut perm = Vec::with_capacity((h + 2 * kv) * hd);
        for head in 0..h {
            perm.extend((0..hd).map(|j| row(head / qpg, head % qpg, j)));
        }
        for slot in [qpg, qpg + 1] {
            for g in 0..kv {
                perm.extend((0..hd).map(|j| row(g, slot, j)));
            }
        }
        Some(perm)
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let (d, h, kv) = (self.hidden_size, self.num_attention_heads, self.kv_heads());
        let hd = d / h;
        let eps = self.layer_norm_epsilon as f32;
        let rope = self.rope.unwrap_or(RopeParams {
            theta: 10000.0,
            scaling: llmc_ir::RopeScaling::None,
            partial_rotary_factor: 1.0,
        });
        let act = self.act(Path::new("config.json"))?;
        let mut b = Builder::new("falcon");
        let embed = b.weight("transformer.word_embeddings.weight", &[self.vocab_size, d]);
        let tokens = b.tokens;
        let mut x = b.op(Op::Embedding, &[embed, tokens])?;
        let perm = self.qkv_permutation();
        let qkv_rows = (h + 2 * kv) * hd;
        for i in 0..self.num_hidden_layers {
            let p = format!("transformer.h.{i}");
            let attn = AttnParams {
                heads: h,
                kv_heads: kv,
                head_dim: hd,
                window: None,
                scale: 1.0 / (hd as f32).sqrt(),
                rope: Some((rope.theta, rope.scaling, (hd as f32 * rope.partial_rotary_factor) as usize)),
            };
            let (ln_a, ln_m) = if self.num_ln() == 2 {
                (
                    b.layer_norm(x, &format!("{p}.ln_attn"), d, eps)?,
                    Some(b.layer_norm(x, &format!("{p}.ln_mlp"), d, eps)?),
                )
            } else {
                (b.layer_norm(x, &format!("{p}.input_layernorm"), d, eps)?, None)
            };
            // Fused QKV, rows permuted to [q | k | v] when the checkpoint groups them.
            let name = format!("{p}.self_attention.query_key_value");
            let t = perm.clone().map_or(Transform::None, Transform::PermuteRows);
            let wn = format!("{name}.weight");
            let w = b.weight_from(&wn, &[qkv_rows, d], &[&wn], t.clone());
            let mut args = vec![ln_a, w];
            if self.bias {
                let bn = format!("{name}.bias");
                args.push(b.weight_from(&bn, &[qkv_rows], &[&bn], t));
            }
            let qkv = b.op(Op::MatMul, &args)?;
            let (q, k, v) = b.split_qkv(qkv, &attn)?;
            let a = b.attention(i, q, k, v, attn)?;
            let attn_out = b.linear(a, &format!("{p}.self_attention.dense"), d, d, self.bias)?;
            let mlp_in = if self.parallel_attn || self.new_decoder_architecture {
                ln_m.unwrap_or(ln_a)
            } else {
                x = b.op(Op::Add, &[x, attn_out])?;
                b.layer_norm(x, &format!("{p}.post_attention_layernorm"), d, eps)?
            };
            let up = b.linear(mlp_in, &format!("{p}.mlp.dense_h_to_4h"), self.ffn(), d, self.bias)?;
            let up = b.op(act.clone(), &[up])?;
            let down = b.linear(up, &format!("{p}.mlp.dense_4h_to_h"), d, self.ffn(), self.bias)?;
            if self.parallel_attn || self.new_decoder_architecture {
                let both = b.op(Op::Add, &[down, attn_out])?;
                x = b.op(Op::Add, &[x, both])?;
            } else {
                x = b.op(Op::Add, &[x, down])?;
            }
        }
        let last = b.last_row(x)?;
        let x = b.layer_norm(last, "transformer.ln_f", d, eps)?;
        let head = if self.tie_word_embeddings { "transformer.word_embeddings.weight" } else { "lm_head.weight" };
        b.logits(x, head, self.vocab_size, d)?;
        b.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_qkv_rows_are_permuted_to_q_k_v() {
        let v = serde_json::json!({"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_kv_heads": 2, "new_decoder_architecture": true});
        let c = FalconConfig::parse(Path::new("config.json"), &v).unwrap();
        // head_dim 1; checkpoint rows per group: [q q k v] → [q0 q1 k0 v0 q2 q3 k1 v1]
        assert_eq!(c.qkv_permutation().unwrap(), vec![0, 1, 4, 5, 2, 6, 3, 7]);
        // Falcon-7B multi-query: already [q.. k v]
        let v = serde_json::json!({"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 4, "multi_query": true});
        assert!(FalconConfig::parse(Path::new("config.json"), &v).unwrap().qkv_permutation().is_none());
        // Old layout without multi_query: per-head [q k v] triples.
        let v = serde_json::json!({"vocab_size": 8, "hidden_size": 2, "num_hidden_layers": 1,
            "num_attention_heads": 2, "multi_query": false});
        assert_eq!(
            FalconConfig::parse(Path::new("config.json"), &v).unwrap().qkv_permutation().unwrap(),
            vec![0, 3, 1, 4, 2, 5]
        );
    }
}
