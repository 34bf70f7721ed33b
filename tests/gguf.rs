//! GGUF files end to end: SmolLM2-135M-Instruct's Q4_1 GGUF (Q4_1 blocks, Q8_0 embeddings;
//! fetched once per test process by scripts/get-smollm2-gguf) compiled and run directly, with
//! its tokenizer and chat template from the file's own metadata; and hostile or unsupported
//! GGUF files refused with one clear line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{floats, ints, llmc, run_json, stderr};

fn gguf() -> PathBuf {
    common::smollm2_gguf()
}

/// transformers' reference for SmolLM2 (its weights are this GGUF's, dequantized).
fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(common::shared().join("tools/smollm2/expected.json")).unwrap();
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    e["prompts"][0].clone()
}

fn compile(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"];
    args.extend_from_slice(extra);
    let o = llmc(&args);
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
}

/// With f32 activations the GGUF's prompt ids (from its own tokenizer metadata) and greedy ids
/// equal transformers'.
#[test]
#[ignore = "fetches a 98 MB GGUF; scripts/test runs it in release mode"]
fn smollm2_gguf_equals_transformers_with_f32_activations() {
    let case = expected();
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("smollm2-gguf-f32.llmc");
    compile(&gguf(), &art, &["--activations", "f32"]);
    let o = llmc(&["run", art.to_str().unwrap(), "-p", case["text"].as_str().unwrap(), "-n", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ints(&v["prompt_ids"]), ints(&case["prompt_ids"]));
    let g = run_json(&art, &ints(&case["prompt_ids"]), 32, &[]);
    assert_eq!(ints(&g["generated_ids"]), ints(&case["greedy_ids"]));
    let o = llmc(&["inspect", art.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dtypes = v["dtypes"].as_object().unwrap();
    // stored as the file has them: Q4_1 blocks and the Q8_0 embedding table
    assert!(
        dtypes.keys().any(|k| k.starts_with("q8_0/")) && dtypes.keys().any(|k| k.starts_with("q4_1/")),
        "{dtypes:?}"
    );
}

/// Feeds transformers' greedy tokens one at a time (teacher forcing) and returns, for every
/// step where the argmax differs from transformers' token, `(step, argmax, its logit minus the
/// logit of transformers' token)`.
fn teacher_forced(art: &Path, prompt: &[i64], greedy: &[i64]) -> Vec<(usize, i32, f32)> {
    let engine = llmc_runtime::Engine::open(art, 2).unwrap();
    let mut s = llmc_runtime::session::Session::new(
        &engine,
        llmc_runtime::session::Backend::Jit,
        Some(prompt.len() + greedy.len() + 1),
    )
    .unwrap();
    let prompt: Vec<i32> = prompt.iter().map(|&i| i as i32).collect();
    let argmax =
        |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as i32;
    let mut logits = s.step(&prompt).unwrap();
    let mut misses = Vec::new();
    for (i, &want) in greedy.iter().enumerate() {
        let got = argmax(&logits);
        if got != want as i32 {
            misses.push((i, got, logits[got as usize] - logits[want as usize]));
        }
        logits = s.step(&[want as i32]).unwrap();
    }
    misses
}

/// The int8 activation path (each projection's input rounded to 8 bits, as llama.cpp does) is
/// not transformers' arithmetic: any f32 rounding difference upstream moves some activations
/// across a rounding boundary (a few dozen per token), so where transformers' top two logits
/// are close, the argmax can go either way, and which way depends on the kernels' summation
/// order. What must hold: the argmax agrees at most steps, and where it does not, transformers'
/// token is within `NEAR_TIE` of the top logit (a wrong kernel misses by whole units).
const NEAR_TIE: f32 = 0.25;

/// Teacher-forced steps of 32 at which the int8 kernels' argmax must equal transformers' token:
/// llama.cpp's agreement on the same files (31 of 32 on SmolLM2's and Qwen 0.5B's, see the
/// issue's correctness criteria).
const AGREE: usize = 31;

fn assert_follows(name: &str, misses: &[(usize, i32, f32)], steps: usize, min_agree: usize) {
    for (i, got, gap) in misses {
        eprintln!("{name}: step {i}: argmax {got}, {gap:.4} above transformers' token");
    }
    eprintln!("{name}: int8 kernels agree with transformers at {} of {steps} steps", steps - misses.len());
    assert!(steps - misses.len() >= min_agree, "{name}: {} of {steps}", steps - misses.len());
    assert!(misses.iter().all(|m| m.2 < NEAR_TIE), "{name}: a miss that is not a near tie: {misses:?}");
}

/// With the default (int8 activation) kernels, fed transformers' greedy tokens one at a time,
/// the argmax agrees at 31 of 32 steps or more (llama.cpp's agreement on this file), every
/// miss a near tie. The logits projection reads its input as int8 plus residual
/// (`quant_q8x2`); with one int8 rounding there this was 29.
#[test]
#[ignore = "fetches a 98 MB GGUF; scripts/test runs it in release mode"]
fn smollm2_gguf_default_kernels_follow_transformers() {
    let case = expected();
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("smollm2-gguf.llmc");
    compile(&gguf(), &art, &[]);
    let o = llmc(&["ir", art.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ir = String::from_utf8_lossy(&o.stdout);
    assert_eq!(ir.matches("quant_q8x2(").count(), 1, "one quant_q8x2, before the logits projection:\n{ir}");
    assert_eq!(ir.matches("quant_q8(").count(), 30 * 4, "each layer's QKV, output, gate/up and down inputs");
    let greedy = ints(&case["greedy_ids"]);
    let misses = teacher_forced(&art, &ints(&case["prompt_ids"]), &greedy);
    assert_follows("smollm2", &misses, greedy.len(), AGREE);
}

/// `llmc run model.gguf` compiles on first use into the cache, says so, and reuses it.
#[test]
#[ignore = "fetches a 98 MB GGUF; scripts/test runs it in release mode"]
fn run_gguf_compiles_once_into_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(common::llmc_bin())
            .args(["run", gguf().to_str().unwrap(), "-p", "The capital of France is", "-n", "3", "--temp", "0"])
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("first use"), "{}", stderr(&first));
    assert!(String::from_utf8_lossy(&first.stdout).starts_with(" Paris"), "{}", String::from_utf8_lossy(&first.stdout));
    let second = run();
    assert!(second.status.success());
    assert!(!stderr(&second).contains("first use"), "{}", stderr(&second));
    assert_eq!(first.stdout, second.stdout);
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("llmc")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one artifact, no temp files left");
}

/// A minimal GGUF: `general.architecture` and one f32 tensor.
fn tiny_gguf(arch: &str) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, arch);
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend([0u8; 32]);
    b
}

#[test]
fn unsupported_and_broken_gguf_files_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.llmc");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("mamba.gguf", tiny_gguf("mamba"), "architecture `mamba` is not supported"),
        ("trunc.gguf", tiny_gguf("llama")[..60].to_vec(), "invalid GGUF file"),
        ("noblocks.gguf", tiny_gguf("llama"), "metadata `llama.embedding_length` is missing"),
        ("magic.gguf", b"GGUF\x09\0\0\0".to_vec(), "GGUF version 9"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        for cmd in [
            vec!["compile", p.to_str().unwrap(), "-o", out.to_str().unwrap()],
            vec!["run", p.to_str().unwrap(), "-p", "x"],
        ] {
            let o = Command::new(common::llmc_bin()).args(&cmd).env("XDG_CACHE_HOME", dir.path()).output().unwrap();
            assert!(!o.status.success(), "{name}: {cmd:?} succeeded");
            let e = stderr(&o);
            assert!(e.contains(want), "{name}: {e}");
            assert!(!e.contains("panicked"), "{name}: {e}");
        }
    }
}

/// Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF (Q5_0, Q8_0, Q6_K, Q4_K and F32 tensors; qwen2
/// architecture and pre-tokenizer).
fn qwen() -> PathBuf {
    qwen25("0.5b")
}

/// A Qwen2.5-Coder GGUF of `size` (`0.5b`, `1.5b`), fetched once per test process by
/// ../shared/tools/get-qwen25.
fn qwen25(size: &'static str) -> PathBuf {
    static PATHS: OnceLock<std::sync::Mutex<std::collections::HashMap<&str, PathBuf>>> = OnceLock::new();
    let mut paths = PATHS.get_or_init(Default::default).lock().unwrap();
    paths
        .entry(size)
        .or_insert_with(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models");
            let o = Command::new(common::shared().join("tools/get-qwen25"))
                .arg(&dir)
                .arg(size)
                .output()
                .expect("run get-qwen25");
            assert!(o.status.success(), "get-qwen25: {}", String::from_utf8_lossy(&o.stderr));
            PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
        })
        .clone()
}

fn qwen_expected() -> serde_json::Value {
    let text = std::fs::read_to_string(common::shared().join("tools/qwen25/expected-0.5b.json")).unwrap();
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    e["prompts"][0].clone()
}

/// Prompt ids from the GGUF's own tokenizer; greedy ids with f32 activations equal
/// transformers' (on the file's dequantized weights); the default int8 kernels follow them
/// (teacher-forced, every miss a near tie: see `NEAR_TIE`).
#[test]
fn qwen25_gguf_equals_transformers() {
    let case = qwen_expected();
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("default", &[][..]), ("f32", &["--activations", "f32"][..])] {
        let art = dir.path().join(format!("qwen-{name}.llmc"));
        compile(&qwen(), &art, extra);
        // the file's blocks are kept as they are: Q4_K as q4_k, Q6_K as q6_k, Q5_0 and Q8_0 as
        // q8_0 (the ffn_down matrices are Q4_K or Q6_K; the rest of this file is Q5_0 / Q8_0)
        let o = llmc(&["inspect", art.to_str().unwrap()]);
        let storage =
            String::from_utf8_lossy(&o.stdout).lines().find(|l| l.contains("storage")).unwrap_or("").to_string();
        for t in ["q4_k/", "q6_k/", "q8_0/"] {
            assert!(storage.contains(t), "{name}: {storage}");
        }
        let o = llmc(&["run", art.to_str().unwrap(), "-p", case["text"].as_str().unwrap(), "-n", "1", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(ints(&v["prompt_ids"]), ints(&case["prompt_ids"]), "{name}");
        if name == "f32" {
            let g = run_json(&art, &ints(&case["prompt_ids"]), 32, &[]);
            assert_eq!(ints(&g["generated_ids"]), ints(&case["greedy_ids"]), "{name}");
        } else {
            let greedy = ints(&case["greedy_ids"]);
            let misses = teacher_forced(&art, &ints(&case["prompt_ids"]), &greedy);
            assert_follows("qwen 0.5b", &misses, greedy.len(), AGREE);
        }
        let _ = std::fs::remove_file(&art);
    }
}

/// `llmc perplexity` straight on the GGUF (GPL-3, `-c 512`, llama-perplexity's method): 18.19
/// with the default int8 kernels, within 1 % of the f32 model of the same weights (18.13,
/// tests/perplexity.rs). llama-perplexity gives 18.39 on this file: its `smollm`
/// pre-tokenizer splits digits, transformers' tokenizer (which llmc follows) does not; with
/// llama.cpp's split the f32 model gives llama.cpp's number (tests/perplexity.rs).
#[test]
#[ignore = "fetches a 98 MB GGUF and scores 3,570 tokens; scripts/test runs it in release mode"]
fn smollm2_gguf_perplexity() {
    let p = gpl3_perplexity(&gguf());
    assert!((p - 18.19).abs() < 0.1, "ppl {p}");
    assert!((p / 18.13 - 1.0).abs() < 0.01, "ppl {p} vs the f32 model's 18.13");
}

/// `llmc perplexity MODEL -f GPL-3 -c 512 --json` (the GGUF compiled into a fresh cache): the
/// estimate over its 14 chunks.
fn gpl3_perplexity(model: &Path) -> f64 {
    let cache = tempfile::tempdir().unwrap();
    let o = Command::new(common::llmc_bin())
        .args(["perplexity", model.to_str().unwrap(), "-f", "/usr/share/common-licenses/GPL-3", "-c", "512", "--json"])
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["chunks"], 14);
    v["ppl"].as_f64().unwrap()
}

