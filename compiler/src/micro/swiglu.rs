//! The SwiGLU epilogue of a wide projection tile, on 8-lane vectors (AVX2 and FMA, which
//! every wide host has): a panel's 16 sums are 8 gate rows then the matching 8 up rows
//! (`interleave_rows8`); each token's 8 outputs are `silu(g·s) · (u·s)` with `s` its RMS scale.
//!
//! The arithmetic is the 128-bit epilogue's (`kernels::elementwise`'s SiLU over `Kb::exp`): the
//! same clamp, the same split `ln 2`, the same Horner polynomial with fused multiply-adds, the
//! same `2^k` from the exponent bits and the same division, so for finite sums the outputs are
//! bit for bit what that code writes, at twice the width and without its NaN-exact min/max and
//! saturating-conversion sequences.

use std::arch::x86_64::*;

use super::x86::exp256;
use super::TILE_PANELS;
use crate::pack::PANEL;

/// The tile's `nt` rows × `np` panels of sums at `src` (`[token][term][TILE_PANELS][16]` f32,
/// `terms` buffer rows per token, added in order) to `dst`: row `t` at `dst + t·stride`, panel
/// `q`'s 8 outputs at `+ 8q`; `inv` (unless null) holds the rows' RMS scales.
///
/// # Safety
/// `src` holds the tile buffer (`nt·terms ≤ TILE_TOKENS`, `np ≤ TILE_PANELS`), `inv` (unless
/// null) `nt` f32, `dst` rows `t < nt` of at least `8·np` f32 `stride` f32 apart; AVX2 and FMA
/// on this host.
#[target_feature(enable = "avx2,fma")]
pub unsafe extern "C" fn swiglu_tile(
    src: *const f32,
    nt: usize,
    np: usize,
    terms: usize,
    inv: *const f32,
    dst: *mut f32,
    stride: usize,
) {
    // SAFETY (whole body): reads of `src` at `((t·terms + u)·TILE_PANELS + q)·16 + (< 16)`,
    // of `inv` at `t`, writes of `dst` at `t·stride + 8q + (< 8)`: inside the contract.
    unsafe {
        for t in 0..nt {
            let s = (!inv.is_null()).then(|| _mm256_set1_ps(*inv.add(t)));
            for q in 0..np {
                let at = |u: usize, h: usize| src.add(((t * terms + u) * TILE_PANELS + q) * PANEL + 8 * h);
                let (mut g, mut up) = (_mm256_loadu_ps(at(0, 0)), _mm256_loadu_ps(at(0, 1)));
                for u in 1..terms {
                    g = _mm256_add_ps(g, _mm256_loadu_ps(at(u, 0)));
                    up = _mm256_add_ps(up, _mm256_loadu_ps(at(u, 1)));
                }
                if let Some(s) = s {
                    g = _mm256_mul_ps(g, s);
                    up = _mm256_mul_ps(up, s);
                }
                let neg = _mm256_xor_ps(g, _mm256_set1_ps(-0.0));
                let silu = _mm256_div_ps(g, _mm256_add_ps(exp256(neg), _mm256_set1_ps(1.0)));
                _mm256_storeu_ps(dst.add(t * stride + 8 * q), _mm256_mul_ps(silu, up));
            }
        }
    }
}
