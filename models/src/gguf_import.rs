//! A GGUF file as a model: its `{arch}.*` metadata becomes the Hugging Face config the family
//! builders already read, its tensors are found under the Hugging Face names (with llama.cpp's
//! Q/K row permutation undone), and its `tokenizer.ggml.*` metadata becomes a `tokenizer.json`.
//!
//! Supported architectures: `llama` (Llama 2/3, SmolLM2, Mistral, and Mixtral: `llama` with
//! `expert_count`, experts stacked in `ffn_*_exps`), `qwen2`, `gpt2` and `falcon` (both
//! layouts: one norm per block, or `attn_norm_2` for Falcon-40B's two). Anything this
//! module cannot map exactly (another architecture, RoPE scaling, a tokenizer model or
//! pre-tokenizer it does not know, a tensor type without a reader) is an error naming it.

use std::path::Path;

use serde_json::{json, Map, Value as Json};

use crate::error::{ModelError, Result};
use crate::gguf::{Gguf, GgufFile, Value};
use crate::safetensors_io::{GgufTensor, TensorLoc, WeightFiles};
use crate::text::TextAssets;
use crate::{check_spec, Model, ModelConfig};

/// Architectures `llmc` reads from GGUF metadata.
pub const GGUF_ARCHS: &str = "llama, qwen2, gpt2, falcon";

fn err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Gguf { path: path.to_path_buf(), msg: msg.into() }
}

