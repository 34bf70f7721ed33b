//! Wide micro-kernels: the inner products of the matmul family at the host's full vector width
//! (512-bit on AVX-512 hosts), which Cranelift's x64 backend cannot emit (it has 128-bit
//! vectors only).
//!
//! They are precompiled Rust (`#[target_feature]` functions with `std::arch` intrinsics) rather
//! than JIT-assembled: the shapes they depend on (`kd`, the panel stride) are loop bounds read
//! once per call, so specializing them at load buys nothing measurable, while Rust code is
//! checked by the compiler and readable by a reviewer. The JIT kernels keep everything else:
//! the argument table, the RMS and int8 prologues and every fused epilogue. A kernel calls a
//! micro-kernel by its address (a constant in the JIT code) for one tile of up to
//! `TILE_TOKENS` × `TILE_PANELS` 16-row panels, which writes the tile's f32 sums to a stack
//! buffer the kernel then finishes (RMS scale, bias, epilogue).
//!
//! Tiles (AVX-512): `(1, 1..=4)` for a single row (decode: four weight streams in flight) and
//! `(1..=4, 1..=2)` for int8 prefill, `(1..=8, 1..=2)` for f32/bf16/f16 prefill (register
//! blocking: each weight vector loaded once per tile feeds every token's FMA); a batched
//! decode step's 5–8 rows in one int8 tile over one panel, or two on rows of 1024 columns and
//! more (q8_0, q4_0), the K types as two 4-row tiles. AVX2 (16
//! registers): `(1, 1..=2)` int8 and `(1, 1..=4)` float for one row, `(1..=4, 1)` for several.

use llmc_ir::DType;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_attention;
#[cfg(target_arch = "x86_64")]
mod quant;
#[cfg(target_arch = "x86_64")]
mod round;
#[cfg(target_arch = "x86_64")]
mod scan;
#[cfg(target_arch = "x86_64")]
mod swiglu;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Most tokens and panels one call computes; `out` holds `[TILE_TOKENS][TILE_PANELS][16]` f32.
pub const TILE_TOKENS: usize = 8;
pub const TILE_PANELS: usize = 4;

/// Tokens × panels per call: for one row, and for several (int8 or float weights).
pub const DECODE_PANELS: usize = 4;
pub const DOT_TOKENS: usize = 4;
pub const FLOAT_TOKENS: usize = 8;
pub const PREFILL_PANELS: usize = 2;

/// A micro-kernel: `(w, panel_stride, panels, x, x_row_stride, tokens, kd, out)`.
///
/// `w` is the first of `panels` panels `panel_stride` bytes apart, each in the `Panel16`
/// layout (float weights) or the `Dot16` layout (`pack::panel_bytes`); `x` is the first of
/// `tokens` input rows `x_row_stride` bytes apart: f32 rows of `kd` values, or rows of the
/// int8 prologue's buffer (`kd` bytes of q, then 12 bytes of metadata per block of 32:
/// `kernels::dot`). Writes `Σ_k x[t, k]·W[row, k]` (int8: each block's integer sum corrected
/// and scaled, as `kernels::dot` defines) to `out[(t·TILE_PANELS + p)·16 + lane]`.
pub type MicroFn = unsafe extern "C" fn(*const u8, usize, usize, *const u8, usize, usize, usize, *mut f32);

/// The micro-kernel family a kernel calls: 512-bit (AVX-512 F/BW/VL, VNNI, F16C) or 256-bit
/// (AVX2, FMA, F16C; int8 dot products with AVX-VNNI's `vpdpbusd` (`AvxVnni`) or without
/// (`Avx2`); every other 256-bit kernel is the same for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wide {
    Avx2,
    AvxVnni,
    Avx512,
}

