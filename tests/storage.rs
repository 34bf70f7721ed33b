//! Weight storage types end to end (`llmc compile --dtype`): every fixture family at every
//! storage type compiles and runs, the JIT agrees with the interpreter on the quantized
//! artifact (q8_0/q4_0 with int8 activations, the default), and with `--activations f32` a
//! quantized artifact means exactly the f32 model of its dequantized weights (what
//! transformers would compute on them).

mod common;

use std::fs;
use std::path::Path;

use common::{fixture, ints, llmc, run_json, stderr};

const FAMILIES: [&str; 10] =
    ["gpt2", "llama", "mistral", "qwen2", "falcon", "falcon40b", "mixtral", "bamba", "granitemoehybrid", "bitnet"];
const DTYPES: [&str; 5] = ["bf16", "f16", "q8_0", "q4_0", "q4_1"];

fn compile_with(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"];
    args.extend_from_slice(extra);
    let o = llmc(&args);
    assert!(o.status.success(), "compile {extra:?} failed: {}", stderr(&o));
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn every_family_at_every_dtype_jit_equals_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1i64, 5, 9, 2, 7, 3, 8];
    for fam in FAMILIES {
        for dt in DTYPES {
            let art = dir.path().join(format!("{fam}-{dt}.llmc"));
            compile_with(&fixture(fam), &art, &["--dtype", dt]);
            let i = run_json(&art, &ids, 6, &["--logits", "--backend", "interp"]);
            let j = run_json(&art, &ids, 6, &["--logits", "--backend", "jit"]);
            let err = max_rel(&common::floats(&j["logits_last"]), &common::floats(&i["logits_last"]));
            assert!(err < 2e-5, "{fam} {dt}: JIT vs interpreter {err:.2e}");
            assert_eq!(ints(&j["generated_ids"]), ints(&i["generated_ids"]), "{fam} {dt}");
            let o = llmc(&["inspect", art.to_str().unwrap(), "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let stored = v["dtypes"].as_object().unwrap().keys().any(|k| k.starts_with(&format!("{dt}/")));
            let q4_output = dt == "q4_0" && v["dtypes"].as_object().unwrap().keys().any(|k| k.starts_with("q8_0/"));
            assert!(stored || q4_output, "{fam} {dt}: inspect lists no {dt} tensor: {}", v["dtypes"]);
        }
    }
}

/// `--activations bf16`: every family's bf16 artifact rounds its projections' inputs to bf16
/// (`round_bf16` in its IR), and the JIT (with `vdpbf16ps` where the host has AVX512_BF16)
/// agrees with the interpreter.
#[test]
fn bf16_activations_jit_equals_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1i64, 5, 9, 2, 7, 3, 8];
    for fam in FAMILIES {
        let art = dir.path().join(format!("{fam}-bf16x.llmc"));
        compile_with(&fixture(fam), &art, &["--dtype", "bf16", "--activations", "bf16"]);
        let ir = llmc(&["ir", art.to_str().unwrap()]);
        let rounds = String::from_utf8_lossy(&ir.stdout).matches("round_bf16").count();
        // (BitNet's projections are ternary: nothing to round for)
        assert!(rounds > 0 || fam == "bitnet", "{fam}: no round_bf16 in the IR");
        let i = run_json(&art, &ids, 6, &["--logits", "--backend", "interp"]);
        let j = run_json(&art, &ids, 6, &["--logits", "--backend", "jit"]);
        // Rounding to bf16 is a step function: where the JIT's f32 sums and the interpreter's
        // f64 ones leave a value on two sides of a rounding boundary, that value moves by one
        // bf16 step (2⁻⁸ relative). Qwen2's fixture has one such value: 1.1e-4 at every ISA
        // level, with or without `vdpbf16ps`. A wrong pairing of columns is off by O(1).
        let err = max_rel(&common::floats(&j["logits_last"]), &common::floats(&i["logits_last"]));
        assert!(err < 1e-3, "{fam} bf16 activations: JIT vs interpreter {err:.2e}");
        assert_eq!(ints(&j["generated_ids"]), ints(&i["generated_ids"]), "{fam} bf16 activations");
    }
}

/// A copy of a fixture whose f32 weights are replaced by what `dtype` makes of them (every
/// 2-D+ tensor whose rows are a multiple of 32 values: the same rule as the compiler's).
fn dequantized_fixture(name: &str, dtype: llmc_ir::DType, dir: &Path) -> std::path::PathBuf {
    let model = dir.join(format!("{name}-dequantized"));
    fs::create_dir_all(&model).unwrap();
    fs::copy(fixture(name).join("config.json"), model.join("config.json")).unwrap();
    let bytes = fs::read(fixture(name).join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    for (tname, t) in header.as_object().unwrap() {
        if tname == "__metadata__" || t["dtype"] != "F32" {
            continue;
        }
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let cols = *shape.last().unwrap();
        if shape.len() < 2 || (llmc_ir::quant::is_blocked(dtype) && cols % 32 != 0) {
            continue;
        }
        let (a, b) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        let vals: Vec<f32> = data[a..b].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let round = llmc_ir::quant::round_trip(dtype, &vals, cols);
        for (i, v) in round.iter().enumerate() {
            data[a + 4 * i..a + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let mut out = bytes[..8 + n].to_vec();
    out.extend_from_slice(&data);
    fs::write(model.join("model.safetensors"), out).unwrap();
    model
}

/// Unoptimized (so the quantized tensors are the checkpoint's own, not folded ones), with
/// `--activations f32`: the quantized artifact gives the logits of the f32 model of its dequantized weights, on both
/// backends. (`--dtype q4_0` keeps the output matrix at q8_0, so it is checked as q8_0 here
/// for the families whose output matrix is the embedding.)
#[test]
fn quantized_artifacts_mean_their_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [3i64, 1, 4, 1, 5, 9, 2, 6];
    for fam in ["llama", "qwen2", "mixtral"] {
        for dt in ["bf16", "f16", "q8_0", "q4_1"] {
            let dtype = llmc_ir::DType::parse(dt).unwrap();
            let q = dir.path().join(format!("{fam}-{dt}.llmc"));
            compile_with(&fixture(fam), &q, &["--dtype", dt, "--no-opt", "--activations", "f32"]);
            let f = dir.path().join(format!("{fam}-{dt}-f32.llmc"));
            compile_with(&dequantized_fixture(fam, dtype, dir.path()), &f, &["--dtype", "f32", "--no-opt"]);
            for backend in ["jit", "interp"] {
                let a = run_json(&q, &ids, 4, &["--logits", "--backend", backend]);
                let b = run_json(&f, &ids, 4, &["--logits", "--backend", backend]);
                let err = max_rel(&common::floats(&a["logits_last"]), &common::floats(&b["logits_last"]));
                assert!(err < 2e-5, "{fam} {dt} {backend}: {err:.2e}");
                assert_eq!(ints(&a["generated_ids"]), ints(&b["generated_ids"]), "{fam} {dt} {backend}");
            }
        }
    }
}

#[test]
fn bad_dtype_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.llmc");
    let o = llmc(&["compile", fixture("llama").to_str().unwrap(), "-o", out.to_str().unwrap(), "--dtype", "q3_k"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q3_k"), "{}", stderr(&o));
}
