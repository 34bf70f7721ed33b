//! Criterion benchmarks of the JIT kernels that dominate decode: the matvec (one token through
//! a SmolLM2-sized projection, in cache and streaming from DRAM) and attention over a filled KV
//! cache; and prefill attention (the last 512 rows of a 2048-token prompt, SmolLM2's heads).
//! `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmc_compiler::program::{KernelSpec, Layout};
use llmc_compiler::{jit, pack};

fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    for (k, m) in [(576usize, 1536usize), (576, 49152)] {
        let kernels = jit::compile(&[KernelSpec::matmul(k, m, false)]).expect("jit");
        let w = pack::pack(Layout::Panel16, &[m, k], &vec![0.25f32; m * k]);
        let x = vec![1.0f32; k];
        let mut out = vec![0f32; m];
        let args = [x.as_ptr() as *mut u8, w.as_ptr() as *mut u8, out.as_mut_ptr() as *mut u8];
        g.throughput(Throughput::Bytes((w.len() * 4) as u64));
        g.bench_function(format!("k{k}_m{m}"), |b| {
            // SAFETY: the pointer table matches the MatMul spec: x has k floats, w is the packed
            // m×k matrix, out has m floats; n = 1 row over all panels.
            b.iter(|| unsafe { (kernels.fns[0])(args.as_ptr(), 1, 0, m.div_ceil(16) as i64, 0) })
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let (heads, kv, hd, ctx) = (9usize, 3usize, 64usize, 512usize);
    let kernels =
        jit::compile(&[KernelSpec::Attention { heads, kv_heads: kv, head_dim: hd, window: None, scale: 0.125 }])
            .expect("jit");
    let q = vec![0.1f32; heads * hd];
    let kc = vec![0.2f32; ctx * kv * hd];
    let vc = vec![0.3f32; ctx * kv * hd];
    let pos = [ctx as i32 - 1];
    let mut out = vec![0f32; heads * hd];
    let args = [
        q.as_ptr() as *mut u8,
        pos.as_ptr() as *mut u8,
        kc.as_ptr() as *mut u8,
        vc.as_ptr() as *mut u8,
        out.as_mut_ptr() as *mut u8,
    ];
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Bytes((2 * ctx * kv * hd * 4) as u64));
    g.bench_function(format!("h{heads}_kv{kv}_hd{hd}_ctx{ctx}"), |b| {
        // SAFETY: the table matches the Attention spec; the caches hold `ctx` positions and
        // the query sits at position ctx-1; units = kv heads × 1 row.
        b.iter(|| unsafe { (kernels.fns[0])(args.as_ptr(), 1, 0, kv as i64, ctx as i64) })
    });
    g.finish();
}

fn attention_prefill(c: &mut Criterion) {
    let (heads, kv, hd, ctx, n) = (9usize, 3usize, 64usize, 2048usize, 512usize);
    let kernels =
        jit::compile(&[KernelSpec::Attention { heads, kv_heads: kv, head_dim: hd, window: None, scale: 0.125 }])
            .expect("jit");
    // scores that vary, so the running maximum moves now and then as it would
    let wave = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).sin() * 0.5).collect::<Vec<f32>>();
    let q = wave(n * heads * hd, 0.37);
    let kc = wave(ctx * kv * hd, 0.11);
    let vc = wave(ctx * kv * hd, 0.23);
    let pos: Vec<i32> = (0..n).map(|t| (ctx - n + t) as i32).collect();
    let mut out = vec![0f32; n * heads * hd];
    let args = [
        q.as_ptr() as *mut u8,
        pos.as_ptr() as *mut u8,
        kc.as_ptr() as *mut u8,
        vc.as_ptr() as *mut u8,
        out.as_mut_ptr() as *mut u8,
    ];
    // causal pairs × heads × (score + value) × 2 flops
    let pairs: usize = pos.iter().map(|&p| p as usize + 1).sum();
    let mut g = c.benchmark_group("attention_prefill");
    g.throughput(Throughput::Elements((pairs * heads * hd * 4) as u64));
    g.sample_size(20);
    g.bench_function(format!("h{heads}_kv{kv}_hd{hd}_rows{n}_ctx{ctx}"), |b| {
        // SAFETY: the table matches the Attention spec; the caches hold `ctx` positions, the
        // n rows sit at positions ctx-n .. ctx-1; units = kv heads × n rows.
        b.iter(|| unsafe { (kernels.fns[0])(args.as_ptr(), n as i64, 0, (kv * n) as i64, ctx as i64) })
    });
    g.finish();
}

criterion_group!(benches, matvec, attention, attention_prefill);
criterion_main!(benches);
