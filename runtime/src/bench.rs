//! `llmc bench`: prefill and decode throughput, weight bytes read per decoded token, memory
//! bandwidth measured in the same process, and the roofline fraction
//! `decode tok/s × bytes per token ÷ bandwidth`.

use std::time::Instant;

use llmc_compiler::program::{Arg, KernelSpec};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::RuntimeError;
use crate::sampler::argmax;
use crate::session::{Backend, Engine, Session};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// The prompt step's matmul FLOP (`step_flops`) per second.
    pub prefill_gflop_s: f64,
    /// The f32 FMA peak of the pool's threads together, measured in the same run by a loop of
    /// independent FMAs at the widest vector width the host has.
    pub fma_peak_gflop_s: f64,
    /// Where the host has AVX512_BF16: the peak of `vdpbf16ps` (bf16 pairs multiplied and
    /// summed into f32, 32 multiply-adds per instruction), measured as `fma_peak_gflop_s`. It
    /// is what bf16 weights times bf16-rounded activations could reach; the float kernels use
    /// FMAs on f32 activations (see the closing note of issue 12 for why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16_dot_peak_gflop_s: Option<f64>,
    /// `prefill_gflop_s / fma_peak_gflop_s` (int8 dot products do 4 multiply-adds per lane and
    /// instruction, so quantized models may pass 1).
    pub prefill_peak_fraction: f64,
    pub bytes_per_token: u64,
    pub bandwidth_gb_s: f64,
    pub roofline_fraction: f64,
    pub threads: usize,
    /// The instruction-set level the kernels were compiled for (`avx512`, `avxvnni`, `avx2`, `sse`;
    /// `LLMC_ISA` lowers it).
    pub isa: String,
    pub kernel_calls_per_token: usize,
    pub kernels: usize,
    pub arena_bytes: u64,
    pub load_s: f64,
    pub jit_s: f64,
    /// With `--batch N`: N sequences decoded together in batched steps, and their aggregate
    /// tokens per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_decode_tok_s: Option<f64>,
    /// With `--batch` and profiling: (kernel name, milliseconds per batched step, calls per
    /// step), slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub batch_profile: Vec<(String, f64, usize)>,
    /// With profiling: (kernel name, decode milliseconds per token, calls per token), slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decode_profile: Vec<(String, f64, usize)>,
    /// With profiling: (kernel name, milliseconds, calls) of the prompt's prefill step (run
    /// again in a fresh session after the timed one), slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefill_profile: Vec<(String, f64, usize)>,
}

/// Bytes of weights one decode step reads: whole tensors, except embedding gathers (one row)
/// and MoE experts (the top-k of E experts: k/E of the stacked expert tensors).
pub fn bytes_per_token(engine: &Engine) -> u64 {
    let prog = &engine.art.header.program;
    let size = |name: &str| engine.art.header.tensors.iter().find(|t| t.name == name).map_or(0, |t| t.len);
    let mut total = 0;
    for call in &prog.calls {
        for a in &call.args {
            if let Arg::Weight(name) = a {
                total += match prog.kernels[call.kernel] {
                    KernelSpec::Embedding { d, w, .. } => (llmc_compiler::pack::panel_bytes(w, d) / 16) as u64,
                    KernelSpec::MoeGateUp { .. } | KernelSpec::MoeDown { .. } => {
                        let experts =
                            engine.art.header.tensors.iter().find(|t| &t.name == name).map_or(1, |t| t.shape[0]);
                        let top_k = match prog.kernels[call.kernel] {
                            KernelSpec::MoeGateUp { top_k, .. } | KernelSpec::MoeDown { top_k, .. } => top_k,
                            _ => 1,
                        };
                        size(name) * top_k as u64 / experts.max(1) as u64
                    }
                    _ => size(name),
                };
            }
        }
    }
    total
}

/// Matmul FLOP of one step of `rows` rows: the projections before `take_last` run on every
/// row, those after it (the output projection) on the last row only.
pub fn step_flops(engine: &Engine, rows: usize) -> u64 {
    let prog = &engine.art.header.program;
    let mut per_row = true;
    let mut total = 0u64;
    for c in &prog.calls {
        let f = match prog.kernels[c.kernel] {
            KernelSpec::TakeLast { .. } => {
                per_row = false;
                0
            }
            KernelSpec::MatMul { k, m, .. } => 2 * (k * m) as u64,
            KernelSpec::MoeGateUp { d, ff, top_k, .. } => 2 * (d * 2 * ff * top_k) as u64,
            KernelSpec::MoeDown { d, ff, top_k, .. } => 2 * (d * ff * top_k) as u64,
            KernelSpec::QkvRope { k, heads, kv_heads, head_dim, .. } => {
                2 * (k * (heads + 2 * kv_heads) * head_dim) as u64
            }
            _ => 0,
        };
        total += if per_row { f * rows as u64 } else { f };
    }
    total
}