impl Wide {
    /// Whether this host has what the family needs.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Wide::Avx2 => avx2::available(),
                Wide::AvxVnni => avx2::available() && avx2::vnni_available(),
                Wide::Avx512 => avx512::available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// Bytes of a blocked type's block head, of its whole block, and of its entry in a K type's
/// super-block table, from the micro-kernels' type parameters (nibbles, a minimum, K heads,
/// high bits): what `pack::block_head`, `pack::block_bytes` and `pack::super_bytes` say.
pub(crate) const fn block_layout(nib: bool, min: bool, kh: bool, hb: usize) -> (usize, usize, usize) {
    let head = if kh {
        32
    } else if min {
        128
    } else {
        64
    };
    (head, head + if nib { 256 + 64 * hb } else { 512 }, if min { 128 } else { 64 })
}

/// Bytes of the host's L2 cache (per core): from Linux's sysfs description of cpu0's caches,
/// else 1 MiB. Read once.
pub fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        (0..8)
            .filter_map(|i| {
                let idx = dir.join(format!("index{i}"));
                let level = read(idx.join("level"))?;
                let kind = read(idx.join("type"))?;
                let size = read(idx.join("size"))?;
                (level == "2" && kind != "Instruction").then_some(())?;
                let (num, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
                let num: usize = num.parse().ok()?;
                let scale = match unit {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    _ => return None,
                };
                num.checked_mul(scale).filter(|&b| (64 << 10..=1 << 30).contains(&b))
            })
            .next()
            .unwrap_or(1 << 20)
    })
}

/// Rows of `row_bytes` a prefill walks per block: half the host's L2 worth, a whole number of
/// float tiles (`FLOAT_TOKENS`), at least one tile.
pub fn row_block(row_bytes: usize) -> usize {
    let rows = l2_bytes() / 2 / row_bytes.max(1);
    (rows / FLOAT_TOKENS * FLOAT_TOKENS).max(FLOAT_TOKENS)
}

/// The micro-kernel over int8 activations and `Dot16` weights of storage type `wt`.
pub fn dot(wt: DType, wide: Wide) -> Option<MicroFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match wide {
            Wide::Avx2 => avx2::dot(wt),
            Wide::AvxVnni => avx2::dot_vnni(wt),
            Wide::Avx512 => avx512::dot(wt),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wt;
        None
    }
}

/// Whether the `vdpbf16ps` tile (`float_xbf16`) is faster than `float`'s f32 tile on this host,
/// so kernels use it by default (`jit::compile`): AMD hosts with AVX512_BF16. Measured on
/// SmolLM2 bf16 `--activations bf16`, 512-token prefill: 1.46–2× the f32 tile on Zen 5; 0.61×
/// on an Intel Xeon with AVX512_BF16 (Sapphire Rapids class), where `vdpbf16ps` issues on one
/// port while f32 FMAs issue on two (the bench's probe there: 81 bf16 GFLOP/s vs 158 f32) and
/// the tile's `vpermw`/`vpshufb` compete with it.
pub fn bf16_dot_pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::bf16_available() && x86::vendor_is_amd()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The micro-kernel over bf16-exact activations (`round_bf16`) and bf16 `Panel16` weights
/// that multiplies with `vdpbf16ps` (AVX-512 hosts with AVX512_BF16); `None` elsewhere, where
/// `float`'s tiles take them as f32. Kernels use it where `bf16_dot_pays` (or when compiled
/// with it forced, `jit::compile_with`).
pub fn float_xbf16(wt: DType, wide: Wide) -> Option<MicroFn> {
    // (`avx512::float_xbf16` checks the host: AVX-512 with AVX512_BF16)
    if wide != Wide::Avx512 {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        avx512::float_xbf16(wt)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wt;
        None
    }
}

/// The micro-kernel over f32 activations and `Panel16` weights of type `wt` (float types, and
/// the blocked types widened to f32 in registers).
pub fn float(wt: DType, wide: Wide) -> Option<MicroFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match wide {
            Wide::Avx2 | Wide::AvxVnni => avx2::float(wt),
            Wide::Avx512 => avx512::float(wt),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wt;
        None
    }
}

