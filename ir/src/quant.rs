//! Weight storage types: their exact meaning (dequantization) and the quantizers that produce
//! them. The interpreter and the kernels agree on these definitions; the quantizers follow
//! ggml's reference round-to-nearest math, so a Q8_0/Q4_0 weight means what it means in a
//! GGUF file.
//!
//! - `bf16`, `f16`: the value is the 16-bit float widened to f32 (exact).
//! - `q8_0`: blocks of 32 values along a row, `x = d · q` with `q: i8` and one scale `d` per
//!   block, an f16 value (stored widened to f32 in llmc's repacked layout; exact).
//! - `q4_0`: blocks of 32, `x = d · (q − 8)` with `q` in `0..16`, `d` an f16 value.
//! - `q5_0`: blocks of 32, `x = d · q` with `q` in `−16..16`, `d` an f16 value (ggml's Q5_0).
//! - `q4_1`: blocks of 32, `x = q · d + m` with `q` in `0..16`; `d` and `m` are f32 values
//!   (ggml's Q4_1: f16 values; each 32-value sub-block of a Q4_K super-block: `d · scale` and
//!   `−dmin · min`, exact products in f32).
//! - `q5_1`: the same with `q` in `0..32` (ggml's Q5_1, and Q5_K's sub-blocks).
//! - `q6_k`: blocks of 32 in two halves of 16, `x = d_h · q` with `q` in `−32..32` and one
//!   scale `d_h` per half (ggml's Q6_K: `d · scale`, exact in f32).
//! - `q4_k`, `q5_k`: `q4_1` and `q5_1` blocks whose `d` and `m` are ggml's Q4_K / Q5_K products
//!   `d · scale` and `−dmin · min`.
//!
//! The K types (`q4_k`, `q5_k`, `q6_k`) keep ggml's super-blocks of 256 values along a row:
//! each block's scales are small integers times scales the super-block's 8 blocks share
//! (`KScales`), which is how they are stored (a byte per scale instead of an f32); their rows
//! are whole super-blocks.
//!
//! Every blocked type has one canonical block form, `QBlock` (`x = d[k / 16] · q[k] + m`):
//! packing takes blocks (from a quantizer, or taken as they are from a GGUF tensor), and
//! `dequantize_block` is the meaning the interpreter and the kernels agree on. The products
//! `d · q` are exact in f32 for every block a quantizer or a GGUF file makes (at most 24
//! significant bits), so a kernel's fused `q · d + m` rounds once, as the definition does.

use half::{bf16, f16};

use crate::types::DType;

/// Values per quantization block (both Q8_0 and Q4_0).
pub const QK: usize = 32;

/// Values per super-block of the K types (`is_k`).
pub const QK_K: usize = 256;

/// Whether `dtype` is a weight storage type other than f32 (only weights may have one, and
/// only where a kernel reads it: see `Op::accepts_storage`).
pub fn is_storage(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) || is_blocked(dtype)
}

/// Whether `dtype` quantizes in blocks of `QK` along the last dim.
pub fn is_blocked(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::Q4_1 | DType::Q5_1 | DType::Q6K | DType::Q4K | DType::Q5K
    )
}

/// Whether `dtype` keeps ggml's super-blocks of `QK_K` values (`KScales`).
pub fn is_k(dtype: DType) -> bool {
    matches!(dtype, DType::Q6K | DType::Q4K | DType::Q5K)
}

/// Whether a block of `dtype` has a minimum `m` (else `m = 0`).
pub fn has_min(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K)
}

/// The range of a block's integers `q` for `dtype`.
pub fn q_range(dtype: DType) -> std::ops::RangeInclusive<i32> {
    match dtype {
        DType::Q8_0 => -128..=127,
        DType::Q4_0 => -8..=7,
        DType::Q5_0 => -16..=15,
        DType::Q4_1 | DType::Q4K => 0..=15,
        DType::Q5_1 | DType::Q5K => 0..=31,
        DType::Q6K => -32..=31,
        _ => 0..=0,
    }
}