/// Sums a slice as fast as this CPU reads memory: the widest loads the CPU has (512-bit with
/// AVX-512, 256-bit with AVX2), over `STREAMS` interleaved streams (the four quarters of the
/// slice read side by side, as decode reads several weight panels at once: one stream per core
/// leaves the hardware prefetchers idle and reads slower than decode does).
fn stream_sum(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above).
            return unsafe { stream_sum_avx512(c) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { stream_sum_avx2(c) };
        }
    }
    let q = c.len() / STREAMS;
    let mut acc = [0u64; STREAMS];
    for i in 0..q {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(c[j * q + i]);
        }
    }
    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Interleaved read streams per thread of the bandwidth probe.
const STREAMS: usize = 4;

/// The AVX-512 body of `stream_sum`: each quarter of `c` in 512-bit words, four at a time.
///
/// # Safety
/// The CPU must support AVX-512F; every load stays inside `c` (whole 8-word vectors of each
/// quarter only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_sum_avx512(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let q = c.len() / STREAMS / 8; // 512-bit words per quarter
    let mut acc = [_mm512_setzero_si512(); STREAMS];
    let base = c.as_ptr();
    for i in 0..q {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: word i of quarter j: (j·q + i)·8 + 8 <= STREAMS·q·8 <= c.len() u64s.
            let v = unsafe { _mm512_loadu_si512(base.add((j * q + i) * 8) as *const _) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let s = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    _mm512_reduce_add_epi64(s) as u64
}

/// The AVX2 body of `stream_sum`: each quarter of `c` in 256-bit words.
///
/// # Safety
/// The CPU must support AVX2 (`is_x86_feature_detected!("avx2")`); every load stays inside
/// `c` (whole 4-word vectors of each quarter only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_sum_avx2(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let q = c.len() / STREAMS / 4; // 256-bit words per quarter
    let mut acc = [_mm256_setzero_si256(); STREAMS];
    let p = c.as_ptr() as *const __m256i;
    for i in 0..q {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: word j·q + i < STREAMS·q 256-bit words inside `c` (unaligned load).
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(j * q + i)) });
        }
    }
    let s = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut out = [0u64; 4];
    // SAFETY: `out` has room for one 256-bit store.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s) };
    out.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Read bandwidth in GB/s over as many bytes as a decoded token reads (`bytes`, between 8
/// and 512 MiB): best of 8 passes, split over the pool's threads, each reading its part as
/// `STREAMS` streams with the widest loads it has. The size matters: a model that fits the
/// last-level cache (SmolLM2's q4_0 weights do on a 260 MiB L3) decodes from it, faster than
/// DRAM, and its roofline is the cache's.
pub fn measure_bandwidth(pool: &rayon::ThreadPool, bytes: u64) -> f64 {
    let words = (bytes.clamp(8 << 20, 512 << 20) / 8) as usize;
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = pool.current_num_threads().max(1);
    // each thread's part: whole 512-bit words of each stream, so every counted byte is read
    let per = words / threads / (STREAMS * 8) * (STREAMS * 8);
    let used = &buf[..per * threads];
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = Instant::now();
        let s: u64 = pool.install(|| used.par_chunks(per).map(stream_sum).reduce(|| 0, |a, b| a.wrapping_add(b)));
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (used.len() * 8) as f64 / best / 1e9
}

/// Independent FMA chains of the peak loops: enough to cover 2 ports × 4 cycles of latency,
/// and few enough that the chains and the loop's two constants stay in registers (32 zmm; 16
/// ymm, where 16 chains spilled and measured 55 GFLOP/s on a Zen 3 core whose projections run
/// at 80).
const CHAINS_512: usize = 16;
const CHAINS_256: usize = 12;

/// `iters` rounds of `step` on independent accumulators (the locals named after `;`, one
/// chain each) that start at `init`, then `reduce` of each, summed. The accumulators are
/// distinct locals: held in an array they were partly kept on the stack (a store and a load in
/// one chain every round), which measured the FMA peak at 98 GFLOP/s on a host whose FMAs
/// reach 168.
macro_rules! chains {
    ($iters:expr, $init:expr, |$x:ident| $step:expr, |$r:ident| $reduce:expr; $($c:ident)+) => {{
        $(let mut $c = $init;)+
        for _ in 0..$iters {
            $($c = {
                let $x = $c;
                $step
            };)+
        }
        [$($c),+].map(|$r| $reduce).iter().sum::<f32>()
    }};
}

/// `iters` rounds of `CHAINS_512` 512-bit FMAs; returns a value that depends on all of them.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    chains!(iters, _mm512_set1_ps(1.0), |x| _mm512_fmadd_ps(x, a, b), |v| _mm512_reduce_add_ps(v);
        c0 c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 c11 c12 c13 c14 c15)
}

