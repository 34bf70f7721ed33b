//! What the JIT emits, for a reviewer to read: the machine code (Cranelift's VCode listing,
//! x86-64 instructions on virtual and real registers) of one small projection kernel, for a
//! fixed x86-64-v2 target (SSE4.2, no AVX: the portable level), so the listing is the same on
//! every host and any change to the generated code shows up in the snapshot's diff. (The
//! AVX-512/AVX2 micro-kernels the wide levels call are precompiled Rust: `micro/`.)

#![cfg(target_arch = "x86_64")]

use llmc_compiler::jit::vcode_text_baseline;
use llmc_compiler::program::KernelSpec;

/// `matmul_k32_m16`: one 16-row panel over 32 columns, f32 (the decode two-panel walk, the
/// 4-token prefill tiles and the one-token rest).
#[test]
fn matmul_k32_m16_vcode() {
    let text = vcode_text_baseline(&KernelSpec::matmul(32, 16, false)).unwrap();
    insta::assert_snapshot!(text);
}
