//! The int8 prologue's quantization of input rows (`kernels::dot::quantize_rows`) on AVX-512
//! and AVX2.
//! Cranelift's 128-bit code took ~5 cycles a value there (scalar divisions, a saturating
//! conversion expanded into several instructions, lane extractions): 18 % of a q8_0 prefill.
//! (Plain Rust compiled for AVX-512 was slower still: LLVM keeps the max fold and the
//! saturating conversions scalar.)
//!
//! Same arithmetic as `kernels::dot::quantize_block` and `llmc_ir::quant::quantize_act_q8`
//! (on finite values):
//! `d = max|x| / 127`, `q = round_ties_even(x · (1/d))` (0 when `d = 0`), the corrections and
//! sums of the buffer's metadata, and for an RMS prologue `1/sqrt(Σ(d·q)²/k + eps)` summed in
//! four lanes as the 128-bit code sums them. So a buffer is bit for bit what that code writes.

use llmc_ir::quant::QK;

/// Bytes of a block's metadata in a quantized row (`kernels::dot`'s `META`).
const META: usize = 12;

/// `mode` bits: the weights' unsigned offset (low byte), a minimum term (q4_1, q5_1: `d·Σq` at
/// +8), a correction per half block (q6_k: `−offset·Σq` of the first and last 16 values at +4
/// and +8).
pub const MODE_MIN: usize = 1 << 8;
pub const MODE_HALVES: usize = 1 << 9;

use std::arch::x86_64::*;

/// Writes a block's metadata: `d`, then the corrections or the minimum's sum (`mode`).
#[inline(always)]
fn meta(m: &mut [u8], d: f32, lo: i32, hi: i32, mode: usize) {
    let off = -((mode & 0xff) as i32);
    let s = lo.wrapping_add(hi);
    m[0..4].copy_from_slice(&d.to_le_bytes());
    if mode & MODE_HALVES != 0 {
        m[4..8].copy_from_slice(&lo.wrapping_mul(off).to_le_bytes());
        m[8..12].copy_from_slice(&hi.wrapping_mul(off).to_le_bytes());
    } else {
        m[4..8].copy_from_slice(&s.wrapping_mul(off).to_le_bytes());
        if mode & MODE_MIN != 0 {
            m[8..12].copy_from_slice(&(d * s as f32).to_le_bytes());
        }
    }
}

/// The block `v` quantized on AVX-512 (two vectors of 16): its 32 bytes of q into `q`, its
/// metadata into `m`; returns the dequantized values `d·q`.
///
/// # Safety
/// AVX-512 F/BW/VL on this host.
#[inline(always)]
unsafe fn block16(v: &[f32; QK], q: &mut [u8], m: &mut [u8], mode: usize) -> [f32; QK] {
    assert!(q.len() >= QK);
    let mut dq = [0f32; QK];
    // SAFETY: register arithmetic on a host with the features; loads and stores of 16 f32 at
    // 0 and 16 of `v` and `dq` (32 each) and of 16 bytes at 0 and 16 of `q` (32).
    unsafe {
        let v = [_mm512_loadu_ps(v.as_ptr()), _mm512_loadu_ps(v.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (idv, dv) = (_mm512_set1_ps(id), _mm512_set1_ps(d));
        let mut sums = [0i32; 2];
        for h in 0..2 {
            let qf =
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(v[h], idv));
            _mm512_storeu_ps(dq.as_mut_ptr().add(16 * h), _mm512_mul_ps(qf, dv));
            let qi = _mm512_cvtps_epi32(qf);
            sums[h] = _mm512_reduce_add_epi32(qi);
            _mm_storeu_si128(q.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtsepi32_epi8(qi));
        }
        meta(m, d, sums[0], sums[1], mode);
    }
    dq
}

/// The block `v` quantized on AVX2 (four vectors of 8), as `block16`.
///
/// # Safety
/// AVX2 on this host.
#[inline(always)]
unsafe fn block8(v: &[f32; QK], q: &mut [u8], m: &mut [u8], mode: usize) -> [f32; QK] {
    assert!(q.len() >= QK);
    let mut dq = [0f32; QK];
    // SAFETY: register arithmetic on a host with the features; loads and stores of 8 f32 at
    // 0, 8, 16, 24 of `v` and `dq` (32 each) and of 32 bytes at `q` (32).
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(v.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|x| _mm256_andnot_ps(sign, x));
        let a = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let a = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        let amax = _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps::<1>(a, a)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (idv, dv) = (_mm256_set1_ps(id), _mm256_set1_ps(d));
        let qf = v.map(|x| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, idv)));
        for (i, x) in qf.iter().enumerate() {
            _mm256_storeu_ps(dq.as_mut_ptr().add(8 * i), _mm256_mul_ps(*x, dv));
        }
        let qi = qf.map(|x| _mm256_cvtps_epi32(x));
        // i32 -> i16 -> i8 with saturation; the packs interleave 128-bit lanes, the permute
        // puts the 4-byte groups back in order
        let p01 = _mm256_packs_epi32(qi[0], qi[1]);
        let p23 = _mm256_packs_epi32(qi[2], qi[3]);
        let bytes =
            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
        let hsum = |x: __m256i| {
            let x = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
            let x = _mm_add_epi32(x, _mm_shuffle_epi32::<0b01_00_11_10>(x));
            _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32::<0b10_11_00_01>(x)))
        };
        meta(m, d, hsum(_mm256_add_epi32(qi[0], qi[1])), hsum(_mm256_add_epi32(qi[2], qi[3])), mode);
    }
    dq
}

