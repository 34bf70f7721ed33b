//! The AVX2 micro-kernels (see `micro`): one 16-row panel is two ymm registers (rows 0–7 and
//! 8–15), with tiles sized for AVX2's 16 registers.
//!
//! - float (`Panel16`): as `avx512.rs`, 8 lanes at a time (bf16 zero-extended and shifted,
//!   f16 through `vcvtph2ps`).
//! - int8 (`Dot16`): without VNNI, each group's 4 products per row are summed exactly by
//!   `vpmaddubsw` (unsigned weight byte × signed activation byte, adjacent pairs added in i16)
//!   and `vpmaddwd` by ones (pairs of those added in i32). The i16 pair sums cannot saturate
//!   for weights below 64 (q4_0, q4_1, q5_1, q6_k: at most 63·127·2 = 16002); q8_0's bytes
//!   (`q + 128`) could, so q8_0 goes the way llama.cpp's AVX2 path goes: the weight made signed
//!   (`q`), the activation's sign moved onto it (`vpsignb`) and its magnitude multiplied
//!   (at most 127·127·2 = 32258), which sums `q · x` directly, without the offset correction.
//!   With AVX-VNNI (`dot_vnni`, the `avxvnni` level) one `vpdpbusd` on ymm does all of that
//!   for every type, q8_0's unsigned bytes included, from the prologue's correction as on
//!   AVX-512.
//!
//! Results equal the AVX-512 tiles' up to f32 summation order (integer sums are exact).

use std::arch::x86_64::*;

use super::{MicroFn, TILE_PANELS, TILE_TOKENS};
use llmc_ir::DType;

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Whether the host has AVX-VNNI (the VEX-encoded `vpdpbusd`) for `dot_vnni`'s tiles.
pub fn vnni_available() -> bool {
    is_x86_feature_detected!("avxvnni")
}

#[inline(always)]
unsafe fn rd_f32(p: *const u8) -> f32 {
    // SAFETY: the caller passes an address inside a row it was given.
    unsafe { (p as *const f32).read_unaligned() }
}

#[inline(always)]
unsafe fn rd_i32(p: *const u8) -> i32 {
    // SAFETY: as `rd_f32`.
    unsafe { (p as *const i32).read_unaligned() }
}

/// How far ahead (bytes) a tile prefetches each weight stream (as `avx512.rs`).
const PF: usize = 2048;

/// Integer kinds of `dot_tile`: unsigned nibbles (below 64 with a plane's high bits), or
/// q8_0's bytes.
const NIBBLE: u8 = 1;
const Q8: u8 = 2;

