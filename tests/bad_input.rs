//! Bad input gets one clear error line naming the culprit, a non-zero exit, no panic, and no
//! artifact left behind.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{fixture, llmc, stderr};

/// A copy of a fixture folder in a temp dir, for mutilation.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture(name).join(f), model.join(f)).unwrap();
    }
    (dir, model)
}

/// Compiles and expects failure; returns stderr. Checks that nothing was written.
fn compile_fails(model: &Path) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.llmc");
    let o = llmc(&["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success(), "compile should fail");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 0, "nothing may be left in the output folder");
    err
}

fn edit_config(model: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// One tensor of a safetensors file: name, dtype, shape, raw bytes.
type StTensor = (String, String, serde_json::Value, Vec<u8>);

fn read_st(path: &Path) -> Vec<StTensor> {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut names: Vec<_> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = &header[&name];
            let (a, b) =
                (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
            (name.clone(), t["dtype"].as_str().unwrap().to_string(), t["shape"].clone(), data[a..b].to_vec())
        })
        .collect()
}

fn write_st(path: &Path, tensors: &[StTensor]) {
    let mut header = serde_json::Map::new();
    let mut blob = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = blob.len();
        blob.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, blob.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&blob);
    fs::write(path, out).unwrap();
}

/// Rewrites the model's safetensors keeping only the tensors `keep` accepts.
fn drop_tensor(model: &Path, name: &str) {
    let p = model.join("model.safetensors");
    let t: Vec<_> = read_st(&p).into_iter().filter(|t| t.0 != name).collect();
    write_st(&p, &t);
}

/// Rewrites the safetensors header in place (same data section), e.g. to make it lie.
fn edit_safetensors_header(model: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("model.safetensors");
    let bytes = fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(p, out).unwrap();
}