/// The Hugging Face `config.json` the metadata describes.
fn hf_config(path: &Path, g: &Gguf) -> Result<(String, Json)> {
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| err(path, "metadata `general.architecture` is missing"))?
        .to_string();
    if !matches!(arch.as_str(), "llama" | "qwen2" | "gpt2" | "falcon") {
        return Err(err(path, format!("architecture `{arch}` is not supported from GGUF (supported: {GGUF_ARCHS})")));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<Option<u64>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| err(path, format!("metadata `{}` must be an integer", key(k))))
            }
        }
    };
    let need =
        |k: &str| -> Result<u64> { int(k)?.ok_or_else(|| err(path, format!("metadata `{}` is missing", key(k)))) };
    let float = |k: &str| -> Result<Option<f64>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| err(path, format!("metadata `{}` must be a number", key(k)))),
        }
    };
    let d = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv = int("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || d % heads != 0 {
        return Err(err(path, format!("embedding_length {d} is not a multiple of head_count {heads}")));
    }
    let head_dim = d / heads;
    for k in ["attention.key_length", "attention.value_length"] {
        if let Some(l) = int(k)? {
            if l != head_dim {
                return Err(err(
                    path,
                    format!("metadata `{}` = {l} differs from embedding_length / head_count = {head_dim}", key(k)),
                ));
            }
        }
    }
    if let Some(rd) = int("rope.dimension_count")? {
        if rd != head_dim {
            return Err(err(
                path,
                format!("rope.dimension_count {rd} differs from the head size {head_dim} (partial RoPE)"),
            ));
        }
    }
    for k in ["rope.scaling.type", "rope.scaling.factor"] {
        match g.get(&key(k)) {
            None => {}
            Some(Value::Str(s)) if s == "none" => {}
            Some(Value::F32(f)) if *f == 1.0 || *f == 0.0 => {}
            Some(v) => {
                return Err(err(
                    path,
                    format!("metadata `{}` = {v:?}: RoPE scaling from GGUF is not supported", key(k)),
                ))
            }
        }
    }
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(err(path, "tensor `rope_freqs.weight` (Llama 3 RoPE scaling) is not supported from GGUF"));
    }
    let experts = int("expert_count")?.filter(|&e| e > 0);
    if experts.is_some() && arch != "llama" {
        return Err(err(path, format!("`{arch}.expert_count`: mixture-of-experts {arch} GGUFs are not supported")));
    }
    let vocab = match int("vocab_size")? {
        Some(v) => v,
        None => g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map_or(0, |a| a.len() as u64),
    };
    let tie = g.tensor("output.weight").is_none();
    let layers = need("block_count")?;
    let ff = need("feed_forward_length")?;
    let ctx = int("context_length")?;
    match arch.as_str() {
        "gpt2" => {
            if kv != heads {
                return Err(err(path, format!("`gpt2.attention.head_count_kv` {kv} differs from head_count {heads}")));
            }
            let eps = float("attention.layer_norm_epsilon")?.unwrap_or(1e-5);
            let c = json!({
                "model_type": "gpt2", "n_embd": d, "n_head": heads, "n_layer": layers,
                "n_positions": need("context_length")?, "n_inner": if ff == 4 * d { Json::Null } else { json!(ff) },
                "layer_norm_epsilon": eps, "vocab_size": vocab, "tie_word_embeddings": tie,
                "activation_function": "gelu_new",
            });
            return Ok((arch, c));
        }
        "falcon" => {
            // Falcon-40B's layout has a second norm per block (`attn_norm_2` = ln_attn,
            // `attn_norm` = ln_mlp); Falcon-7B's one norm feeds both parallel branches
            let two_norms = g.tensor("blk.0.attn_norm_2.weight").is_some();
            if !two_norms && kv != 1 && kv != heads {
                return Err(err(
                    path,
                    format!("falcon with one norm per block and {kv} kv heads of {heads}: no such Falcon layout"),
                ));
            }
            let c = json!({
                "model_type": "falcon", "hidden_size": d, "num_attention_heads": heads,
                "num_hidden_layers": layers, "num_kv_heads": kv, "vocab_size": vocab,
                "new_decoder_architecture": two_norms, "multi_query": !two_norms && kv == 1,
                "parallel_attn": true, "bias": g.tensor("blk.0.attn_qkv.bias").is_some(), "alibi": false,
                "ffn_hidden_size": ff, "layer_norm_epsilon": float("attention.layer_norm_epsilon")?.unwrap_or(1e-5),
                "tie_word_embeddings": tie, "max_position_embeddings": ctx.unwrap_or(2048),
                "rope_theta": float("rope.freq_base")?.unwrap_or(10000.0),
            });
            return Ok((arch, c));
        }
        _ => {}
    }
    let mut c = Map::new();
    // a `llama` file with experts is Mixtral's layout (router `ffn_gate_inp`, stacked experts)
    // and one with a sliding window is Mistral's (llama's builder has no window)
    let window = int("attention.sliding_window")?;
    let model_type = match (experts, window) {
        (Some(_), _) => "mixtral",
        (None, Some(_)) if arch == "llama" => "mistral",
        _ => arch.as_str(),
    };
    c.insert("model_type".into(), json!(model_type));
    if let Some(e) = experts {
        c.insert("num_local_experts".into(), json!(e));
        c.insert("num_experts_per_tok".into(), json!(need("expert_used_count")?));
    }
    c.insert("hidden_size".into(), json!(d));
    c.insert("intermediate_size".into(), json!(ff));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("tie_word_embeddings".into(), json!(tie));
    c.insert("hidden_act".into(), json!("silu"));
    if let Some(e) = float("attention.layer_norm_rms_epsilon")? {
        c.insert("rms_norm_eps".into(), json!(e));
    }
    c.insert("rope_theta".into(), json!(float("rope.freq_base")?.unwrap_or(10000.0)));
    if let Some(n) = ctx {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    if let Some(w) = window {
        c.insert("sliding_window".into(), json!(w));
    }
    if arch == "llama" && g.tensor("blk.0.attn_q.bias").is_some() {
        c.insert("attention_bias".into(), json!(true));
    }
    Ok((arch, Json::Object(c)))
}

/// Where a Hugging Face tensor of the llama/qwen2/mixtral builders is in a GGUF file.
struct GgufPlace {
    name: String,
    /// llama.cpp's Q/K row permutation over this many heads.
    perm: Option<usize>,
    /// Mixtral's expert `e` of a stacked `ffn_*_exps` tensor (`[experts, rows, cols]`).
    expert: Option<usize>,
}

