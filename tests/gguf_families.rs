//! GGUF files of every family llmc imports from GGUF, made from the Hugging Face fixtures the
//! way llama.cpp's converter writes them (its tensor names, its Q/K row permutation for
//! `llama`, Mixtral's experts stacked into `ffn_*_exps`, GPT-2's Conv1D weights transposed,
//! Falcon's fused QKV regrouped), compiled straight from the `.gguf` and checked against
//! transformers' logits and greedy ids like tests/parity.rs. (The fixtures have no tokenizer:
//! the GGUFs carry none, and the runs take token ids.)

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{expected, fixture, floats, ints, run_json};
use serde_json::Value;

/// The f32 tensors of a fixture's model.safetensors: name → (shape, values).
fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name}");
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let off: Vec<usize> =
            t["data_offsets"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let v = data[off[0]..off[1]].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        out.insert(name.clone(), (shape, v));
    }
    out
}

/// A metadata value of a GGUF file.
enum Meta {
    U32(u64),
    F32(f32),
    Str(&'static str),
    Bool(bool),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// ggml's Q8_0 blocks of `v` (`d = max|x| / 127` as f16, `q = round(x / d)`).
fn q8_0(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in v.chunks(32) {
        let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(b.iter().map(|x| (x * id).round() as i8 as u8));
    }
    out
}

/// A GGUF array (type 9) of 4-byte items of ggml metadata type `ty`.
fn array4(b: &mut Vec<u8>, ty: u32, items: impl ExactSizeIterator<Item = [u8; 4]>) {
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for x in items {
        b.extend_from_slice(&x);
    }
}

/// A GGUF v3 file: metadata, then tensors (row-major `shape`; 2-D and larger matrices in Q8_0
/// when `quantize`).
fn gguf(meta: &[(String, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)], quantize: bool) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let num = |b: &mut Vec<u8>, v: u64, w: usize| b.extend_from_slice(&v.to_le_bytes()[..w]);
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    num(&mut b, 3, 4);
    num(&mut b, tensors.len() as u64, 8);
    num(&mut b, meta.len() as u64, 8);
    for (k, v) in meta {
        string(&mut b, k);
        match v {
            Meta::U32(x) => {
                num(&mut b, 4, 4);
                num(&mut b, *x, 4);
            }
            Meta::F32(x) => {
                num(&mut b, 6, 4);
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Str(s) => {
                num(&mut b, 8, 4);
                string(&mut b, s);
            }
            Meta::Bool(x) => {
                num(&mut b, 7, 4);
                b.push(*x as u8);
            }
            Meta::Strs(v) => {
                num(&mut b, 9, 4);
                num(&mut b, 8, 4);
                num(&mut b, v.len() as u64, 8);
                for x in v {
                    string(&mut b, x);
                }
            }
            // arrays of 4-byte numbers: the element type, the count, the little-endian items
            Meta::F32s(v) => array4(&mut b, 6, v.iter().map(|x| x.to_le_bytes())),
            Meta::I32s(v) => array4(&mut b, 5, v.iter().map(|x| x.to_le_bytes())),
        }
    }
    let datas: Vec<(u32, Vec<u8>)> = tensors
        .iter()
        .map(|(_, shape, v)| {
            if quantize && shape.len() >= 2 && shape[shape.len() - 1] % 32 == 0 {
                (8, q8_0(v))
            } else {
                (0, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
        .collect();
    let mut off = 0u64;
    for ((name, shape, _), (ty, data)) in tensors.iter().zip(&datas) {
        string(&mut b, name);
        num(&mut b, shape.len() as u64, 4);
        for &d in shape.iter().rev() {
            num(&mut b, d as u64, 8);
        }
        num(&mut b, *ty as u64, 4);
        num(&mut b, off, 8);
        off += (data.len() as u64).div_ceil(32) * 32;
    }
    for (_, data) in &datas {
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend_from_slice(data);
    }
    b
}

/// llama.cpp's Q/K row order for its interleaved RoPE: the file's row `h·hd + 2i + s` is
/// Hugging Face's row `h·hd + s·hd/2 + i`.
fn permute(v: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = v.len() / rows;
    let hd = rows / heads;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for s in 0..2 {
                let (to, from) = (h * hd + 2 * i + s, h * hd + s * hd / 2 + i);
                out[to * cols..(to + 1) * cols].copy_from_slice(&v[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// A llama/mistral/qwen2/mixtral fixture as llama.cpp's converter writes it.
fn llama_like_gguf(name: &str, quantize: bool) -> Vec<u8> {
    llama_like_gguf_edited(name, quantize, &|_| {})
}

/// `llama_like_gguf` with `edit` applied to the GGUF tensors (name, shape, values) before
/// they are written.
fn llama_like_gguf_edited(name: &str, quantize: bool, edit: &dyn Fn(&mut [(String, Vec<usize>, Vec<f32>)])) -> Vec<u8> {
    let dir = fixture(name);
    let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut w = read_safetensors(&dir.join("model.safetensors"));
    let u = |k: &str| c[k].as_u64().unwrap();
    let arch = if name == "qwen2" { "qwen2" } else { "llama" };
    let (heads, kv, layers) = (u("num_attention_heads"), u("num_key_value_heads"), u("num_hidden_layers"));
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta = vec![
        ("general.architecture".to_string(), Meta::Str(arch)),
        (key("context_length"), Meta::U32(u("max_position_embeddings"))),
        (key("embedding_length"), Meta::U32(u("hidden_size"))),
        (key("feed_forward_length"), Meta::U32(u("intermediate_size"))),
        (key("block_count"), Meta::U32(layers)),
        (key("attention.head_count"), Meta::U32(heads)),
        (key("attention.head_count_kv"), Meta::U32(kv)),
        (key("attention.layer_norm_rms_epsilon"), Meta::F32(c["rms_norm_eps"].as_f64().unwrap() as f32)),
        (key("rope.freq_base"), Meta::F32(c["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32)),
        (key("vocab_size"), Meta::U32(u("vocab_size"))),
    ];
    if let Some(sw) = c["sliding_window"].as_u64() {
        meta.push((key("attention.sliding_window"), Meta::U32(sw)));
    }
    if let Some(e) = c["num_local_experts"].as_u64() {
        meta.push((key("expert_count"), Meta::U32(e)));
        meta.push((key("expert_used_count"), Meta::U32(u("num_experts_per_tok"))));
    }
    let mut t = Vec::new();
    type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;
    let take =
        |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>, w: &mut Tensors, hf: &str, gg: String, perm: Option<u64>| {
            let (shape, mut v) = w.remove(hf).unwrap_or_else(|| panic!("{name}: no {hf}"));
            if let (Some(h), "llama") = (perm, arch) {
                v = permute(&v, shape[0], h as usize);
            }
            t.push((gg, shape, v));
        };
    take(&mut t, &mut w, "model.embed_tokens.weight", "token_embd.weight".into(), None);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        take(&mut t, &mut w, &format!("{p}.input_layernorm.weight"), format!("blk.{l}.attn_norm.weight"), None);
        for (hf, gg, perm) in
            [("q_proj", "attn_q", Some(heads)), ("k_proj", "attn_k", Some(kv)), ("v_proj", "attn_v", None)]
        {
            for kind in ["weight", "bias"] {
                if w.contains_key(&format!("{p}.self_attn.{hf}.{kind}")) {
                    take(&mut t, &mut w, &format!("{p}.self_attn.{hf}.{kind}"), format!("blk.{l}.{gg}.{kind}"), perm);
                }
            }
        }
        take(&mut t, &mut w, &format!("{p}.self_attn.o_proj.weight"), format!("blk.{l}.attn_output.weight"), None);
        take(&mut t, &mut w, &format!("{p}.post_attention_layernorm.weight"), format!("blk.{l}.ffn_norm.weight"), None);
        if let Some(e) = c["num_local_experts"].as_u64() {
            let m = format!("{p}.block_sparse_moe");
            take(&mut t, &mut w, &format!("{m}.gate.weight"), format!("blk.{l}.ffn_gate_inp.weight"), None);
            for (hf, gg) in [("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")] {
                let mut stacked = Vec::new();
                let mut shape = Vec::new();
                for x in 0..e {
                    let (s, v) = w.remove(&format!("{m}.experts.{x}.{hf}.weight")).unwrap();
                    shape = s;
                    stacked.extend(v);
                }
                t.push((format!("blk.{l}.{gg}.weight"), vec![e as usize, shape[0], shape[1]], stacked));
            }
        } else {
            for (hf, gg) in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")] {
                take(&mut t, &mut w, &format!("{p}.mlp.{hf}.weight"), format!("blk.{l}.{gg}.weight"), None);
            }
        }
    }
    take(&mut t, &mut w, "model.norm.weight", "output_norm.weight".into(), None);
    if w.contains_key("lm_head.weight") {
        take(&mut t, &mut w, "lm_head.weight", "output.weight".into(), None);
    }
    assert!(w.is_empty(), "{name}: tensors left unconverted: {:?}", w.keys().collect::<Vec<_>>());
    edit(&mut t);
    gguf(&meta, &t, quantize)
}

/// A GPT-2 or Falcon fixture as llama.cpp's converter writes it: GPT-2's Conv1D weights
/// transposed to `[out, in]`, Falcon's fused QKV rows regrouped from Hugging Face's
/// `[kv group][q heads of the group.., k, v]` to `[q heads | k heads | v heads]`.
fn gpt2_falcon_gguf(name: &str) -> Vec<u8> {
    let dir = fixture(name);
    let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut w = read_safetensors(&dir.join("model.safetensors"));
    let u = |k: &str| c[k].as_u64().unwrap();
    let falcon = name.starts_with("falcon");
    // Falcon-40B's layout: kv heads in groups, two norms per block
    let new_arch = falcon && c["new_decoder_architecture"].as_bool() == Some(true);
    let (d, heads, layers) = if falcon {
        (u("hidden_size"), u("num_attention_heads"), u("num_hidden_layers"))
    } else {
        (u("n_embd"), u("n_head"), u("n_layer"))
    };
    // Falcon-7B's layout: one kv head with `multi_query`, else one per head
    let kv = if new_arch {
        u("num_kv_heads")
    } else if falcon && c["multi_query"].as_bool() == Some(true) {
        1
    } else {
        heads
    };
    let arch = if falcon { "falcon" } else { "gpt2" };
    let key = |k: &str| format!("{arch}.{k}");
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str(arch)),
        (key("context_length"), Meta::U32(if falcon { u("max_position_embeddings") } else { u("n_positions") })),
        (key("embedding_length"), Meta::U32(d)),
        (key("feed_forward_length"), Meta::U32(4 * d)),
        (key("block_count"), Meta::U32(layers)),
        (key("attention.head_count"), Meta::U32(heads)),
        (key("attention.head_count_kv"), Meta::U32(kv)),
        (key("attention.layer_norm_epsilon"), Meta::F32(c["layer_norm_epsilon"].as_f64().unwrap() as f32)),
        (key("vocab_size"), Meta::U32(u("vocab_size"))),
    ];
    let mut t = Vec::new();
    type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;
    let take = |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>, w: &mut Tensors, hf: &str, gg: String| {
        let (shape, v) = w.remove(&format!("transformer.{hf}")).unwrap_or_else(|| panic!("{name}: no {hf}"));
        let (shape, v) = if !falcon && shape.len() == 2 && !hf.starts_with('w') {
            // Conv1D `[in, out]` → `[out, in]`
            let (r, cc) = (shape[0], shape[1]);
            let mut o = vec![0f32; v.len()];
            for i in 0..r {
                for j in 0..cc {
                    o[j * r + i] = v[i * cc + j];
                }
            }
            (vec![cc, r], o)
        } else if falcon && hf.ends_with("query_key_value.weight") {
            let (hd, r) = ((d / heads) as usize, (heads / kv) as usize);
            let block = |b: usize| &v[b * hd * shape[1]..(b + 1) * hd * shape[1]];
            let mut o = Vec::new();
            for g in 0..kv as usize {
                for j in 0..r {
                    o.extend_from_slice(block(g * (r + 2) + j));
                }
            }
            for x in [r, r + 1] {
                for g in 0..kv as usize {
                    o.extend_from_slice(block(g * (r + 2) + x));
                }
            }
            (shape, o)
        } else {
            (shape, v)
        };
        t.push((gg, shape, v));
    };
    take(&mut t, &mut w, if falcon { "word_embeddings.weight" } else { "wte.weight" }, "token_embd.weight".into());
    if !falcon {
        take(&mut t, &mut w, "wpe.weight", "position_embd.weight".into());
    }
    let parts: &[(&str, &str)] = if new_arch {
        // llama.cpp's names: ln_mlp is `attn_norm`, ln_attn `attn_norm_2`
        &[
            ("ln_attn", "attn_norm_2"),
            ("ln_mlp", "attn_norm"),
            ("self_attention.query_key_value", "attn_qkv"),
            ("self_attention.dense", "attn_output"),
            ("mlp.dense_h_to_4h", "ffn_up"),
            ("mlp.dense_4h_to_h", "ffn_down"),
        ]
    } else if falcon {
        &[
            ("input_layernorm", "attn_norm"),
            ("self_attention.query_key_value", "attn_qkv"),
            ("self_attention.dense", "attn_output"),
            ("mlp.dense_h_to_4h", "ffn_up"),
            ("mlp.dense_4h_to_h", "ffn_down"),
        ]
    } else {
        &[
            ("ln_1", "attn_norm"),
            ("attn.c_attn", "attn_qkv"),
            ("attn.c_proj", "attn_output"),
            ("ln_2", "ffn_norm"),
            ("mlp.c_fc", "ffn_up"),
            ("mlp.c_proj", "ffn_down"),
        ]
    };
    for l in 0..layers {
        for (hf, gg) in parts {
            for kind in ["weight", "bias"] {
                let full = format!("h.{l}.{hf}.{kind}");
                if w.contains_key(&format!("transformer.{full}")) {
                    take(&mut t, &mut w, &full, format!("blk.{l}.{gg}.{kind}"));
                }
            }
        }
    }
    take(&mut t, &mut w, "ln_f.weight", "output_norm.weight".into());
    take(&mut t, &mut w, "ln_f.bias", "output_norm.bias".into());
    assert!(w.is_empty(), "{name}: tensors left unconverted: {:?}", w.keys().collect::<Vec<_>>());
    gguf(&meta, &t, false)
}

/// The max |a − b| and max |b|.
fn max_err(a: &[f64], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    (a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())), b.iter().fold(0f64, |m, x| m.max(x.abs())))
}

/// The GGUF made of fixture `name`, compiled from the `.gguf` and run on the fixture's prompt:
/// the last logits and the greedy ids.
fn run_gguf(name: &str, bytes: &[u8], extra: &[&str]) -> (Vec<f64>, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join(format!("{name}.gguf"));
    std::fs::write(&g, bytes).unwrap();
    let art = dir.path().join(format!("{name}.llmc"));
    let mut args = vec!["compile", g.to_str().unwrap(), "-o", art.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = common::llmc(&args);
    assert!(o.status.success(), "{name}: compile failed: {}", common::stderr(&o));
    let exp = expected(name);
    let prompt = ints(&exp["prompt_ids"]);
    let out = run_json(&art, &prompt, 24, &["--logits"]);
    (floats(&out["logits_last"]), ints(&out["generated_ids"]))
}

fn check_f32(name: &str) {
    let bytes = if matches!(name, "gpt2" | "falcon" | "falcon40b") {
        gpt2_falcon_gguf(name)
    } else {
        llama_like_gguf(name, false)
    };
    let (logits, ids) = run_gguf(name, &bytes, &[]);
    let (err, max_abs) = max_err(&logits, &floats(&expected(name)["logits_last"]));
    assert!(err <= 1e-4 * max_abs.max(1.0), "{name}: max |logits - expected| = {err}");
    assert_eq!(ids, ints(&expected(name)["greedy_ids"]), "{name}: greedy ids");
}

#[test]
fn llama_gguf_equals_transformers() {
    check_f32("llama");
}

#[test]
fn mistral_gguf_equals_transformers() {
    check_f32("mistral");
}

#[test]
fn qwen2_gguf_equals_transformers() {
    check_f32("qwen2");
}

#[test]
fn gpt2_gguf_equals_transformers() {
    check_f32("gpt2");
}

#[test]
fn falcon_gguf_equals_transformers() {
    check_f32("falcon");
}

/// Falcon-40B's layout, as llama.cpp's converter writes it (QKV regrouped to `[q | k | v]`,
/// `attn_norm_2`); the fixture is the project's own (scripts/make-falcon40b-fixture).
#[test]
fn falcon40b_gguf_equals_transformers() {
    check_f32("falcon40b");
}

#[test]
fn mixtral_gguf_equals_transformers() {
    check_f32("mixtral");
}

/// Q8_0 experts are kept as their blocks (stacked by row moves only): the logits equal those
/// of the fixture compiled by llmc itself at `--dtype q8_0` (the same ggml quantizer), with
/// f32 activations; a wrong expert or row order would move them by far more.
#[test]
fn mixtral_q8_0_gguf_keeps_its_blocks() {
    let f32_args = ["--activations", "f32"];
    let (logits, _) = run_gguf("mixtral", &llama_like_gguf("mixtral", true), &f32_args);
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("mixtral-q8.llmc");
    let fx = fixture("mixtral");
    let o = common::llmc(&[
        "compile",
        fx.to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
        "--dtype",
        "q8_0",
        "--activations",
        "f32",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let exp = expected("mixtral");
    let own = floats(&run_json(&art, &ints(&exp["prompt_ids"]), 1, &["--logits"])["logits_last"]);
    let (err, max_abs) = max_err(&logits, &own);
    let (q_err, _) = max_err(&own, &floats(&exp["logits_last"]));
    eprintln!("mixtral q8_0: GGUF vs llmc --dtype q8_0 {err:.2e}; q8_0 vs transformers {q_err:.3} (max {max_abs:.3})");
    assert!(err <= 1e-5 * max_abs.max(1.0), "GGUF vs llmc's own q8_0: {err}");
}

/// A quantized GGUF tensor whose block scale is not finite (here an f16 infinity) is refused
/// by name: its blocks are packed as the file stores them, so this check stands where the f32
/// path's non-finite check does.
#[test]
fn non_finite_block_scale_is_refused() {
    let poisoned = llama_like_gguf_edited("llama", true, &|t| {
        let w = t.iter_mut().find(|(n, _, _)| n == "blk.1.ffn_down.weight").unwrap();
        w.2[40] = f32::INFINITY; // the second block of the first row: its scale becomes inf
    });
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("nan.gguf");
    std::fs::write(&g, poisoned).unwrap();
    let o = common::llmc(&["compile", g.to_str().unwrap(), "-o", dir.path().join("nan.llmc").to_str().unwrap()]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("model.layers.1.mlp.down_proj.weight") && err.contains("non-finite scale"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A SentencePiece tokenizer (`tokenizer.ggml.model = llama`: pieces, scores, token types, no
/// merges) gives transformers' ids: tests/data/spm-llama-600.json holds a 600-piece BPE
/// SentencePiece model trained as Llama's is configured and the ids transformers'
/// LlamaTokenizer gives for some texts (scripts/make-spm-reference made it). The model around
/// it is a random tiny llama of that vocabulary.
#[test]
fn sentencepiece_gguf_tokenizes_like_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm-llama-600.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tokens: Vec<String> = r["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let vocab = tokens.len();
    let (d, ff) = (64usize, 128usize);
    let meta = vec![
        ("general.architecture".to_string(), Meta::Str("llama")),
        ("llama.context_length".into(), Meta::U32(256)),
        ("llama.embedding_length".into(), Meta::U32(d as u64)),
        ("llama.feed_forward_length".into(), Meta::U32(ff as u64)),
        ("llama.block_count".into(), Meta::U32(1)),
        ("llama.attention.head_count".into(), Meta::U32(4)),
        ("llama.attention.head_count_kv".into(), Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Meta::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Meta::Str("llama")),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Meta::F32s(r["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::I32s(r["token_type"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Meta::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
    ];
    let mut seed = 1u64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    };
    let mut t = vec![("token_embd.weight".to_string(), vec![vocab, d], rand(vocab * d))];
    for (name, shape) in [
        ("attn_norm", vec![d]),
        ("attn_q", vec![d, d]),
        ("attn_k", vec![d / 2, d]),
        ("attn_v", vec![d / 2, d]),
        ("attn_output", vec![d, d]),
        ("ffn_norm", vec![d]),
        ("ffn_gate", vec![ff, d]),
        ("ffn_up", vec![ff, d]),
        ("ffn_down", vec![d, ff]),
    ] {
        let n = shape.iter().product();
        t.push((format!("blk.0.{name}.weight"), shape, rand(n)));
    }
    t.push(("output_norm.weight".into(), vec![d], vec![1.0; d]));
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("spm.gguf");
    std::fs::write(&g, gguf(&meta, &t, false)).unwrap();
    let art = dir.path().join("spm.llmc");
    let o = common::llmc(&["compile", g.to_str().unwrap(), "-o", art.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for (text, want) in r["ids"].as_object().unwrap() {
        let o = common::llmc(&["run", art.to_str().unwrap(), "-p", text, "-n", "1", "--temp", "0", "--json"]);
        assert!(o.status.success(), "{text:?}: {}", common::stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(ints(&v["prompt_ids"]), ints(want), "{text:?}");
    }
}
