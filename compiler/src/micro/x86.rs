//! Pieces the x86-64 micro-kernels share, inlined into their `#[target_feature]` functions:
//! SSE2 (the x86-64 baseline) for both families, and the 8-lane `exp256` (AVX2 + FMA, which
//! every wide host has).

use std::arch::x86_64::*;

/// Pair `j` of a nibble block's `Panel16` integers (`qs`: the block after its head): columns
/// `2j` (low nibbles) and `2j + 1` (high nibbles), 16 rows each as i8 lanes, with their `HB`
/// high bits from the block's plane (`pack::plane_at`) and the type's offset `OFF` taken out,
/// so each lane is the integer the block means.
///
/// # Safety
/// `qs` holds the block's 256 nibble bytes and, with `HB > 0`, its plane after them.
#[inline(always)]
pub unsafe fn nibble_pair<const HB: usize, const OFF: i8>(qs: *const u8, j: usize) -> (__m128i, __m128i) {
    // SAFETY: `j < 16` pairs of 16 bytes, and the plane's `256 + (j / per)·16 + 16` bytes,
    // inside the block, as the caller promises.
    unsafe {
        let nib = _mm_set1_epi8(0x0f);
        let v = _mm_loadu_si128(qs.add(j * 16) as *const __m128i);
        let mut lo = _mm_and_si128(v, nib);
        let mut hi = _mm_and_si128(_mm_srli_epi16::<4>(v), nib);
        if HB > 0 {
            // the plane's bits of this pair, moved up to bits 4..
            let hmask = _mm_set1_epi8(((1u32 << HB) - 1) as i8);
            let per = if HB == 1 { 4 } else { 2 };
            let pl = _mm_loadu_si128(qs.add(256 + j / per * 16) as *const __m128i);
            let s = (2 * HB * (j % per)) as i32;
            let bits = |sh: i32| _mm_slli_epi16::<4>(_mm_and_si128(_mm_srl_epi16(pl, _mm_cvtsi32_si128(sh)), hmask));
            lo = _mm_or_si128(lo, bits(s));
            hi = _mm_or_si128(hi, bits(s + HB as i32));
        }
        if OFF != 0 {
            let off = _mm_set1_epi8(OFF);
            lo = _mm_sub_epi8(lo, off);
            hi = _mm_sub_epi8(hi, off);
        }
        (lo, hi)
    }
}

/// Prefetches (T0) the `hd` f32 of a KV-cache row at `p`, a line (16 f32) at a time.
#[inline(always)]
#[allow(unused_unsafe)]
pub fn prefetch_row(p: *const f32, hd: usize) {
    for line in (0..hd).step_by(16) {
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line) as *const i8) };
    }
}

/// The cache rows of keys `j0 .. j0 + rows.len()` of kv head `kvh` (`(kvh·cap + slot)·hd`,
/// slot `j % cap`: one division per block of keys).
#[inline(always)]
pub fn block_rows(rows: &mut [usize], j0: usize, kvh: usize, cap: usize, hd: usize) {
    let mut slot = j0 % cap;
    for r in rows {
        *r = (kvh * cap + slot) * hd;
        slot += 1;
        if slot == cap {
            slot = 0;
        }
    }
}

/// The cache row of the key `ahead` keys after key `j0 + jj` (`slots`: the cache rows of the
/// block of keys from `j0`, `(kvh·cap + slot)·hd` each): in this block, or past its end from
/// the position's slot; none past `jmax`, the last key any row attends to. What attention
/// prefetches while it scores key `j0 + jj`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn key_row_ahead(
    slots: &[usize],
    j0: usize,
    jj: usize,
    ahead: usize,
    jmax: i32,
    kvh: usize,
    cap: usize,
    hd: usize,
) -> Option<usize> {
    let j = j0 + jj + ahead;
    // (a position below the capacity is its own slot: no division, which a decode pass paid
    // for every key it prefetched past a block's end)
    let slot = |j: usize| if j < cap { j } else { j % cap };
    (j as i64 <= jmax as i64).then(|| slots.get(jj + ahead).copied().unwrap_or_else(|| (kvh * cap + slot(j)) * hd))
}

/// `e^x` as `Kb::exp` computes it (clamped to [-80, 88.3], `2^n · p(r)`), on 8 lanes: the
/// AVX2 attention's softmax and the SwiGLU epilogue's SiLU.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-80.0)), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// Whether the CPU's vendor string (CPUID leaf 0) is AMD's.
pub fn vendor_is_amd() -> bool {
    // SAFETY: CPUID leaf 0 exists on every x86-64 processor.
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid(0) };
    let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes == b"AuthenticAMD"
}