/// The GGUF place of a Hugging Face tensor name.
fn gguf_name(arch: &str, hf: &str, heads: usize, kv_heads: usize) -> Option<GgufPlace> {
    let place = |name: String, perm, expert| Some(GgufPlace { name, perm, expert });
    if matches!(arch, "gpt2" | "falcon") {
        return place(gpt2_falcon_name(hf)?, None, None);
    }
    match hf {
        "model.embed_tokens.weight" => return place("token_embd.weight".into(), None, None),
        "model.norm.weight" => return place("output_norm.weight".into(), None, None),
        "lm_head.weight" => return place("output.weight".into(), None, None),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if let Some(moe) = part.strip_prefix("block_sparse_moe.") {
        // Mixtral: the router, and experts stacked per projection (gate = w1, up = w3,
        // down = w2)
        if moe == "gate" {
            return place(format!("blk.{layer}.ffn_gate_inp.{kind}"), None, None);
        }
        let (e, w) = moe.strip_prefix("experts.")?.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let name = match w {
            "w1" => "ffn_gate_exps",
            "w3" => "ffn_up_exps",
            "w2" => "ffn_down_exps",
            _ => return None,
        };
        return place(format!("blk.{layer}.{name}.{kind}"), None, Some(e));
    }
    let (name, perm) = match part {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(heads)),
        "self_attn.k_proj" => ("attn_k", Some(kv_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    // llama.cpp's converter permutes the Q and K rows of `llama` models only (for its
    // interleaved RoPE); qwen2 files keep Hugging Face's order.
    let perm = if arch == "llama" { perm } else { None };
    place(format!("blk.{layer}.{name}.{kind}"), perm, None)
}

/// The GGUF name of a GPT-2 or Falcon tensor (llama.cpp's `tensor_mapping.py`).
fn gpt2_falcon_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let top = match hf {
        "wte.weight" | "word_embeddings.weight" => Some("token_embd.weight"),
        "wpe.weight" => Some("position_embd.weight"),
        "ln_f.weight" => Some("output_norm.weight"),
        "ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let rest = hf.strip_prefix("h.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let name = match part {
        "ln_1" | "input_layernorm" | "ln_mlp" => "attn_norm",
        "ln_attn" => "attn_norm_2",
        "ln_2" => "ffn_norm",
        "attn.c_attn" | "self_attention.query_key_value" => "attn_qkv",
        "attn.c_proj" | "self_attention.dense" => "attn_output",
        "mlp.c_fc" | "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.c_proj" | "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// Opens a GGUF file as a model.
pub fn load_gguf(path: &Path) -> Result<Model> {
    let file = GgufFile::open(path)?;
    let (arch, raw_config) = hf_config(path, &file.header)?;
    let config = ModelConfig::from_json(path, &raw_config)?;
    let (graph, mut specs) = config.build()?;
    if matches!(arch.as_str(), "gpt2" | "falcon") {
        // llama.cpp's converter stores GPT-2's Conv1D weights transposed (`[out, in]`, as the
        // IR reads them) and Falcon's fused QKV rows as `[q heads | k heads | v heads]` (the
        // IR's order): the Hugging Face transforms are already applied
        for spec in &mut specs {
            spec.transform = crate::weights::Transform::None;
        }
    }
    let (heads, kv) = (
        raw_config["num_attention_heads"].as_u64().unwrap_or(1) as usize,
        raw_config["num_key_value_heads"].as_u64().unwrap_or(1) as usize,
    );
    let mut tensors = std::collections::HashMap::new();
    for spec in &specs {
        for cand in &spec.candidates {
            let Some(GgufPlace { name: gname, perm, expert }) = gguf_name(&arch, cand, heads, kv) else { continue };
            let Some(t) = file.header.tensor(&gname) else { continue };
            let ty = t
                .ty
                .ok_or_else(|| err(path, format!("tensor `{gname}` has ggml type {}, unknown to llmc", t.type_id)))?;
            if !crate::ggml_quants::can_read(ty) {
                return Err(err(
                    path,
                    format!(
                        "tensor `{gname}` is {}, which llmc cannot read (supported: {})",
                        ty.name(),
                        crate::ggml_quants::READABLE
                    ),
                ));
            }
            let (shape, start, end) = match expert {
                None => (t.shape.clone(), t.start, t.end),
                Some(e) => {
                    // expert `e`'s matrix: a contiguous range of the stacked tensor
                    let (n, inner) = match t.shape.as_slice() {
                        [n, rows, cols] => (*n, vec![*rows, *cols]),
                        _ => return Err(err(path, format!("tensor `{gname}` must have 3 dims (experts, rows, cols)"))),
                    };
                    let (be, bb) = ty.block();
                    let elems = inner[0].checked_mul(inner[1]).filter(|x| x % be as usize == 0);
                    let bytes = elems.and_then(|x| (x / be as usize).checked_mul(bb as usize));
                    let Some(bytes) = bytes.filter(|b| b.checked_mul(n) == Some(t.end - t.start)) else {
                        return Err(err(
                            path,
                            format!("tensor `{gname}`: its experts are not whole {} rows", ty.name()),
                        ));
                    };
                    if e >= n {
                        return Err(err(path, format!("tensor `{gname}` has {n} experts, the metadata more")));
                    }
                    (inner, t.start + e * bytes, t.start + (e + 1) * bytes)
                }
            };
            let loc = TensorLoc {
                file: 0,
                dtype: safetensors::Dtype::F32,
                shape,
                start,
                end,
                gguf: Some(GgufTensor { name: gname, ty, unpermute_heads: perm }),
            };
            tensors.insert(cand.clone(), loc);
        }
    }
    let text = text_assets(path, &file.header)?;
    let files = WeightFiles::from_gguf(path.to_path_buf(), file.map, tensors);
    for spec in &specs {
        check_spec(&files, spec)?;
    }
    Ok(Model { config_path: path.to_path_buf(), raw_config, config, graph, specs, files, text })
}

/// The text side of a GGUF file alone (its `tokenizer.ggml.*` metadata as a `tokenizer.json`,
/// special tokens, chat template): what `load_gguf` bundles, also for vocabulary-only files.
pub fn load_gguf_text(path: &Path) -> Result<TextAssets> {
    text_assets(path, &GgufFile::open(path)?.header)
}

/// deepseek-llm's splits (its tokenizer.json, in order): line breaks; runs of cased letters
/// (Unicode's `LC`, as ranges: Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee ...); ASCII
/// and full-width punctuation; trailing whitespace; CJK and Hangul runs; digit runs. Six of the
/// letters are written as escapes: U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126 (ohm) and U+212A
/// (kelvin) are changed by NFC normalization (into U+03CE, U+03B9, U+0390, U+038A, U+03A9 and
/// `K`), and copies of this pattern that went through it have reversed or far too wide ranges.
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];

/// deepseek-coder's splits: line breaks, letter runs, punctuation runs, CJK and Hangul runs,
/// single digits.
const DEEPSEEK_CODER: &[&str] = &["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"];

/// Pre-tokenizers by `tokenizer.ggml.pre`, as Hugging Face's tokenizer.json files of those
/// models write them (ids must equal transformers').
fn pre_tokenizer(path: &Path, pre: &str) -> Result<(Json, Json)> {
    let byte_level =
        |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        // SmolLM2's and GPT-2's tokenizer.json: byte-level with the GPT-2 regex
        "smollm" | "gpt-2" => (Json::Null, byte_level(true)),
        "starcoder" | "refact" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "qwen2" => {
            (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}))
        }
        "llama-bpe" | "llama3" => {
            (Json::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}))
        }
        // DeepSeek's tokenizer.json files: a chain of isolating splits, then the byte mapping
        "deepseek-llm" | "deepseek-coder" => {
            let res: &[&str] = if pre == "deepseek-llm" { DEEPSEEK_LLM } else { DEEPSEEK_CODER };
            let mut steps: Vec<Json> = res.iter().map(|re| split(re)).collect();
            steps.push(byte_level(false));
            (Json::Null, json!({"type": "Sequence", "pretokenizers": steps}))
        }
        // Falcon's: punctuation runs apart, the GPT-2 regex, then digits in threes
        "falcon" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Punctuation", "behavior": "Contiguous"}, byte_level(true),
                {"type": "Digits", "individual_digits": false}, split("[0-9][0-9][0-9]")]}),
        ),
        // MPT's (GPT-NeoX's): NFC, then byte-level with the GPT-2 regex
        "mpt" => (json!({"type": "NFC"}), byte_level(true)),
        other => {
            return Err(err(
                path,
                format!(
                    "tokenizer.ggml.pre `{other}` is not supported ({})",
                    "smollm, gpt-2, starcoder, refact, qwen2, llama-bpe, deepseek-llm, deepseek-coder, falcon, mpt"
                ),
            ))
        }
    })
}