/// Rows of `x` (`kd` f32 each) into `terms` buffer rows each at `dst` (each term quantizes what
/// the previous ones missed), and with `inv` each row's inverse RMS of the dequantized sum;
/// `block` quantizes one block. Inlined into each family's `#[target_feature]` function.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows(
    x: &[f32],
    dst: &mut [u8],
    mut inv: Option<&mut [f32]>,
    kd: usize,
    terms: usize,
    mode: usize,
    eps: f32,
    block: impl Fn(&[f32; QK], &mut [u8], &mut [u8], usize) -> [f32; QK],
) {
    let row_bytes = kd + kd / QK * META;
    for (r, src) in x.chunks_exact(kd).enumerate() {
        let out = &mut dst[r * terms * row_bytes..(r + 1) * terms * row_bytes];
        let mut ss = [0f32; 4];
        for (b, xb) in src.chunks_exact(QK).enumerate() {
            let mut rest = [0f32; QK];
            rest.copy_from_slice(xb);
            let mut total = [0f32; QK];
            for term in 0..terms {
                let row = &mut out[term * row_bytes..(term + 1) * row_bytes];
                let (q, m) = row.split_at_mut(kd);
                let dq = block(&rest, &mut q[b * QK..(b + 1) * QK], &mut m[b * META..(b + 1) * META], mode);
                for i in 0..QK {
                    rest[i] -= dq[i];
                    total[i] = if term == 0 { dq[i] } else { total[i] + dq[i] };
                }
            }
            if inv.is_some() {
                // four lanes, each summing every fourth value in order (as the 128-bit code)
                for (i, t) in total.iter().enumerate() {
                    ss[i % 4] = t.mul_add(*t, ss[i % 4]);
                }
            }
        }
        if let Some(inv) = inv.as_deref_mut() {
            let h = (ss[0] + ss[1]) + (ss[2] + ss[3]);
            inv[r] = 1.0 / h.mul_add(1.0 / kd as f32, eps).sqrt();
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn rows16(x: &[f32], dst: &mut [u8], inv: Option<&mut [f32]>, kd: usize, terms: usize, mode: usize, eps: f32) {
    // SAFETY: this function's features are what `block16` needs.
    rows(x, dst, inv, kd, terms, mode, eps, |v, q, m, mode| unsafe { block16(v, q, m, mode) })
}

#[target_feature(enable = "avx2,fma")]
fn rows8(x: &[f32], dst: &mut [u8], inv: Option<&mut [f32]>, kd: usize, terms: usize, mode: usize, eps: f32) {
    // SAFETY: this function's features are what `block8` needs.
    rows(x, dst, inv, kd, terms, mode, eps, |v, q, m, mode| unsafe { block8(v, q, m, mode) })
}

/// A call's rows of `x`, buffer rows and inverse RMS values.
type Views<'a> = (&'a [f32], &'a mut [u8], Option<&'a mut [f32]>);

/// A call's pointers as slices (none for a shape no kernel asks for).
///
/// # Safety
/// `QuantFn`'s contract.
unsafe fn views<'a>(
    x: *const f32,
    n: usize,
    dst: *mut u8,
    inv: *mut f32,
    kd: usize,
    terms: usize,
) -> Option<Views<'a>> {
    if kd == 0 || !kd.is_multiple_of(QK) || terms == 0 {
        return None;
    }
    let row_bytes = kd + kd / QK * META;
    // SAFETY: the caller's contract: `x` holds n·kd f32, `dst` n·terms·row_bytes bytes, `inv`
    // (when not null) n f32, none overlapping.
    unsafe {
        Some((
            std::slice::from_raw_parts(x, n * kd),
            std::slice::from_raw_parts_mut(dst, n * terms * row_bytes),
            (!inv.is_null()).then(|| std::slice::from_raw_parts_mut(inv, n)),
        ))
    }
}

