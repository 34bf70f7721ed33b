//! What the values of a ggml tensor mean: dequantization of each block type llmc reads from
//! GGUF files, following ggml's reference `dequantize_row_*` definitions (blocks in
//! `ggml-common.h`; `f16` fields little-endian).

use half::{bf16, f16};

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
            Q8_0 => {
                let d = h(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            Q4_0 | Q4_1 => {
                let d = h(b, 0);
                let (m, qs) = if ty == Q4_1 { (h(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            Q5_0 | Q5_1 => {
                let d = h(b, 0);
                let (m, rest) = if ty == Q5_1 { (h(b, 2), &b[4..]) } else { (-16.0 * d, &b[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for (j, &q) in qs.iter().enumerate() {
                    let hi = ((qh >> j) & 1) << 4;
                    out.push(((q & 0xF) as u32 | hi) as f32 * d + m);
                }
                for (j, &q) in qs.iter().enumerate() {
                    let hi = ((qh >> (j + 16)) & 1) << 4;
                    out.push(((q >> 4) as u32 | hi) as f32 * d + m);
                }
            }
            Q4K | Q5K => {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if ty == Q5K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for c in 0..4 {
                    // 64 values: 32 low nibbles (sub-block 2c), then 32 high nibbles (2c + 1)
                    let q = &qs[32 * c..32 * c + 32];
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + half, scales);
                        let (d1, m1) = (d * sc, dmin * m);
                        for l in 0..32 {
                            let mut v = if half == 0 { q[l] & 0xF } else { q[l] >> 4 } as u32;
                            if ty == Q5K && qh[l] & (1 << (2 * c + half)) != 0 {
                                v += 16;
                            }
                            out.push(d1 * v as f32 - m1);
                        }
                    }
                }
            }
            Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let mut vals = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |lo: u8, shift: u32| ((lo as i32) | ((((qh[l] >> shift) & 3) as i32) << 4)) - 32;
                        vals[l] = d * sc[is] as i8 as f32 * q(ql[l] & 0xF, 0) as f32;
                        vals[l + 32] = d * sc[is + 2] as i8 as f32 * q(ql[l + 32] & 0xF, 2) as f32;
                        vals[l + 64] = d * sc[is + 4] as i8 as f32 * q(ql[l] >> 4, 4) as f32;
                        vals[l + 96] = d * sc[is + 6] as i8 as f32 * q(ql[l + 32] >> 4, 6) as f32;
                    }
                    out.extend_from_slice(&vals);
                }
            }
            _ => unreachable!("`can_read` is checked before dequantizing"),
        }
    }
    out
}

/// The storage type llmc keeps a GGUF tensor in, when compiled without `--dtype`: the file's
/// own type where llmc has it (f32, f16, bf16, q8_0, q4_0, q4_1: repacked losslessly), and
/// q8_0 for the other quantized types (re-quantized from their exact values: llmc has no
/// native kernels for Q5_x and the K-quants yet).
pub fn storage_type(ty: GgmlType) -> llmc_ir::DType {
    use llmc_ir::DType;
    match ty {
        GgmlType::F32 => DType::F32,
        GgmlType::F16 => DType::F16,
        GgmlType::BF16 => DType::BF16,
        GgmlType::Q4_0 => DType::Q4_0,
        GgmlType::Q4_1 => DType::Q4_1,
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
