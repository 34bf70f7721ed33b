//! `Kb`: a thin layer over `cranelift_frontend::FunctionBuilder` for writing kernels: counted
//! loops with SSA variables, addressed loads/stores, f32x4 helpers, and the polynomial `exp`,
//! `tanh` and `erf` every activation uses.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Type, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, Variable};

pub const F32: Type = types::F32;
pub const V4: Type = types::F32X4;
pub const I64: Type = types::I64;

/// Loads and stores: never trap (all ranges are checked by the runtime), not assumed aligned.
fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Float constants of the polynomial approximations. They are written to a stack slot at
/// kernel entry and loaded where used: a constant materialized as a value would be hoisted by
/// Cranelift's mid-end to the kernel's entry and stay live in a register through the hot k
/// loops, where it makes the register allocator spill (measured: a matmul with a GELU epilogue
/// fell from 30 to 19 GFLOP/s).
const POOL_F32: [f32; 22] = [
    -80.0,
    88.3,
    std::f32::consts::LOG2_E,
    -0.693_359_4,
    2.121_944_4e-4,
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    2.0,
    0.327_591_1,
    1.061_405_4,
    -1.453_152_1,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
    0.797_884_6, // sqrt(2/pi)
    0.044715,
    std::f32::consts::FRAC_1_SQRT_2,
];
/// Integer constants (i32 lanes) of the same functions: the exponent bias and the sign bit.
const POOL_I32: [i64; 2] = [127, 0x8000_0000];

pub struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    pub args: Value,
    pub n: Value,
    pub lo: Value,
    pub hi: Value,
    pub cap: Value,
    cfg: TargetFrontendConfig,
    pool: cranelift_codegen::ir::StackSlot,
    /// Whether the target has FMA (else `fma` is a multiply and an add: Cranelift would make
    /// an FMA without hardware support a call, and kernels call nothing).
    has_fma: bool,
    /// The wide micro-kernels projections (and at AVX-512 attention) call (`crate::micro`, via
    /// `kernels::wide`), if any.
    pub wide: Option<crate::micro::Wide>,
    /// Whether projections over bf16-exact inputs and bf16 weights use the `vdpbf16ps` tile
    /// (`micro::float_xbf16`) where the host has it.
    pub bf16_dot: bool,
}