#[test]
fn unknown_model_type() {
    let (_d, m) = copy_fixture("llama");
    edit_config(&m, |v| v["model_type"] = "gpt-j-9000".into());
    let e = compile_fails(&m);
    assert!(e.contains("unknown model_type `gpt-j-9000`") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_field() {
    let (_d, m) = copy_fixture("llama");
    edit_config(&m, |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = compile_fails(&m);
    assert!(e.contains("num_hidden_layers") && e.contains("config.json"), "{e}");
}

#[test]
fn absurd_field() {
    let (_d, m) = copy_fixture("qwen2");
    edit_config(&m, |v| v["num_key_value_heads"] = 3.into());
    let e = compile_fails(&m);
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn non_json_config() {
    let (_d, m) = copy_fixture("gpt2");
    fs::write(m.join("config.json"), "model_type: gpt2\n").unwrap();
    let e = compile_fails(&m);
    assert!(e.contains("not valid JSON") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_weights_file() {
    let (_d, m) = copy_fixture("gpt2");
    fs::remove_file(m.join("model.safetensors")).unwrap();
    let e = compile_fails(&m);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn tensor_with_wrong_shape() {
    let (_d, m) = copy_fixture("llama");
    // Pretend the model is wider than its weights.
    edit_config(&m, |v| v["intermediate_size"] = 255.into());
    let e = compile_fails(&m);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[256, 128]") && e.contains("[255, 128]"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let (_d, m) = copy_fixture("falcon");
    drop_tensor(&m, "transformer.h.1.self_attention.dense.weight");
    let e = compile_fails(&m);
    assert!(e.contains("transformer.h.1.self_attention.dense.weight") && e.contains("missing"), "{e}");
}

#[test]
fn untied_model_without_lm_head() {
    let (_d, m) = copy_fixture("mistral");
    drop_tensor(&m, "lm_head.weight");
    let e = compile_fails(&m);
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let (_d, m) = copy_fixture("gpt2");
    let p = m.join("model.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = compile_fails(&m);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    fs::write(&p, &bytes[..5]).unwrap();
    let e = compile_fails(&m);
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn safetensors_offsets_past_end_of_file() {
    let (_d, m) = copy_fixture("qwen2");
    edit_safetensors_header(&m, |h| {
        let t = &mut h["model.norm.weight"]["data_offsets"];
        let end = t[1].as_u64().unwrap();
        t[1] = (end + 1_000_000).into();
    });
    let e = compile_fails(&m);
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
}

#[test]
fn config_by_any_name_and_explicit_weights() {
    // `llmc compile llama.json -o llama.bin --weights ...`
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llama.json");
    fs::copy(fixture("llama").join("config.json"), &cfg).unwrap();
    let out = dir.path().join("llama.bin");
    let weights = fixture("llama").join("model.safetensors");
    let o = llmc(&["compile", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!o.status.success(), "no weights beside llama.json");
    assert!(stderr(&o).contains("llama.json"), "{}", stderr(&o));
    let o =
        llmc(&["compile", cfg.to_str().unwrap(), "-o", out.to_str().unwrap(), "--weights", weights.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = common::run_json(&out, &[1, 2, 3], 2, &["--backend", "interp"]);
    assert_eq!(r["generated_ids"].as_array().unwrap().len(), 2);
}

#[test]
fn sharded_checkpoint() {
    // Split the llama fixture into two shards with an index, as save_pretrained does.
    let (_d, m) = copy_fixture("llama");
    let mut shards: [Vec<StTensor>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, t) in read_st(&m.join("model.safetensors")).into_iter().enumerate() {
        weight_map.insert(t.0.clone(), format!("model-0000{}-of-00002.safetensors", i % 2 + 1).into());
        shards[i % 2].push(t);
    }
    for (s, tensors) in shards.iter().enumerate() {
        write_st(&m.join(format!("model-0000{}-of-00002.safetensors", s + 1)), tensors);
    }
    fs::remove_file(m.join("model.safetensors")).unwrap();
    fs::write(
        m.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let out = m.join("sharded.llmc");
    common::compile(&m, &out);
    let exp = common::expected("llama");
    let r = common::run_json(&out, &common::ints(&exp["prompt_ids"]), 24, &["--backend", "interp"]);
    assert_eq!(common::ints(&r["generated_ids"]), common::ints(&exp["greedy_ids"]));
}

#[test]
fn bf16_and_f16_weights_are_widened() {
    // Rewrite every tensor as bf16 (then f16): the model still runs and greedy decoding mostly
    // agrees with f32 (the values changed, so only the first token is asserted).
    for (dtype, conv) in [("BF16", 0), ("F16", 1)] {
        let (_d, m) = copy_fixture("llama");
        let p = m.join("model.safetensors");
        let tensors: Vec<StTensor> = read_st(&p)
            .into_iter()
            .map(|(name, _, shape, bytes)| {
                let half: Vec<u8> = bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes(c.try_into().unwrap());
                        if conv == 0 {
                            half::bf16::from_f32(x).to_le_bytes()
                        } else {
                            half::f16::from_f32(x).to_le_bytes()
                        }
                    })
                    .collect();
                (name, dtype.to_string(), shape, half)
            })
            .collect();
        write_st(&p, &tensors);
        let art = m.join("half.llmc");
        common::compile(&m, &art);
        let exp = common::expected("llama");
        let r = common::run_json(&art, &common::ints(&exp["prompt_ids"]), 4, &["--backend", "interp", "--logits"]);
        let got = common::floats(&r["logits_last"]);
        let want = common::floats(&exp["logits_last"]);
        let err = got.iter().zip(&want).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(err < 0.5 && err > 0.0, "{dtype}: logits error {err} (rounded weights must change them a little)");
    }
}

// ---- artifacts whose header lies ----

fn compiled(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("m.llmc");
    common::compile(&fixture(name), &art);
    (dir, art)
}

fn run_fails(art: &Path) -> String {
    let o = llmc(&["run", art.to_str().unwrap(), "--ids", "1,2", "-n", "2", "--json", "--backend", "interp"]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    e
}

#[test]
fn truncated_artifact() {
    let (_d, art) = compiled("gpt2");
    let bytes = fs::read(&art).unwrap();
    fs::write(&art, &bytes[..bytes.len() - 100]).unwrap();
    assert!(run_fails(&art).contains("truncated"));
    fs::write(&art, &bytes[..10]).unwrap();
    assert!(run_fails(&art).contains("not an llmc artifact"));
}

#[test]
fn artifact_with_wrong_version() {
    let (_d, art) = compiled("gpt2");
    let mut bytes = fs::read(&art).unwrap();
    bytes[8] = 99;
    fs::write(&art, &bytes).unwrap();
    let e = run_fails(&art);
    assert!(e.contains("version 99"), "{e}");
}

/// Rewrites the artifact's JSON header in place (checksum recomputed, as a forger would).
fn edit_artifact_header(art: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let orig = llmc_compiler::artifact::ArtifactBytes::parse(&fs::read(art).unwrap()).unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(orig.header_json()).unwrap();
    f(&mut h);
    fs::write(art, orig.with_header(&serde_json::to_vec(&h).unwrap()).unwrap()).unwrap();
}

#[test]
fn artifact_offsets_past_eof() {
    let (_d, art) = compiled("llama");
    edit_artifact_header(&art, |h| h["tensors"][3]["offset"] = 99_999_999u64.into());
    let e = run_fails(&art);
    assert!(e.contains("outside the file"), "{e}");
}

#[test]
fn artifact_shape_lies() {
    let (_d, art) = compiled("llama");
    edit_artifact_header(&art, |h| h["tensors"][0]["shape"] = serde_json::json!([256, 127]));
    let e = run_fails(&art);
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
}

#[test]
fn run_usage_errors() {
    let (_d, art) = compiled("gpt2");
    let a = art.to_str().unwrap();
    let o = llmc(&["run", a, "--ids", "1,999", "-n", "2", "--json"]);
    assert!(!o.status.success() && stderr(&o).contains("999") && stderr(&o).contains("vocabulary"));
    // GPT-2 has 64 learned positions: 60 + 10 does not fit.
    let ids = vec!["1"; 60].join(",");
    let o = llmc(&["run", a, "--ids", &ids, "-n", "10", "--json", "--backend", "interp"]);
    assert!(!o.status.success() && stderr(&o).contains("context"), "{}", stderr(&o));
    let o = llmc(&["run", a, "--ids", "1", "--backend", "cuda"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown backend"));
}

#[test]
fn artifact_for_a_cpu_with_other_isa_features() {
    let (_d, art) = compiled("llama");
    edit_artifact_header(&art, |h| {
        h["target"]["features"] = serde_json::json!(["has_avx1024"]);
    });
    let e = run_fails(&art);
    assert!(e.contains("ISA features this CPU lacks: has_avx1024"), "{e}");
    edit_artifact_header(&art, |h| h["target"]["arch"] = "riscv64".into());
    let e = run_fails(&art);
    assert!(e.contains("compiled for riscv64"), "{e}");
}

#[test]
fn text_prompts_need_a_tokenizer_and_valid_input() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let o = llmc(&["run", a, "-p", "hello", "-n", "2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no tokenizer"), "{}", stderr(&o));
    let o = llmc(&["run", a, "-p", "", "-n", "2"]);
    assert!(!o.status.success() && stderr(&o).contains("prompt is empty"), "{}", stderr(&o));
    // invalid UTF-8 on stdin
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llmc"))
        .args(["run", a, "-n", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"caf\xe9 \xff\xfe").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("not valid UTF-8") && !e.contains("panicked"), "{e}");
}

// ---- issue 9: sizes, domains and non-finite values are refused by name ----

#[test]
fn absurd_sizes_are_refused_before_building_anything() {
    let cases: [(&str, &str, serde_json::Value); 5] = [
        ("llama", "num_hidden_layers", 16_777_216.into()),
        ("llama", "num_hidden_layers", 1_000_000_000u64.into()),
        ("llama", "vocab_size", (1u64 << 40).into()),
        ("llama", "max_position_embeddings", 1_000_000_000u64.into()),
        ("gpt2", "n_layer", 100_000.into()),
    ];
    for (fixture_name, field, value) in cases {
        let (_d, m) = copy_fixture(fixture_name);
        edit_config(&m, |v| v[field] = value.clone());
        let t0 = std::time::Instant::now();
        let e = compile_fails(&m);
        assert!(e.contains(field), "{field}: {e}");
        assert!(t0.elapsed().as_secs() < 10, "{field} = {value} took {:?}", t0.elapsed());
    }
}

#[test]
fn out_of_domain_rope_settings_are_refused() {
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>)> = vec![
        (
            "rope_scaling.factor",
            Box::new(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0})),
        ),
        (
            "rope_scaling.factor",
            Box::new(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": -2.0})),
        ),
        (
            "rope_scaling",
            Box::new(|v| {
                v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 0.0, "low_freq_factor": 0.0,
                    "high_freq_factor": 0.0, "original_max_position_embeddings": 0})
            }),
        ),
        (
            "rope_scaling",
            Box::new(|v| {
                v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
            }),
        ),
        ("rope_theta", Box::new(|v| v["rope_theta"] = "abc".into())),
        ("rope_theta", Box::new(|v| v["rope_theta"] = (-1.0).into())),
    ];
    for (field, edit) in cases {
        let (_d, m) = copy_fixture("llama");
        edit_config(&m, |v| {
            v.as_object_mut().unwrap().remove("rope_parameters");
            edit(v)
        });
        let e = compile_fails(&m);
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn nan_and_inf_weights_are_refused_by_name() {
    for bad in [f32::NAN, f32::INFINITY] {
        let (_d, m) = copy_fixture("llama");
        let p = m.join("model.safetensors");
        let mut t = read_st(&p);
        let i = t.iter().position(|t| t.0.ends_with("mlp.down_proj.weight")).unwrap();
        assert_eq!(t[i].1, "F32");
        t[i].3[40..44].copy_from_slice(&bad.to_le_bytes());
        let name = t[i].0.clone();
        write_st(&p, &t);
        let e = compile_fails(&m);
        assert!(e.contains(&name) && e.contains("non-finite"), "{e}");
    }
}

/// Corrupted artifacts that used to panic or crash, on both backends: each is one `error:`
/// line and exit 1 (the stored program is compared with the one lowered from the IR, and the
/// IR is verified: zero kv heads or experts, a divisor of zero, a reader of a cache that no
/// op writes).
#[test]
fn corrupted_programs_and_ir_are_errors_on_both_backends() {
    type Edit = Box<dyn Fn(&mut serde_json::Value, &mut String)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("llama", Box::new(|h, _| h["program"]["calls"][0]["kernel"] = 16.into())),
        ("llama", Box::new(|h, _| h["program"]["buffers"][1]["width"] = (1u64 << 31).into())),
        ("mixtral", Box::new(|h, _| set_spec_field(h, "MoeRoute", "top_k", 0))),
        ("bamba", Box::new(|h, _| set_spec_field(h, "Mamba2Scan", "groups", 0))),
        ("llama", Box::new(|h, _| set_spec_field(h, "Attention", "kv_heads", 0))),
        // the IR itself, consistently re-lowered: an attend whose kv heads disagree with its cache
        ("llama", Box::new(|_, ir| edit_ir_line(ir, "attend(", "kv_heads=2", "kv_heads=4"))),
        ("llama", Box::new(|_, ir| edit_ir_line(ir, "attend(", "kv_heads=2", "kv_heads=0"))),
        ("llama", Box::new(|_, ir| edit_ir_line(ir, "qkv_rope(", "kv_heads=2", "kv_heads=4"))),
        ("mixtral", Box::new(|_, ir| edit_ir_line(ir, "moe(", "top_k=2", "top_k=0"))),
        ("bamba", Box::new(|_, ir| edit_ir_line(ir, "mamba2(", "groups=1", "groups=0"))),
    ];
    for (i, (name, edit)) in cases.iter().enumerate() {
        let (_d, art) = compiled(name);
        let orig = llmc_compiler::artifact::ArtifactBytes::parse(&fs::read(&art).unwrap()).unwrap();
        let mut h: serde_json::Value = serde_json::from_slice(orig.header_json()).unwrap();
        let old_ir = String::from_utf8(orig.ir_text().to_vec()).unwrap();
        let mut ir = old_ir.clone();
        edit(&mut h, &mut ir);
        let bytes = if ir != old_ir {
            // a forger re-lowers the edited IR when it lowers; otherwise the old program stays
            if let Ok(p) = llmc_ir::text::parse(&ir).map(|g| llmc_compiler::lower::lower(&g)) {
                if let Ok(p) = p {
                    h["program"] = serde_json::to_value(p).unwrap();
                }
            }
            orig.with_ir(&ir, &serde_json::to_vec(&h).unwrap()).unwrap()
        } else {
            orig.with_header(&serde_json::to_vec(&h).unwrap()).unwrap()
        };
        fs::write(&art, bytes).unwrap();
        for backend in ["jit", "interp"] {
            let o = llmc(&["run", art.to_str().unwrap(), "--ids", "1,2", "-n", "2", "--backend", backend]);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "case {i} ({name}, {backend}): {e}");
            assert_eq!(e.trim().lines().count(), 1, "case {i}: {e}");
            assert!(e.starts_with("error:") && !e.contains("panicked"), "case {i}: {e}");
        }
    }
}

/// Sets `field` of the first kernel spec of kind `kind` in a header's program.
fn set_spec_field(h: &mut serde_json::Value, kind: &str, field: &str, value: u64) {
    let spec = h["program"]["kernels"].as_array_mut().unwrap().iter_mut().find(|k| k.get(kind).is_some());
    spec.unwrap()[kind][field] = value.into();
}

/// Replaces `from` by `to` in the first IR line containing `op`.
fn edit_ir_line(ir: &mut String, op: &str, from: &str, to: &str) {
    let start = ir.find(op).unwrap();
    let start = ir[..start].rfind('\n').map_or(0, |i| i + 1);
    let end = start + ir[start..].find('\n').unwrap();
    let line = ir[start..end].replacen(from, to, 1);
    assert_ne!(line, ir[start..end], "`{from}` not in the {op} line");
    ir.replace_range(start..end, &line);
}

#[test]
fn inspect_verify_finds_a_corrupted_weight() {
    let (_d, art) = compiled("llama");
    let o = llmc(&["inspect", art.to_str().unwrap(), "--verify", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], true);
    // flip one byte inside the last tensor: the header and IR still check out
    let orig = llmc_compiler::artifact::ArtifactBytes::parse(&fs::read(&art).unwrap()).unwrap();
    let h: serde_json::Value = serde_json::from_slice(orig.header_json()).unwrap();
    let t = h["tensors"].as_array().unwrap().last().unwrap().clone();
    let mut bytes = fs::read(&art).unwrap();
    bytes[t["offset"].as_u64().unwrap() as usize + 5] ^= 0x40;
    fs::write(&art, &bytes).unwrap();
    assert!(llmc(&["inspect", art.to_str().unwrap()]).status.success(), "without --verify weights are not read");
    let o = llmc(&["inspect", art.to_str().unwrap(), "--verify"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.starts_with("error:") && e.contains(t["name"].as_str().unwrap()) && e.contains("checksum"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// A huge -c neither aborts nor allocates what the run does not need: it is capped at the
/// trained context with a warning, a one-shot run sizes its cache from prompt + -n, and a
/// context that cannot fit this machine is refused with the memory it would take.
#[test]
fn huge_context_sizes_are_capped_sized_or_refused() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let o = llmc(&["run", a, "--ids", "1,2", "-n", "2", "-c", "100000000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: -c 100000000 is more than"), "{}", stderr(&o));
    let o = llmc(&["run", a, "--ids", "1,2", "-n", "2", "-c", "16000000", "--ctx-beyond-training"]);
    assert!(o.status.success(), "one-shot runs allocate what they need: {}", stderr(&o));
    // learned positions: capped with a warning, and never past them even when asked
    let (_d2, g) = compiled("gpt2");
    let o = llmc(&["run", g.to_str().unwrap(), "--ids", "1,2", "-n", "2", "-c", "100000"]);
    assert!(o.status.success() && stderr(&o).contains("positions this model has"), "{}", stderr(&o));
    let o = llmc(&["run", g.to_str().unwrap(), "--ids", "1,2", "-n", "2000", "-c", "100000", "--ctx-beyond-training"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.starts_with("error:") && e.contains("context size 2002"), "{e}");
}