/// One block of 32 weights in the canonical form of its storage type: `x[k] = d[k / 16] · q[k]
/// + m` (`d[0] == d[1]` except for q6_k; `m == 0` except for the types with a minimum; `q` in
/// `q_range`). Blocks of the K types also carry `k`, from which `d` and `m` are made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QBlock {
    pub d: [f32; 2],
    pub m: f32,
    pub q: [i8; QK],
    pub k: KScales,
}

/// A K-type block's scales as stored: `d[h] = sd · sc[h]` and `m = smin · mi`, each product
/// exact in f32, where `sd` and `smin` are shared by the 8 blocks of a super-block (ggml's
/// Q4_K/Q5_K: `sd = d`, `smin = −dmin` (f16 values), `sc` and `mi` in `0..64`, `sc[0] ==
/// sc[1]`; Q6_K: `sd = d`, `sc` its signed 8-bit scales of the two halves, no minimum).
/// All zero for the other types.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KScales {
    pub sd: f32,
    pub smin: f32,
    pub sc: [i8; 2],
    pub mi: i8,
}

impl KScales {
    /// The block scales `[d0, d1]` and minimum these make.
    pub fn block(&self) -> ([f32; 2], f32) {
        ([self.sd * self.sc[0] as f32, self.sd * self.sc[1] as f32], self.smin * self.mi as f32)
    }
}

/// What a block means (see `QBlock`); `out` has `QK` values.
pub fn dequantize_block(b: &QBlock, out: &mut [f32]) {
    for (k, (o, &q)) in out.iter_mut().zip(&b.q).enumerate() {
        let dq = q as f32 * b.d[k / 16];
        *o = if b.m != 0.0 { dq + b.m } else { dq };
    }
}

/// Quantizes one block of 32 values into `dtype` (not a K type: see `quantize_super`): ggml's
/// reference math for q8_0, q4_0 and q4_1; for q5_1, the same as q4_1 with 31 steps. (GGUF
/// files bring their q5_1 blocks with them; this quantizer serves `--dtype`-free tests.)
pub fn quantize_block(dtype: DType, x: &[f32]) -> QBlock {
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 => {
            let b = match dtype {
                DType::Q8_0 => quantize_q8_0(x),
                DType::Q4_0 => quantize_q4_0(x),
                _ => quantize_q5_0(x),
            };
            QBlock { d: [b.d; 2], q: b.q, ..Default::default() }
        }
        DType::Q4_1 => {
            let b = quantize_q4_1(x);
            QBlock { d: [b.d; 2], m: b.m, q: b.q.map(|q| q as i8), ..Default::default() }
        }
        _ => {
            debug_assert_eq!(dtype, DType::Q5_1, "K types quantize whole super-blocks");
            let (d, m, q) = quantize_with_min(x, 31);
            QBlock { d: [d; 2], m, q: q.map(|q| q as i8), ..Default::default() }
        }
    }
}