impl<'a> Kb<'a> {
    pub fn new(
        mut b: FunctionBuilder<'a>,
        cfg: TargetFrontendConfig,
        has_fma: bool,
        wide: Option<crate::micro::Wide>,
    ) -> Kb<'a> {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let p = b.block_params(entry).to_vec();
        let size = ((POOL_F32.len() + POOL_I32.len()) * 16) as u32;
        let pool = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
        for (i, &v) in POOL_F32.iter().enumerate() {
            let c = b.ins().f32const(v);
            let c = b.ins().splat(V4, c);
            b.ins().stack_store(I64, c, pool, (16 * i) as i32);
        }
        for (i, &v) in POOL_I32.iter().enumerate() {
            let c = b.ins().iconst(types::I32, v);
            let c = b.ins().splat(types::I32X4, c);
            b.ins().stack_store(I64, c, pool, (16 * (POOL_F32.len() + i)) as i32);
        }
        Kb { b, args: p[0], n: p[1], lo: p[2], hi: p[3], cap: p[4], cfg, pool, has_fma, wide, bf16_dot: false }
    }

    pub fn finish(mut self) {
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        self.b.finalize(self.cfg);
    }

    /// The host's calling convention (of the micro-kernels a kernel calls).
    pub fn call_conv(&self) -> cranelift_codegen::isa::CallConv {
        self.cfg.default_call_conv
    }

    /// The `i`-th pointer of the argument table.
    pub fn ptr(&mut self, i: usize) -> Value {
        let a = self.args;
        self.b.ins().load(I64, MemFlagsData::trusted(), a, (8 * i) as i32)
    }

    pub fn ic(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    pub fn f(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    /// A constant of type `ty` (F32 or F32X4); pool constants are loaded where used.
    pub fn c(&mut self, ty: Type, v: f32) -> Value {
        if let Some(i) = POOL_F32.iter().position(|&p| p.to_bits() == v.to_bits()) {
            return self.b.ins().stack_load(I64, ty, self.pool, (16 * i) as i32);
        }
        let s = self.b.ins().f32const(v);
        if ty == V4 {
            self.b.ins().splat(V4, s)
        } else {
            s
        }
    }

    pub fn splat(&mut self, s: Value) -> Value {
        self.b.ins().splat(V4, s)
    }

    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    pub fn get(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }

    pub fn set(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x)
    }

    // ---- integer arithmetic ----
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }
    pub fn addi(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().iadd_imm_s(a, b)
    }
    pub fn muli(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().imul_imm_s(a, b)
    }
    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().imul(a, b)
    }
    pub fn udivi(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().udiv_imm_u(a, b)
    }
    pub fn uremi(&mut self, a: Value, b: i64) -> Value {
        self.b.ins().urem_imm_u(a, b)
    }
    pub fn fneg(&mut self, a: Value) -> Value {
        self.b.ins().fneg(a)
    }
    /// `base + idx * scale` (a byte address).
    pub fn at(&mut self, base: Value, idx: Value, scale: i64) -> Value {
        let o = self.b.ins().imul_imm_s(idx, scale);
        self.b.ins().iadd(base, o)
    }

    // ---- memory ----
    pub fn ld(&mut self, ty: Type, p: Value, off: i64) -> Value {
        self.b.ins().load(ty, mem(), p, off as i32)
    }
    pub fn st(&mut self, x: Value, p: Value, off: i64) {
        self.b.ins().store(mem(), x, p, off as i32);
    }
    /// Loads an i32 at `p + off` and sign-extends it.
    pub fn ld_i32(&mut self, p: Value, off: i64) -> Value {
        let v = self.b.ins().load(types::I32, mem(), p, off as i32);
        self.b.ins().sextend(I64, v)
    }

    // ---- float arithmetic (scalar or f32x4) ----
    pub fn fadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    pub fn fsub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    pub fn fmul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    pub fn fdiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }
    /// `a * b + c` (fused where the target has FMA)
    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.has_fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }
    pub fn fmax(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmax(a, b)
    }

    /// Horizontal sum of an f32x4, as ((l0 + l1) + (l2 + l3)).
    pub fn hsum(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4u8).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fadd(l[0], l[1]);
        let b = self.b.ins().fadd(l[2], l[3]);
        self.b.ins().fadd(a, b)
    }

    /// Horizontal max of an f32x4.
    pub fn hmax(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4u8).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fmax(l[0], l[1]);
        let b = self.b.ins().fmax(l[2], l[3]);
        self.b.ins().fmax(a, b)
    }

    // ---- control flow ----

    /// `for iv in (start..end).step_by(step)` while a whole step fits: the body runs for
    /// `iv, iv+step, ...` with `iv + step <= end`. Returns the first `iv` not processed.
    pub fn for_step(&mut self, start: Value, end: Value, step: i64, mut body: impl FnMut(&mut Kb<'a>, Value)) -> Value {
        let iv = self.var(I64, start);
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(iv);
        let next = self.b.ins().iadd_imm_s(i, step);
        let ok = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, next, end);
        self.b.ins().brif(ok, body_b, &[], exit, &[]);
        self.b.switch_to_block(body_b);
        body(self, i);
        let i2 = self.b.use_var(iv);
        let i2 = self.b.ins().iadd_imm_s(i2, step);
        self.b.def_var(iv, i2);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        self.b.use_var(iv)
    }

    /// `while var < end { body }`: the body must advance `var` (a pointer walked by the loop).
    pub fn for_ptr(&mut self, var: Variable, end: Value, body: impl FnOnce(&mut Kb<'a>)) {
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let v = self.b.use_var(var);
        let ok = self.b.ins().icmp(IntCC::UnsignedLessThan, v, end);
        self.b.ins().brif(ok, body_b, &[], exit, &[]);
        self.b.switch_to_block(body_b);
        body(self);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
    }

    /// `for iv in start..end`.
    pub fn for_range(&mut self, start: Value, end: Value, body: impl FnMut(&mut Kb<'a>, Value)) {
        self.for_step(start, end, 1, body);
    }

    /// Runs `then` only when `cond` (an i8 from icmp/fcmp) is true.
    pub fn when(&mut self, cond: Value, then: impl FnOnce(&mut Kb<'a>)) {
        let t = self.b.create_block();
        let join = self.b.create_block();
        self.b.ins().brif(cond, t, &[], join, &[]);
        self.b.switch_to_block(t);
        then(self);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    /// `if cond { a } else { b }` as two blocks joining after.
    pub fn if_else(&mut self, cond: Value, a: impl FnOnce(&mut Kb<'a>), b: impl FnOnce(&mut Kb<'a>)) {
        let ta = self.b.create_block();
        let tb = self.b.create_block();
        let join = self.b.create_block();
        self.b.ins().brif(cond, ta, &[], tb, &[]);
        self.b.switch_to_block(ta);
        a(self);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(tb);
        b(self);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    pub fn icmp(&mut self, cc: IntCC, a: Value, b: Value) -> Value {
        self.b.ins().icmp(cc, a, b)
    }

    pub fn fcmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }

    pub fn select(&mut self, c: Value, a: Value, b: Value) -> Value {
        self.b.ins().select(c, a, b)
    }

    /// Walks `0..d` in f32x4 chunks, then the tail one float at a time: `body(kb, offset_floats,
    /// is_vector)`. The vector part is a real loop; `offset` is a Value.
    pub fn chunks(&mut self, d: usize, mut body: impl FnMut(&mut Kb<'a>, Value, bool)) {
        let zero = self.ic(0);
        let vend = self.ic((d / 4 * 4) as i64);
        self.for_step(zero, vend, 4, |kb, i| body(kb, i, true));
        for t in d / 4 * 4..d {
            let i = self.ic(t as i64);
            body(self, i, false);
        }
    }

    // ---- transcendental functions (scalar F32 or F32X4) ----

    fn ity(ty: Type) -> Type {
        if ty == V4 {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn iconst_like(&mut self, ty: Type, v: i64) -> Value {
        let ity = if ty == V4 { types::I32X4 } else { types::I32 };
        if let Some(i) = POOL_I32.iter().position(|&p| p == v) {
            return self.b.ins().stack_load(I64, ity, self.pool, (16 * (POOL_F32.len() + i)) as i32);
        }
        let s = self.b.ins().iconst(types::I32, v);
        if ty == V4 {
            self.b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    fn bitcast(&mut self, to: Type, x: Value) -> Value {
        self.b.ins().bitcast(to, MemFlagsData::new().with_endianness(Endianness::Little), x)
    }

    /// `x` (F32 or F32X4) rounded to bf16 (to nearest, ties to even, on the bits: `+ 0x7fff +
    /// lsb`, then the low half cleared; overflow rounds to infinity) and widened back; a NaN is
    /// kept as it is.
    pub fn round_bf16(&mut self, ty: Type, x: Value) -> Value {
        let bits = self.bitcast(Self::ity(ty), x);
        let sixteen = self.b.ins().iconst(types::I32, 16);
        let high = self.b.ins().ushr(bits, sixteen);
        let one = self.iconst_like(ty, 1);
        let lsb = self.b.ins().band(high, one);
        let half = self.iconst_like(ty, 0x7fff);
        let r = self.b.ins().iadd(bits, half);
        let r = self.b.ins().iadd(r, lsb);
        let mask = self.iconst_like(ty, 0xffff_0000_u32 as i32 as i64);
        let r = self.b.ins().band(r, mask);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let r = if ty == V4 { self.b.ins().bitselect(nan, bits, r) } else { self.b.ins().select(nan, bits, r) };
        self.bitcast(ty, r)
    }

    /// `e^x` for F32 or F32X4: range reduction `x = k·ln2 + r`, `|r| <= ln2/2`, a degree-7
    /// Taylor polynomial for `e^r`, and `2^k` built in the exponent bits. Inputs are clamped to
    /// [-80, 88.3]: results never reach inf/NaN, and never come near the denormal range (below
    /// 1.2e-38), where x86 arithmetic on them — and on products with them, as in erf's
    /// `poly · e^{-a²}` — runs ~100× slower (measured: token-dependent 6× slowdowns of a GELU
    /// model). e^-80 ≈ 1.8e-35 stands in for anything smaller. Relative error < 2e-7 above that
    /// (tested against f64 in `runtime/tests/kernels.rs`).
    pub fn exp(&mut self, ty: Type, x: Value) -> Value {
        let lo = self.c(ty, -80.0);
        let hi = self.c(ty, 88.3);
        let x = self.b.ins().fmax(x, lo);
        let x = self.b.ins().fmin(x, hi);
        let log2e = self.c(ty, std::f32::consts::LOG2_E);
        let t = self.b.ins().fmul(x, log2e);
        let k = self.b.ins().nearest(t);
        // ln 2 split in two (Cephes): k·ln2 = k·0.693359375 - k·2.12194440e-4, exact first product.
        let ln2_hi = self.c(ty, -0.693_359_4);
        let ln2_lo = self.c(ty, 2.121_944_4e-4);
        let r = self.fma(k, ln2_hi, x);
        let r = self.fma(k, ln2_lo, r);
        // Horner: 1 + r(1 + r/2(1 + r/3(...)))  written with the Taylor coefficients.
        let coeffs = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
        let mut p = self.c(ty, coeffs[0]);
        for &c in &coeffs[1..] {
            let cv = self.c(ty, c);
            p = self.fma(p, r, cv);
        }
        let ity = Self::ity(ty);
        let ki = self.b.ins().fcvt_to_sint_sat(ity, k);
        let bias = self.iconst_like(ty, 127);
        let e = self.b.ins().iadd(ki, bias);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let scale = self.bitcast(ty, e);
        self.b.ins().fmul(p, scale)
    }

    /// Natural log of a positive scalar f32: `x = 2^e · m`, `m` in [√½, √2), and
    /// `ln m = 2·atanh((m-1)/(m+1))` by its odd series to s¹³ (|s| ≤ 0.172: error < 1e-9).
    pub fn ln(&mut self, x: Value) -> Value {
        let bits = self.bitcast(types::I32, x);
        let e = self.b.ins().sshr_imm_u(bits, 23);
        let e = self.b.ins().iadd_imm_s(e, -127);
        let mant = self.b.ins().band_imm_u(bits, 0x7f_ffff);
        let mant = self.b.ins().bor_imm_u(mant, 0x3f80_0000);
        let m = self.bitcast(F32, mant);
        // center: m > √2 → m/2, e+1
        let sqrt2 = self.f(std::f32::consts::SQRT_2);
        let big = self.b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
        let half = self.f(0.5);
        let m2 = self.b.ins().fmul(m, half);
        let m = self.b.ins().select(big, m2, m);
        let e1 = self.b.ins().iadd_imm_s(e, 1);
        let e = self.b.ins().select(big, e1, e);
        let one = self.f(1.0);
        let num = self.b.ins().fsub(m, one);
        let den = self.b.ins().fadd(m, one);
        let s = self.b.ins().fdiv(num, den);
        let s2 = self.b.ins().fmul(s, s);
        let mut p = self.f(1.0 / 13.0);
        for c in [1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
            let cv = self.f(c);
            p = self.fma(p, s2, cv);
        }
        let two_s = self.b.ins().fadd(s, s);
        let lm = self.b.ins().fmul(p, two_s);
        let ef = self.b.ins().fcvt_from_sint(F32, e);
        let ln2 = self.f(std::f32::consts::LN_2);
        self.fma(ef, ln2, lm)
    }

    /// `softplus(v) = ln(1 + e^v)`, as torch: `v` itself above 20; `e^v` below -15.
    pub fn softplus(&mut self, v: Value) -> Value {
        let e = self.exp(F32, v);
        let one = self.f(1.0);
        let onep = self.b.ins().fadd(one, e);
        let l = self.ln(onep);
        let twenty = self.f(20.0);
        let big = self.b.ins().fcmp(FloatCC::GreaterThan, v, twenty);
        let r = self.b.ins().select(big, v, l);
        let m15 = self.f(-15.0);
        let small = self.b.ins().fcmp(FloatCC::LessThan, v, m15);
        self.b.ins().select(small, e, r)
    }

    /// `tanh(y) = 1 - 2 / (e^{2y} + 1)`.
    pub fn tanh(&mut self, ty: Type, y: Value) -> Value {
        let two = self.c(ty, 2.0);
        let one = self.c(ty, 1.0);
        let y2 = self.b.ins().fmul(y, two);
        let e = self.exp(ty, y2);
        let d = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(two, d);
        self.b.ins().fsub(one, q)
    }

    /// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), sign restored by bits.
    pub fn erf(&mut self, ty: Type, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let one = self.c(ty, 1.0);
        let p = self.c(ty, 0.327_591_1);
        let d = self.fma(p, a, one);
        let t = self.b.ins().fdiv(one, d);
        let coeffs = [1.061_405_4, -1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6];
        let mut poly = self.c(ty, coeffs[0]);
        for &c in &coeffs[1..] {
            let cv = self.c(ty, c);
            poly = self.fma(poly, t, cv);
        }
        poly = self.b.ins().fmul(poly, t);
        let a2 = self.b.ins().fmul(a, a);
        let na2 = self.b.ins().fneg(a2);
        let e = self.exp(ty, na2);
        let pe = self.b.ins().fmul(poly, e);
        let y = self.b.ins().fsub(one, pe);
        // copy the sign of x onto y (y >= 0)
        let ity = Self::ity(ty);
        let xi = self.bitcast(ity, x);
        let yi = self.bitcast(ity, y);
        let sign = self.iconst_like(ty, 0x8000_0000);
        let s = self.b.ins().band(xi, sign);
        let r = self.b.ins().bor(yi, s);
        self.bitcast(ty, r)
    }
}
