//! Cranelift setup: the host ISA, one JIT module per engine, and compilation of every kernel
//! spec into a native function.
//!
//! Every kernel has the same signature:
//! `extern "C" fn(args: *const *mut u8, n: i64, lo: i64, hi: i64, cap: i64)` — a table of
//! pointers (the spec says which), the rows of the step, the range of work units this call
//! does, and the KV cache capacity (KV kernels only; for an int8 projection, the address of
//! its input rows already quantized by its shared pre-pass, or 0: `kernels::dot::Xq`; the
//! pre-passes, `Kernels::shared`, have the same signature, units: rows). Kernels call nothing
//! but the wide micro-kernels of `crate::micro`, by an address in the code (no relocation):
//! the compiler checks that each has zero relocations.

use std::sync::Arc;

use cranelift_codegen::ir::{types, AbiParam, Signature, UserFuncName};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use thiserror::Error;

use crate::kernels;
use crate::program::KernelSpec;

#[derive(Debug, Error)]
pub enum JitError {
    #[error("host ISA: {0}")]
    Isa(String),
    #[error("kernel {kernel}: {msg}")]
    Codegen { kernel: String, msg: String },
}

/// A compiled kernel.
pub type KernelFn = unsafe extern "C" fn(args: *const *mut u8, n: i64, lo: i64, hi: i64, cap: i64);

/// Cranelift's optimization level for kernels. `none`: the generators already emit scheduled
/// code (pointer-walking loops, hoisted addresses, ≤ 13 live vectors), and the e-graph mid-end
/// of `speed` re-places pure values in ways that make the register allocator spill in the hot
/// loops. Measured on SmolLM2 (`llmc bench -t 1`): prefill 26.4 → 34.8 GFLOP/s, decode
/// 21.2 → 22.8 tok/s; attention at ctx 512: 108 → 83 µs. `LLMC_CRANELIFT_OPT_LEVEL=speed`
/// overrides it for comparison.
fn opt_level() -> String {
    std::env::var("LLMC_CRANELIFT_OPT_LEVEL").unwrap_or_else(|_| "none".to_string())
}

/// The instruction-set level the kernels are compiled for. Every level runs the same
/// generators (128-bit vectors: Cranelift's x64 backend has no wider ones); the level picks the
/// instructions Cranelift may use: AVX-512VL/VNNI (`vpdpbusd` for the int8 dot products, EVEX
/// encodings), AVX2 + FMA with AVX-VNNI (`avxvnni`: the VEX `vpdpbusd` on ymm, as on Intel's
/// client cores since Alder Lake, which have no AVX-512), AVX2 + FMA (VEX; no VNNI, as on
/// Haswell to Zen 3), or SSE4.2 (no FMA: the kernels multiply and add in two roundings).
/// `LLMC_ISA=avxvnni|avx2|sse` forces a lower level than the host's, so every path is tested
/// on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaLevel {
    Sse,
    Avx2,
    AvxVnni,
    Avx512,
}

/// Cranelift x64 flags each level turns off (those above it).
const AVX512_FLAGS: &[&str] =
    &["has_avx512f", "has_avx512vl", "has_avx512dq", "has_avx512bitalg", "has_avx512vbmi", "has_avx512vnni"];
const AVX_FLAGS: &[&str] = &["has_avx", "has_avx2", "has_fma", "has_avx_vnni"];

impl IsaLevel {
    pub const ALL: [IsaLevel; 4] = [IsaLevel::Sse, IsaLevel::Avx2, IsaLevel::AvxVnni, IsaLevel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            IsaLevel::Sse => "sse",
            IsaLevel::Avx2 => "avx2",
            IsaLevel::AvxVnni => "avxvnni",
            IsaLevel::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<IsaLevel> {
        IsaLevel::ALL.into_iter().find(|l| l.name() == s)
    }

    /// Whether the kernels may use fused multiply-add.
    /// The wide micro-kernels (`crate::micro`) kernels at this level call: the level's own
    /// width, on a host that has what they need; none at `sse`.
    pub fn wide(self) -> Option<crate::micro::Wide> {
        use crate::micro::Wide;
        let w = match self {
            IsaLevel::Avx512 => Wide::Avx512,
            IsaLevel::AvxVnni => Wide::AvxVnni,
            IsaLevel::Avx2 => Wide::Avx2,
            IsaLevel::Sse => return None,
        };
        (cfg!(target_arch = "x86_64") && w.available()).then_some(w)
    }

    pub fn has_fma(self) -> bool {
        self >= IsaLevel::Avx2 || !cfg!(target_arch = "x86_64")
    }
}

/// The levels this CPU can run, lowest first (on other architectures: `Avx512` alone, meaning
/// "all the host has"). Not always a prefix of `IsaLevel::ALL`: AVX-512 hosts without AVX-VNNI
/// (Skylake-SP, Cascade Lake, Ice Lake) have no `avxvnni` level.
pub fn host_levels() -> Result<Vec<IsaLevel>, JitError> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(vec![IsaLevel::Avx512]);
    }
    let f = isa_features(&*cpu_isa()?);
    Ok(levels_with(&|x| f.iter().any(|g| g == x)))
}

