//! Weight storage types: their exact meaning (dequantization) and the quantizers that produce
//! them. The interpreter and the kernels agree on these definitions; the quantizers follow
//! ggml's reference round-to-nearest math, so a Q8_0/Q4_0 weight means what it means in a
//! GGUF file.
//!
//! - `bf16`, `f16`: the value is the 16-bit float widened to f32 (exact).
//! - `q8_0`: blocks of 32 values along a row, `x = d · q` with `q: i8` and one scale `d` per
//!   block, an f16 value (stored widened to f32 in llmc's repacked layout; exact).
//! - `q4_0`: blocks of 32, `x = d · (q − 8)` with `q` in `0..16`, `d` an f16 value.
//! - `q4_1`: blocks of 32, `x = q · d + m` with `q` in `0..16`; `d` and `m` are f32 values
//!   (ggml's Q4_1: f16 values; each 32-value sub-block of a Q4_K super-block: `d · scale` and
//!   `−dmin · min`, exact products in f32).
//! - `q5_1`: the same with `q` in `0..32` (ggml's Q5_1, and Q5_K's sub-blocks).
//! - `q6_k`: blocks of 32 in two halves of 16, `x = d_h · q` with `q` in `−32..32` and one f32
//!   scale `d_h` per half (ggml's Q6_K: `d · scale`, exact in f32).
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

/// Whether `dtype` is a weight storage type other than f32 (only weights may have one, and
/// only where a kernel reads it: see `Op::accepts_storage`).
pub fn is_storage(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) || is_blocked(dtype)
}

/// Whether `dtype` quantizes in blocks of `QK` along the last dim.
pub fn is_blocked(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_1 | DType::Q6K)
}

/// Whether a block of `dtype` has a minimum `m` (else `m = 0`).
pub fn has_min(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q5_1)
}

/// The range of a block's integers `q` for `dtype`.
pub fn q_range(dtype: DType) -> std::ops::RangeInclusive<i32> {
    match dtype {
        DType::Q8_0 => -128..=127,
        DType::Q4_0 => -8..=7,
        DType::Q4_1 => 0..=15,
        DType::Q5_1 => 0..=31,
        DType::Q6K => -32..=31,
        _ => 0..=0,
    }
}

/// One block of 32 weights in the canonical form of its storage type: `x[k] = d[k / 16] · q[k]
/// + m` (`d[0] == d[1]` except for q6_k; `m == 0` except for q4_1 and q5_1; `q` in
/// `q_range`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QBlock {
    pub d: [f32; 2],
    pub m: f32,
    pub q: [i8; QK],
}

/// What a block means (see `QBlock`); `out` has `QK` values.
pub fn dequantize_block(b: &QBlock, out: &mut [f32]) {
    for (k, (o, &q)) in out.iter_mut().zip(&b.q).enumerate() {
        let dq = q as f32 * b.d[k / 16];
        *o = if b.m != 0.0 { dq + b.m } else { dq };
    }
}

/// Quantizes one block of 32 values into `dtype`: ggml's reference math for q8_0, q4_0 and
/// q4_1; for q5_1, the same as q4_1 with 31 steps; for q6_k, q4_0's rule per half of 16 with
/// 32 steps (`d = max / −32`). (GGUF files bring their q5_1/q6_k blocks with them; these two
/// quantizers serve `--dtype`-free tests and fallbacks.)
pub fn quantize_block(dtype: DType, x: &[f32]) -> QBlock {
    match dtype {
        DType::Q8_0 | DType::Q4_0 => {
            let b = if dtype == DType::Q8_0 { quantize_q8_0(x) } else { quantize_q4_0(x) };
            QBlock { d: [b.d; 2], m: 0.0, q: b.q }
        }
        DType::Q4_1 => {
            let b = quantize_q4_1(x);
            QBlock { d: [b.d; 2], m: b.m, q: b.q.map(|q| q as i8) }
        }
        DType::Q5_1 => {
            let (d, m, q) = quantize_with_min(x, 31);
            QBlock { d: [d; 2], m, q: q.map(|q| q as i8) }
        }
        _ => {
            let mut b = QBlock { d: [0.0; 2], m: 0.0, q: [0; QK] };
            for h in 0..2 {
                let half = &x[16 * h..16 * h + 16];
                let d = signed_absmax(half) / -32.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &v) in b.q[16 * h..16 * h + 16].iter_mut().zip(half) {
                    *o = ((v * id + 32.5) as i8).min(63) - 32;
                }
                b.d[h] = f16::from_f32(d).to_f32();
            }
            b
        }
    }
}

/// The blocks of a row-major matrix of rows of `cols` values (a multiple of `QK`).
pub fn quantize_blocks(dtype: DType, x: &[f32]) -> Vec<QBlock> {
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
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        let t = (v * id + 8.5) as i8; // C's (int8_t) cast truncates toward zero
        *o = t.min(15) - 8;
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

/// Rounds `x` to what a weight of storage type `dtype` holds, value by value (f32: as is;
/// bf16/f16: round to nearest even; blocked types: quantize and dequantize each block of the
/// last dim). `cols` is the last dim, a multiple of `QK` for blocked types.
pub fn round_trip(dtype: DType, x: &[f32], cols: usize) -> Vec<f32> {
    match dtype {
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        d if is_blocked(d) => {
            debug_assert!(cols % QK == 0 && x.len() % cols == 0);
            let mut out = vec![0f32; x.len()];
            for (b, o) in x.chunks(QK).zip(out.chunks_mut(QK)) {
                dequantize_block(&quantize_block(dtype, b), o);
            }
            out
        }
        _ => x.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 61) as f32 - 30.0) * 0.07).collect();
        for (dtype, steps) in [(DType::Q5_1, 31.0), (DType::Q6K, 32.0)] {
            let blocks = quantize_blocks(dtype, &x);
            for (b, xs) in blocks.iter().zip(x.chunks(QK)) {
                assert!(b.q.iter().all(|&q| q_range(dtype).contains(&(q as i32))), "{dtype:?} {b:?}");
                let mut back = [0f32; QK];
                dequantize_block(b, &mut back);
                let span = xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                for (a, v) in back.iter().zip(xs) {
                    assert!((a - v).abs() <= span / steps * 0.51 + 1e-3, "{dtype:?} {a} {v}");
                }
            }
            let once = round_trip(dtype, &x, 32);
            assert_eq!(round_trip(dtype, &once, 32), once, "{dtype:?} blocks come back unchanged");
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