/// `tokenizer.json` (Hugging Face's format) and the special tokens from the metadata.
fn text_assets(path: &Path, g: &Gguf) -> Result<TextAssets> {
    let mut t = TextAssets { generation: json!({}), ..Default::default() };
    t.chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
    let Some(model) = g.get("tokenizer.ggml.model").and_then(Value::as_str) else {
        return Ok(t); // no tokenizer: token ids only
    };
    if model != "gpt2" && model != "llama" {
        return Err(err(
            path,
            format!(
                "tokenizer.ggml.model `{model}` is not supported (gpt2 byte-level BPE and llama SentencePiece are)"
            ),
        ));
    }
    let spm = model == "llama";
    let strs = |k: &str| -> Result<Vec<String>> {
        let a = g.get(k).and_then(Value::as_array).ok_or_else(|| err(path, format!("metadata `{k}` is missing")))?;
        a.iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| err(path, format!("metadata `{k}` must hold strings")))
            })
            .collect()
    };
    let tokens = strs("tokenizer.ggml.tokens")?;
    // SentencePiece files carry no merges: they are derived from the pieces and their scores
    // (`spm_merges`)
    let merges = if spm { Vec::new() } else { strs("tokenizer.ggml.merges")? };
    let scores: Option<Vec<f32>> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(a) if spm && a.len() == tokens.len() => Some(
            a.iter()
                .map(|v| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))
                .collect::<Option<_>>()
                .ok_or_else(|| err(path, "tokenizer.ggml.scores must hold finite numbers"))?,
        ),
        Some(a) if spm => {
            return Err(err(path, format!("tokenizer.ggml.scores has {} items for {} tokens", a.len(), tokens.len())))
        }
        _ => None,
    };
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_u64().map_or(-1, |x| x as i64)).collect(),
        Some(a) => {
            return Err(err(
                path,
                format!("tokenizer.ggml.token_type has {} items for {} tokens", a.len(), tokens.len()),
            ))
        }
        None => vec![1; tokens.len()],
    };
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("gpt-2");
    // SentencePiece: llama.cpp's space prefix (`add_space_prefix`, default on) prepends one
    // space to the text, even one that starts with a space, and every space becomes `▁`: the
    // normalizer of Llama's own tokenizer.json (transformers' `legacy` form; a Metaspace
    // pre-tokenizer would not prepend before a leading space)
    let space_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
    let (normalizer, pre_tok) = if spm {
        let mut steps = Vec::new();
        if space_prefix {
            steps.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        steps.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        (json!({"type": "Sequence", "normalizers": steps}), Json::Null)
    } else {
        pre_tokenizer(path, pre)?
    };
    let id = |k: &str| -> Result<Option<i64>> {
        match g.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as i64)),
                _ => Err(err(path, format!("metadata `{k}` = {v:?} is not a token id below {}", tokens.len()))),
            },
        }
    };
    let mut vocab = Map::new();
    for (i, tok) in tokens.iter().enumerate() {
        if vocab.insert(tok.clone(), json!(i)).is_some() {
            return Err(err(path, format!("token `{tok}` appears twice in tokenizer.ggml.tokens")));
        }
    }
    let merges: Vec<Json> = if spm {
        spm_merges(&tokens, scores.as_deref()).into_iter().map(|(a, b)| json!([a, b])).collect()
    } else {
        merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(err(path, format!("merge `{m}` has no space"))),
            })
            .collect::<Result<_>>()?
    };
    // control and user-defined tokens (types 3, 4; SentencePiece's unknown piece, 2, too) are
    // matched whole, as added tokens
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4 || spm && ty == 2)
        .map(|(i, (tok, &ty))| {
            json!({"id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty != 4})
        })
        .collect();
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    // llama.cpp adds BOS by default for SentencePiece vocabularies, not for BPE ones
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(spm);
    let add_eos = g.get("tokenizer.ggml.add_eos_token").and_then(Value::as_bool).unwrap_or(false);
    let specials: Vec<i64> =
        [(add_bos, bos), (add_eos, eos)].into_iter().filter_map(|(on, t)| t.filter(|_| on)).collect();
    let post = if specials.is_empty() {
        if spm {
            json!({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {}})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    } else {
        // `[BOS] $A [EOS]` with whichever of the two the file asks for
        let piece = |t: i64| tokens[t as usize].clone();
        let seq = |id: &str, ty: u32| -> Vec<Json> {
            let mut v = Vec::new();
            if let (true, Some(b)) = (add_bos, bos) {
                v.push(json!({"SpecialToken": {"id": piece(b), "type_id": ty}}));
            }
            v.push(json!({"Sequence": {"id": id, "type_id": ty}}));
            if let (true, Some(e)) = (add_eos, eos) {
                v.push(json!({"SpecialToken": {"id": piece(e), "type_id": ty}}));
            }
            v
        };
        let mut pair = seq("A", 0);
        pair.extend(seq("B", 1));
        let special: Map<String, Json> =
            specials.iter().map(|&t| (piece(t), json!({"id": piece(t), "ids": [t], "tokens": [piece(t)]}))).collect();
        json!({"type": "TemplateProcessing", "single": seq("A", 0), "pair": pair, "special_tokens": special})
    };
    let (decoder, model) = if spm {
        // pieces back to text: ▁ → space, <0xNN> pieces → bytes, the space prefix stripped
        let mut steps = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let unk = id("tokenizer.ggml.unknown_token_id")?.map(|u| tokens[u as usize].clone());
        (
            json!({"type": "Sequence", "decoders": steps}),
            json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                   "vocab": vocab, "merges": merges}),
        )
    } else {
        (
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                   "ignore_merges": pre.starts_with("llama"), "vocab": vocab, "merges": merges}),
        )
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tok, "post_processor": post,
        "decoder": decoder, "model": model,
    });
    t.tokenizer_json = Some(serde_json::to_vec(&tok).map_err(|e| err(path, e.to_string()))?);
    t.bos_token_id = bos;
    t.bos_token = bos.map(|b| tokens[b as usize].clone());
    t.eos_token = eos.map(|e| tokens[e as usize].clone());
    t.eos_token_ids = eos.into_iter().chain(eot).collect();
    t.eos_token_ids.dedup();
    t.pad_token_id = id("tokenizer.ggml.padding_token_id")?;
    Ok(t)
}

