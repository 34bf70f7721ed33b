//! A real trained model end to end: SmolLM2-135M-Instruct (f32) through the JIT must produce
//! transformers' 32 greedy tokens and its top-5 logits at the last prompt position.
//! Ignored by default (it fetches and runs a 538 MB model); `scripts/test` runs it.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn model_dir() -> PathBuf {
    let dir = match std::env::var_os("LLMC_SMOLLM2") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/smollm2"),
    };
    if !dir.join("model.safetensors").exists() || !dir.join("tokenizer.json").exists() {
        let tool = common::shared().join("tools/get-smollm2");
        let st = Command::new(&tool).arg(&dir).status().expect("run get-smollm2");
        assert!(st.success(), "{} failed", tool.display());
    }
    dir
}

#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_greedy_matches_transformers() {
    let dir = model_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::shared().join("tools/smollm2/expected.json")).unwrap())
            .unwrap();
    let case = &expected["prompts"][0];
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("smollm2.llmc");
    common::compile(&dir, &art);
    let prompt = common::ints(&case["prompt_ids"]);
    let out = common::run_json(&art, &prompt, 32, &["--logits", "--backend", "jit"]);
    assert_eq!(common::ints(&out["generated_ids"]), common::ints(&case["greedy_ids"]), "greedy tokens");
    let logits = common::floats(&out["logits_last"]);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top5: Vec<i64> = idx[..5].iter().map(|&i| i as i64).collect();
    assert_eq!(top5, common::ints(&case["last_top5_ids"]), "top-5 ids");
    for (i, want) in idx[..5].iter().zip(common::floats(&case["last_top5_values"])) {
        let got = logits[*i];
        assert!((got - want).abs() <= 1e-3 * want.abs(), "logit {i}: {got} vs {want}");
    }
}