/// One int8 tile: `T` tokens × `P` panels. `KIND` as above; `MIN`: a minimum per row and
/// block; `SUBS`: scales per block (2 for q6_k); `KH`: K-type heads, `HB`: bits above the
/// nibble (both as `avx512::dot_tile`).
///
/// # Safety
/// As `avx512::dot_tile`, on a host with AVX2 and FMA (and AVX-VNNI for `dot_tile_vnni`).
macro_rules! dot_tile {
    ($name:ident, $features:literal, $vnni:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<
            const T: usize,
            const P: usize,
            const KIND: u8,
            const MIN: bool,
            const SUBS: usize,
            const KH: bool,
            const HB: usize,
        >(
            w: *const u8,
            pb: usize,
            x: *const u8,
            rb: usize,
            kd: usize,
            out: *mut f32,
        ) {
            let (head, block, entry) = super::block_layout(KIND == NIBBLE, MIN, KH, HB);
            // the plane's bits of one group moved up to bits 4.. of each byte
            let planes = _mm256_set1_epi8(if HB == 1 { 0x10 } else { 0x30 });
            let up = |v: __m256i, s: usize| {
                let v = if s <= 4 {
                    _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - s as i32))
                } else {
                    _mm256_srl_epi16(v, _mm_cvtsi32_si128(s as i32 - 4))
                };
                _mm256_and_si256(v, planes)
            };
            let table = kd / 32 * block;
            let groups = if KIND == NIBBLE { 4 } else { 8 };
            let nib = _mm256_set1_epi8(0x0f);
            let flip = _mm256_set1_epi8(-128);
            let ones = _mm256_set1_epi16(1);
            let mut facc = [[[_mm256_setzero_ps(); 2]; P]; T];
            // `acc + Σ` over each group of 4 bytes of `w (u8) · x (i8)`, exact
            let dot = |acc: __m256i, w: __m256i, x: __m256i| -> __m256i {
                if $vnni {
                    // SAFETY: `$features` has AVX-VNNI where `$vnni` (the other expansion never runs
                    // this, and needs the block)
                    #[allow(unused_unsafe)]
                    return unsafe { _mm256_dpbusd_avx_epi32(acc, w, x) };
                }
                let p16 = if KIND == Q8 {
                    let ws = _mm256_sign_epi8(_mm256_xor_si256(w, flip), x);
                    _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), ws)
                } else {
                    _mm256_maddubs_epi16(w, x)
                };
                _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones))
            };
            // SAFETY (whole body): addresses as in `avx512::dot_tile`.
            unsafe {
                for b in 0..kd / 32 {
                    let bp = w.add(b * block);
                    let tb = w.add(table + b / 8 * entry);
                    // 8 rows' block scales: the head's f32s at `at`, or (K types) its i8s at `at`
                    // times the super-block's f32s at `tab`
                    let scales = |at: *const u8, tab: *const u8| {
                        if KH {
                            let i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(at as *const __m128i));
                            _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_loadu_ps(tab as *const f32))
                        } else {
                            _mm256_loadu_ps(at as *const f32)
                        }
                    };
                    let xb = x.add(b * 32);
                    let mb = x.add(kd + b * 12);
                    for sub in 0..SUBS {
                        let mut iacc = [[[_mm256_setzero_si256(); 2]; P]; T];
                        // (q8_0 without VNNI sums `q · x` directly: no correction)
                        if KIND != Q8 || $vnni {
                            for (t, row) in iacc.iter_mut().enumerate() {
                                let c = _mm256_set1_epi32(rd_i32(mb.add(t * rb + 4 + 4 * sub)));
                                *row = [[c; 2]; P];
                            }
                        }
                        // q6_k's halves with nibbles: the low, then the high nibbles of all 4 groups
                        let (g0, g1) = if KIND == NIBBLE && SUBS == 2 {
                            (0, groups)
                        } else {
                            (sub * groups / SUBS, (sub + 1) * groups / SUBS)
                        };
                        for g in g0..g1 {
                            for p in 0..P {
                                let a = bp.add(p * pb + head + g * 64);
                                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF) as *const i8);
                                for h in 0..2 {
                                    let wv = _mm256_loadu_si256(a.add(32 * h) as *const __m256i);
                                    if KIND == NIBBLE {
                                        let mut lo = _mm256_and_si256(wv, nib);
                                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), nib);
                                        if HB > 0 {
                                            let at = bp.add(
                                                p * pb + head + 256 + if HB == 2 { g / 2 * 64 } else { 0 } + 32 * h,
                                            );
                                            let pl = _mm256_loadu_si256(at as *const __m256i);
                                            let (sl, sh) = if HB == 1 {
                                                (2 * g, 2 * g + 1)
                                            } else {
                                                (4 * (g % 2), 4 * (g % 2) + 2)
                                            };
                                            lo = _mm256_or_si256(lo, up(pl, sl));
                                            hi = _mm256_or_si256(hi, up(pl, sh));
                                        }
                                        for (t, row) in iacc.iter_mut().enumerate() {
                                            let xl = _mm256_set1_epi32(rd_i32(xb.add(t * rb + g * 4)));
                                            let xh = _mm256_set1_epi32(rd_i32(xb.add(t * rb + g * 4 + 16)));
                                            if SUBS == 1 || sub == 0 {
                                                row[p][h] = dot(row[p][h], lo, xl);
                                            }
                                            if SUBS == 1 || sub == 1 {
                                                row[p][h] = dot(row[p][h], hi, xh);
                                            }
                                        }
                                    } else {
                                        for (t, row) in iacc.iter_mut().enumerate() {
                                            let xv = _mm256_set1_epi32(rd_i32(xb.add(t * rb + g * 4)));
                                            row[p][h] = dot(row[p][h], wv, xv);
                                        }
                                    }
                                }
                            }
                        }
                        for t in 0..T {
                            let dx = _mm256_set1_ps(rd_f32(mb.add(t * rb)));
                            let ds = _mm256_set1_ps(if MIN { rd_f32(mb.add(t * rb + 8)) } else { 0.0 });
                            for p in 0..P {
                                for h in 0..2 {
                                    let sw = if KH {
                                        scales(bp.add(p * pb + sub * 16 + 8 * h), tb.add(p * pb + 32 * h))
                                    } else {
                                        scales(bp.add(p * pb + sub * 64 + 32 * h), tb)
                                    };
                                    let s = _mm256_mul_ps(sw, dx);
                                    let f = _mm256_cvtepi32_ps(iacc[t][p][h]);
                                    facc[t][p][h] = _mm256_fmadd_ps(f, s, facc[t][p][h]);
                                    if MIN {
                                        let mw = if KH {
                                            scales(bp.add(p * pb + 16 + 8 * h), tb.add(p * pb + 64 + 32 * h))
                                        } else {
                                            scales(bp.add(p * pb + 64 + 32 * h), tb)
                                        };
                                        facc[t][p][h] = _mm256_fmadd_ps(mw, ds, facc[t][p][h]);
                                    }
                                }
                            }
                        }
                    }
                }
                for (t, row) in facc.iter().enumerate() {
                    for (p, v) in row.iter().enumerate() {
                        for (h, x) in v.iter().enumerate() {
                            _mm256_storeu_ps(out.add((t * TILE_PANELS + p) * 16 + 8 * h), *x);
                        }
                    }
                }
            }
        }
    };
}