/// Most query rows (heads of a group × step rows) one attention pass holds, one lane each;
/// the most head dims the attention micro-kernel takes.
pub const ROWS: usize = 64;
pub const MAX_HEAD_DIM: usize = 256;

/// The arguments of one attention micro-kernel call, as the JIT kernel writes them (8-byte
/// words, then `scale`): every query head of kv head `kvh`'s group for step rows
/// `t0 .. t0 + nt`.
#[repr(C)]
pub struct AttnCall {
    /// Row `t0` of the step's queries (`q_stride` f32 per row; head `h` at `h·head_dim`).
    pub q: *const f32,
    /// Positions of rows `t0 .. t0 + nt`.
    pub pos: *const i32,
    /// Row `t0` of the output (laid out as `q`).
    pub out: *mut f32,
    /// This layer's caches, `[kv_heads, cap, head_dim]`.
    pub kc: *const f32,
    pub vc: *const f32,
    pub nt: u64,
    pub kvh: u64,
    pub cap: u64,
    pub group: u64,
    pub head_dim: u64,
    pub q_stride: u64,
    /// Sliding window (0: none): the row at position `p` attends to `max(0, p-window+1) ..= p`.
    pub window: u64,
    pub scale: f32,
}

/// Byte offsets of `AttnCall`'s fields, in declaration order, and its size.
pub const ATTN_WORDS: usize = 12;
pub const ATTN_BYTES: usize = ATTN_WORDS * 8 + 8;

/// An attention micro-kernel: `attend(&AttnCall)`.
pub type AttnFn = unsafe extern "C" fn(*const AttnCall);