/// Quantizes one super-block of `QK_K` values into K type `dtype`, round to nearest (GGUF files
/// bring their K blocks with them; this quantizer serves tests): per block the q4_1-style
/// scale and minimum (minimum ≤ 0) or per half q4_0-style signed scale (q6_k, 32 steps), then
/// the shared scales `sd = max scale / 63` (q6_k: `max |scale| / 127`) and `smin`, f16 values,
/// the integers rounded, and the values rounded to the scales they made.
pub fn quantize_super(dtype: DType, x: &[f32]) -> [QBlock; QK_K / QK] {
    let f16r = |v: f32| f16::from_f32(v).to_f32();
    let mut out = [QBlock::default(); QK_K / QK];
    let div = |a: f32, b: f32| if b != 0.0 { a / b } else { 0.0 };
    if dtype == DType::Q6K {
        let scales: Vec<f32> = x.chunks(16).map(|h| signed_absmax(h) / -32.0).collect();
        let sd = f16r(scales.iter().fold(0f32, |m, s| m.max(s.abs())) / 127.0);
        for (j, o) in out.iter_mut().enumerate() {
            let sc = [0, 1].map(|h| div(scales[2 * j + h], sd).round().clamp(-128.0, 127.0) as i8);
            o.k = KScales { sd, smin: 0.0, sc, mi: 0 };
            (o.d, o.m) = o.k.block();
            for (i, q) in o.q.iter_mut().enumerate() {
                *q = div(x[QK * j + i], o.d[i / 16]).round().clamp(-32.0, 31.0) as i8;
            }
        }
        return out;
    }
    let top = if dtype == DType::Q4K { 15.0 } else { 31.0 };
    let blocks: Vec<(f32, f32)> = x
        .chunks(QK)
        .map(|b| {
            let min = b.iter().fold(0f32, |m, &v| m.min(v));
            let max = b.iter().fold(f32::MIN, |m, &v| m.max(v));
            ((max - min) / top, -min)
        })
        .collect();
    let sd = f16r(blocks.iter().fold(0f32, |m, b| m.max(b.0)) / 63.0);
    let dmin = f16r(blocks.iter().fold(0f32, |m, b| m.max(b.1)) / 63.0);
    for (j, o) in out.iter_mut().enumerate() {
        let sc = div(blocks[j].0, sd).round().clamp(0.0, 63.0) as i8;
        let mi = div(blocks[j].1, dmin).round().clamp(0.0, 63.0) as i8;
        o.k = KScales { sd, smin: -dmin, sc: [sc; 2], mi };
        (o.d, o.m) = o.k.block();
        for (i, q) in o.q.iter_mut().enumerate() {
            *q = div(x[QK * j + i] - o.m, o.d[0]).round().clamp(0.0, top) as i8;
        }
    }
    out
}

/// The blocks of a row-major matrix of rows of `cols` values (a multiple of `QK`; of `QK_K`
/// for the K types).
pub fn quantize_blocks(dtype: DType, x: &[f32]) -> Vec<QBlock> {
    if is_k(dtype) {
        return x.chunks(QK_K).flat_map(|s| quantize_super(dtype, s)).collect();
    }
    x.chunks(QK).map(|b| quantize_block(dtype, b)).collect()
}

/// One Q4_1 block: scale `d` and minimum `m` (f16 values, as f32) and 32 integers `q` in
/// `0..16`; the block means `q · d + m`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block41 {
    pub d: f32,
    pub m: f32,
    pub q: [u8; QK],
}

/// ggml's `quantize_row_q4_1_ref` for one block: `d = (max − min) / 15`, `m = min` (both
/// stored as f16), `q = min(15, trunc((x − min) / d + 0.5))` with the unrounded `d`.
pub fn quantize_q4_1(x: &[f32]) -> Block41 {
    let (d, m, q) = quantize_with_min(x, 15);
    Block41 { d, m, q }
}

/// A block with a minimum and `top + 1` levels, ggml's Q4_1 rule: `d = (max − min) / top`,
/// `m = min` (f16 values), `q = min(top, trunc((x − min) / d + 0.5))` with the unrounded `d`.
fn quantize_with_min(x: &[f32], top: u8) -> (f32, f32, [u8; QK]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / top as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (((v - min) * id + 0.5) as u8).min(top);
    }
    (f16::from_f32(d).to_f32(), f16::from_f32(min).to_f32(), q)
}

/// One block quantized: its scale (an f16 value, as f32) and its 32 integers (Q4_0: `q − 8`,
/// so both types dequantize as `d · q`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block {
    pub d: f32,
    pub q: [i8; QK],
}

/// ggml's `quantize_row_q8_0_ref` for one block: `d = max|x| / 127` (stored as f16),
/// `q = round(x / d)` with the unrounded `d`, half away from zero.
pub fn quantize_q8_0(x: &[f32]) -> Block {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round() as i8;
    }
    Block { d: f16::from_f32(d).to_f32(), q }
}

/// The value of largest magnitude, with its sign (the first one on ties; 0 for none).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// ggml's `quantize_row_q4_0_ref` for one block: `d = max / −8` where `max` is the value of
/// largest magnitude (first one on ties), `q = min(15, trunc(x/d + 8.5))`; returns `q − 8`.
pub fn quantize_q4_0(x: &[f32]) -> Block {
    quantize_signed(x, 8)
}

