//! `round_bf16` over a range of rows on 8-lane vectors (AVX2, which every wide host has): the
//! 128-bit kernel's arithmetic on the bits (`+ 0x7fff + lsb`, low half cleared; a NaN kept as
//! it is), so the values are bit for bit what that code writes.

use std::arch::x86_64::*;

/// The `n` f32 at `src`, each rounded to bf16 (nearest, ties to even) and widened back, to
/// `dst` (which may be `src`).
///
/// # Safety
/// `src` and `dst` hold `n` f32; AVX2 on this host.
#[target_feature(enable = "avx2")]
pub unsafe extern "C" fn round_bf16(src: *const f32, dst: *mut f32, n: usize) {
    let (one, half) = (_mm256_set1_epi32(1), _mm256_set1_epi32(0x7fff));
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    // SAFETY (whole body): indices below `n`, as the contract says.
    unsafe {
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(src.add(i));
            let b = _mm256_castps_si256(x);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), one);
            let r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(b, half), lsb), high);
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
            _mm256_storeu_ps(dst.add(i), _mm256_blendv_ps(_mm256_castsi256_ps(r), x, nan));
            i += 8;
        }
        while i < n {
            let x = *src.add(i);
            let b = x.to_bits();
            let r = b.wrapping_add(0x7fff).wrapping_add((b >> 16) & 1) & 0xffff_0000;
            *dst.add(i) = if x.is_nan() { x } else { f32::from_bits(r) };
            i += 1;
        }
    }
}
