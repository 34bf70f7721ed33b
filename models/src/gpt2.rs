//! GPT-2: learned absolute positions, pre-LayerNorm blocks, fused `c_attn` (Q|K|V), GELU MLP,
//! Conv1D weights stored `[in, out]` (transposed here), lm_head tied to `wte`.
//!
//! ```text
//! x = wte(tokens) + wpe(positions)
//! per layer:  x += c_proj(attn(split(c_attn(ln_1(x)))))
//!             x += mlp.c_proj(gelu(c_fc(ln_2(x))))
//! logits = wteᵀ · ln_f(x)[last]
//! ```

use std::path::Path;

use llmc_ir::Op;
use serde::Deserialize;
use serde_json::Value;

use crate::builder::{AttnParams, Builder};
use crate::config::{check_dims, field_err, typed};
use crate::error::Result;
use crate::weights::{Transform, WeightSpec};

fn yes() -> bool {
    true
}
fn default_act() -> String {
    "gelu_new".into()
}

/// `config.json` of GPT-2, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "crate::config::defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

impl Gpt2Config {
    pub fn parse(path: &Path, v: &Value) -> Result<Gpt2Config> {
        let c: Gpt2Config = typed(path, v)?;
        check_dims(
            path,
            &[
                ("vocab_size", c.vocab_size),
                ("n_embd", c.n_embd),
                ("n_head", c.n_head),
                ("n_layer", c.n_layer),
                ("n_positions", c.n_positions),
                ("n_inner", c.inner()),
            ],
        )?;
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(field_err(path, "n_head", "must divide n_embd"));
        }
        c.activation(path)?;
        Ok(c)
    }

    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    fn activation(&self, path: &Path) -> Result<Op> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Op::Gelu),
            "gelu" => Ok(Op::GeluErf),
            other => Err(field_err(path, "activation_function", format!("`{other}` is not supported"))),
        }
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let (d, h) = (self.n_embd, self.n_head);
        let hd = d / h;
        let eps = self.layer_norm_epsilon as f32;
        let act = self.activation(Path::new("config.json"))?;
        let mut b = Builder::new("gpt2");
        // Checkpoints saved from GPT2LMHeadModel prefix names with `transformer.`; the original
        // hub checkpoints do not.
        let w = |b: &mut Builder, name: &str, dims: &[usize], t: Transform| {
            let full = format!("transformer.{name}");
            b.weight_from(&full, dims, &[&full, name], t)
        };
        let linear = |b: &mut Builder, x, name: &str, out: usize, inp: usize| -> Result<_> {
            let wt = w(b, &format!("{name}.weight"), &[out, inp], Transform::Transpose);
            let bias = w(b, &format!("{name}.bias"), &[out], Transform::None);
            b.op(Op::MatMul, &[x, wt, bias])
        };
        let norm = |b: &mut Builder, x, name: &str| -> Result<_> {
            let wt = w(b, &format!("{name}.weight"), &[d], Transform::None);
            let bias = w(b, &format!("{name}.bias"), &[d], Transform::None);
            b.op(Op::LayerNorm { eps }, &[x, wt, bias])
        };
        let wte = w(&mut b, "wte.weight", &[self.vocab_size, d], Transform::None);
        let wpe = w(&mut b, "wpe.weight", &[self.n_positions, d], Transform::None);
        let (tokens, positions) = (b.tokens, b.positions);
        let te = b.op(Op::Embedding, &[wte, tokens])?;
        let pe = b.op(Op::Embedding, &[wpe, positions])?;
        let mut x = b.op(Op::Add, &[te, pe])?;
        for i in 0..self.n_layer {
            let mut scale = if self.scale_attn_weights { 1.0 / (hd as f32).sqrt() } else { 1.0 };
            if self.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f32;
            }
            let attn = AttnParams { heads: h, kv_heads: h, head_dim: hd, window: None, scale, rope: None };
            let hn = norm(&mut b, x, &format!("h.{i}.ln_1"))?;
            let qkv = linear(&mut b, hn, &format!("h.{i}.attn.c_attn"), 3 * d, d)?;
            let (q, k, v) = b.split_qkv(qkv, &attn)?;
            let a = b.attention(i, q, k, v, attn)?;
            let o = linear(&mut b, a, &format!("h.{i}.attn.c_proj"), d, d)?;
            x = b.op(Op::Add, &[x, o])?;
            let hn = norm(&mut b, x, &format!("h.{i}.ln_2"))?;
            let ff = linear(&mut b, hn, &format!("h.{i}.mlp.c_fc"), self.inner(), d)?;
            let ff = b.op(act.clone(), &[ff])?;
            let down = linear(&mut b, ff, &format!("h.{i}.mlp.c_proj"), d, self.inner())?;
            x = b.op(Op::Add, &[x, down])?;
        }
        let last = b.last_row(x)?;
        let x = norm(&mut b, last, "ln_f")?;
        if self.tie_word_embeddings {
            b.logits(x, "transformer.wte.weight", self.vocab_size, d)?;
        } else {
            b.logits(x, "lm_head.weight", self.vocab_size, d)?;
        }
        b.finish()
    }
}
