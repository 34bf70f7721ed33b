//! Batched steps (`llmc_runtime::Batcher`): several sequences' next tokens (and a prefill
//! chunk among them) in one step give exactly the logits each sequence's own step gives (rows
//! never mix), on every family,
//! the Mamba2 hybrids included (each sequence's conv window and SSM state), at float and int8
//! weights.

mod common;

use llmc_runtime::{Backend, Batcher, Engine, Session};

/// Three sequences with different prompts (so different positions), then six decode steps:
/// each batched step's logits equal the single-sequence steps' bit for bit on the wide
/// micro-kernels (the host's level here), and to rounding elsewhere.
fn batch_equals_single(family: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join(format!("{family}.llmc"));
    let mut args = vec!["compile", common::fixture(family).to_str().unwrap().to_string().leak() as &str, "-o"];
    let art_s = art.to_str().unwrap().to_string();
    args.push(&art_s);
    args.extend_from_slice(extra);
    let o = common::llmc(&args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let engine = Engine::open(&art, 2).unwrap();
    let vocab = engine.art.header.vocab_size as i32;
    let prompts: Vec<Vec<i32>> = vec![vec![1, 5, 9], vec![2, 7, 3, 8, 4, 6, 11], vec![10]];
    let ctx = 32;
    let mut batched: Vec<Session<'_>> =
        prompts.iter().map(|_| Session::new(&engine, Backend::Jit, Some(ctx)).unwrap()).collect();
    let mut single: Vec<Session<'_>> =
        prompts.iter().map(|_| Session::new(&engine, Backend::Jit, Some(ctx)).unwrap()).collect();
    let mut next: Vec<i32> = Vec::new();
    for ((b, s), p) in batched.iter_mut().zip(&mut single).zip(&prompts) {
        let lb = b.step(p).unwrap();
        let ls = s.step(p).unwrap();
        assert_eq!(lb, ls);
        next.push(llmc_runtime::sampler::argmax(&lb) as i32);
    }
    let mut batcher = Batcher::new(&engine, ctx, 8).unwrap();
    let wide = engine.kernels.level != llmc_compiler::jit::IsaLevel::Sse;
    for step in 0..6 {
        let mut refs: Vec<&mut Session<'_>> = batched.iter_mut().collect();
        let got = batcher.step(&mut refs, &next).unwrap();
        for (i, s) in single.iter_mut().enumerate() {
            let want = s.step(&[next[i]]).unwrap();
            if wide {
                assert_eq!(got[i], want, "{family}: step {step}, sequence {i}");
            } else {
                let worst = got[i].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{family}: step {step}, sequence {i}: {worst}");
            }
        }
        next = got.iter().map(|l| (llmc_runtime::sampler::argmax(l) as i32 + step) % vocab).collect();
    }
    // a prefill chunk sharing a step with decode tokens (the IR's rows of several sequences,
    // `seqs` = 0 0 0 1 2): each sequence's last-row logits are its own step's
    let chunks: Vec<Vec<i32>> = vec![vec![next[0], 4, 9], vec![next[1]], vec![next[2], 3]];
    let refs_chunks: Vec<&[i32]> = chunks.iter().map(Vec::as_slice).collect();
    let mut refs: Vec<&mut Session<'_>> = batched.iter_mut().collect();
    let got = batcher.step_rows(&mut refs, &refs_chunks).unwrap();
    assert_eq!(got.len(), 3);
    for (i, s) in single.iter_mut().enumerate() {
        let want = s.step(&chunks[i]).unwrap();
        if wide {
            assert_eq!(got[i], want, "{family}: mixed step, sequence {i}");
        } else {
            let worst = got[i].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{family}: mixed step, sequence {i}: {worst}");
        }
    }
    // more rows than the batch takes is an error, not an overflow
    let long: Vec<i32> = vec![1; batcher.max_rows() + 1];
    let mut refs: Vec<&mut Session<'_>> = batched.iter_mut().take(1).collect();
    assert!(batcher.step_rows(&mut refs, &[&long]).is_err());
    assert_eq!(batched.iter().map(|s| s.pos).collect::<Vec<_>>(), single.iter().map(|s| s.pos).collect::<Vec<_>>());
}

#[test]
fn batched_decode_equals_single_sequences() {
    for family in ["llama", "qwen2", "mistral", "gpt2", "falcon", "falcon40b", "mixtral", "bamba", "granitemoehybrid"] {
        batch_equals_single(family, &[]);
    }
    batch_equals_single("llama", &["--dtype", "q8_0"]);
    batch_equals_single("qwen2", &["--dtype", "q4_0"]);
}