/// ggml's `quantize_row_q5_0_ref` for one block: as q4_0 with `d = max / −16`,
/// `q = min(31, trunc(x/d + 16.5))`; returns `q − 16`.
pub fn quantize_q5_0(x: &[f32]) -> Block {
    quantize_signed(x, 16)
}

/// ggml's rule for its blocks without a minimum of `2·half` levels (q4_0: 8, q5_0: 16).
fn quantize_signed(x: &[f32], half: i8) -> Block {
    let d = signed_absmax(x) / -(half as f32);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        let t = (v * id + (half as f32 + 0.5)) as i8; // C's (int8_t) cast truncates toward zero
        *o = t.min(2 * half - 1) - half;
    }
    Block { d: f16::from_f32(d).to_f32(), q }
}

/// The activation quantization of the int8 dot-product kernels (`quant_q8`), one block of 32:
/// `d = max|x| / 127` (kept in f32), `q = round(x · (1/d))`, ties to even (what the kernels'
/// `nearest` does, so both sides round the same f32 product the same way). Returns `(d, q)`;
/// the block means `d · q`.
pub fn quantize_act_q8(x: &[f32]) -> (f32, [i8; QK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round_ties_even() as i8;
    }
    (d, q)
}

/// `quant_q8` on rows of `cols` values (a multiple of `QK`): each block quantized and
/// dequantized.
pub fn round_trip_act_q8(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(QK) {
        let (d, q) = quantize_act_q8(b);
        out.extend(q.iter().map(|&q| d * q as f32));
    }
    out
}

/// `quant_q8x2` on rows of `cols` values: the round trip `r` plus the round trip of what it
/// missed, `x − r` (each block's second scale is about `1/254` of the first).
pub fn round_trip_act_q8x2(x: &[f32]) -> Vec<f32> {
    let r = round_trip_act_q8(x);
    let rest: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a - b).collect();
    r.iter().zip(round_trip_act_q8(&rest)).map(|(a, b)| a + b).collect()
}