/// The x86-64 levels of a CPU with the Cranelift features `has` says it has.
fn levels_with(has: &dyn Fn(&str) -> bool) -> Vec<IsaLevel> {
    let avx2 = has("has_avx2") && has("has_fma");
    let ok = |l: IsaLevel| match l {
        IsaLevel::Sse => true,
        IsaLevel::Avx2 => avx2,
        IsaLevel::AvxVnni => avx2 && has("has_avx_vnni"),
        IsaLevel::Avx512 => avx2 && has("has_avx512f") && has("has_avx512vl") && has("has_avx512dq"),
    };
    IsaLevel::ALL.into_iter().filter(|&l| ok(l)).collect()
}

/// The best level this CPU has (on other architectures: `Avx512`, meaning "all the host has").
pub fn host_level() -> Result<IsaLevel, JitError> {
    Ok(host_levels()?.into_iter().max().unwrap_or(IsaLevel::Sse))
}

/// The level kernels are compiled for: the host's, or `LLMC_ISA` (`avx512`, `avxvnni`, `avx2`, `sse`)
/// when it names one the host has.
pub fn selected_level() -> Result<IsaLevel, JitError> {
    let levels = host_levels()?;
    let host = levels.iter().copied().max().unwrap_or(IsaLevel::Sse);
    match std::env::var("LLMC_ISA") {
        Err(_) => Ok(host),
        Ok(v) => match IsaLevel::parse(&v) {
            Some(l) if levels.contains(&l) => Ok(l),
            Some(l) => Err(JitError::Isa(format!(
                "LLMC_ISA={} but this CPU lacks that level (its best level is {})",
                l.name(),
                host.name()
            ))),
            None => Err(JitError::Isa(format!("LLMC_ISA={v:?}: expected avx512, avxvnni, avx2 or sse"))),
        },
    }
}

fn isa_builder(level: Option<IsaLevel>) -> Result<OwnedTargetIsa, JitError> {
    let mut flags = settings::builder();
    flags.set("opt_level", &opt_level()).map_err(|e| JitError::Isa(e.to_string()))?;
    flags.set("is_pic", "false").map_err(|e| JitError::Isa(e.to_string()))?;
    let mut isa = cranelift_native::builder().map_err(|e| JitError::Isa(e.to_string()))?;
    if cfg!(target_arch = "x86_64") {
        let off: Vec<&str> = match level {
            None | Some(IsaLevel::Avx512) => Vec::new(),
            Some(IsaLevel::AvxVnni) => AVX512_FLAGS.to_vec(),
            Some(IsaLevel::Avx2) => [AVX512_FLAGS, &["has_avx_vnni"]].concat(),
            Some(IsaLevel::Sse) => [AVX512_FLAGS, AVX_FLAGS].concat(),
        };
        for f in off {
            isa.set(f, "false").map_err(|e| JitError::Isa(format!("{f}: {e}")))?;
        }
    }
    isa.finish(settings::Flags::new(flags)).map_err(|e| JitError::Isa(e.to_string()))
}

/// The Cranelift ISA with every feature of this CPU (what an artifact records and is checked
/// against).
pub fn cpu_isa() -> Result<OwnedTargetIsa, JitError> {
    isa_builder(None)
}

/// The Cranelift ISA the kernels are compiled for: the CPU's at the selected level.
pub fn host_isa() -> Result<OwnedTargetIsa, JitError> {
    isa_builder(Some(selected_level()?))
}

/// The Cranelift ISA of one level (which must not exceed the host's).
pub fn level_isa(level: IsaLevel) -> Result<OwnedTargetIsa, JitError> {
    isa_builder(Some(level))
}

/// The ISA feature flags enabled on this host (`has_avx2`, `has_fma`, ...).
pub fn isa_features(isa: &dyn TargetIsa) -> Vec<String> {
    isa.isa_flags().iter().filter(|v| v.as_bool() == Some(true)).map(|v| v.name.to_string()).collect()
}

/// The compiled kernels of one program. Owns the executable memory.
pub struct Kernels {
    module: Option<JITModule>,
    pub fns: Vec<KernelFn>,
    /// For each int8 projection (`KernelSpec::int8_input`), its shared pre-pass
    /// (`kernels::dot::prequantize`), indexed like `fns`.
    pub shared: Vec<Option<KernelFn>>,
    pub features: Vec<String>,
    /// The level the kernels were compiled for.
    pub level: IsaLevel,
    /// The specs the kernels were compiled from, in order (`fns[i]` implements `specs[i]`).
    specs: Vec<KernelSpec>,
}