/// As `fma_loop_avx512` with 256-bit FMAs.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let first = |v: __m256| _mm_cvtss_f32(_mm256_castps256_ps128(v));
    chains!(iters, _mm256_set1_ps(1.0), |x| _mm256_fmadd_ps(x, a, b), |v| first(v); c0 c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 c11)
}

/// `iters` rounds of `CHAINS_512` 512-bit `vdpbf16ps`; returns a value that depends on all of them.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    // bf16 pairs (1.0, 1.0) and (2^-20, 2^-20): the sums grow slowly and stay finite
    let a: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80));
    let b: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3580_3580));
    chains!(iters, _mm512_set1_ps(1.0), |x| _mm512_dpbf16_ps(x, a, b), |v| _mm512_reduce_add_ps(v);
        c0 c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 c11 c12 c13 c14 c15)
}

/// GFLOP/s of one thread's `vdpbf16ps` loop (`None` without AVX512_BF16).
fn bf16_dot_rate(iters: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")) {
            return None;
        }
        let t = Instant::now();
        // SAFETY: AVX-512F and AVX512_BF16 are present (checked just above).
        std::hint::black_box(unsafe { bf16_dot_loop(iters) });
        Some((iters * CHAINS_512 * 32 * 2) as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

/// The `vdpbf16ps` peak of the pool's threads running at once (best of 3 rounds), where the
/// host has it.
pub fn measure_bf16_dot_peak(pool: &rayon::ThreadPool) -> Option<f64> {
    let mut best: Option<f64> = None;
    for _ in 0..3 {
        let rates = pool.broadcast(|_| bf16_dot_rate(1_000_000));
        let total: Option<f64> = rates.iter().copied().sum();
        best = match (best, total) {
            (Some(b), Some(t)) => Some(b.max(t)),
            (b, t) => b.or(t),
        };
    }
    best
}

/// GFLOP/s of one thread's FMA loop (`None` without AVX2/FMA or AVX-512).
fn fma_rate(iters: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let t = Instant::now();
        let lanes_x_chains = if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above).
            std::hint::black_box(unsafe { fma_loop_avx512(iters) });
            16 * CHAINS_512
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked just above).
            std::hint::black_box(unsafe { fma_loop_avx2(iters) });
            8 * CHAINS_256
        } else {
            return None;
        };
        Some((iters * lanes_x_chains * 2) as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

/// The f32 FMA peak of the pool's threads running at once (best of 3 rounds of ~20 ms);
/// 0 where the host has no FMA vectors this loop knows.
pub fn measure_fma_peak(pool: &rayon::ThreadPool) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let rates = pool.broadcast(|_| fma_rate(2_000_000));
        let total: f64 = rates.iter().map(|r| r.unwrap_or(0.0)).sum();
        best = best.max(total);
    }
    best
}

