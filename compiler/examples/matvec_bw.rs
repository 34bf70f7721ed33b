//! Measures one JIT matvec over a matrix larger than the caches:
//! `cargo run --release -p llmc-compiler --example matvec_bw -- K M [n]`.
use llmc_compiler::program::KernelSpec;
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (k, m, n) = (a[0], a[1], a.get(2).copied().unwrap_or(1));
    let spec = KernelSpec::matmul(k, m, false);
    let kernels = llmc_compiler::jit::compile(&[spec]).unwrap();
    let w = llmc_compiler::pack::pack(llmc_compiler::program::Layout::Panel16, &[m, k], &vec![0.5f32; m * k]);
    let x = vec![1.0f32; k * n];
    let mut out = vec![0f32; m * n];
    let args = [x.as_ptr() as *mut u8, w.as_ptr() as *mut u8, out.as_mut_ptr() as *mut u8];
    let panels = m.div_ceil(16) as i64;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        unsafe { (kernels.fns[0])(args.as_ptr(), n as i64, 0, panels, 0) };
        best = best.min(t.elapsed().as_secs_f64());
    }
    assert_eq!(out[0], 0.5 * k as f32);
    println!(
        "k {k} m {m} n {n}: {:.2} ms, {:.1} GB/s, {:.1} GFLOP/s",
        best * 1e3,
        (w.len() * 4) as f64 / best / 1e9,
        (2 * k * m * n) as f64 / best / 1e9
    );
}