/// Pieces longer than this (in bytes) get no merges derived: each split costs a hash of the
/// piece, so a hostile file of long pieces would cost time quadratic in their length.
/// SentencePiece's pieces are at most 16 characters unless trained otherwise (control and
/// user-defined pieces, matched whole as added tokens, can be longer).
const MAX_MERGED_PIECE: usize = 256;

/// The BPE merges transformers derives from a SentencePiece vocabulary (`generate_merges` in
/// its tokenization_utils_base): for each piece in id order, every split into two pieces of the
/// vocabulary (ordered by their ids); then, with the pieces' scores (what SentencePiece merges
/// by, and what a GGUF stores), all of them from the highest score of the merged piece down,
/// longer halves first on ties; without scores, by the merged piece's id and then the halves'
/// lengths in characters (stable sorts both). Pieces over `MAX_MERGED_PIECE` bytes are skipped.
fn spm_merges(tokens: &[String], scores: Option<&[f32]>) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, usize, usize, usize)> = Vec::new(); // (id, len l, len r, id l, id r)
    for (id, piece) in tokens.iter().enumerate().filter(|(_, p)| p.len() <= MAX_MERGED_PIECE) {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                local.push((id, l.chars().count(), r.chars().count(), a, b));
            }
        }
        local.sort_by_key(|m| (m.3, m.4));
        merges.extend(local);
    }
    match scores {
        Some(sc) => merges.sort_by(|a, b| sc[b.0].total_cmp(&sc[a.0]).then((b.1, b.2).cmp(&(a.1, a.2)))),
        None => merges.sort_by_key(|m| (m.0, m.1, m.2)),
    }
    merges.into_iter().map(|m| (tokens[m.3].clone(), tokens[m.4].clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::{build, str_val};

    fn u32v(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// `llama` metadata with `extra` keys added.
    fn header(extra: &[(&str, u32, Vec<u8>)]) -> Gguf {
        let mut kv = vec![
            ("general.architecture", 8, str_val("llama")),
            ("llama.embedding_length", 4, u32v(64)),
            ("llama.feed_forward_length", 4, u32v(128)),
            ("llama.block_count", 4, u32v(2)),
            ("llama.attention.head_count", 4, u32v(4)),
            ("llama.attention.head_count_kv", 4, u32v(2)),
        ];
        kv.extend(extra.iter().cloned());
        Gguf::parse(Path::new("t.gguf"), &build(&kv, &[])).unwrap()
    }

    #[test]
    fn metadata_becomes_the_hf_config() {
        let (arch, c) =
            hf_config(Path::new("t.gguf"), &header(&[("llama.rope.freq_base", 6, 5e5f32.to_le_bytes().to_vec())]))
                .unwrap();
        assert_eq!(arch, "llama");
        assert_eq!((c["hidden_size"].as_u64(), c["num_key_value_heads"].as_u64()), (Some(64), Some(2)));
        assert_eq!(c["rope_theta"].as_f64(), Some(5e5));
        assert_eq!(c["tie_word_embeddings"], true);
        // experts: Mixtral's layout
        let moe = [("llama.expert_count", 4, u32v(8)), ("llama.expert_used_count", 4, u32v(2))];
        let (_, c) = hf_config(Path::new("t.gguf"), &header(&moe)).unwrap();
        assert_eq!((c["model_type"].as_str(), c["num_local_experts"].as_u64()), (Some("mixtral"), Some(8)));
        assert_eq!(c["num_experts_per_tok"].as_u64(), Some(2));
    }

    /// The letter class of deepseek-llm's pattern is narrow ranges in order: a copy with `K` for
    /// the kelvin sign would span U+004B..U+212D, one with U+03CE for U+1F7D would be reversed.
    #[test]
    fn deepseek_letter_ranges_are_ordered_and_narrow() {
        let class: Vec<char> = DEEPSEEK_LLM[1].trim_start_matches("\\s?[").trim_end_matches("]+").chars().collect();
        let mut i = 0;
        let mut ranges = 0;
        while i < class.len() {
            if i + 2 < class.len() && class[i + 1] == '-' {
                let (a, b) = (class[i] as u32, class[i + 2] as u32);
                assert!(a <= b && b - a < 0x200, "range U+{a:04X}-U+{b:04X}");
                ranges += 1;
                i += 3;
            } else {
                i += 1;
            }
        }
        assert_eq!(ranges, 65);
        for c in ['\u{1F7D}', '\u{1FBE}', '\u{1FD3}', '\u{1FDB}', '\u{2126}', '\u{212A}'] {
            assert!(class.contains(&c), "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn sentencepiece_merges_follow_transformers_order() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // "ab" (id 3) splits once; "abc" (id 4) as "ab"+"c" and "a"+"bc" (id of "a" first);
        // a piece too long for merges gets none
        let long = "a".repeat(MAX_MERGED_PIECE + 1);
        let tokens = t(&["a", "b", "c", "ab", "abc", "bc", &long]);
        let m = spm_merges(&tokens, None);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(pairs, [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]);
    }

    #[test]
    fn gpt2_and_falcon_tensor_names() {
        let n = |hf: &str| gpt2_falcon_name(hf);
        assert_eq!(n("transformer.h.3.attn.c_attn.weight").as_deref(), Some("blk.3.attn_qkv.weight"));
        assert_eq!(n("h.0.mlp.c_proj.bias").as_deref(), Some("blk.0.ffn_down.bias"));
        // Falcon-40B: ln_mlp is llama.cpp's attn_norm, ln_attn its attn_norm_2
        assert_eq!(n("transformer.h.1.ln_mlp.weight").as_deref(), Some("blk.1.attn_norm.weight"));
        assert_eq!(n("transformer.h.1.ln_attn.bias").as_deref(), Some("blk.1.attn_norm_2.bias"));
        assert_eq!(n("transformer.word_embeddings.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(n("transformer.h.1.unknown.weight"), None);
    }

    #[test]
    fn what_cannot_be_mapped_exactly_is_refused_by_name() {
        let e =
            |extra: &[(&str, u32, Vec<u8>)]| hf_config(Path::new("t.gguf"), &header(extra)).unwrap_err().to_string();
        assert!(e(&[("llama.attention.key_length", 4, u32v(32))]).contains("llama.attention.key_length"));
        assert!(e(&[("llama.rope.dimension_count", 4, u32v(8))]).contains("partial RoPE"));
        assert!(e(&[("llama.rope.scaling.type", 8, str_val("yarn"))]).contains("RoPE scaling"));
        assert!(e(&[("llama.expert_count", 4, u32v(8))]).contains("llama.expert_used_count` is missing"));
        let g = Gguf::parse(Path::new("t.gguf"), &build(&[("general.architecture", 8, str_val("phi3"))], &[])).unwrap();
        assert!(hf_config(Path::new("t.gguf"), &g).unwrap_err().to_string().contains("`phi3` is not supported"));
    }
}