/// The `QuantFn` entry point of a family: its pointers as slices, then its `rows`.
macro_rules! entry {
    ($name:ident, $features:literal, $rows:ident, $host:literal) => {
        /// # Safety
        #[doc = concat!("`QuantFn`'s contract, on a host with ", $host, ".")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C" fn $name(
            x: *const f32,
            n: usize,
            dst: *mut u8,
            inv: *mut f32,
            kd: usize,
            terms: usize,
            mode: usize,
            eps_bits: usize,
        ) {
            // SAFETY: the caller's contract.
            if let Some((x, dst, inv)) = unsafe { views(x, n, dst, inv, kd, terms) } {
                $rows(x, dst, inv, kd, terms, mode, f32::from_bits(eps_bits as u32));
            }
        }
    };
}

entry!(quant_avx512, "avx512f,avx512bw,avx512vl,fma", rows16, "AVX-512 F/BW/VL and FMA");
entry!(quant_avx2, "avx2,fma", rows8, "AVX2 and FMA");

#[cfg(test)]
mod tests {
    use super::*;
    use llmc_ir::quant::quantize_act_q8;

    /// Blocks of random values (with zero blocks, huge and tiny ones) give the IR's `(d, q)`
    /// and the metadata the buffer layout says, for one and two terms and every mode, on each
    /// family the host has.
    #[test]
    fn matches_the_ir_quantization() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let kd = 4 * QK;
        let mut fams: Vec<crate::micro::QuantFn> = Vec::new();
        if crate::micro::Wide::Avx512.available() {
            fams.push(quant_avx512);
        }
        if crate::micro::Wide::Avx2.available() {
            fams.push(quant_avx2);
        }
        for (f, (mode, terms)) in
            fams.into_iter().flat_map(|f| [(128, 1), (8, 2), (MODE_MIN, 1), (32 | MODE_HALVES, 2)].map(|m| (f, m)))
        {
            let mut x: Vec<f32> = (0..3 * kd).map(|_| rnd() * 4.0).collect();
            x[QK..2 * QK].fill(0.0);
            x[2 * QK] = 3e30;
            x[3 * QK] = 1e-30;
            let row_bytes = kd + kd / QK * META;
            let mut dst = vec![0u8; 3 * terms * row_bytes];
            let mut inv = [0f32; 3];
            // SAFETY: the host has the family's features (checked above); the buffers hold
            // 3 rows.
            unsafe {
                f(x.as_ptr(), 3, dst.as_mut_ptr(), inv.as_mut_ptr(), kd, terms, mode, 1e-5f32.to_bits() as usize)
            };
            for (r, xr) in x.chunks_exact(kd).enumerate() {
                let mut back = vec![0f32; kd];
                for (b, xb) in xr.chunks_exact(QK).enumerate() {
                    let mut rest = xb.to_vec();
                    for term in 0..terms {
                        let row = &dst[(r * terms + term) * row_bytes..][..row_bytes];
                        let (d, q) = quantize_act_q8(&rest);
                        let got_q: Vec<i8> = row[b * QK..(b + 1) * QK].iter().map(|&u| u as i8).collect();
                        assert_eq!(got_q, q.to_vec(), "mode {mode:#x} row {r} block {b} term {term}");
                        let meta = &row[kd + b * META..][..META];
                        let word = |i: usize| <[u8; 4]>::try_from(&meta[i..i + 4]).unwrap();
                        assert_eq!(f32::from_le_bytes(word(0)).to_bits(), d.to_bits());
                        let sum = |qs: &[i8]| qs.iter().map(|&v| v as i32).sum::<i32>();
                        let off = (mode & 0xff) as i32;
                        if mode & MODE_HALVES != 0 {
                            assert_eq!(i32::from_le_bytes(word(4)), -off * sum(&q[..16]));
                            assert_eq!(i32::from_le_bytes(word(8)), -off * sum(&q[16..]));
                        } else {
                            assert_eq!(i32::from_le_bytes(word(4)), -off * sum(&q));
                        }
                        if mode & MODE_MIN != 0 {
                            assert_eq!(f32::from_le_bytes(word(8)), d * sum(&q) as f32);
                        }
                        for (i, v) in rest.iter_mut().enumerate() {
                            let dq = d * q[i] as f32;
                            back[b * QK + i] += dq;
                            *v -= dq;
                        }
                    }
                }
                let mut ss = [0f32; 4];
                for (i, v) in back.iter().enumerate() {
                    ss[i % 4] = v.mul_add(*v, ss[i % 4]);
                }
                let want = 1.0 / ((ss[0] + ss[1]) + (ss[2] + ss[3])).mul_add(1.0 / kd as f32, 1e-5).sqrt();
                assert_eq!(inv[r].to_bits(), want.to_bits(), "row {r}");
            }
        }
    }
}