impl Kernels {
    /// The specs the kernels were compiled from: an executor checks a program's kernel list
    /// against this before it calls anything.
    pub fn specs(&self) -> &[KernelSpec] {
        &self.specs
    }
}

// SAFETY: after `finalize_definitions` the module is only kept alive to own the code memory;
// the function pointers refer to immutable executable memory and may be called from any thread.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `fns` dies with `self`, and callers cannot keep copies past the engine
            // that owns this value (the executor borrows it for each step).
            unsafe { m.free_memory() };
        }
    }
}

pub fn signature(isa: &dyn TargetIsa) -> Signature {
    let mut sig = Signature::new(isa.default_call_conv());
    sig.params.push(AbiParam::new(types::I64)); // args
    for _ in 0..4 {
        sig.params.push(AbiParam::new(types::I64)); // n, lo, hi, cap
    }
    sig
}

/// JIT-compiles every spec for the host (at the selected level).
pub fn compile(specs: &[KernelSpec]) -> Result<Kernels, JitError> {
    compile_for(specs, selected_level()?)
}

/// JIT-compiles every spec at `level` (at most the host's), with the `vdpbf16ps` tile where
/// it pays on this host (`micro::bf16_dot_pays`).
pub fn compile_for(specs: &[KernelSpec], level: IsaLevel) -> Result<Kernels, JitError> {
    compile_with(specs, level, crate::micro::bf16_dot_pays())
}

/// `compile_for`, choosing whether projections over bf16-exact inputs and bf16 weights use the
/// `vdpbf16ps` tile where the host has one (`bf16_dot`; tests run both tiles on every host).
pub fn compile_with(specs: &[KernelSpec], level: IsaLevel, bf16_dot: bool) -> Result<Kernels, JitError> {
    let isa = level_isa(level)?;
    let features = isa_features(&*isa);
    let isa: Arc<dyn TargetIsa> = isa;
    let mut module = JITModule::new(JITBuilder::with_isa(isa.clone(), cranelift_module::default_libcall_names()));
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    // every kernel, then the int8 projections' pre-passes
    let mut names = Vec::new();
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let jobs =
        specs.iter().map(|s| (s, false)).chain(specs.iter().filter(|s| s.int8_input().is_some()).map(|s| (s, true)));
    for (i, (spec, pre)) in jobs.enumerate() {
        let name = format!("k{i}_{}{}", if pre { "prequantize_" } else { "" }, spec.name());
        let cg = |msg: String| JitError::Codegen { kernel: name.clone(), msg };
        let sig = signature(&*isa);
        let id = module.declare_function(&name, Linkage::Local, &sig).map_err(|e| cg(e.to_string()))?;
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, i as u32);
        {
            let b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let (cfg, fma, wide) = (isa.frontend_config(), level.has_fma(), level.wide());
            match spec.int8_input().filter(|_| pre) {
                Some(q) => kernels::build_prequantize(q, b, cfg, fma, wide),
                None => kernels::build(spec, b, cfg, fma, wide, bf16_dot),
            }
        }
        module.define_function(id, &mut ctx).map_err(|e| cg(format!("{e:?}")))?;
        let relocs = ctx.compiled_code().map(|c| c.buffer.relocs().len()).unwrap_or(0);
        if relocs != 0 {
            return Err(cg(format!("has {relocs} relocations; kernels must have none")));
        }
        sizes.push(ctx.compiled_code().map_or(0, |c| c.code_buffer().len()));
        module.clear_context(&mut ctx);
        ids.push(id);
        names.push(name);
    }
    module.finalize_definitions().map_err(|e| JitError::Codegen { kernel: "finalize".into(), msg: e.to_string() })?;
    let code: Vec<*const u8> = ids.into_iter().map(|id| module.get_finalized_function(id)).collect();
    if std::env::var_os("LLMC_PERF_MAP").is_some() {
        write_perf_map(&names, &code, &sizes);
    }
    let mut fns: Vec<KernelFn> = code
        .into_iter()
        .map(|p| {
            // SAFETY: the function was declared with `signature`, which is this C ABI type.
            unsafe { std::mem::transmute::<*const u8, KernelFn>(p) }
        })
        .collect();
    let mut pre = fns.split_off(specs.len()).into_iter();
    let shared = specs.iter().map(|s| s.int8_input().and_then(|_| pre.next())).collect();
    Ok(Kernels { module: Some(module), fns, shared, features, level, specs: specs.to_vec() })
}

