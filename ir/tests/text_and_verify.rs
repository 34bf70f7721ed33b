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
    let seqs = g.input(InputKind::Seqs);
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
        .add(Op::Attention { layer: 0, heads, kv_heads: kv, head_dim: hd, window, scale: 0.5 }, &[q, k, v, pos, seqs])
        .unwrap();
    let s = g.add(Op::Silu, &[a]).unwrap();
    let y = g.add(Op::Add, &[x, s]).unwrap();
    let last = g.add(Op::TakeLast, &[y, seqs]).unwrap();
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
    let bad = good.replace("%3 = weight", "%3 = weight_missing_close");
    assert_ne!(bad, good);
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
    let seqs = g.input(InputKind::Seqs);
    let emb = g.weight("emb", &[4, 1]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let zero = g.add(Op::Scale { factor: 0.0 }, &[x]).unwrap();
    let a = g
        .add(
            Op::Attention { layer: 0, heads: 1, kv_heads: 1, head_dim: 1, window: Some(2), scale: 1.0 },
            &[zero, zero, x, pos, seqs],
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

/// Mamba2's gated RMSNorm takes one mean of squares over all `heads·head_dim` channels, also
/// with two B/C groups (transformers' BambaRMSNormGated has no group size). The conv passes
/// `x` through (`d_conv = 1`, unit weights) and zeroes B and C, so the SSM adds nothing and
/// `y = D·silu(x)`; the expected rows are computed here directly. The per-group alternative
/// (mamba_ssm, llama.cpp) is computed too, to show these inputs tell the two apart.
#[test]
fn mamba2_gated_norm_spans_all_groups() {
    let (heads, hd, groups) = (4, 2, 2);
    let (inner, ch) = (heads * hd, heads * hd + 2 * groups);
    let width = inner + ch + heads;
    let mut g = Graph::new("mamba");
    let tok = g.input(InputKind::Tokens);
    g.input(InputKind::Positions);
    let seqs = g.input(InputKind::Seqs);
    let zx = g.weight("zx", &[4, width]);
    let x = g.add(Op::Embedding, &[zx, tok]).unwrap();
    let p: Vec<_> = [("cw", vec![ch, 1, 1]), ("cb", vec![ch]), ("dtb", vec![heads]), ("alog", vec![heads])]
        .into_iter()
        .chain([("d", vec![heads]), ("nw", vec![inner])])
        .map(|(n, s)| (n, g.weight(n, &s), s))
        .collect();
    let op = Op::Mamba2 { layer: 0, heads, head_dim: hd, d_state: 1, groups, d_conv: 1, chunk: 2, eps: 1e-5 };
    let ops: Vec<_> = std::iter::once(x).chain(p.iter().map(|q| q.1)).chain([seqs]).collect();
    let m = g.add(op, &ops).unwrap();
    g.output("out", m);
    // Row t: z, then x (group 0 small, group 1 large), then B, C and dt (zeroed by the conv).
    let rows: Vec<f32> = (0..4)
        .flat_map(|t| {
            let t = t as f32;
            let z = (0..inner).map(move |c| 0.4 + 0.3 * c as f32 - 0.2 * t);
            let xs = (0..inner)
                .map(move |c| if c < inner / 2 { 0.05 * (c as f32 + t + 1.0) } else { 2.0 + 0.5 * c as f32 - t });
            z.chain(xs).chain((0..2 * groups + heads).map(|c| 1.0 + c as f32))
        })
        .collect();
    let d = [1.0f32, 2.0, 0.5, 3.0];
    let nw = [1.5f32, -0.5, 2.0, 1.0, 0.25, 3.0, -1.0, 0.75];
    let cw: Vec<f32> = (0..ch).map(|c| if c < inner { 1.0 } else { 0.0 }).collect();
    let w = weights(&[
        ("zx", vec![4, width], rows.clone()),
        ("cw", p[0].2.clone(), cw),
        ("cb", p[1].2.clone(), vec![0.0; ch]),
        ("dtb", p[2].2.clone(), vec![0.5; heads]),
        ("alog", p[3].2.clone(), vec![0.0; heads]),
        ("d", p[4].2.clone(), d.to_vec()),
        ("nw", p[5].2.clone(), nw.to_vec()),
    ]);
    let silu = |v: f64| v / (1.0 + (-v).exp());
    // (whole width, per group) for token t
    let want = |t: usize| {
        let r = &rows[t * width..(t + 1) * width];
        let gated: Vec<f64> =
            (0..inner).map(|c| d[c / hd] as f64 * silu(r[inner + c] as f64) * silu(r[c] as f64)).collect();
        let norm = |xs: &[f64], w: &[f32]| {
            let inv = 1.0 / (xs.iter().map(|v| v * v).sum::<f64>() / xs.len() as f64 + 1e-5).sqrt();
            xs.iter().zip(w).map(|(v, w)| *w as f64 * v * inv).collect::<Vec<f64>>()
        };
        let per_group: Vec<f64> =
            gated.chunks(inner / groups).zip(nw.chunks(inner / groups)).flat_map(|(x, w)| norm(x, w)).collect();
        (norm(&gated, &nw), per_group)
    };
    let mut cache = KvCache::new(&g, 8);
    // A three-token step (the chunked scan, two chunks), then a one-token step (the recurrence).
    let prefill = interp::run(&g, StepInput { tokens: &[0, 1, 2], positions: &[0, 1, 2] }, &w, &mut cache).unwrap();
    let decode = interp::run(&g, StepInput { tokens: &[3], positions: &[3] }, &w, &mut cache).unwrap();
    let got: Vec<f32> = prefill["out"].data.iter().chain(&decode["out"].data).copied().collect();
    for t in 0..4 {
        let (whole, per_group) = want(t);
        let row = &got[t * inner..(t + 1) * inner];
        for (o, w) in row.iter().zip(&whole) {
            assert!((*o as f64 - w).abs() < 1e-5 * w.abs().max(1.0), "token {t}: {row:?} vs {whole:?}");
        }
        let apart = whole.iter().zip(&per_group).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(apart > 0.1, "token {t}: the inputs do not separate the two norms ({apart})");
    }
}

/// `block` with a final RMSNorm and an output projection to `vocab` logits, and weights for
/// all of it.
fn block_with_head(d: usize, vocab: usize, window: Option<usize>) -> (Graph, HashMap<String, Tensor>) {
    let mut g = block(d, 2, 1, window);
    let last = g.outputs[0].1;
    let nw = g.weight("final_norm", &[d]);
    let h = g.add(Op::RmsNorm { eps: 1e-5 }, &[last, nw]).unwrap();
    let head = g.weight("lm_head", &[vocab, d]);
    let logits = g.add(Op::MatMul, &[h, head]).unwrap();
    g.outputs = vec![("logits".into(), logits)];
    g.verify().unwrap();
    let val = |n: usize, k: usize| (0..n).map(|i| ((i * 7 + k) % 11) as f32 / 11.0 - 0.4).collect::<Vec<f32>>();
    let hd = d / 2;
    let w = weights(&[
        ("emb", vec![10, d], val(10 * d, 1)),
        ("norm", vec![d], val(d, 2)),
        ("qkv", vec![4 * hd, d], val(4 * hd * d, 3)),
        ("final_norm", vec![d], val(d, 4)),
        ("lm_head", vec![vocab, d], val(vocab * d, 5)),
    ]);
    (g, w)
}

/// `with_all_logits` removes `take_last`, re-types what follows it (`[s, d]` → `[n, d]`) and
/// leaves everything else alone: on the interpreter its last row is exactly the original
/// graph's output, and every row is the same step's per-token result.
#[test]
fn all_logits_graph_keeps_the_last_row() {
    let vocab = 5;
    let (g, w) = block_with_head(8, vocab, None);
    let all = g.with_all_logits().unwrap();
    let text = text::print(&all);
    assert!(!text.contains("take_last"), "{text}");
    assert!(text.contains(&format!(": f32[n, {vocab}]")), "{text}");
    assert_eq!(all.weights(), g.weights(), "same weights, same types");
    assert_eq!(all.kv_layers(), g.kv_layers());
    // the derived graph has nothing left to derive
    assert!(all.with_all_logits().unwrap_err().to_string().contains("no take_last"));

    let (tokens, positions) = ([3, 1, 4, 1, 5], [0, 1, 2, 3, 4]);
    let step = StepInput { tokens: &tokens, positions: &positions };
    let one = interp::run(&g, step, &w, &mut KvCache::new(&g, 8)).unwrap().remove("logits").unwrap();
    let step = StepInput { tokens: &tokens, positions: &positions };
    let every = interp::run(&all, step, &w, &mut KvCache::new(&all, 8)).unwrap().remove("logits").unwrap();
    assert_eq!(one.shape, vec![1, vocab]);
    assert_eq!(every.shape, vec![5, vocab]);
    assert_eq!(&every.data[4 * vocab..], one.data.as_slice());
    // row 1 is what a two-token step would end with
    let step = StepInput { tokens: &tokens[..2], positions: &positions[..2] };
    let two = interp::run(&g, step, &w, &mut KvCache::new(&g, 8)).unwrap().remove("logits").unwrap();
    assert_eq!(&every.data[vocab..2 * vocab], two.data.as_slice());
}

#[test]
fn all_logits_graph_needs_a_take_last() {
    let mut g = Graph::new("no_take");
    let tok = g.input(InputKind::Tokens);
    let emb = g.weight("emb", &[4, 2]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    g.output("logits", x);
    let e = g.with_all_logits().unwrap_err().to_string();
    assert!(e.contains("no take_last"), "{e}");
}

/// Found by `tests/fuzz.rs` (fuzz_ir_text): a NUL byte inserted into a weight name of the
/// printed llama graph parsed, but printed as `"\0model.norm.weight"` and parsed back as a
/// backslash and a zero: names with escapes did not survive print → parse → print.
#[test]
fn names_with_escaped_characters_round_trip() {
    let mut g = Graph::new("we\"ird\\\u{0}\t");
    let tok = g.input(InputKind::Tokens);
    let seqs = g.input(InputKind::Seqs);
    let emb = g.weight("\u{0}emb\n\u{200b}\"q\\", &[10, 4]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let last = g.add(Op::TakeLast, &[x, seqs]).unwrap();
    g.output("logits", last);
    let t1 = text::print(&g);
    let parsed = text::parse(&t1).unwrap();
    assert_eq!(parsed.name, g.name);
    assert!(parsed.weights().iter().any(|(n, _)| n == "\u{0}emb\n\u{200b}\"q\\"), "{t1}");
    assert_eq!(t1, text::print(&parsed));
    // An escape the printer never writes is an error, not a silent change of the name.
    let bad = t1.replace("\\0emb", "\\qemb");
    assert!(text::parse(&bad).is_err());
}

/// Found by `tests/fuzz.rs` (fuzz_ir_text): deleting one token of the optimized qwen2 graph
/// left `concat_rows` with scalar operands, and the type rule sliced `shape[1..]` of a rank-0
/// shape (a panic instead of a verifier error).
#[test]
fn concat_rows_of_scalars_is_a_type_error() {
    let t = "graph \"t\" {\n  %0 = weight name=\"a\" : f32[]\n  %1 = concat_rows(%0, %0) : f32[2]\n  output logits = %1\n}\n";
    let e = text::parse(t).unwrap_err().to_string();
    assert!(e.contains("concat_rows"), "{e}");
}

/// A step over several sequences (`interp::run_batch`) is each sequence's own step: rows of
/// two sequences (a decode token of one, a three-token chunk of the other) in one step give
/// each sequence's last-row logits and leave each cache as that sequence's steps alone do.
#[test]
fn batch_step_is_each_sequence_alone() {
    let vocab = 5;
    let (g, w) = block_with_head(8, vocab, Some(4));
    assert!(text::print(&g).contains("take_last(%"), "{}", text::print(&g));
    assert!(text::print(&g).contains(&format!(": f32[s, {vocab}]")), "{}", text::print(&g));
    let run = |tokens: &[i32], positions: &[i32], cache: &mut KvCache| {
        interp::run(&g, StepInput { tokens, positions }, &w, cache).unwrap().remove("logits").unwrap()
    };
    // each alone: A = [3, 1] then 4; B = [5] then [9, 2, 6]
    let (mut a, mut b) = (KvCache::new(&g, 8), KvCache::new(&g, 8));
    run(&[3, 1], &[0, 1], &mut a);
    run(&[5], &[0], &mut b);
    let (a2, b2) = (a.clone(), b.clone());
    let want_a = run(&[4], &[2], &mut a);
    let want_b = run(&[9, 2, 6], &[1, 2, 3], &mut b);
    // together: B's chunk, then A's token
    let mut caches = vec![b2.clone(), a2.clone()];
    let step = StepInput { tokens: &[9, 2, 6, 4], positions: &[1, 2, 3, 2] };
    let got = interp::run_batch(&g, step, &[0, 0, 0, 1], &w, &mut caches).unwrap().remove("logits").unwrap();
    assert_eq!(got.shape, vec![2, vocab]);
    assert_eq!(&got.data[..vocab], want_b.data.as_slice());
    assert_eq!(&got.data[vocab..], want_a.data.as_slice());
    assert_eq!(caches[0].layers[&0].k, b.layers[&0].k);
    assert_eq!(caches[1].layers[&0].v, a.layers[&0].v);
    // a sequence's rows must be contiguous and name a state
    let step = StepInput { tokens: &[9, 4, 2], positions: &[1, 2, 2] };
    let e = interp::run_batch(&g, step, &[0, 1, 0], &w, &mut caches).unwrap_err().to_string();
    assert!(e.contains("not contiguous"), "{e}");
    let step = StepInput { tokens: &[9], positions: &[1] };
    let e = interp::run_batch(&g, step, &[2], &w, &mut [b2.clone(), a2.clone()]).unwrap_err().to_string();
    assert!(e.contains("2 sequence states"), "{e}");
}

/// Ops that pair rows with the step's positions and sequences take a row per token: a
/// `take_last` result (`[s, d]`, one row per sequence) fed to attention is a type error, not
/// rows the interpreter would slice past.
#[test]
fn stateful_ops_take_a_row_per_token() {
    let mut g = Graph::new("rows");
    let tok = g.input(InputKind::Tokens);
    let pos = g.input(InputKind::Positions);
    let seqs = g.input(InputKind::Seqs);
    let emb = g.weight("emb", &[4, 2]);
    let x = g.add(Op::Embedding, &[emb, tok]).unwrap();
    let last = g.add(Op::TakeLast, &[x, seqs]).unwrap();
    let att = Op::Attention { layer: 0, heads: 1, kv_heads: 1, head_dim: 2, window: None, scale: 1.0 };
    let e = g.add(att.clone(), &[last, x, x, pos, seqs]).unwrap_err().to_string();
    assert!(e.contains("a row per token"), "{e}");
    assert!(g.add(att, &[x, x, x, pos, seqs]).is_ok());
    let rope = Op::Rope { heads: 1, head_dim: 2, rotary_dim: 2, theta: 10000.0, scaling: RopeScaling::None };
    assert!(g.add(rope, &[last, pos]).unwrap_err().to_string().contains("a row per token"));
}