dot_tile!(dot_tile, "avx2,fma", false);
dot_tile!(dot_tile_vnni, "avx2,fma,avxvnni", true);

const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// One float tile: `T` tokens × `P` panels of weights of kind `WT`.
///
/// # Safety
/// As `avx512::float_tile`, on a host with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_tile<const T: usize, const P: usize, const WT: u8>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let es = if WT == F32 { 4 } else { 2 };
    let mut facc = [[[_mm256_setzero_ps(); 2]; P]; T];
    // SAFETY (whole body): addresses as in `avx512::float_tile`.
    unsafe {
        for k in 0..kd {
            for p in 0..P {
                let a = w.add(p * pb + k * 16 * es);
                if (k * 16 * es) % 64 == 0 {
                    // as `avx512::float_tile`: f32 one prefetch per line, 16-bit kinds two
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF) as *const i8);
                    if WT != F32 {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PF + 64) as *const i8);
                    }
                }
                // 8 values of this panel's column k (inside the panel)
                let half = |h: usize| -> __m256 {
                    match WT {
                        F32 => _mm256_loadu_ps(a.add(32 * h) as *const f32),
                        BF16 => {
                            let v = _mm_loadu_si128(a.add(16 * h) as *const __m128i);
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
                        }
                        _ => _mm256_cvtph_ps(_mm_loadu_si128(a.add(16 * h) as *const __m128i)),
                    }
                };
                let wv = [half(0), half(1)];
                for (t, row) in facc.iter_mut().enumerate() {
                    let xv = _mm256_set1_ps(rd_f32(x.add(t * rb + k * 4)));
                    row[p][0] = _mm256_fmadd_ps(wv[0], xv, row[p][0]);
                    row[p][1] = _mm256_fmadd_ps(wv[1], xv, row[p][1]);
                }
            }
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                for (h, x) in v.iter().enumerate() {
                    _mm256_storeu_ps(out.add((t * TILE_PANELS + p) * 16 + 8 * h), *x);
                }
            }
        }
    }
}

/// One float tile over blocked weights (`Panel16`): as `avx512::bfloat_tile`, each 16-row
/// column as two halves of 8 rows.
///
/// # Safety
/// As `avx512::bfloat_tile`, on a host with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn bfloat_tile<
    const T: usize,
    const P: usize,
    const NIB: bool,
    const MIN: bool,
    const SUBS: usize,
    const KH: bool,
    const HB: usize,
    const OFF: i8,