/// With `LLMC_PERF_MAP` set, names the kernels for `perf report`: appends `addr size name`
/// lines to `/tmp/perf-<pid>.map` (perf's convention for JIT code). Best effort: a file that
/// cannot be written only costs the names.
fn write_perf_map(names: &[String], code: &[*const u8], sizes: &[usize]) {
    use std::io::Write;
    let path = format!("/tmp/perf-{}.map", std::process::id());
    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) else { return };
    let lines: String = names
        .iter()
        .zip(code.iter().zip(sizes))
        .map(|(name, (p, n))| format!("{:x} {n:x} llmc:{name}\n", *p as usize))
        .collect();
    let _ = f.write_all(lines.as_bytes());
}

/// Compiles one spec and returns the machine code listing (VCode) Cranelift produced.
pub fn vcode_text(spec: &KernelSpec) -> Result<String, JitError> {
    let level = selected_level()?;
    vcode_text_for(spec, &*level_isa(level)?, level)
}

/// The VCode listing of one spec for a fixed x86-64-v2 target (SSE4.2, no AVX, no FMA, no
/// micro-kernels), whatever the host: the same text on every machine, for snapshot tests.
pub fn vcode_text_baseline(spec: &KernelSpec) -> Result<String, JitError> {
    let mut flags = settings::builder();
    flags.set("opt_level", &opt_level()).map_err(|e| JitError::Isa(e.to_string()))?;
    flags.set("is_pic", "false").map_err(|e| JitError::Isa(e.to_string()))?;
    let mut isa =
        cranelift_codegen::isa::lookup_by_name("x86_64-unknown-linux-gnu").map_err(|e| JitError::Isa(e.to_string()))?;
    for f in ["has_sse3", "has_ssse3", "has_sse41", "has_sse42", "has_popcnt"] {
        isa.set(f, "true").map_err(|e| JitError::Isa(format!("{f}: {e}")))?;
    }
    let isa = isa.finish(settings::Flags::new(flags)).map_err(|e| JitError::Isa(e.to_string()))?;
    vcode_text_for(spec, &*isa, IsaLevel::Sse)
}

fn vcode_text_for(spec: &KernelSpec, isa: &dyn TargetIsa, level: IsaLevel) -> Result<String, JitError> {
    let mut ctx = Context::new();
    ctx.func.signature = signature(isa);
    ctx.set_disasm(true);
    let mut fctx = FunctionBuilderContext::new();
    kernels::build(
        spec,
        FunctionBuilder::new(&mut ctx.func, &mut fctx),
        isa.frontend_config(),
        level.has_fma(),
        level.wide(),
        crate::micro::bf16_dot_pays(),
    );
    let code = ctx
        .compile(isa, &mut Default::default())
        .map_err(|e| JitError::Codegen { kernel: spec.name(), msg: format!("{e:?}") })?;
    Ok(code.vcode.clone().unwrap_or_default())
}

/// Compiles one spec and returns its CLIF text after optimization (for inspection and tests).
pub fn clif_text(spec: &KernelSpec) -> Result<String, JitError> {
    let level = selected_level()?;
    let isa = level_isa(level)?;
    let mut ctx = Context::new();
    ctx.func.signature = signature(&*isa);
    let mut fctx = FunctionBuilderContext::new();
    kernels::build(
        spec,
        FunctionBuilder::new(&mut ctx.func, &mut fctx),
        isa.frontend_config(),
        level.has_fma(),
        level.wide(),
        crate::micro::bf16_dot_pays(),
    );
    ctx.optimize(&*isa, &mut Default::default())
        .map_err(|e| JitError::Codegen { kernel: spec.name(), msg: format!("{e:?}") })?;
    Ok(ctx.func.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels by CPU generation: AVX-512 without AVX-VNNI (Skylake-SP to Ice Lake) skips
    /// `avxvnni`; Alder Lake (AVX-VNNI, no AVX-512) tops at it; Zen 4/5 have every level.
    #[test]
    fn levels_by_cpu() {
        use IsaLevel::*;
        let cpu = |f: &[&str]| levels_with(&|x| f.contains(&x));
        let avx512 = ["has_avx2", "has_fma", "has_avx512f", "has_avx512vl", "has_avx512dq"];
        assert_eq!(cpu(&avx512), vec![Sse, Avx2, Avx512]);
        assert_eq!(cpu(&["has_avx2", "has_fma", "has_avx_vnni"]), vec![Sse, Avx2, AvxVnni]);
        let zen = ["has_avx2", "has_fma", "has_avx_vnni", "has_avx512f", "has_avx512vl", "has_avx512dq"];
        assert_eq!(cpu(&zen), IsaLevel::ALL.to_vec());
        assert_eq!(cpu(&["has_avx2"]), vec![Sse]);
    }
}
