//! BitNet b1.58 (the bitnet-b1.58-2B-4T layout): a Llama-like decoder whose projections are
//! BitLinear layers — ternary weights stored four per byte (`u8[out/4, in]`) with one f32 scale
//! per tensor, int8 per-token activation quantization — plus sub-norms before `o_proj` and
//! `down_proj` and a `relu2` gated MLP. Embeddings, norms and the tied lm_head stay f32.
//!
//! ```text
//! per layer:  h = rms(x);  x += o(attn_sub_norm(attn(rope(q(h)), rope(k(h)), v(h))))
//!             h = rms(x);  x += down(ffn_sub_norm(relu(gate(h))² · up(h)))
//! ```

use std::path::Path;

use llmc_ir::{NodeId, Op};
use serde::Deserialize;
use serde_json::Value;

use crate::builder::{AttnParams, Builder};
use crate::config::{check_dims, check_heads, field_err, typed, RopeParams};
use crate::error::Result;
use crate::weights::WeightSpec;

fn yes() -> bool {
    true
}
fn default_act() -> String {
    "relu2".into()
}

/// `config.json` of BitNet, with HF's field names.
#[derive(Clone, Debug, Deserialize)]
pub struct BitNetConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "crate::config::defaults::eps_1e5")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "crate::config::defaults::max_pos_2048")]
    pub max_position_embeddings: usize,
    #[serde(skip)]
    pub rope: Option<RopeParams>,
}

impl BitNetConfig {
    pub fn parse(path: &Path, v: &Value) -> Result<BitNetConfig> {
        let mut c: BitNetConfig = typed(path, v)?;
        c.rope = Some(RopeParams::from_config(path, v, 500000.0)?);
        check_dims(
            path,
            &[
                ("vocab_size", c.vocab_size),
                ("hidden_size", c.hidden_size),
                ("intermediate_size", c.intermediate_size),
                ("num_hidden_layers", c.num_hidden_layers),
                ("num_attention_heads", c.num_attention_heads),
                ("num_key_value_heads", c.kv_heads()),
                ("max_position_embeddings", c.max_position_embeddings),
            ],
        )?;
        check_heads(path, c.hidden_size, c.num_attention_heads, c.kv_heads())?;
        if c.hidden_act != "relu2" {
            return Err(field_err(path, "hidden_act", format!("`{}` is not supported (relu2 only)", c.hidden_act)));
        }
        let q = v.get("quantization_config");
        let method = q.and_then(|q| q.get("quant_method")).and_then(Value::as_str);
        let mode = q.and_then(|q| q.get("quantization_mode")).and_then(Value::as_str);
        if method != Some("bitnet") || mode.is_some_and(|m| m != "offline") {
            return Err(field_err(
                path,
                "quantization_config",
                "only offline-quantized bitnet checkpoints are supported",
            ));
        }
        for (field, rows) in [("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size)] {
            if rows % 4 != 0 {
                return Err(field_err(path, field, "must be a multiple of 4 (four ternary weights per byte)"));
            }
        }
        Ok(c)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// A BitLinear `{prefix}.weight` (`u8[out/4, in]`) with its `{prefix}.weight_scale`.
    fn bit_linear(b: &mut Builder, x: NodeId, prefix: &str, out: usize, inp: usize) -> Result<NodeId> {
        let w = b.weight_u8(&format!("{prefix}.weight"), &[out / 4, inp]);
        let s = b.weight(&format!("{prefix}.weight_scale"), &[1]);
        b.op(Op::BitLinear, &[x, w, s])
    }

    pub fn build(&self) -> Result<(llmc_ir::Graph, Vec<WeightSpec>)> {
        let (d, hd, ff) = (self.hidden_size, self.head_dim(), self.intermediate_size);
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        let eps = self.rms_norm_eps as f32;
        let rope = self.rope.unwrap_or(RopeParams {
            theta: 500000.0,
            scaling: llmc_ir::RopeScaling::None,
            partial_rotary_factor: 1.0,
        });
        let mut b = Builder::new("bitnet");
        let embed = b.weight("model.embed_tokens.weight", &[self.vocab_size, d]);
        let tokens = b.tokens;
        let mut x = b.op(Op::Embedding, &[embed, tokens])?;
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = AttnParams {
                heads: h,
                kv_heads: kv,
                head_dim: hd,
                window: None,
                scale: 1.0 / (hd as f32).sqrt(),
                rope: Some((rope.theta, rope.scaling, (hd as f32 * rope.partial_rotary_factor) as usize)),
            };
            let hn = b.rms_norm(x, &format!("{p}.input_layernorm"), d, eps)?;
            let q = Self::bit_linear(&mut b, hn, &format!("{p}.self_attn.q_proj"), h * hd, d)?;
            let k = Self::bit_linear(&mut b, hn, &format!("{p}.self_attn.k_proj"), kv * hd, d)?;
            let v = Self::bit_linear(&mut b, hn, &format!("{p}.self_attn.v_proj"), kv * hd, d)?;
            let a = b.attention(i, q, k, v, attn)?;
            let a = b.rms_norm(a, &format!("{p}.self_attn.attn_sub_norm"), h * hd, eps)?;
            let o = Self::bit_linear(&mut b, a, &format!("{p}.self_attn.o_proj"), d, h * hd)?;
            x = b.op(Op::Add, &[x, o])?;
            let hn = b.rms_norm(x, &format!("{p}.post_attention_layernorm"), d, eps)?;
            let gate = Self::bit_linear(&mut b, hn, &format!("{p}.mlp.gate_proj"), ff, d)?;
            let up = Self::bit_linear(&mut b, hn, &format!("{p}.mlp.up_proj"), ff, d)?;
            let act = b.op(Op::Relu2, &[gate])?;
            let m = b.op(Op::Mul, &[act, up])?;
            let m = b.rms_norm(m, &format!("{p}.mlp.ffn_sub_norm"), ff, eps)?;
            let down = Self::bit_linear(&mut b, m, &format!("{p}.mlp.down_proj"), d, ff)?;
            x = b.op(Op::Add, &[x, down])?;
        }
        let last = b.last_row(x)?;
        let x = b.rms_norm(last, "model.norm", d, eps)?;
        let head = if self.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        b.logits(x, head, self.vocab_size, d)?;
        b.finish()
    }
}