/// `llmc perplexity` on Qwen2.5-Coder-0.5B's Q4_K_M GGUF (GPL-3, `-c 512`, default int8
/// kernels) within 1 % of llama-perplexity on the same file: 5.3184 ± 0.186 (llama.cpp
/// 0.3.36's build, measured beside llmc's 5.307 on the development VM).
#[test]
#[ignore = "scores 3,570 tokens with a 0.5B model; scripts/test runs it in release mode"]
fn qwen25_gguf_perplexity_is_llama_cpps() {
    let p = gpl3_perplexity(&qwen());
    assert!((p / 5.3184 - 1.0).abs() < 0.01, "ppl {p} vs llama-perplexity's 5.3184");
}

/// Qwen2.5-Coder-1.5B-Instruct's Q4_K_M GGUF (Q4_K, Q6_K and F32 tensors: the speed
/// model).
fn qwen15() -> PathBuf {
    qwen25("1.5b")
}

/// With f32 activations llmc computes what transformers computes, up to f32 summation order:
/// a step whose top two logits are closer than this can go either way.
const EXACT_TIE: f32 = 0.01;

/// The 1.5B against transformers' reference for it (tests/data/qwen25-1.5b-expected.json, made
/// by scripts/make-qwen15-reference from the same file): for each prompt, the GGUF tokenizer's
/// ids; with `--activations f32` the greedy ids (but where transformers' own top two tie, see
/// `EXACT_TIE`); with the default int8 kernels, fed
/// transformers' tokens, the argmax at `AGREE` of 32 steps or more, every miss a near tie.
#[test]
#[ignore = "fetches a 1.1 GB GGUF and runs a 1.5B model; scripts/test runs it in release mode"]
fn qwen25_1_5b_gguf_equals_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen25-1.5b-expected.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = qwen15();
    assert_eq!(std::fs::metadata(&model).unwrap().len(), reference["gguf_bytes"].as_u64().unwrap());
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("default", &[][..]), ("f32", &["--activations", "f32"][..])] {
        let art = dir.path().join(format!("qwen15-{name}.llmc"));
        compile(&model, &art, extra);
        for case in reference["prompts"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let o = llmc(&["run", art.to_str().unwrap(), "-p", text, "-n", "1", "--json"]);
            assert!(o.status.success(), "{}", stderr(&o));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(ints(&v["prompt_ids"]), ints(&case["prompt_ids"]), "{name}: {text:?}");
            let greedy = ints(&case["greedy_ids"]);
            if name == "f32" {
                // transformers' own top two are 0.0008 apart at one step of the first prompt:
                // there f32 summation order decides. Free-running greedy ids equal up to the
                // first step whose margin is under `EXACT_TIE`; fed transformers' tokens, the
                // argmax equals at every step but such ties, and misses there by less.
                let margins = floats(&case["greedy_margins"]);
                let tie = margins.iter().position(|&m| m < EXACT_TIE as f64).unwrap_or(greedy.len());
                let g = run_json(&art, &ints(&case["prompt_ids"]), greedy.len(), &[]);
                assert_eq!(ints(&g["generated_ids"])[..tie], greedy[..tie], "{name}: {text:?}");
                for (i, got, gap) in teacher_forced(&art, &ints(&case["prompt_ids"]), &greedy) {
                    assert!(
                        margins[i] < EXACT_TIE as f64 && gap < EXACT_TIE,
                        "{name}: {text:?} step {i}: argmax {got}, {gap} above transformers' token (margin {})",
                        margins[i]
                    );
                }
            } else {
                let misses = teacher_forced(&art, &ints(&case["prompt_ids"]), &greedy);
                assert_follows(&format!("qwen 1.5b {text:?}"), &misses, greedy.len(), AGREE);
            }
        }
        let _ = std::fs::remove_file(&art);
    }
}

/// `llmc perplexity` on the 1.5B's GGUF (GPL-3, `-c 512`, default int8 kernels) within 1 % of
/// llama-perplexity on the same file: 1.761 (llama.cpp 0.3.36's build, measured beside llmc's
/// 1.757 on the development VM).
#[test]
#[ignore = "fetches a 1.1 GB GGUF and scores 3,570 tokens with a 1.5B model; scripts/test runs it in release mode"]
fn qwen25_1_5b_gguf_perplexity_is_llama_cpps() {
    let p = gpl3_perplexity(&qwen15());
    assert!((p / 1.761 - 1.0).abs() < 0.01, "ppl {p} vs llama-perplexity's 1.761");
}
