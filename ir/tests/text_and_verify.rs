//! Text form round trips, parser and verifier errors, and interpreter semantics on tiny graphs.

use std::collections::HashMap;

use llmc_ir::interp::{self, KvCache, StepInput, Tensor};
use llmc_ir::{text, Graph, InputKind, Op, RopeScaling};
use proptest::prelude::*;

/// A small attention block with every op kind the families use.
fn block(d: usize, heads: usize, kv: usize, window: Option<usize>) -> Graph {
    let hd = d / heads;
    let mut g = Graph::new("tiny");
    let tok = g.input(InputKind::Tokens);
    let pos = g.input(InputKind::Positions);
    let emb = g.weight("emb", &[10, d]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let nw = g.weight("norm", &[d]);
    let h = g.add(Op::RmsNorm { eps: 1e-5 }, &[x, nw]).unwrap();
    let wqkv = g.weight("qkv", &[(heads + 2 * kv) * hd, d]);
    let qkv = g.add(Op::MatMul, &[h, wqkv]).unwrap();
    let q = g.add(Op::Slice { start: 0, len: heads * hd }, &[qkv]).unwrap();
    let k = g.add(Op::Slice { start: heads * hd, len: kv * hd }, &[qkv]).unwrap();
    let v = g.add(Op::Slice { start: (heads + kv) * hd, len: kv * hd }, &[qkv]).unwrap();
    let rope = |h| Op::Rope { heads: h, head_dim: hd, rotary_dim: hd, theta: 10000.0, scaling: RopeScaling::None };
    let q = g.add(rope(heads), &[q, pos]).unwrap();
    let k = g.add(rope(kv), &[k, pos]).unwrap();
    let a = g
        .add(Op::Attention { layer: 0, heads, kv_heads: kv, head_dim: hd, window, scale: 0.5 }, &[q, k, v, pos])
        .unwrap();
    let s = g.add(Op::Silu, &[a]).unwrap();
    let y = g.add(Op::Add, &[x, s]).unwrap();
    let last = g.add(Op::TakeLast, &[y]).unwrap();
    g.output("logits", last);
    g
}

#[test]
fn print_parse_print_is_identity() {
    let g = block(8, 2, 1, Some(3));
    let t1 = text::print(&g);
    let t2 = text::print(&text::parse(&t1).unwrap());
    assert_eq!(t1, t2);
    assert!(t1.contains("attention(%"), "{t1}");
    assert!(t1.contains("window=3"), "{t1}");
}

proptest! {
    #[test]
    fn round_trip_on_random_shapes(heads in 1usize..5, group in 1usize..4, hd in 1usize..6, window in proptest::option::of(1usize..40)) {
        let heads = heads * group;
        let kv = heads / group;
        let g = block(heads * hd * 2, heads, kv, window);
        let t1 = text::print(&g);
        prop_assert_eq!(&t1, &text::print(&text::parse(&t1).unwrap()));
    }
}

#[test]
fn parse_errors_name_the_line() {
    let good = text::print(&block(8, 2, 1, None));
    let bad = good.replace("rms_norm(", "rms_normz(");
    let e = text::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown op `rms_normz`") && e.contains("line"), "{e}");
    let bad = good.replace("%2 = weight", "%2 = weight_missing_close");
    assert!(text::parse(&bad).is_err());
    let e = text::parse("graph \"x\" {\n  %0 = input kind=tokens : i32[n]\n").unwrap_err().to_string();
    assert!(e.contains("missing closing"), "{e}");
}

#[test]
fn verifier_names_the_node_and_the_mismatch() {
    let good = text::print(&block(8, 2, 1, None));
    // Declare the wrong width for the q slice.
    let line = good.lines().find(|l| l.contains("slice(") && l.contains("start=0")).unwrap().to_string();
    let bad = good.replace(&line, &line.replace("f32[n, 8]", "f32[n, 9]"));
    let e = text::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("slice") && e.contains("declared type f32[n, 9]"), "{e}");
    // A matmul whose weight has the wrong inner dim.
    let mut g = Graph::new("bad");
    let tok = g.input(InputKind::Tokens);
    let emb = g.weight("emb", &[10, 4]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let w = g.weight("w", &[3, 5]);
    let e = g.add(Op::MatMul, &[x, w]).unwrap_err().to_string();
    assert!(e.contains("4 columns") && e.contains("expects 5"), "{e}");
}

fn weights(pairs: &[(&str, Vec<usize>, Vec<f32>)]) -> HashMap<String, Tensor> {
    pairs.iter().map(|(n, s, d)| (n.to_string(), Tensor { shape: s.clone(), data: d.clone() })).collect()
}

/// One-head attention with a window of 2 over values 1, 2, 4, 8 with equal scores: each query
/// averages the values of the last two positions.
#[test]
fn attention_window_and_cache_across_steps() {
    let mut g = Graph::new("win");
    let tok = g.input(InputKind::Tokens);
    let pos = g.input(InputKind::Positions);
    let emb = g.weight("emb", &[4, 1]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let zero = g.add(Op::Scale { factor: 0.0 }, &[x]).unwrap();
    let a = g
        .add(
            Op::Attention { layer: 0, heads: 1, kv_heads: 1, head_dim: 1, window: Some(2), scale: 1.0 },
            &[zero, zero, x, pos],
        )
        .unwrap();
    g.output("out", a);
    let w = weights(&[("emb", vec![4, 1], vec![1.0, 2.0, 4.0, 8.0])]);
    let mut cache = KvCache::new(&g, 8);
    // Prefill three tokens, then decode one: the cache carries the earlier values.
    let out = interp::run(&g, StepInput { tokens: &[0, 1, 2], positions: &[0, 1, 2] }, &w, &mut cache).unwrap();
    assert_eq!(out["out"].data, vec![1.0, 1.5, 3.0]);
    let out = interp::run(&g, StepInput { tokens: &[3], positions: &[3] }, &w, &mut cache).unwrap();
    assert_eq!(out["out"].data, vec![6.0]);
    let e = interp::run(&g, StepInput { tokens: &[3], positions: &[8] }, &w, &mut cache).unwrap_err();
    assert!(e.to_string().contains("outside the context of 8"), "{e}");
}

/// RoPE rotates pairs (i, i + d/2) by pos · theta^(-2i/d).
#[test]
fn rope_rotates_half_pairs() {
    let mut g = Graph::new("rope");
    let tok = g.input(InputKind::Tokens);
    let pos = g.input(InputKind::Positions);
    let emb = g.weight("emb", &[1, 4]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let r = g
        .add(Op::Rope { heads: 1, head_dim: 4, rotary_dim: 4, theta: 100.0, scaling: RopeScaling::None }, &[x, pos])
        .unwrap();
    g.output("out", r);
    let w = weights(&[("emb", vec![1, 4], vec![1.0, 2.0, 0.0, 0.0])]);
    let mut cache = KvCache::new(&g, 4);
    let out = interp::run(&g, StepInput { tokens: &[0], positions: &[3] }, &w, &mut cache).unwrap();
    let (a0, a1) = (3.0f64, 3.0f64 * 0.1); // inv_freq = [1, 100^-0.5]
    let want = [a0.cos(), 2.0 * a1.cos(), a0.sin(), 2.0 * a1.sin()];
    for (o, w) in out["out"].data.iter().zip(want) {
        assert!((*o as f64 - w).abs() < 1e-6, "{:?} vs {want:?}", out["out"].data);
    }
}

#[test]
fn llama3_scaling_matches_transformers_formula() {
    // transformers' _compute_llama3_parameters for factor 8, low 1, high 4, original 8192.
    let s =
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 };
    let f = s.inv_freq(500000.0, 128);
    let base: Vec<f64> = (0..64).map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0)).collect();
    assert!((f[0] as f64 - base[0]).abs() < 1e-7); // high frequency: unchanged
    assert!((f[63] as f64 - base[63] / 8.0).abs() / (base[63] / 8.0) < 1e-5); // low frequency: divided
    let mid = (0..64).find(|&i| {
        let wl = 2.0 * std::f64::consts::PI / base[i];
        wl > 2048.0 && wl < 8192.0
    });
    let i = mid.unwrap();
    let wl = 2.0 * std::f64::consts::PI / base[i];
    let smooth = (8192.0 / wl - 1.0) / 3.0;
    let want = (1.0 - smooth) * base[i] / 8.0 + smooth * base[i];
    assert!((f[i] as f64 - want).abs() / want < 1e-4);
}