/// Rounds `x` to what a weight of storage type `dtype` holds, value by value (f32: as is;
/// bf16/f16: round to nearest even; blocked types: quantize and dequantize each block of the
/// last dim). `cols` is the last dim, a multiple of `QK` for blocked types (`QK_K` for K types).
pub fn round_trip(dtype: DType, x: &[f32], cols: usize) -> Vec<f32> {
    match dtype {
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        d if is_blocked(d) => {
            debug_assert!(cols % if is_k(d) { QK_K } else { QK } == 0 && x.len() % cols == 0);
            let mut out = vec![0f32; x.len()];
            for (b, o) in quantize_blocks(dtype, x).iter().zip(out.chunks_mut(QK)) {
                dequantize_block(b, o);
            }
            out
        }
        _ => x.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `quant_q8x2` misses by at most half a step of its second scale (`amax/127/127`, about
    /// 1/254 of one rounding's error), per block.
    #[test]
    fn act_q8x2_adds_the_residual() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + (i as f32).sin()).collect();
        let one = round_trip_act_q8(&x);
        let two = round_trip_act_q8x2(&x);
        for (b, ((xb, o), t)) in x.chunks(QK).zip(one.chunks(QK)).zip(two.chunks(QK)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let e1 = xb.iter().zip(o).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let e2 = xb.iter().zip(t).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(e1 <= amax / 254.0 * 1.0001, "block {b}: {e1}");
            assert!(e2 <= amax / 127.0 / 254.0 * 1.01 + amax * 1e-7, "block {b}: {e2} vs {e1}");
            assert!(e2 < e1 / 50.0, "block {b}: {e2} vs {e1}");
        }
    }

    #[test]
    fn q8_0_matches_ggml_reference_math() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.1).collect();
        let b = quantize_q8_0(&x);
        // amax = 1.55 (x[31]), d = 1.55/127 rounded to f16
        assert_eq!(b.d, f16::from_f32(1.55f32 / 127.0).to_f32());
        assert_eq!(b.q[0], -127);
        assert_eq!(b.q[31], 127);
        // 0.05 / (1.55/127) = 4.097 -> 4
        assert_eq!(b.q[16], 4);
        let zero = quantize_q8_0(&[0.0; 32]);
        assert_eq!((zero.d, zero.q), (0.0, [0; 32]));
    }

    #[test]
    fn activation_q8_rounds_ties_to_even() {
        let mut x = [0f32; 32];
        x[0] = 127.0; // d = 1
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.4;
        let (d, q) = quantize_act_q8(&x);
        assert_eq!(d, 1.0);
        assert_eq!(&q[..4], &[127, 2, -4, 0]);
        assert_eq!(round_trip_act_q8(&x)[..4], [127.0, 2.0, -4.0, 0.0]);
        assert_eq!(quantize_act_q8(&[0.0; 32]), (0.0, [0; 32]));
    }

    #[test]
    fn q4_1_matches_ggml_reference_math() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 3.0).collect(); // -3 .. 12.5
        let b = quantize_q4_1(&x);
        assert_eq!(b.m, -3.0);
        assert_eq!(b.d, f16::from_f32(15.5 / 15.0).to_f32());
        assert_eq!((b.q[0], b.q[31]), (0, 15));
        let back = round_trip(DType::Q4_1, &x, 32);
        assert!(back.iter().zip(&x).all(|(a, v)| (a - v).abs() <= 0.52), "{back:?}");
        // values that are already Q4_1 blocks come back unchanged (a GGUF's Q4_1 tensor)
        assert_eq!(round_trip(DType::Q4_1, &back, 32), back);
    }

    #[test]
    fn new_block_types_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 61) as f32 - 30.0) * 0.07).collect();
        for (dtype, steps) in
            // q5_0 (as q4_0): the end opposite the largest magnitude is clamped, a whole step off
            [
                (DType::Q5_0, 16.0),
                (DType::Q5_1, 31.0),
                (DType::Q6K, 32.0),
                (DType::Q4K, 15.0),
                (DType::Q5K, 31.0),
            ]
        {
            let blocks = quantize_blocks(dtype, &x);
            for (b, xs) in blocks.iter().zip(x.chunks(QK)) {
                assert!(b.q.iter().all(|&q| q_range(dtype).contains(&(q as i32))), "{dtype:?} {b:?}");
                let mut back = [0f32; QK];
                dequantize_block(b, &mut back);
                let span = xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                // K types round their scales to integer multiples of the shared ones too
                let bound = if is_k(dtype) { span * 0.1 } else { span / steps * 0.51 + 1e-3 };
                for (a, v) in back.iter().zip(xs) {
                    assert!((a - v).abs() <= bound, "{dtype:?} {a} {v}");
                }
                if is_k(dtype) {
                    assert_eq!((b.d, b.m), b.k.block(), "{dtype:?}: d and m are the K scales' products");
                }
            }
            if !is_k(dtype) {
                let once = round_trip(dtype, &x, 32);
                assert_eq!(round_trip(dtype, &once, 32), once, "{dtype:?} blocks come back unchanged");
            }
        }
    }

    #[test]
    fn q4_0_matches_ggml_reference_math() {
        let mut x = [0.5f32; 32];
        x[3] = -2.0; // the value of largest magnitude: d = -2 / -8 = 0.25
        let b = quantize_q4_0(&x);
        assert_eq!(b.d, 0.25);
        assert_eq!(b.q[3], -8); // -2 / 0.25 = -8 exactly -> trunc(0.5) = 0 -> 0 - 8
        assert_eq!(b.q[0], 2); // 0.5 / 0.25 + 8.5 = 10.5 -> 10 -> 2
        let mut y = [0.1f32; 32];
        y[0] = 1.6; // d = -0.2; 0.1/-0.2 + 8.5 = 8.0 -> q 8 -> 0
        let b = quantize_q4_0(&y);
        assert_eq!(b.q[0], -8);
        assert_eq!(b.q[1], 0);
        assert!(round_trip(DType::Q4_0, &y, 32).iter().zip(&y).all(|(a, b)| (a - b).abs() <= 0.1 + 1e-6));
    }
}
