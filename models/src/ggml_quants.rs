//! What the values of a ggml tensor mean: dequantization of each block type llmc reads from
//! GGUF files, following ggml's reference `dequantize_row_*` definitions (blocks in
//! `ggml-common.h`; `f16` fields little-endian).

use half::{bf16, f16};

use llmc_ir::quant::{self, KScales, QBlock, QK};

use crate::gguf::GgmlType;

/// The types `dequantize` reads, for error messages.
pub const READABLE: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

pub fn can_read(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4K | Q5K | Q6K)
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f32, ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32)
    }
}

/// The f32 values of `bytes` (whole blocks of `ty`; the caller checked the length).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    use GgmlType::*;
    let (be, bb) = ty.block();
    let (be, bb) = (be as usize, bb as usize);
    let mut out = Vec::with_capacity(bytes.len() / bb * be);
    for b in bytes.chunks_exact(bb) {
        match ty {
            F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            F16 => out.push(h(b, 0)),
            BF16 => out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => {
                let mut blocks = [QBlock::default(); 8];
                let blocks = &mut blocks[..be / QK];
                blocks_of(ty, b, blocks);
                let mut v = [0f32; QK];
                for blk in blocks.iter() {
                    quant::dequantize_block(blk, &mut v);
                    out.extend_from_slice(&v);
                }
            }
        }
    }
    out
}

/// The blocks of `bytes` (whole ggml blocks of the quantized `ty`) in the canonical form of
/// `storage_type(ty)`, 32 values each, in order: the values llmc stores are the file's own.
pub fn to_blocks(ty: GgmlType, bytes: &[u8]) -> Vec<QBlock> {
    let (be, bb) = ty.block();
    let mut out = vec![QBlock::default(); bytes.len() / bb as usize * be as usize / QK];
    to_blocks_into(ty, bytes, &mut out);
    out
}

/// `to_blocks` into `out` (as many blocks as `bytes` holds).
pub fn to_blocks_into(ty: GgmlType, bytes: &[u8], out: &mut [QBlock]) {
    let (be, bb) = ty.block();
    let per = be as usize / QK;
    for (b, o) in bytes.chunks_exact(bb as usize).zip(out.chunks_mut(per)) {
        blocks_of(ty, b, o);
    }
}

/// One ggml block of a quantized type as canonical blocks (ggml's `dequantize_row_*` read as
/// `x = d · q + m`; every product `d · scale` below is exact in f32).
/// `out` has room for the block's `elements / 32` blocks.
fn blocks_of(ty: GgmlType, b: &[u8], out: &mut [QBlock]) {
    use GgmlType::*;
    let block = |d: f32, m: f32, q: [i8; QK]| QBlock { d: [d; 2], m, q, ..Default::default() };
    match ty {
        Q8_0 => {
            let mut q = [0i8; QK];
            for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                *o = v as i8;
            }
            out[0] = block(h(b, 0), 0.0, q);
        }
        Q4_0 | Q4_1 | Q5_0 | Q5_1 => {
            // Q4_0, Q5_0: q − 8 / q − 16 with no minimum; Q4_1, Q5_1: q and the minimum
            let with_min = matches!(ty, Q4_1 | Q5_1);
            let (m, rest) = if with_min { (h(b, 2), &b[4..]) } else { (0.0, &b[2..]) };
            let (qh, qs) = if matches!(ty, Q5_0 | Q5_1) {
                (u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]), &rest[4..20])
            } else {
                (0, &rest[..16])
            };
            let five = matches!(ty, Q5_0 | Q5_1);
            let off = if with_min {
                0
            } else if five {
                16
            } else {
                8
            };
            let mut q = [0i8; QK];
            for j in 0..16 {
                let (lo, hi) = ((qs[j] & 0xF) as i32, (qs[j] >> 4) as i32);
                let (b0, b1) = if five { (((qh >> j) & 1) << 4, ((qh >> (j + 16)) & 1) << 4) } else { (0, 0) };
                q[j] = (lo + b0 as i32 - off) as i8;
                q[j + 16] = (hi + b1 as i32 - off) as i8;
            }
            out[0] = block(h(b, 0), m, q);
        }
        Q4K | Q5K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == Q5K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
            for (j, o) in out.iter_mut().enumerate().take(8) {
                // 64 values per 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high
                let (c, high) = (j / 2, j % 2 == 1);
                let (sc, mn) = scale_min_k4(j, scales);
                let mut q = [0i8; QK];
                for (l, o) in q.iter_mut().enumerate() {
                    let byte = qs[32 * c + l];
                    let mut v = if high { byte >> 4 } else { byte & 0xF };
                    if ty == Q5K && qh[l] & (1 << j) != 0 {
                        v += 16;
                    }
                    *o = v as i8;
                }
                // ggml: d·sc·q − dmin·min
                let k = KScales { sd: d, smin: -dmin, sc: [sc as i8; 2], mi: mn as i8 };
                let (ds, m) = k.block();
                *o = QBlock { d: ds, m, q, k };
            }
        }
        Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for (blk, o) in out.iter_mut().enumerate().take(8) {
                let mut q = [0i8; QK];
                for (i, o) in q.iter_mut().enumerate() {
                    // element e of the 256: half n (128 each), quarter j (32), lane l
                    let e = 32 * blk + i;
                    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                    let lo = ql[64 * n + l + 32 * (j % 2)];
                    let lo = if j < 2 { lo & 0xF } else { lo >> 4 };
                    let hi = (qh[32 * n + l] >> (2 * j)) & 3;
                    *o = ((lo | (hi << 4)) as i32 - 32) as i8;
                }
                let k = KScales { sd: d, smin: 0.0, sc: [sc[2 * blk] as i8, sc[2 * blk + 1] as i8], mi: 0 };
                *o = QBlock { d: k.block().0, m: 0.0, q, k };
            }
        }
        _ => unreachable!("`can_read` is checked before dequantizing"),
    }
}

