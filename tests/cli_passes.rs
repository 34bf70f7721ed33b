//! The pass-pipeline CLI: `llmc ir --list-passes`, `llmc ir MODEL --after PASS`,
//! `llmc compile --passes LIST` and `--no-opt`, and kernel calls per layer after fusion.

mod common;

use common::{fixture, llmc, stderr};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn list_passes_in_pipeline_order() {
    let o = llmc(&["ir", "--list-passes"]);
    assert!(o.status.success());
    let names: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(
        names,
        [
            "fold_norm",
            "fuse_qkv",
            "fuse_rope",
            "fuse_swiglu",
            "fuse_gelu",
            "fuse_parallel",
            "fuse_residual",
            "cse",
            "dce"
        ]
    );
}

#[test]
fn ir_after_a_pass_shows_its_rewrite() {
    let m = fixture("llama");
    let m = m.to_str().unwrap();
    let before = stdout(&llmc(&["ir", m]));
    assert!(before.contains("silu(") && !before.contains("act=swiglu"));
    let after = stdout(&llmc(&["ir", m, "--after", "fuse_swiglu"]));
    assert!(after.contains("act=swiglu") && after.contains("interleave_rows8(") && !after.contains("silu("), "{after}");
    assert!(after.contains("qkv_rope("), "earlier passes ran too");
    assert!(!after.contains("residual=true"), "later passes did not");
    let o = llmc(&["ir", m, "--after", "fuse_everything"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown pass `fuse_everything`"));
}

#[test]
fn compile_with_custom_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixture("qwen2");
    let exp = common::expected("qwen2");
    let prompt = common::ints(&exp["prompt_ids"]);
    for (flags, calls_per_layer) in [
        (vec!["--no-opt"], None),
        (vec!["--passes", "fuse_qkv,fuse_rope"], None),
        (vec!["--passes", "fold_norm,fuse_qkv,fuse_rope,fuse_swiglu,fuse_residual"], Some(5)),
        (vec![], Some(5)),
    ] {
        let art = dir.path().join("m.llmc");
        let mut args = vec!["compile", m.to_str().unwrap(), "-o", art.to_str().unwrap()];
        args.extend(flags.iter().copied());
        let o = llmc(&args);
        assert!(o.status.success(), "{flags:?}: {}", stderr(&o));
        let out = common::run_json(&art, &prompt, 24, &["--backend", "jit"]);
        assert_eq!(common::ints(&out["generated_ids"]), common::ints(&exp["greedy_ids"]), "{flags:?}");
        if let Some(per_layer) = calls_per_layer {
            let b = llmc(&["bench", art.to_str().unwrap(), "-p", "4", "-n", "2", "--json"]);
            assert!(b.status.success(), "{}", stderr(&b));
            let r: serde_json::Value = serde_json::from_str(stdout(&b).trim()).unwrap();
            // 2 layers; outside them: embedding, take_last and lm_head (final norm folded in)
            let calls = r["kernel_calls_per_token"].as_u64().unwrap();
            assert_eq!(calls, 2 * per_layer + 3, "{flags:?}");
        }
    }
    let o =
        llmc(&["compile", m.to_str().unwrap(), "-o", dir.path().join("x.llmc").to_str().unwrap(), "--passes", "nope"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown pass `nope`"));
}