/// Runs the benchmark: a `prefill`-token prompt, then `decode` greedy tokens, on the JIT.
pub fn run(engine: &Engine, prefill: usize, decode: usize, profile: bool) -> Result<BenchReport, RuntimeError> {
    let vocab = engine.art.header.vocab_size;
    let prompt: Vec<i32> = (0..prefill.max(1)).map(|i| ((i * 7919 + 13) % vocab) as i32).collect();
    let ctx = prompt.len() + decode + 1;
    // Warm-up: touch every weight page once.
    {
        let mut s = Session::new(engine, Backend::Jit, Some(ctx))?;
        s.step(&prompt[..1])?;
    }
    let mut s = Session::new(engine, Backend::Jit, Some(ctx))?;
    let t0 = Instant::now();
    let mut logits = s.step(&prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    if profile {
        s.enable_profile();
    }
    let t1 = Instant::now();
    for _ in 0..decode {
        let tok = argmax(&logits) as i32;
        logits = s.step(&[tok])?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let bytes = bytes_per_token(engine);
    let bw = measure_bandwidth(&engine.pool, bytes);
    let peak = measure_fma_peak(&engine.pool);
    let bf16_peak = measure_bf16_dot_peak(&engine.pool);
    let decode_tok_s = decode as f64 / decode_s.max(1e-9);
    let prefill_tok_s = prompt.len() as f64 / prefill_s.max(1e-9);
    let prefill_gflop_s = step_flops(engine, prompt.len()) as f64 / prefill_s.max(1e-9) / 1e9;
    let prog = &engine.art.header.program;
    let per_step = |p: Option<&[(f64, usize)]>, steps: usize| per_step(&prog.kernels, p.unwrap_or(&[]), steps);
    let decode_profile = per_step(s.profile(), decode);
    let prefill_profile = if profile {
        let mut p = Session::new(engine, Backend::Jit, Some(ctx))?;
        p.enable_profile();
        p.step(&prompt)?;
        per_step(p.profile(), 1)
    } else {
        Vec::new()
    };
    Ok(BenchReport {
        decode_profile,
        prefill_profile,
        prefill_tokens: prompt.len(),
        decode_tokens: decode,
        prefill_tok_s,
        decode_tok_s,
        prefill_gflop_s,
        fma_peak_gflop_s: peak,
        bf16_dot_peak_gflop_s: bf16_peak,
        prefill_peak_fraction: if peak > 0.0 { prefill_gflop_s / peak } else { 0.0 },
        bytes_per_token: bytes,
        bandwidth_gb_s: bw,
        roofline_fraction: decode_tok_s * bytes as f64 / (bw * 1e9),
        threads: engine.threads(),
        isa: engine.kernels.level.name().to_string(),
        kernel_calls_per_token: prog.calls.len(),
        kernels: prog.kernels.len(),
        arena_bytes: (prog.arena_width * crate::session::DEFAULT_CHUNK * 4) as u64,
        load_s: engine.load_s,
        jit_s: engine.jit_s,
        batch: None,
        batch_decode_tok_s: None,
        batch_profile: Vec::new(),
    })
}

/// Aggregate decode tokens per second of `batch` sequences stepped together
/// ([`crate::Batcher`]): each prefills its own `prefill`-token prompt, then `decode` batched
/// greedy steps run.
pub fn batch_decode(
    engine: &Engine,
    prefill: usize,
    decode: usize,
    batch: usize,
    profile: bool,
) -> Result<(f64, Vec<(String, f64, usize)>), RuntimeError> {
    let vocab = engine.art.header.vocab_size;
    let ctx = prefill.max(1) + decode + 1;
    let mut sessions: Vec<Session<'_>> =
        (0..batch).map(|_| Session::new(engine, Backend::Jit, Some(ctx))).collect::<Result<_, _>>()?;
    let mut next = Vec::new();
    for (b, s) in sessions.iter_mut().enumerate() {
        let prompt: Vec<i32> = (0..prefill.max(1)).map(|i| ((i * 7919 + 13 + b * 101) % vocab) as i32).collect();
        next.push(argmax(&s.step(&prompt)?) as i32);
    }
    let mut batcher = crate::Batcher::new(engine, ctx, batch)?;
    if profile {
        batcher.enable_profile();
    }
    let t = Instant::now();
    for _ in 0..decode {
        let mut refs: Vec<&mut Session<'_>> = sessions.iter_mut().collect();
        let logits = batcher.step(&mut refs, &next)?;
        next = logits.iter().map(|l| argmax(l) as i32).collect();
    }
    let rate = (decode * batch) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let prof = per_step(&engine.art.header.program.kernels, batcher.profile().unwrap_or(&[]), decode);
    Ok((rate, prof))
}

/// A step profile (`JitState::profile`: seconds and calls per kernel, then per kernel's shared
/// pre-pass) over `steps` steps as (kernel name, milliseconds per step, calls per step), the
/// slowest first; pre-passes that never ran are left out.
fn per_step(kernels: &[KernelSpec], p: &[(f64, usize)], steps: usize) -> Vec<(String, f64, usize)> {
    let mut v: Vec<(String, f64, usize)> = p
        .iter()
        .enumerate()
        .filter(|&(k, &(_, calls))| k < kernels.len() || calls > 0)
        .filter_map(|(k, &(secs, calls))| {
            let name = match kernels.get(k) {
                Some(spec) => spec.name(),
                None => format!("prequantize_{}", kernels.get(k - kernels.len())?.name()),
            };
            Some((name, secs * 1e3 / steps.max(1) as f64, calls / steps.max(1)))
        })
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