>(
    w: *const u8,
    pb: usize,
    x: *const u8,
    rb: usize,
    kd: usize,
    out: *mut f32,
) {
    let (head, block, entry) = super::block_layout(NIB, MIN, KH, HB);
    let table = kd / 32 * block;
    let mut facc = [[[_mm256_setzero_ps(); 2]; P]; T];
    // SAFETY (whole body): addresses as in `avx512::bfloat_tile`.
    unsafe {
        for b in 0..kd / 32 {
            let bp = w.add(b * block);
            let tb = w.add(table + b / 8 * entry);
            let xb = x.add(b * 128);
            for p in 0..P {
                let hp = bp.add(p * pb);
                let tp = tb.add(p * pb);
                for l in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(hp.wrapping_add(PF + 64 * l) as *const i8);
                }
                // 8 rows' scales: the head's f32s, or (K types) its i8s times the table's f32s
                let scale = |at: usize, tab: usize, h: usize| {
                    if KH {
                        let i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(hp.add(at + 8 * h) as *const __m128i));
                        _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_loadu_ps(tp.add(tab + 32 * h) as *const f32))
                    } else {
                        _mm256_loadu_ps(hp.add(at * 4 + 32 * h) as *const f32)
                    }
                };
                let d = [0, 1].map(|h| [scale(0, 0, h), if SUBS == 2 { scale(16, 0, h) } else { _mm256_setzero_ps() }]);
                let m = [0, 1].map(|h| if MIN { scale(16, 64, h) } else { _mm256_setzero_ps() });
                let qs = hp.add(head);
                // one column's 16 integers (i8 lanes) as the f32 values they mean, in halves
                let value = |q: __m128i, half: usize| {
                    [0, 1].map(|h| {
                        let q = if h == 0 { q } else { _mm_srli_si128::<8>(q) };
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                        let d = d[h][if SUBS == 2 { half } else { 0 }];
                        if MIN {
                            _mm256_fmadd_ps(f, d, m[h])
                        } else {
                            _mm256_mul_ps(f, d)
                        }
                    })
                };
                let mut fma = |wv: [__m256; 2], xo: usize| {
                    for (t, row) in facc.iter_mut().enumerate() {
                        let xv = _mm256_set1_ps(rd_f32(xb.add(t * rb + xo)));
                        row[p][0] = _mm256_fmadd_ps(wv[0], xv, row[p][0]);
                        row[p][1] = _mm256_fmadd_ps(wv[1], xv, row[p][1]);
                    }
                };
                if NIB {
                    // pair `j`: columns `2j` (low nibbles) and `2j + 1` (high nibbles)
                    for j in 0..16 {
                        let (lo, hi) = super::x86::nibble_pair::<HB, OFF>(qs, j);
                        fma(value(lo, j / 8), 8 * j);
                        fma(value(hi, j / 8), 8 * j + 4);
                    }
                } else {
                    for k in 0..32 {
                        let q = _mm_loadu_si128(qs.add(k * 16) as *const __m128i);
                        fma(value(q, k / 16), 4 * k);
                    }
                }
            }
        }
        for (t, row) in facc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                for (h, x) in v.iter().enumerate() {
                    _mm256_storeu_ps(out.add((t * TILE_PANELS + p) * 16 + 8 * h), *x);
                }
            }
        }
    }
}

/// Splits a call into tiles of at most `$tmax` tokens × 1 panel (several rows) or 1 token ×
/// `$dp` panels (one row).
macro_rules! dispatch {
    ($name:ident, $tile:ident, $dp:expr, [$($g:tt)*]) => {
        /// # Safety
        /// As the tile function it calls (`MicroFn`'s contract), on a host with the features
        /// `available` checks.
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn $name(
            w: *const u8,
            pb: usize,
            np: usize,
            x: *const u8,
            rb: usize,
            nt: usize,
            kd: usize,
            out: *mut f32,
        ) {
            let nt = nt.min(TILE_TOKENS);
            let np = np.min(TILE_PANELS);
            let (tstep, pstep) = if nt == 1 { (1, $dp) } else { (4, 1) };
            let mut t0 = 0;
            while t0 < nt {
                let tn = (nt - t0).min(tstep);
                let mut p0 = 0;
                while p0 < np {
                    let pn = (np - p0).min(pstep);
                    // SAFETY: sub-tiles of the caller's tile, as in `avx512`.
                    unsafe {
                        let (w, x, o) = (w.add(p0 * pb), x.add(t0 * rb), out.add((t0 * TILE_PANELS + p0) * 16));
                        match (tn, pn) {
                            (1, 1) => $tile::<1, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (1, 2) => $tile::<1, 2, $($g)*>(w, pb, x, rb, kd, o),
                            (1, 3) => $tile::<1, 3, $($g)*>(w, pb, x, rb, kd, o),
                            (1, _) => $tile::<1, 4, $($g)*>(w, pb, x, rb, kd, o),
                            (2, _) => $tile::<2, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (3, _) => $tile::<3, 1, $($g)*>(w, pb, x, rb, kd, o),
                            (_, _) => $tile::<4, 1, $($g)*>(w, pb, x, rb, kd, o),
                        }
                    }
                    p0 += pn;
                }
                t0 += tn;
            }
        }
    };
}

