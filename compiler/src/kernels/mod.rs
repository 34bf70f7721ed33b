//! One file per kernel family; `build` dispatches a spec to its generator.

pub mod attention;
pub mod bitnet;
pub mod dot;
pub mod elementwise;
pub mod kb;
pub mod mamba;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod qkv_rope;
pub mod rope;
pub mod storage;
pub mod wide;

use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::FunctionBuilder;

use crate::program::KernelSpec;
use kb::Kb;

/// Emits the body of the kernel for `spec` into `b` (`fma`: whether the target has fused
/// multiply-add; without it, `Kb::fma` multiplies and adds; `wide`: whether projections call
/// the wide micro-kernels of `crate::micro`; `bf16_dot`: whether they use its `vdpbf16ps`
/// tile where there is one, `Kb::bf16_dot`).
pub fn build(
    spec: &KernelSpec,
    b: FunctionBuilder<'_>,
    cfg: TargetFrontendConfig,
    fma: bool,
    wide: Option<crate::micro::Wide>,
    bf16_dot: bool,
) {
    let mut k = Kb::new(b, cfg, fma, wide);
    k.bf16_dot = bf16_dot;
    match spec {
        KernelSpec::Embedding { d, layout, w } => elementwise::embedding(&mut k, *d, *layout, *w),
        KernelSpec::MatMul { k: kd, m, bias, rms_eps, act, residual, w, xq, xbf16 } => {
            matmul::matmul(&mut k, *kd, *m, *bias, *rms_eps, *act, *residual, *w, *xq, *xbf16)
        }
        KernelSpec::QkvRope { k: kd, heads, kv_heads, head_dim, rotary_dim, rms_eps, bias, w, xq, xbf16 } => {
            let (h, kvh, hd, rd) = (*heads, *kv_heads, *head_dim, *rotary_dim);
            qkv_rope::qkv_rope(&mut k, *kd, h, kvh, hd, rd, *rms_eps, *bias, *w, *xq, *xbf16)
        }
        KernelSpec::RmsNorm { d, eps } => norm::rms_norm(&mut k, *d, *eps),
        KernelSpec::LayerNorm { d, eps, affine } => norm::layer_norm(&mut k, *d, *eps, *affine),
        KernelSpec::Rope { heads, head_dim, rotary_dim } => rope::rope(&mut k, *heads, *head_dim, *rotary_dim),
        KernelSpec::KvAppend { kv_heads, head_dim } => attention::kv_append(&mut k, *kv_heads, *head_dim),
        KernelSpec::Attention { heads, kv_heads, head_dim, window, scale } => {
            attention::attention(&mut k, *heads, *kv_heads, *head_dim, *window, *scale)
        }
        KernelSpec::Unary { op, d } => elementwise::unary(&mut k, *op, *d),
        KernelSpec::Binary { op, d } => elementwise::binary(&mut k, *op, *d),
        KernelSpec::Slice { d, start, len } => elementwise::slice(&mut k, *d, *start, *len),
        KernelSpec::Concat { widths } => elementwise::concat(&mut k, widths),
        KernelSpec::TakeLast { d } => elementwise::take_last(&mut k, *d),
        KernelSpec::Softmax { d } => elementwise::softmax(&mut k, *d),
        KernelSpec::Mamba2Conv { ch, d_conv, inner, width } => mamba::conv(&mut k, *ch, *d_conv, *inner, *width),
        KernelSpec::Mamba2Scan { heads, head_dim, d_state, groups, width } => {
            mamba::scan(&mut k, *heads, *head_dim, *d_state, *groups, *width, width - heads)
        }
        KernelSpec::Mamba2Norm { inner, width, eps } => mamba::norm(&mut k, *inner, *width, *eps),
        KernelSpec::ActQuant { k: kd } => bitnet::act_quant(&mut k, *kd),
        KernelSpec::BitMatMul { k: kd, m } => bitnet::bit_matmul(&mut k, *kd, *m),
        KernelSpec::MoeRoute { experts, top_k } => moe::route(&mut k, *experts, *top_k),
        KernelSpec::MoeGateUp { d, ff, experts, top_k, w } => moe::gate_up(&mut k, *d, *ff, *experts, *top_k, *w),
        KernelSpec::MoeDown { d, ff, experts, top_k, w } => moe::down(&mut k, *d, *ff, *experts, *top_k, *w),
    }
    k.finish();
}

/// Emits the shared pre-pass of an int8 projection (`dot::prequantize`: its input rows
/// `lo..hi` quantized into the buffer at the fifth argument).
pub fn build_prequantize(
    q: crate::program::Int8Input,
    b: FunctionBuilder<'_>,
    cfg: TargetFrontendConfig,
    fma: bool,
    wide: Option<crate::micro::Wide>,
) {
    let mut k = Kb::new(b, cfg, fma, wide);
    dot::prequantize(&mut k, q.k, q.rms_eps, q.w, q.terms);
    k.finish();
}
