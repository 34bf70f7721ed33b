//! The pass pipeline on every fixture family: an insta snapshot of the IR after every pass,
//! meaning preservation (interpreter before ≈ after, random weights and tokens, prefill and
//! decode steps), and where each fusion must and must not fire.

mod common;

use std::collections::HashMap;

use llmc_ir::interp::{self, KvCache, StepInput, Tensor};
use llmc_ir::passes::{self, Pass};
use llmc_ir::{text, Graph, Op};
use llmc_models::{load_config, ModelConfig};
use proptest::prelude::*;

const FAMILIES: [&str; 9] =
    ["gpt2", "llama", "mistral", "qwen2", "falcon", "mixtral", "bitnet", "bamba", "granitemoehybrid"];

fn graph(family: &str) -> (ModelConfig, Graph) {
    let (_, _, cfg) = load_config(&common::fixture(family)).unwrap();
    let g = cfg.build().unwrap().0;
    (cfg, g)
}

/// Random f32 weights, and random bytes for `u8` weights (BitNet's packed ternary values).
struct RandomWeights {
    f32: HashMap<String, Tensor>,
    u8: HashMap<String, Vec<u8>>,
}

fn random_weights(g: &Graph, seed: u64) -> RandomWeights {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 3;
    let mut u8s = HashMap::new();
    for (name, ty) in g.weights() {
        if ty.dtype == llmc_ir::DType::U8 {
            let bytes = (0..ty.shape.numel(0))
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    // four 2-bit fields, each 0..=2 (ternary -1, 0, +1)
                    (0..4).fold(0u8, |b, i| b | ((((s >> (8 * i)) % 3) as u8) << (2 * i)))
                })
                .collect();
            u8s.insert(name, bytes);
        }
    }
    let f32s = g
        .weights()
        .into_iter()
        .filter(|(_, ty)| ty.dtype != llmc_ir::DType::U8)
        .map(|(name, ty)| {
            let shape = ty.shape.resolve(0);
            let data = (0..shape.iter().product::<usize>())
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            (name, Tensor { shape, data })
        })
        .collect();
    RandomWeights { f32: f32s, u8: u8s }
}

/// Logits of a 7-token prefill then three decode steps.
fn logits(g: &Graph, w: &RandomWeights, tokens: &[i32]) -> Vec<f32> {
    let w = interp::Weights { f32: &w.f32, u8: &w.u8 };
    let mut cache = KvCache::new(g, 32);
    let mut out = Vec::new();
    let pos: Vec<i32> = (0..tokens.len() as i32).collect();
    let split = tokens.len() - 3;
    let mut steps = vec![(tokens[..split].to_vec(), pos[..split].to_vec())];
    for i in split..tokens.len() {
        steps.push((vec![tokens[i]], vec![pos[i]]));
    }
    for (t, p) in steps {
        let r = interp::run(g, StepInput { tokens: &t, positions: &p }, &w, &mut cache).unwrap();
        out.extend_from_slice(&r["logits"].data);
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1f64, |m, x| m.max(x.abs() as f64));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
}

#[test]
fn snapshot_after_every_pass() {
    for family in FAMILIES {
        let (_, mut g) = graph(family);
        for p in passes::standard_pipeline() {
            let name = p.name();
            passes::run_pipeline(&mut g, &[p]).unwrap();
            insta::assert_snapshot!(format!("{family}_after_{name}"), text::print(&g));
        }
    }
}

/// Each pass, applied after the ones before it, changes no logits (1e-5 relative).
#[test]
fn every_pass_preserves_meaning() {
    for family in FAMILIES {
        let (cfg, mut g) = graph(family);
        let w = random_weights(&g, 7);
        let tokens: Vec<i32> = (0..10).map(|i| ((i * 37 + 11) % cfg.vocab_size()) as i32).collect();
        let reference = logits(&g, &w, &tokens);
        for p in passes::standard_pipeline() {
            let name = p.name();
            passes::run_pipeline(&mut g, &[p]).unwrap();
            let err = rel_err(&logits(&g, &w, &tokens), &reference);
            assert!(err < 1e-5, "{family}: after {name}: relative error {err}");
        }
    }
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().into_iter().filter(|&id| pred(&g.node(id).op)).count()
}

