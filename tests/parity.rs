//! Hugging Face parity: every fixture family compiled and run through the `llmc` binary must
//! match transformers' logits (1e-4 · max(1, max|expected|)) and all 24 greedy ids.

mod common;

#[test]
fn gpt2_interp() {
    common::check_parity("gpt2", "interp");
}

#[test]
fn llama_interp() {
    common::check_parity("llama", "interp");
}

#[test]
fn mistral_interp() {
    common::check_parity("mistral", "interp");
}

#[test]
fn qwen2_interp() {
    common::check_parity("qwen2", "interp");
}

#[test]
fn falcon_interp() {
    common::check_parity("falcon", "interp");
}

/// Falcon-40B's layout (`new_decoder_architecture`: grouped kv heads, two norms per block);
/// the fixture is the project's own (scripts/make-falcon40b-fixture).
#[test]
fn falcon40b_interp() {
    common::check_parity("falcon40b", "interp");
}

#[test]
fn falcon40b_jit() {
    common::check_parity("falcon40b", "jit");
}

#[test]
fn gpt2_jit() {
    common::check_parity("gpt2", "jit");
}

#[test]
fn llama_jit() {
    common::check_parity("llama", "jit");
}

#[test]
fn mistral_jit() {
    common::check_parity("mistral", "jit");
}

#[test]
fn qwen2_jit() {
    common::check_parity("qwen2", "jit");
}

#[test]
fn falcon_jit() {
    common::check_parity("falcon", "jit");
}

#[test]
fn mixtral_interp() {
    common::check_parity("mixtral", "interp");
}

#[test]
fn mixtral_jit() {
    common::check_parity("mixtral", "jit");
}

#[test]
fn bitnet_interp() {
    common::check_parity("bitnet", "interp");
}

#[test]
fn bitnet_jit() {
    common::check_parity("bitnet", "jit");
}

#[test]
fn bamba_interp() {
    common::check_parity("bamba", "interp");
}

#[test]
fn bamba_jit() {
    common::check_parity("bamba", "jit");
}

#[test]
fn granitemoehybrid_interp() {
    common::check_parity("granitemoehybrid", "interp");
}

#[test]
fn granitemoehybrid_jit() {
    common::check_parity("granitemoehybrid", "jit");
}

/// Without --backend the fastest backend (the JIT) runs, with the same results.
#[test]
fn default_backend_is_jit() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("m.llmc");
    common::compile(&common::fixture("mistral"), &art);
    let exp = common::expected("mistral");
    let out = common::run_json(&art, &common::ints(&exp["prompt_ids"]), 24, &["-t", "2"]);
    assert_eq!(common::ints(&out["generated_ids"]), common::ints(&exp["greedy_ids"]));
}

/// The unfused program (`--no-opt`) on the JIT matches too: every unfused kernel stays tested.
#[test]
fn all_families_without_passes() {
    for name in
        ["gpt2", "llama", "mistral", "qwen2", "falcon", "falcon40b", "mixtral", "bitnet", "bamba", "granitemoehybrid"]
    {
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("m.llmc");
        let fx = common::fixture(name);
        let o = common::llmc(&["compile", fx.to_str().unwrap(), "-o", art.to_str().unwrap(), "--no-opt"]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let exp = common::expected(name);
        let out = common::run_json(&art, &common::ints(&exp["prompt_ids"]), 24, &["--logits", "--backend", "jit"]);
        assert_eq!(common::ints(&out["generated_ids"]), common::ints(&exp["greedy_ids"]), "{name}");
        let got = common::floats(&out["logits_last"]);
        let want = common::floats(&exp["logits_last"]);
        let max_abs = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * max_abs.max(1.0), "{name} --no-opt: {err}");
    }
}

/// The whole binary at every lower ISA level (`LLMC_ISA`): the same logits and greedy ids as
/// transformers on a dense and a MoE fixture; a level the host lacks, or a bad name, is one
/// error line.
#[test]
fn every_isa_level_matches_transformers() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    for name in ["llama", "mixtral"] {
        let art = dir.path().join(format!("{name}.llmc"));
        common::compile(&common::fixture(name), &art);
        let exp = common::expected(name);
        let prompt = common::ints(&exp["prompt_ids"]);
        let ids = prompt.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        for level in ["avxvnni", "avx2", "sse"] {
            let o = Command::new(common::llmc_bin())
                .args(["run", art.to_str().unwrap(), "--ids", &ids, "-n", "24", "--temp", "0", "--json", "--logits"])
                .env("LLMC_ISA", level)
                .output()
                .unwrap();
            let err = common::stderr(&o);
            if err.contains("best level is") {
                eprintln!("{name}: this CPU has no {level} level: {err}");
                continue;
            }
            assert!(o.status.success(), "{name} at {level}: {err}");
            let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let (got, want) = (common::floats(&out["logits_last"]), common::floats(&exp["logits_last"]));
            let max_abs = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let e = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(e <= 1e-4 * max_abs.max(1.0), "{name} at {level}: max |logits - expected| = {e}");
            assert_eq!(common::ints(&out["generated_ids"]), common::ints(&exp["greedy_ids"]), "{name} at {level}");
        }
    }
    let o = Command::new(common::llmc_bin())
        .args(["bench", dir.path().join("llama.llmc").to_str().unwrap(), "-p", "2", "-n", "1"])
        .env("LLMC_ISA", "avx9000")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("LLMC_ISA") && err.trim().lines().count() == 1, "{err}");
}