dispatch!(dot_q8, dot_tile, 2, [Q8, false, 1, false, 0]);
dispatch!(dot_q4_0, dot_tile, 2, [NIBBLE, false, 1, false, 0]);
dispatch!(dot_q5_0, dot_tile, 2, [NIBBLE, false, 1, false, 1]);
dispatch!(dot_q4_1, dot_tile, 2, [NIBBLE, true, 1, false, 0]);
dispatch!(dot_q5_1, dot_tile, 2, [NIBBLE, true, 1, false, 1]);
dispatch!(dot_q6_k, dot_tile, 2, [NIBBLE, false, 2, true, 2]);
dispatch!(dot_q4_k, dot_tile, 2, [NIBBLE, true, 1, true, 0]);
dispatch!(dot_q5_k, dot_tile, 2, [NIBBLE, true, 1, true, 1]);
dispatch!(vnni_q8, dot_tile_vnni, 2, [Q8, false, 1, false, 0]);
dispatch!(vnni_q4_0, dot_tile_vnni, 2, [NIBBLE, false, 1, false, 0]);
dispatch!(vnni_q5_0, dot_tile_vnni, 2, [NIBBLE, false, 1, false, 1]);
dispatch!(vnni_q4_1, dot_tile_vnni, 2, [NIBBLE, true, 1, false, 0]);
dispatch!(vnni_q5_1, dot_tile_vnni, 2, [NIBBLE, true, 1, false, 1]);
dispatch!(vnni_q6_k, dot_tile_vnni, 2, [NIBBLE, false, 2, true, 2]);
dispatch!(vnni_q4_k, dot_tile_vnni, 2, [NIBBLE, true, 1, true, 0]);
dispatch!(vnni_q5_k, dot_tile_vnni, 2, [NIBBLE, true, 1, true, 1]);
dispatch!(bfloat_q8_0, bfloat_tile, 4, [false, false, 1, false, 0, 0]);
dispatch!(bfloat_q4_0, bfloat_tile, 4, [true, false, 1, false, 0, 8]);
dispatch!(bfloat_q5_0, bfloat_tile, 4, [true, false, 1, false, 1, 16]);
dispatch!(bfloat_q4_1, bfloat_tile, 4, [true, true, 1, false, 0, 0]);
dispatch!(bfloat_q5_1, bfloat_tile, 4, [true, true, 1, false, 1, 0]);
dispatch!(bfloat_q6_k, bfloat_tile, 4, [true, false, 2, true, 2, 32]);
dispatch!(bfloat_q4_k, bfloat_tile, 4, [true, true, 1, true, 0, 0]);
dispatch!(bfloat_q5_k, bfloat_tile, 4, [true, true, 1, true, 1, 0]);
dispatch!(float_f32, float_tile, 4, [F32]);
dispatch!(float_bf16, float_tile, 4, [BF16]);
dispatch!(float_f16, float_tile, 4, [F16]);

pub fn dot(wt: DType) -> Option<MicroFn> {
    Some(match wt {
        DType::Q8_0 => dot_q8,
        DType::Q4_0 => dot_q4_0,
        DType::Q5_0 => dot_q5_0,
        DType::Q4_1 => dot_q4_1,
        DType::Q5_1 => dot_q5_1,
        DType::Q6K => dot_q6_k,
        DType::Q4K => dot_q4_k,
        DType::Q5K => dot_q5_k,
        _ => return None,
    })
}

/// The int8 tiles with AVX-VNNI's `vpdpbusd` (a host where `vnni_available`).
pub fn dot_vnni(wt: DType) -> Option<MicroFn> {
    Some(match wt {
        DType::Q8_0 => vnni_q8,
        DType::Q4_0 => vnni_q4_0,
        DType::Q5_0 => vnni_q5_0,
        DType::Q4_1 => vnni_q4_1,
        DType::Q5_1 => vnni_q5_1,
        DType::Q6K => vnni_q6_k,
        DType::Q4K => vnni_q4_k,
        DType::Q5K => vnni_q5_k,
        _ => return None,
    })
}

pub fn float(wt: DType) -> Option<MicroFn> {
    Some(match wt {
        DType::F32 => float_f32,
        DType::BF16 => float_bf16,
        DType::F16 => float_f16,
        DType::Q8_0 => bfloat_q8_0,
        DType::Q4_0 => bfloat_q4_0,
        DType::Q5_0 => bfloat_q5_0,
        DType::Q4_1 => bfloat_q4_1,
        DType::Q5_1 => bfloat_q5_1,
        DType::Q6K => bfloat_q6_k,
        DType::Q4K => bfloat_q4_k,
        DType::Q5K => bfloat_q5_k,
        _ => return None,
    })
}