fn optimized(family: &str) -> Graph {
    let (_, mut g) = graph(family);
    passes::run_pipeline(&mut g, &passes::standard_pipeline()).unwrap();
    g
}

#[test]
fn fusions_fire_where_they_should() {
    // Llama family: QKV + RoPE fused, SwiGLU fused, norms folded, residuals in epilogues.
    for family in ["llama", "mistral", "qwen2"] {
        let g = optimized(family);
        assert_eq!(count(&g, |o| matches!(o, Op::QkvRope { .. })), 2, "{family}");
        assert_eq!(count(&g, |o| matches!(o, Op::Linear { act: llmc_ir::Act::SwiGlu, .. })), 2, "{family}");
        assert_eq!(
            count(&g, |o| matches!(o, Op::Rope { .. } | Op::Attention { .. } | Op::Silu | Op::Mul)),
            0,
            "{family}"
        );
        assert_eq!(count(&g, |o| matches!(o, Op::Linear { residual: true, .. })), 4, "{family}");
        // only the final norm stays (its weight is read by nothing else, but tied or not,
        // lm_head's weight is folded only when private)
        assert!(count(&g, |o| matches!(o, Op::RmsNorm { .. })) <= 1, "{family}");
    }
    // Qwen2's q/k/v biases travel with the fusion.
    let g = optimized("qwen2");
    assert_eq!(count(&g, |o| matches!(o, Op::QkvRope { bias: true, .. })), 2);
}

#[test]
fn fusions_do_not_fire_where_they_must_not() {
    // GPT-2: no RoPE, GELU MLP: no qkv_rope, no swiglu, and its c_attn stays one projection.
    let g = optimized("gpt2");
    assert_eq!(count(&g, |o| matches!(o, Op::QkvRope { .. })), 0);
    assert_eq!(count(&g, |o| matches!(o, Op::Linear { act: llmc_ir::Act::SwiGlu, .. })), 0);
    assert_eq!(count(&g, |o| matches!(o, Op::Linear { act: llmc_ir::Act::Gelu, .. })), 2);
    assert_eq!(count(&g, |o| matches!(o, Op::Attention { .. })), 2);
    // The parallel-block rewrite only fires on Falcon's parallel blocks.
    for family in ["gpt2", "llama", "mistral", "qwen2"] {
        let (_, mut g) = graph(family);
        for p in passes::parse_pipeline("fold_norm,fuse_qkv,fuse_rope,fuse_swiglu,fuse_gelu").unwrap() {
            p.run(&mut g).unwrap();
        }
        assert!(!passes::FuseParallel.run(&mut g).unwrap(), "{family}");
    }
    let (_, mut g) = graph("falcon");
    assert!(passes::FuseParallel.run(&mut g).unwrap());
    // Falcon: both branch outputs accumulate into the residual, no adds remain.
    let g = optimized("falcon");
    assert_eq!(count(&g, |o| matches!(o, Op::Add)), 0);
    assert_eq!(count(&g, |o| matches!(o, Op::QkvRope { .. })), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// The full pipeline preserves meaning on random weights, for every family.
    #[test]
    fn pipeline_preserves_meaning_on_random_weights(seed in 1u64..10_000, family in 0usize..9) {
        let family = FAMILIES[family];
        let (cfg, g0) = graph(family);
        let w = random_weights(&g0, seed);
        let tokens: Vec<i32> = (0..9).map(|i| ((i as u64 * 31 + seed) % cfg.vocab_size() as u64) as i32).collect();
        let mut g = g0.clone();
        passes::run_pipeline(&mut g, &passes::standard_pipeline()).unwrap();
        let err = rel_err(&logits(&g, &w, &tokens), &logits(&g0, &w, &tokens));
        prop_assert!(err < 1e-5, "{family}: {err}");
    }
}
