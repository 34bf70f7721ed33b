//! Times one JIT kernel spec (JSON) over random data, for `n` rows:
//! `cargo run --release -p llmc-compiler --example spec_bw -- '{"MatMul":{...}}' N`.
//! Only for matmul-shaped specs (x [n, k], w Panel16 [m, k], out [n, m]).
use llmc_compiler::program::{KernelSpec, Layout};
use std::time::Instant;

fn main() {
    let spec: KernelSpec = serde_json::from_str(&std::env::args().nth(1).expect("spec")).expect("spec json");
    let n: usize = std::env::args().nth(2).map_or(1, |s| s.parse().expect("n"));
    let KernelSpec::MatMul { k, m, bias, residual, .. } = spec.clone() else { panic!("matmul specs only") };
    let kernels = llmc_compiler::jit::compile(&[spec]).unwrap();
    let w = llmc_compiler::pack::pack(Layout::Panel16, &[m, k], &vec![0.01f32; m * k]);
    let x = vec![1.0f32; k * n];
    let b = vec![0.5f32; m.div_ceil(16) * 16];
    let r = vec![0.25f32; m * n];
    let mut out = vec![0f32; m * n];
    let mut args = vec![x.as_ptr() as *mut u8, w.as_ptr() as *mut u8];
    if bias {
        args.push(b.as_ptr() as *mut u8);
    }
    if residual {
        args.push(r.as_ptr() as *mut u8);
    }
    args.push(out.as_mut_ptr() as *mut u8);
    let panels = m.div_ceil(16) as i64;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        unsafe { (kernels.fns[0])(args.as_ptr(), n as i64, 0, panels, 0) };
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("n {n}: {:.3} ms, {:.1} GFLOP/s", best * 1e3, (2 * k * m * n) as f64 / best / 1e9);
}