/// The storage type llmc keeps a GGUF tensor in, when compiled without `--dtype`: the file's
/// own values, repacked losslessly (`to_blocks`): f32, f16, bf16 as they are; Q8_0, Q4_0,
/// Q5_0, Q4_1 and Q5_1 as q8_0, q4_0, q5_0, q4_1 and q5_1; Q4_K, Q5_K and Q6_K as q4_k, q5_k
/// and q6_k (their super-blocks kept).
pub fn storage_type(ty: GgmlType) -> llmc_ir::DType {
    use llmc_ir::DType;
    match ty {
        GgmlType::F32 => DType::F32,
        GgmlType::F16 => DType::F16,
        GgmlType::BF16 => DType::BF16,
        GgmlType::Q4_0 => DType::Q4_0,
        GgmlType::Q5_0 => DType::Q5_0,
        GgmlType::Q4_1 => DType::Q4_1,
        GgmlType::Q5_1 => DType::Q5_1,
        GgmlType::Q4K => DType::Q4K,
        GgmlType::Q5K => DType::Q5K,
        GgmlType::Q6K => DType::Q6K,
        _ => DType::Q8_0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_blocks_mean_what_ggml_says() {
        // Q4_1: d = 0.5, m = -1, nibbles 0..16
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(GgmlType::Q4_1, &b);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 0.5);
        assert_eq!(v[16], 15.0 * 0.5 - 1.0);
        // Q5_0: d = 1, high bit of element 1 and of element 17 set
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend(((1u32 << 1) | (1 << 17)).to_le_bytes());
        b.extend([0x21u8; 16]);
        let v = dequantize(GgmlType::Q5_0, &b);
        assert_eq!((v[0], v[1], v[16], v[17]), (1.0 - 16.0, 17.0 - 16.0, 2.0 - 16.0, 18.0 - 16.0));
        // Q8_0
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        assert_eq!(dequantize(GgmlType::Q8_0, &b)[0], -4.0);
    }

    /// Random blocks of every quantized type: their integers lie in the range of the storage
    /// type they are kept in, so packing them is lossless.
    #[test]
    fn blocks_fit_their_storage_type() {
        use GgmlType::*;
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for ty in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K] {
            let (be, bb) = ty.block();
            for _ in 0..50 {
                let mut b: Vec<u8> = (0..bb)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (s >> 56) as u8
                    })
                    .collect();
                // finite f16 fields (d, dmin / m) where each type keeps them
                let at: &[usize] = match ty {
                    Q6K => &[208],
                    Q8_0 | Q4_0 | Q5_0 => &[0],
                    _ => &[0, 2],
                };
                for &a in at {
                    let v = f16::from_f32(0.01 * (b[a] as f32 - 128.0));
                    b[a..a + 2].copy_from_slice(&v.to_le_bytes());
                }
                let blocks = to_blocks(ty, &b);
                assert_eq!(blocks.len() * QK, be as usize);
                let range = quant::q_range(storage_type(ty));
                for blk in &blocks {
                    assert!(blk.q.iter().all(|&q| range.contains(&(q as i32))), "{ty:?} {blk:?}");
                    assert!(quant::has_min(storage_type(ty)) || blk.m == 0.0, "{ty:?}");
                    assert!(storage_type(ty) == llmc_ir::DType::Q6K || blk.d[0] == blk.d[1], "{ty:?}");
                    if quant::is_k(storage_type(ty)) {
                        // the K scales make d and m, and the super-block shares its scales
                        assert_eq!((blk.d, blk.m), blk.k.block(), "{ty:?}");
                        assert_eq!((blk.k.sd, blk.k.smin), (blocks[0].k.sd, blocks[0].k.smin), "{ty:?}");
                    } else {
                        assert_eq!(blk.k, KScales::default(), "{ty:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn k_quants_mean_what_ggml_says() {
        // Q4_K: d = 1, dmin = 0.5; sub-block 0 scale 3 min 2, sub-block 1 scale 5 min 1
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        let mut scales = [0u8; 12];
        scales[0] = 3;
        scales[1] = 5;
        scales[4] = 2;
        scales[5] = 1;
        b.extend(scales);
        b.extend([0x72u8; 128]); // low nibble 2, high nibble 7
        let v = dequantize(GgmlType::Q4K, &b);
        assert_eq!(v.len(), 256);
        assert_eq!(v[0], 3.0 * 2.0 - 0.5 * 2.0);
        assert_eq!(v[32], 5.0 * 7.0 - 0.5 * 1.0);
        // Q6_K: d = 2, scale 3 everywhere, q = 33 (low nibble 1, high bits 2) -> 2 * 3 * 1
        let mut b = vec![0x11u8; 128];
        b.extend([0xAAu8; 64]);
        b.extend([3u8; 16]);
        b.extend(f16::from_f32(2.0).to_le_bytes());
        let v = dequantize(GgmlType::Q6K, &b);
        assert!(v.iter().all(|&x| x == 6.0), "{:?}", &v[..4]);
    }
}