/// The attention micro-kernel of a family.
pub fn attention(wide: Wide) -> Option<AttnFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match wide {
            Wide::Avx2 | Wide::AvxVnni => avx2_attention::attend,
            Wide::Avx512 => avx512_attention::attend,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The arguments of one Mamba2 scan micro-kernel call, as `kernels::mamba::scan` writes them
/// (8-byte words): heads `h0..h1` over the step's `n` tokens.
#[repr(C)]
pub struct ScanCall {
    /// The in-projection rows (`width` f32 each): `dt` of head `h` at `dt_off + h`.
    pub zx: *const f32,
    /// The conv outputs, `heads·hd + 2·groups·ds` f32 per token: x, then B and C.
    pub act: *const f32,
    pub dt_bias: *const f32,
    pub a_log: *const f32,
    pub d: *const f32,
    /// The layer's state, `[heads, hd, ds]`.
    pub ssm: *mut f32,
    /// The output, `heads·hd` f32 per token.
    pub y: *mut f32,
    pub n: u64,
    pub h0: u64,
    pub h1: u64,
    pub heads: u64,
    pub hd: u64,
    pub ds: u64,
    pub groups: u64,
    pub width: u64,
    pub dt_off: u64,
}

/// Words of `ScanCall`.
pub const SCAN_WORDS: usize = 16;

/// The int8 prologue's quantization: `(x, rows, dst, inv, kd, terms, mode, eps_bits)` quantizes
/// `rows` rows of `x` (`kd` f32 each, `kd` a multiple of 32) into `terms` buffer rows each at
/// `dst` (`kernels::dot`'s layout: `kd` bytes of q, then 12 bytes of metadata per block) and,
/// when `inv` is not null, writes each row's inverse RMS (`eps` the f32 with bits `eps_bits`)
/// there. `mode`: the weights' offset in the low byte, `QUANT_MIN`, `QUANT_HALVES`.
///
/// # Safety
/// `x` holds `rows·kd` f32, `dst` `rows·terms·(kd + kd/32·12)` bytes and `inv` (unless null)
/// `rows` f32, none overlapping.
pub type QuantFn = unsafe extern "C" fn(*const f32, usize, *mut u8, *mut f32, usize, usize, usize, usize);

#[cfg(target_arch = "x86_64")]
pub use quant::{MODE_HALVES as QUANT_HALVES, MODE_MIN as QUANT_MIN};
#[cfg(not(target_arch = "x86_64"))]
pub const QUANT_MIN: usize = 1 << 8;
#[cfg(not(target_arch = "x86_64"))]
pub const QUANT_HALVES: usize = 1 << 9;

/// The quantization micro-kernel of a family.
pub fn quant(wide: Wide) -> Option<QuantFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match wide {
            Wide::Avx512 => Some(quant::quant_avx512 as QuantFn),
            Wide::Avx2 | Wide::AvxVnni => Some(quant::quant_avx2 as QuantFn),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// `round_bf16` over `n` contiguous f32: `(src, dst, n)` (see `round::round_bf16`).
pub type RoundFn = unsafe extern "C" fn(*const f32, *mut f32, usize);

/// The `round_bf16` micro-kernel, at either wide level.
pub fn round_bf16(wide: Wide) -> Option<RoundFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(round::round_bf16 as RoundFn)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The SwiGLU epilogue of a tile: `(src, tokens, panels, terms, inv, dst, dst_stride)` (see
/// `swiglu::swiglu_tile`).
pub type SwigluFn = unsafe extern "C" fn(*const f32, usize, usize, usize, *const f32, *mut f32, usize);

/// The SwiGLU epilogue micro-kernel (8 lanes: AVX2 and FMA, which both families have).
pub fn swiglu(wide: Wide) -> Option<SwigluFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(swiglu::swiglu_tile as SwigluFn)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// A scan micro-kernel: `scan(&ScanCall)`.
pub type ScanFn = unsafe extern "C" fn(*const ScanCall);

/// The Mamba2 scan micro-kernel of a family, for `ds` state dims, a whole number of the
/// family's vectors (else the Cranelift recurrence runs).
pub fn scan(wide: Wide, ds: usize) -> Option<ScanFn> {
    if !wide.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match wide {
            Wide::Avx512 => (ds % 16 == 0).then_some(scan::scan_avx512 as ScanFn),
            Wide::Avx2 | Wide::AvxVnni => (ds % 8 == 0).then_some(scan::scan_avx2 as ScanFn),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scan_call_layout_is_what_kernels_write() {
        assert_eq!(std::mem::size_of::<super::ScanCall>(), super::SCAN_WORDS * 8);
        assert_eq!(std::mem::offset_of!(super::ScanCall, dt_off), (super::SCAN_WORDS - 1) * 8);
    }

    #[test]
    fn attn_call_layout_is_what_kernels_write() {
        assert_eq!(std::mem::size_of::<super::AttnCall>(), super::ATTN_BYTES);
        assert_eq!(std::mem::offset_of!(super::AttnCall, scale), super::ATTN_WORDS * 8);
    }

    /// The vendor CPUID names is the one Linux reports, and the `vdpbf16ps` tile is chosen
    /// only where it exists and the vendor is AMD.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn bf16_dot_by_vendor() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = info.lines().find_map(|l| l.strip_prefix("vendor_id")).unwrap();
        let amd = vendor.trim_start_matches([' ', '\t', ':']) == "AuthenticAMD";
        assert_eq!(super::x86::vendor_is_amd(), amd, "{vendor}");
        let tile = super::float_xbf16(llmc_ir::DType::BF16, super::Wide::Avx512).is_some();
        assert_eq!(super::bf16_dot_pays(), amd && tile);
    }

    /// The micro-kernels' byte counts are the packer's, for every blocked type.
    #[test]
    fn block_layout_is_the_packers() {
        use crate::pack;
        use llmc_ir::{quant, DType};
        for wt in [DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::Q4_1, DType::Q5_1, DType::Q6K, DType::Q4K, DType::Q5K]
        {
            let (head, block, entry) =
                super::block_layout(pack::is_nibble(wt), quant::has_min(wt), quant::is_k(wt), pack::high_bits(wt));
            assert_eq!((head, block), (pack::block_head(wt), pack::block_bytes(wt)), "{wt:?}");
            if quant::is_k(wt) {
                assert_eq!(entry, pack::super_bytes(wt), "{wt:?}");
            }
        }
    }
}
