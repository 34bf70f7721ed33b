//! Helpers for the end-to-end tests of the `llmc` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `../shared` beside the checkout (override with `LLMC_SHARED`).
pub fn shared() -> PathBuf {
    match std::env::var_os("LLMC_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

/// A parity fixture: the project's own (tests/data/fixtures, made by its scripts) or one of
/// ../shared/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    let own = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures").join(name);
    if own.join("config.json").exists() {
        return own;
    }
    let p = shared().join("fixtures").join(name);
    assert!(p.join("config.json").exists(), "fixture {} not found (set LLMC_SHARED)", p.display());
    p
}

pub fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The `llmc` binary under test: cargo's, or `LLMC_BIN` when set (a copy kept aside when
/// several checkouts build into one shared target folder and overwrite each other's binary).
pub fn llmc_bin() -> PathBuf {
    std::env::var_os("LLMC_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llmc")), PathBuf::from)
}

pub fn llmc(args: &[&str]) -> Output {
    Command::new(llmc_bin()).args(args).output().expect("run llmc")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Compiles a model, panicking with llmc's message on failure.
pub fn compile(model: &Path, out: &Path) {
    let o = llmc(&["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
}

/// `llmc run ... --json` → the parsed object.
pub fn run_json(artifact: &Path, ids: &[i64], n: usize, extra: &[&str]) -> Value {
    let joined = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let n = n.to_string();
    let mut args = vec!["run", artifact.to_str().unwrap(), "--ids", &joined, "-n", &n, "--temp", "0", "--json"];
    args.extend_from_slice(extra);
    let o = llmc(&args);
    assert!(o.status.success(), "run failed: {}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "stdout must be exactly one JSON object: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// Checks logits and greedy ids against a fixture's expected.json; returns the max abs error.
pub fn check_parity(name: &str, backend: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join(format!("{name}.llmc"));
    compile(&fixture(name), &art);
    let exp = expected(name);
    let prompt = ints(&exp["prompt_ids"]);
    let out = run_json(&art, &prompt, 24, &["--logits", "--backend", backend]);
    assert_eq!(ints(&out["prompt_ids"]), prompt);
    let got = floats(&out["logits_last"]);
    let want = floats(&exp["logits_last"]);
    assert_eq!(got.len(), want.len(), "{name}: logits length");
    let max_abs = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * max_abs.max(1.0), "{name} ({backend}): max |logits - expected| = {err}");
    assert_eq!(ints(&out["generated_ids"]), ints(&exp["greedy_ids"]), "{name} ({backend}): greedy ids");
    eprintln!("{name} ({backend}): max abs logits error {err:.3e} (max |expected| {max_abs:.3})");
    err
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF, fetched once per test process by
/// scripts/get-smollm2-gguf into target/models.
pub fn smollm2_gguf() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| fetch("scripts/get-smollm2-gguf")).clone()
}

/// llama.cpp's tokenizer test vocabularies (`ggml-vocab-*.gguf` with `.inp`/`.out`), fetched
/// once per test process by scripts/get-ggml-vocab into target/models/ggml-vocab.
pub fn ggml_vocab() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| fetch("scripts/get-ggml-vocab")).clone()
}

/// Runs one of the project's fetch scripts with target/models and returns the path it prints.
fn fetch(script: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join(script)).arg(root.join("target/models")).output().expect(script);
    assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}
