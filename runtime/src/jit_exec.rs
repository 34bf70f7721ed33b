//! The JIT executor: one sequence's arena, KV caches and RoPE tables, and the walk over the
//! program's schedule calling native kernels, split over threads by rayon.

use llmc_compiler::jit::{KernelFn, Kernels};
use llmc_compiler::program::{Arg, KernelSpec, Program, Rows};

use crate::artifact::Artifact;
use crate::error::RuntimeError;

/// 16 floats, 64-byte aligned: the unit of every buffer the kernels touch.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Block([f32; 16]);

/// A 64-byte aligned, zeroed f32 buffer.
struct Aligned(Vec<Block>);

impl Aligned {
    fn new(floats: usize) -> Result<Aligned, RuntimeError> {
        Ok(Aligned(zeroed::<Block>(floats.div_ceil(16).max(1))?))
    }
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr() as *mut u8
    }
}

/// Floats of work below which a call runs on one thread.
const SPLIT_THRESHOLD: usize = 16 * 1024;
/// Floats of split work below which a whole step runs on one thread (about 4 MB of weights).
const PARALLEL_STEP_THRESHOLD: usize = 1 << 20;

/// The all-rows variant of an artifact's step: the graph from
/// [`Graph::with_all_logits`](llmc_ir::Graph::with_all_logits) (no `take_last`: `logits` for
/// every token), its program (lowered here, at load, from that verified graph) and the kernels
/// JIT-compiled for it. Built only by [`AllRows::derive`]; what the interpreter and
/// [`JitState::all_rows`] run for perplexity.
pub struct AllRows {
    graph: llmc_ir::Graph,
    program: Program,
    kernels: Kernels,
}

impl AllRows {
    /// Derives the all-rows graph from `art`'s verified IR, lowers it and compiles its kernels.
    pub fn derive(art: &Artifact) -> Result<AllRows, RuntimeError> {
        let bad = |msg: String| RuntimeError::BadArtifact { path: art.path.clone(), msg };
        let graph = art.graph.with_all_logits()?;
        let program =
            llmc_compiler::lower::lower(&graph).map_err(|e| bad(format!("the all-rows IR cannot be lowered: {e}")))?;
        check_weights(&graph, &program, art)?;
        let kernels = llmc_compiler::jit::compile(&program.kernels).map_err(|e| bad(e.to_string()))?;
        Ok(AllRows { graph, program, kernels })
    }

    /// The graph the interpreter runs.
    pub fn graph(&self) -> &llmc_ir::Graph {
        &self.graph
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    fn check_weights(&self, art: &Artifact) -> Result<(), RuntimeError> {
        check_weights(&self.graph, &self.program, art)
    }
}

/// `graph` reads exactly `art.graph`'s weights (names, shapes, dtypes), and every stored tensor
/// is in the layout `program` reads.
fn check_weights(graph: &llmc_ir::Graph, program: &Program, art: &Artifact) -> Result<(), RuntimeError> {
    let bad = |msg: String| RuntimeError::BadArtifact { path: art.path.clone(), msg };
    if graph.weights() != art.graph.weights() {
        return Err(bad("the all-rows graph reads other weights than the artifact's IR".into()));
    }
    if crate::artifact::Limits::of(graph).map_err(bad)? != art.limits {
        return Err(bad("the all-rows graph gathers from other embedding tables than the artifact's IR".into()));
    }
    for t in &art.header.tensors {
        let want = if t.dtype == "u8" { llmc_compiler::program::Layout::RowMajor } else { program.layout_of(&t.name) };
        if t.layout != want {
            return Err(bad(format!(
                "tensor `{}` is stored {:?}, the all-rows program reads {:?}",
                t.name, t.layout, want
            )));
        }
    }
    Ok(())
}

/// Per-sequence state of the JIT backend, for one program and the kernels compiled from it
/// (both borrowed, so the state cannot be run with another program or outlive the weights).
pub struct JitState<'a> {
    prog: &'a Program,
    kernels: &'a Kernels,
    arena: Vec<Block>,
    caches: Vec<(usize, Aligned, Aligned, usize)>, // (layer, k, v, cap)
    mamba: Vec<(usize, Aligned, Aligned)>,         // (layer, conv window, ssm state)
    /// Per KV layer, `n_cap` rows of (K address, V address, slots) (`Arg::KvRows`): this
    /// state's own caches, except during a batched step, whose rows name their sequences'.
    kv_rows: Vec<(usize, Vec<u64>)>,
    tables: Vec<Vec<f32>>,
    tokens: Vec<i32>,
    positions: Vec<i32>,
    /// Each row's sequence (`Arg::Seqs`): all 0 in a step of this state's own sequence.
    seqs: Vec<i32>,
    /// Pointer table of every call, fixed for the session.
    args: Vec<Vec<*mut u8>>,
    caps: Vec<i64>,
    /// The int8 projections' shared quantized rows (`kernels::dot::shared_bytes` of the
    /// largest for `n_cap` rows), if the program has any.
    shared: Option<Aligned>,
    /// Token ids must be below this (the rows of every table gathered by token).
    token_rows: usize,
    pub n_cap: usize,
    pub ctx: usize,
    /// When set, seconds spent in each kernel (indexed like `Program::kernels`) and calls,
    /// then in each kernel's shared pre-pass (at `Program::kernels.len()` + its index).
    pub profile: Option<Vec<(f64, usize)>>,
}

// SAFETY: the raw pointers point into buffers this struct owns (arena, caches, tables, tokens,
// positions) or into weights borrowed for 'a (the artifact's read-only map); moving the state
// to another thread moves none of them.
unsafe impl Send for JitState<'_> {}

/// Bytes of the per-sequence buffers of `prog` for a context of `ctx` positions and steps of
/// `n_cap` tokens, with checked arithmetic (`None`: more than the address space).
pub fn state_bytes(prog: &Program, ctx: usize, n_cap: usize) -> Option<u64> {
    let f = |x: usize| (x as u64).checked_mul(4);
    let mut total = f(prog.arena_width)?.checked_mul(n_cap as u64)?;
    for l in &prog.kv_layers {
        let cap = l.window.map_or(ctx, |w| w.saturating_add(n_cap).min(ctx)) as u64;
        let one = cap.checked_mul(l.kv_heads as u64)?.checked_mul(l.head_dim as u64)?.checked_mul(4)?;
        total = total.checked_add(one.checked_mul(2)?)?;
    }
    for t in &prog.rope_tables {
        total = total.checked_add((ctx as u64).checked_mul(2)?.checked_mul(t.rotary_dim as u64)?.checked_mul(4)?)?;
    }
    for &(_, conv, ssm) in &prog.mamba_layers {
        total = total.checked_add(f(conv)?)?.checked_add(f(ssm)?)?;
    }
    let shared = prog.kernels.iter().filter_map(|k| k.int8_input());
    let shared = shared.map(|q| llmc_compiler::kernels::dot::shared_bytes(q.k, q.terms, n_cap)).max().unwrap_or(0);
    total.checked_add(shared as u64)
}

/// Bytes this machine can still give (MemAvailable + SwapFree), if the kernel says.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()?.checked_mul(1024)
    };
    Some(field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0)))
}

/// Refuses a state of `need` bytes (`None`: overflow) that this machine cannot hold, before
/// anything is allocated.
pub fn check_memory(need: Option<u64>, what: &str) -> Result<(), RuntimeError> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match (need, available_memory()) {
        (None, _) => Err(RuntimeError::Usage(format!("{what} would need more memory than can be addressed"))),
        (Some(n), Some(avail)) if n > avail => Err(RuntimeError::Usage(format!(
            "{what} would need {:.2} GiB of memory, this machine has {:.2} GiB available (use a smaller -c)",
            gib(n),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// A zeroed vector of `len` values, or an error instead of an allocation abort.
fn zeroed<T: Clone + Default>(len: usize) -> Result<Vec<T>, RuntimeError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| RuntimeError::Usage(format!("cannot allocate {len} values")))?;
    v.resize(len, T::default());
    Ok(v)
}

/// A barrier for the step's workers, spinning (they run on their own cores for the few
/// microseconds between calls), yielding after a while so an oversubscribed machine still
/// makes progress.
struct SpinBarrier {
    count: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicUsize,
    total: usize,
}

impl SpinBarrier {
    fn new(total: usize) -> SpinBarrier {
        SpinBarrier { count: Default::default(), generation: Default::default(), total }
    }

    fn wait(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        let gen = self.generation.load(Acquire);
        if self.count.fetch_add(1, AcqRel) + 1 == self.total {
            self.count.store(0, Release);
            self.generation.fetch_add(1, Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Acquire) == gen {
            spins += 1;
            if spins < 20_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*const *mut u8);
// SAFETY: shared across the workers of one call, which write disjoint ranges (see `step`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One kernel call of a step.
#[derive(Clone, Copy)]
struct Entry {
    f: KernelFn,
    n: i64,
    units: usize,
    /// How many parts the units split into (one per worker at most).
    chunks: usize,
    table: SendPtr,
    /// The fifth argument: the cache capacity (KV kernels), or the shared quantized rows of
    /// an int8 projection (0: none).
    cap: i64,
    /// The kernel's index (for the profile).
    kernel: usize,
    /// Whether the workers wait for each other after it (not between the per-sequence calls
    /// of one batched call: they touch disjoint rows and caches).
    wait: bool,
    /// The worker that runs it when it does not split.
    owner: usize,
    /// Whether it is the kernel's shared pre-pass (`Kernels::shared`), profiled apart.
    pre: bool,
    /// Where its parts begin and end when they are not equal counts of units: `chunks + 1`
    /// unit indices from this offset in the plan's bounds (`attention_bounds`).
    bounds: Option<usize>,
}

/// Rows from which an int8 projection split over workers has them quantize its input once,
/// together, before it (one more barrier) instead of each quantizing every row.
const SHARED_QUANT_ROWS: usize = 16;

/// Appends `e` to `plan`, preceded by its shared pre-pass when it is an int8 projection
/// split over workers in a step of at least `SHARED_QUANT_ROWS` rows and `shared` is the
/// state's buffer for it (at least `dot::shared_bytes` of the projection for `e.n` rows).
fn push_entry(plan: &mut Vec<Entry>, kernels: &Kernels, mut e: Entry, shared: Option<*mut u8>, threads: usize) {
    let pre = kernels.shared.get(e.kernel).copied().flatten();
    if let (Some(pre), Some(buf), true) = (pre, shared, e.chunks > 1 && e.n as usize >= SHARED_QUANT_ROWS) {
        let rows = e.n as usize;
        // (the barrier after it is what makes the rows complete before the projection reads them)
        let (chunks, cap) = (threads.min(rows), buf as i64);
        plan.push(Entry { f: pre, units: rows, chunks, cap, pre: true, wait: true, owner: 0, bounds: None, ..e });
        e.cap = buf as i64;
    }
    plan.push(e);
}

/// A row's attention cost beside its keys, in keys: loading its query, normalizing and
/// storing its output.
const ATTENTION_ROW_COST: usize = 16;

/// Where the `chunks` parts of an attention call over rows at `pos` begin and end: `chunks +
/// 1` unit indices from 0 to `kv_heads · pos.len()`. Units are (kv head, row) pairs, kv head
/// major, and a row at position `p` scans `min(p + 1, window)` keys, so in a prompt's chunk the
/// later rows cost more: the parts get equal shares of that cost, not equal counts of units.
fn attention_bounds(kv_heads: usize, pos: &[i32], window: Option<usize>, chunks: usize) -> Vec<usize> {
    let cost = |p: i32| {
        let keys = (p.max(0) as usize).saturating_add(1);
        window.map_or(keys, |w| w.min(keys)).saturating_add(ATTENTION_ROW_COST)
    };
    let n = pos.len();
    let units = kv_heads.saturating_mul(n);
    let total = pos.iter().fold(0u128, |a, &p| a + cost(p) as u128) * kv_heads as u128;
    let mut bounds = Vec::with_capacity(chunks + 1);
    bounds.push(0);
    let (mut done, mut u) = (0u128, 0usize);
    for part in 1..chunks {
        let goal = total * part as u128 / chunks as u128;
        // a unit goes to the part where the larger half of its cost lies
        while u < units {
            let c = cost(pos[u % n]) as u128;
            if done + c / 2 >= goal {
                break;
            }
            done += c;
            u += 1;
        }
        bounds.push(u);
    }
    bounds.push(units);
    bounds
}

/// The plan entry of call `ci` over `n_call` rows at `pos` (the step's or the sequence's).
/// Attention's work per unit grows with the context (`span`: the largest position + 1): it
/// splits once the cached positions make it worth it (decode at a long context has only
/// kv_heads units, each a long scan), over rows in shares of keys scanned (`attention_bounds`,
/// appended to `bounds`).
#[allow(clippy::too_many_arguments)]
fn entry(
    prog: &Program,
    kernels: &Kernels,
    ci: usize,
    n_call: usize,
    pos: &[i32],
    span: usize,
    table: SendPtr,
    cap: i64,
    threads: usize,
    bounds: &mut Vec<usize>,
) -> Entry {
    let call = &prog.calls[ci];
    let units = call.units.count(n_call);
    let work = match prog.kernels[call.kernel] {
        KernelSpec::Attention { heads, kv_heads, head_dim, window, .. } => {
            let scanned = window.map_or(span, |w| w.min(span));
            scanned.saturating_mul(head_dim).saturating_mul(heads / kv_heads.max(1)).max(call.work_per_unit)
        }
        _ => call.work_per_unit,
    };
    let chunks =
        if threads > 1 && units >= 2 && units.saturating_mul(work) >= SPLIT_THRESHOLD { threads.min(units) } else { 1 };
    let split = match prog.kernels[call.kernel] {
        KernelSpec::Attention { kv_heads, window, .. }
            if chunks > 1 && n_call > 1 && pos.len() == n_call && units == kv_heads * n_call =>
        {
            let at = bounds.len();
            bounds.extend(attention_bounds(kv_heads, pos, window, chunks));
            Some(at)
        }
        _ => None,
    };
    // an int8 projection's fifth argument is its shared quantized rows, 0 until `push_entry`
    // gives it some (`qkv_rope` reads each row's cache capacity from its `KvRows` entry)
    let cap = if prog.kernels[call.kernel].int8_input().is_some() { 0 } else { cap };
    Entry {
        f: kernels.fns[call.kernel],
        n: n_call as i64,
        units,
        chunks,
        table,
        cap,
        kernel: call.kernel,
        wait: true,
        owner: 0,
        pre: false,
        bounds: split,
    }
}

/// Runs a step's calls in order, each split over the pool's threads as its entry says.
fn run_plan(
    pool: &rayon::ThreadPool,
    prog: &Program,
    plan: &[Entry],
    bounds: &[usize],
    profile: &mut Option<Vec<(f64, usize)>>,
) {
    let threads = pool.current_num_threads();
    if let Some(p) = profile.as_mut() {
        p.resize(2 * prog.kernels.len(), (0.0, 0));
    }
    // Worker `tid` runs its chunk of every call in schedule order; a spin barrier between
    // calls keeps the order (one parallel region per step, not one per call).
    let run_all = |tid: usize, barrier: Option<&SpinBarrier>, profile: Option<&mut Vec<(f64, usize)>>| {
        let mut profile = profile;
        for &Entry { f, n: n_call, units, chunks, ref table, cap, kernel, wait, owner, pre, bounds: split } in plan {
            // alone (no barrier), one worker does every unit
            let chunks = if barrier.is_some() { chunks } else { 1 };
            let t0 = profile.as_ref().map(|_| std::time::Instant::now());
            // an unsplit call runs on its owner (worker 0 when alone)
            let part = if chunks == 1 {
                (barrier.is_none() || tid == owner % threads).then_some(0)
            } else {
                // the sequences of a batched call take turns at the larger parts (3 kv heads
                // over 2 workers: 1 + 2 for one sequence, 2 + 1 for the next), so no worker
                // gets the larger part of every sequence
                (tid < chunks).then_some((tid + owner) % chunks)
            };
            let range = part.map(|part| match split {
                Some(at) if chunks > 1 => (bounds[at + part], bounds[at + part + 1]),
                _ => (units * part / chunks, units * (part + 1) / chunks),
            });
            if let Some((lo, hi)) = range.filter(|(lo, hi)| lo < hi) {
                // SAFETY: the pointer table matches the kernel's spec (built by lowering, and
                // for a batch row-offset inside the arena); every buffer holds n_cap >= n rows;
                // workers get disjoint unit ranges and a kernel writes only the
                // rows/panels/heads of its own range; the barrier after each call makes its
                // outputs complete before the next call starts. The per-sequence calls of one
                // batched call run without barriers between them: each writes only its own
                // sequence's row and cache and reads rows completed before the group. An int8
                // projection's `cap`, when not 0, is the state's shared buffer (at least
                // `dot::shared_bytes` for its n rows), which its pre-pass filled in the call
                // before, with a barrier between (`push_entry`).
                unsafe { f(table.0, n_call, lo as i64, hi as i64, cap) }
            }
            if let (Some(b), true) = (barrier, wait) {
                b.wait();
            }
            if let (Some(p), Some(t0)) = (profile.as_mut(), t0) {
                // (a pre-pass in the slot after every kernel's)
                let slot = kernel + if pre { prog.kernels.len() } else { 0 };
                p[slot].0 += t0.elapsed().as_secs_f64();
                p[slot].1 += 1;
            }
        }
    };
    // A step too small to pay for waking the workers (a few microseconds) runs on this
    // thread alone.
    let split_work: usize = plan
        .iter()
        .filter(|e| !e.pre && (e.chunks > 1 || e.owner > 0))
        .map(|e| e.units * prog.calls.iter().find(|c| c.kernel == e.kernel).map_or(0, |c| c.work_per_unit))
        .sum();
    if threads == 1 || split_work < PARALLEL_STEP_THRESHOLD {
        run_all(0, None, profile.as_mut());
    } else {
        let barrier = SpinBarrier::new(threads);
        let profile = std::sync::Mutex::new(profile.as_mut());
        pool.broadcast(|ctx| {
            let tid = ctx.index();
            if tid == 0 {
                // worker 0 also records the per-kernel times
                let mut guard = profile.lock().unwrap_or_else(|e| e.into_inner());
                run_all(0, Some(&barrier), guard.as_deref_mut());
            } else {
                run_all(tid, Some(&barrier), None);
            }
        });
    }
}

impl<'a> JitState<'a> {
    /// State for running `art`'s program (whose kernels are `kernels`) with `ctx` positions,
    /// steps of at most `n_cap` tokens. Everything is checked: the kernels must be the
    /// program's, the context must fit the model's learned positions and this machine's memory.
    pub fn new(
        art: &'a Artifact,
        kernels: &'a Kernels,
        ctx: usize,
        n_cap: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        JitState::own(art, kernels, ctx, n_cap, ctx)
    }

    /// The state of batched steps (`step_batch`) of `art`'s program: arena rows for `n_cap`
    /// rows and RoPE tables for `ctx` positions, but KV caches of one position: the sequences
    /// bring their own.
    pub fn batch(
        art: &'a Artifact,
        kernels: &'a Kernels,
        ctx: usize,
        n_cap: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        JitState::own(art, kernels, ctx, n_cap, 1)
    }

    /// `new` with KV caches of `cache_ctx` positions.
    fn own(
        art: &'a Artifact,
        kernels: &'a Kernels,
        ctx: usize,
        n_cap: usize,
        cache_ctx: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        if let Some(rows) = art.limits.position_rows {
            if ctx > rows {
                return Err(RuntimeError::Usage(format!("context size {ctx} exceeds the model's {rows} positions")));
            }
        }
        // SAFETY: the artifact's weights were checked at open against the verified IR (shape,
        // dtype, the layout the program reads, inside the map); the map lives for 'a, as does
        // the program the kernels were checked against below; `token_rows` comes from the same IR.
        unsafe {
            JitState::build(
                &art.header.program,
                kernels,
                &|name| art.tensor_ptr(name),
                ctx,
                n_cap,
                art.limits.token_rows,
                cache_ctx,
            )
        }
    }

    /// State for running the all-rows variant of `art`'s program (`logits` for every token
    /// of a step, see [`AllRows`]). The weights are `art`'s own tensors: this checks, as
    /// [`Artifact::open`] does for the stored program, that the derived graph reads exactly the
    /// weights of the artifact's verified IR (same names, shapes and dtypes) and that every
    /// stored tensor is in the layout the derived program's kernels read; anything else is
    /// refused before a kernel sees a pointer.
    pub fn all_rows(
        art: &'a Artifact,
        all: &'a AllRows,
        ctx: usize,
        n_cap: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        JitState::derived(art, all, ctx, n_cap, ctx)
    }

    /// `all_rows` with KV caches of `cache_ctx` positions.
    fn derived(
        art: &'a Artifact,
        all: &'a AllRows,
        ctx: usize,
        n_cap: usize,
        cache_ctx: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        all.check_weights(art)?;
        if let Some(rows) = art.limits.position_rows {
            if ctx > rows {
                return Err(RuntimeError::Usage(format!("context size {ctx} exceeds the model's {rows} positions")));
            }
        }
        // SAFETY: `all.program` is the lowering of the verified graph `all.graph` (built only
        // by `AllRows::derive`, fields private) and `all.kernels` were compiled from it;
        // `check_weights` just established that this graph reads the same weights, with the
        // same shapes and dtypes, as `art.graph`, against which `Artifact::open` checked the
        // tensors in the map (inside the file, shape, dtype), and that each stored tensor's
        // layout is the one `all.program` reads. The map lives for 'a. `token_rows` comes
        // from `art.graph`, whose embedding tables are the derived graph's.
        unsafe {
            JitState::build(
                &all.program,
                &all.kernels,
                &|name| art.tensor_ptr(name),
                ctx,
                n_cap,
                art.limits.token_rows,
                cache_ctx,
            )
        }
    }

    /// The same for any program.
    ///
    /// # Safety
    /// `prog` must be the lowering of a verified graph, and `weights(name)` must give, for
    /// every weight the program reads, the address of that weight's data in the layout
    /// `prog.layout_of(name)` asks for, with the shape and dtype of the graph, valid and
    /// unchanged for 'a. `token_rows` must not exceed the rows of any table the program
    /// gathers by token id. (The artifact loader checks all of this; tests build it.)
    pub unsafe fn with_weights(
        prog: &'a Program,
        kernels: &'a Kernels,
        weights: &dyn Fn(&str) -> Option<*const u8>,
        ctx: usize,
        n_cap: usize,
        token_rows: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { JitState::build(prog, kernels, weights, ctx, n_cap, token_rows, ctx) }
    }

    /// `with_weights` with KV caches of `cache_ctx` positions (a batch's own state, whose
    /// stateful calls use the sequences' caches, keeps one position).
    ///
    /// # Safety
    /// As `with_weights`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn build(
        prog: &'a Program,
        kernels: &'a Kernels,
        weights: &dyn Fn(&str) -> Option<*const u8>,
        ctx: usize,
        n_cap: usize,
        token_rows: usize,
        cache_ctx: usize,
    ) -> Result<JitState<'a>, RuntimeError> {
        if kernels.specs() != prog.kernels.as_slice() {
            return Err(RuntimeError::Usage("the kernels were compiled for another program".into()));
        }
        if ctx == 0 || ctx > llmc_ir::op::MAX_DIM {
            return Err(RuntimeError::Usage(format!("context size {ctx} must be in 1..={}", llmc_ir::op::MAX_DIM)));
        }
        let n_cap = n_cap.clamp(1, ctx).min(llmc_compiler::kernels::matmul::MAX_ROWS);
        check_memory(state_bytes(prog, ctx, n_cap), &format!("a context of {ctx} tokens"))?;
        let arena = zeroed::<Block>((prog.arena_width * n_cap).div_ceil(16).max(1))?;
        let mut caches = Vec::new();
        for l in &prog.kv_layers {
            // Sliding-window layers keep a ring big enough for the window plus one chunk.
            let cap = l.window.map_or(cache_ctx, |w| w.saturating_add(n_cap).min(cache_ctx));
            let len = cap * l.kv_heads * l.head_dim;
            caches.push((l.layer, Aligned::new(len)?, Aligned::new(len)?, cap));
        }
        let mut tables = Vec::new();
        for t in &prog.rope_tables {
            let inv = t.scaling.inv_freq(t.theta, t.rotary_dim);
            let (rd, half) = (t.rotary_dim, t.rotary_dim / 2);
            let mut tab = zeroed::<f32>(ctx * 2 * rd)?;
            for p in 0..ctx {
                let pf = p as f32 / t.scaling.position_divisor();
                for (i, f) in inv.iter().enumerate() {
                    // The interpreter's formula: f32 angle, cos/sin rounded from f64.
                    let angle = (pf * f) as f64;
                    let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                    if t.interleaved {
                        // qkv_rope: per pair (2i, 2i+1): cos, cos ... then -sin, +sin
                        let row = &mut tab[p * 2 * rd..(p + 1) * 2 * rd];
                        row[2 * i] = c;
                        row[2 * i + 1] = c;
                        row[rd + 2 * i] = -s;
                        row[rd + 2 * i + 1] = s;
                    } else {
                        // rope: per position rd/2 cosines then rd/2 sines
                        tab[p * rd + i] = c;
                        tab[p * rd + half + i] = s;
                    }
                }
            }
            tables.push(tab);
        }
        let mut mamba = Vec::new();
        for &(l, conv, ssm) in &prog.mamba_layers {
            mamba.push((l, Aligned::new(conv)?, Aligned::new(ssm)?));
        }
        let kv_rows = caches.iter().map(|c| (c.0, vec![0u64; 3 * n_cap])).collect();
        let shared_bytes = prog
            .kernels
            .iter()
            .filter_map(|k| k.int8_input())
            .map(|q| llmc_compiler::kernels::dot::shared_bytes(q.k, q.terms, n_cap))
            .max();
        let shared = shared_bytes.map(|b| Aligned::new(b.div_ceil(4))).transpose()?;
        let mut s = JitState {
            prog,
            kernels,
            arena,
            caches,
            mamba,
            kv_rows,
            tables,
            tokens: vec![0; n_cap],
            positions: vec![0; n_cap],
            seqs: vec![0; n_cap],
            args: Vec::new(),
            caps: Vec::new(),
            shared,
            token_rows,
            n_cap,
            ctx,
            profile: None,
        };
        s.own_kv_rows();
        s.build_args(weights)?;
        Ok(s)
    }

    /// Points every row of every `kv_rows` table at this state's own caches.
    fn own_kv_rows(&mut self) {
        for (l, rows) in &mut self.kv_rows {
            if let Some(c) = self.caches.iter_mut().find(|c| c.0 == *l) {
                let entry = [c.1.ptr() as u64, c.2.ptr() as u64, c.3 as u64];
                for r in rows.chunks_exact_mut(3) {
                    r.copy_from_slice(&entry);
                }
            }
        }
    }

    fn build_args(&mut self, weights: &dyn Fn(&str) -> Option<*const u8>) -> Result<(), RuntimeError> {
        let prog = self.prog;
        let arena = self.arena.as_mut_ptr() as *mut u8;
        let missing = |what: String| RuntimeError::Usage(format!("invalid program: {what}"));
        let mut tables = Vec::new();
        let mut caps = Vec::new();
        for call in &prog.calls {
            if call.kernel >= self.kernels.fns.len() {
                return Err(missing(format!("call of kernel {} of {}", call.kernel, self.kernels.fns.len())));
            }
            let mut ptrs = Vec::new();
            for a in &call.args {
                let p = match a {
                    Arg::Buf(b) => {
                        let buf = prog.buffers.get(*b).ok_or_else(|| missing(format!("call refers to buffer {b}")))?;
                        if buf.offset.checked_add(buf.width).is_none_or(|end| end > prog.arena_width) {
                            return Err(missing(format!("buffer {b} lies outside the arena")));
                        }
                        // SAFETY: offset × n_cap + width × n_cap <= arena_width × n_cap floats.
                        unsafe { arena.add(buf.offset * self.n_cap * 4) }
                    }
                    Arg::Weight(name) => {
                        weights(name).ok_or_else(|| missing(format!("call reads missing weight `{name}`")))? as *mut u8
                    }
                    Arg::Tokens => self.tokens.as_mut_ptr() as *mut u8,
                    Arg::Positions => self.positions.as_mut_ptr() as *mut u8,
                    Arg::Seqs => self.seqs.as_mut_ptr() as *mut u8,
                    Arg::KCache(l) | Arg::VCache(l) => {
                        let c = self
                            .caches
                            .iter_mut()
                            .find(|c| c.0 == *l)
                            .ok_or_else(|| missing(format!("no cache for layer {l}")))?;
                        if matches!(a, Arg::KCache(_)) {
                            c.1.ptr()
                        } else {
                            c.2.ptr()
                        }
                    }
                    Arg::KvRows(l) => {
                        let t = self
                            .kv_rows
                            .iter_mut()
                            .find(|t| t.0 == *l)
                            .ok_or_else(|| missing(format!("no cache for layer {l}")))?;
                        t.1.as_mut_ptr() as *mut u8
                    }
                    Arg::MambaConv(l) | Arg::MambaSsm(l) => {
                        let m = self
                            .mamba
                            .iter_mut()
                            .find(|m| m.0 == *l)
                            .ok_or_else(|| missing(format!("no Mamba2 state for layer {l}")))?;
                        if matches!(a, Arg::MambaConv(_)) {
                            m.1.ptr()
                        } else {
                            m.2.ptr()
                        }
                    }
                    Arg::RopeTable(t) => {
                        self.tables.get_mut(*t).ok_or_else(|| missing(format!("no rope table {t}")))?.as_mut_ptr()
                            as *mut u8
                    }
                };
                ptrs.push(p);
            }
            let cap = call.layer.and_then(|l| self.caches.iter().find(|c| c.0 == l)).map_or(0, |c| c.3 as i64);
            tables.push(ptrs);
            caps.push(cap);
        }
        self.args = tables;
        self.caps = caps;
        Ok(())
    }

    /// Whether the model carries recurrent (Mamba2) state, which cannot be rewound.
    pub fn has_recurrent_state(&self) -> bool {
        !self.mamba.is_empty()
    }

    /// Zeroes the recurrent state (a new sequence).
    pub fn reset_recurrent(&mut self) {
        for m in &mut self.mamba {
            for b in m.1 .0.iter_mut().chain(m.2 .0.iter_mut()) {
                b.0 = [0.0; 16];
            }
        }
    }

    /// One step over several sequences at once: `self` is the batch's state (its arena holds
    /// the rows; its own caches are not used), `seqs` the sequences, whose caches and
    /// recurrent states the stateful calls read and write. Sequence `i` has `lens[i] >= 1`
    /// consecutive rows (`tokens`, `positions`, in position order): one for a decode step,
    /// more for a prefill chunk sharing the step. This is the IR's step over several
    /// sequences (`seqs[t]` = the sequence of row `t`, `interp::run_batch`): calls without
    /// per-sequence state (projections, norms, the output layer) run once over all rows,
    /// reading each weight once for the whole batch; the fused QKV + RoPE + cache write runs
    /// once over all rows too, each row writing where its `KvRows` entry (its sequence's
    /// caches) says; the calls with per-sequence state (attention, an unfused KV append, the
    /// Mamba2 conv and scan) run once per sequence on its rows and its cache or state.
    /// `take_last` gathers each sequence's last row. Returns the `logits`: one row per
    /// sequence. Every row's arithmetic is the one a step of that sequence alone does (rows
    /// never mix), so on the wide micro-kernels batching changes no token.
    pub fn step_batch(
        &mut self,
        pool: &rayon::ThreadPool,
        seqs: &mut [&mut JitState<'_>],
        tokens: &[i32],
        positions: &[i32],
        lens: &[usize],
    ) -> Result<Vec<f32>, RuntimeError> {
        let (prog, kernels) = (self.prog, self.kernels);
        let s = seqs.len();
        let n = tokens.len();
        if s == 0
            || lens.len() != s
            || lens.contains(&0)
            || lens.iter().try_fold(0usize, |a, &l| a.checked_add(l)) != Some(n)
            || n > self.n_cap
            || positions.len() != n
        {
            return Err(RuntimeError::Usage(format!(
                "a batch takes 1..={} rows, at least one per sequence, with one position each (got {} sequences, \
                 {n} tokens, {} positions, {lens:?} rows)",
                self.n_cap,
                s,
                positions.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.token_rows) {
            return Err(RuntimeError::TokenId { id: bad as i64, vocab: self.token_rows });
        }
        let mut starts = Vec::with_capacity(s);
        let mut at = 0;
        for (q, &len) in seqs.iter().zip(lens) {
            starts.push(at);
            if len > q.n_cap {
                return Err(RuntimeError::Usage(format!(
                    "a sequence takes at most {} rows per step (got {len})",
                    q.n_cap
                )));
            }
            for &p in &positions[at..at + len] {
                if p < 0 || p as usize >= q.ctx || p as usize >= self.ctx {
                    return Err(RuntimeError::Usage(format!(
                        "position {p} is outside the context of {} tokens",
                        q.ctx.min(self.ctx)
                    )));
                }
            }
            at += len;
            // the sequence's caches and recurrent states are the ones this program's layers expect
            for c in &self.caches {
                if !q.caches.iter().any(|d| d.0 == c.0) {
                    return Err(RuntimeError::Usage(format!("a sequence has no matching cache for layer {}", c.0)));
                }
            }
            for m in &self.mamba {
                if !q.mamba.iter().any(|d| d.0 == m.0 && d.1 .0.len() == m.1 .0.len() && d.2 .0.len() == m.2 .0.len()) {
                    return Err(RuntimeError::Usage(format!(
                        "a sequence has no matching Mamba2 state for layer {}",
                        m.0
                    )));
                }
            }
        }
        self.tokens[..n].copy_from_slice(tokens);
        self.positions[..n].copy_from_slice(positions);
        for (i, (&st, &len)) in starts.iter().zip(lens).enumerate() {
            self.seqs[st..st + len].fill(i as i32);
        }
        let threads = pool.current_num_threads();
        // per-sequence pointer tables of the stateful calls (kept alive through the run)
        let mut owned: Vec<Vec<*mut u8>> = Vec::new();
        let mut shape: Vec<(usize, Option<(usize, usize)>)> = Vec::new(); // (call, Some((seq, table)))
        for (ci, call) in prog.calls.iter().enumerate() {
            let stateful = call
                .args
                .iter()
                .any(|a| matches!(a, Arg::KCache(_) | Arg::VCache(_) | Arg::MambaConv(_) | Arg::MambaSsm(_)));
            if !stateful {
                shape.push((ci, None));
                continue;
            }
            for (i, q) in seqs.iter_mut().enumerate() {
                let row0 = starts[i];
                let mut t = self.args[ci].clone();
                for (p, a) in t.iter_mut().zip(&call.args) {
                    match a {
                        Arg::Buf(b) => {
                            let buf = &prog.buffers[*b];
                            if buf.rows != Rows::N {
                                return Err(RuntimeError::Usage(
                                    "a per-sequence call reads a buffer without a row per token".into(),
                                ));
                            }
                            // SAFETY: row0 < n <= n_cap of a buffer of n_cap rows of `width`.
                            *p = unsafe { p.add(row0 * buf.width * 4) };
                        }
                        // SAFETY: index row0 < n <= n_cap of the n_cap-long token/position/seq rows.
                        Arg::Tokens | Arg::Positions | Arg::Seqs => *p = unsafe { p.add(row0 * 4) },
                        Arg::KCache(l) | Arg::VCache(l) => {
                            let c =
                                q.caches.iter_mut().find(|c| c.0 == *l).ok_or_else(|| {
                                    RuntimeError::Usage(format!("a sequence has no cache for layer {l}"))
                                })?;
                            *p = if matches!(a, Arg::KCache(_)) { c.1.ptr() } else { c.2.ptr() };
                        }
                        Arg::MambaConv(l) | Arg::MambaSsm(l) => {
                            let m = q.mamba.iter_mut().find(|m| m.0 == *l).ok_or_else(|| {
                                RuntimeError::Usage(format!("a sequence has no Mamba2 state for layer {l}"))
                            })?;
                            *p = if matches!(a, Arg::MambaConv(_)) { m.1.ptr() } else { m.2.ptr() };
                        }
                        _ => {}
                    }
                }
                owned.push(t);
                shape.push((ci, Some((i, owned.len() - 1))));
            }
        }
        let span_all = positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        let shared = self.shared.as_mut().map(|b| b.ptr());
        let mut plan: Vec<Entry> = Vec::with_capacity(shape.len());
        let mut bounds = Vec::new();
        for &(ci, per) in &shape {
            let e = match per {
                None => {
                    let n_call = call_rows(prog.calls[ci].rows, n, s);
                    let table = SendPtr(self.args[ci].as_ptr());
                    entry(prog, kernels, ci, n_call, positions, span_all, table, self.caps[ci], threads, &mut bounds)
                }
                Some((i, t)) => {
                    let cap = prog.calls[ci]
                        .layer
                        .and_then(|l| seqs[i].caches.iter().find(|c| c.0 == l))
                        .map_or(0, |c| c.3 as i64);
                    let rows = &positions[starts[i]..starts[i] + lens[i]];
                    let span = rows.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
                    let table = SendPtr(owned[t].as_ptr());
                    let mut e = entry(prog, kernels, ci, lens[i], rows, span, table, cap, threads, &mut bounds);
                    // the calls of the other sequences follow without a barrier, spread over
                    // the workers when they do not split
                    e.wait = i + 1 == s;
                    e.owner = i;
                    e
                }
            };
            push_entry(&mut plan, kernels, e, shared, threads);
        }
        // each row writes its K and V into its sequence's caches (the fused QKV projection
        // runs once over all rows); every sequence has every layer's cache (checked above)
        for (l, rows) in &mut self.kv_rows {
            for (i, q) in seqs.iter_mut().enumerate() {
                if let Some(c) = q.caches.iter_mut().find(|c| c.0 == *l) {
                    let entry = [c.1.ptr() as u64, c.2.ptr() as u64, c.3 as u64];
                    for r in rows[3 * starts[i]..3 * (starts[i] + lens[i])].chunks_exact_mut(3) {
                        r.copy_from_slice(&entry);
                    }
                }
            }
        }
        run_plan(pool, prog, &plan, &bounds, &mut self.profile);
        // back to this state's own caches and sequence: no pointer into a sequence outlives
        // the step
        self.own_kv_rows();
        self.seqs[..n].fill(0);
        self.logits(n, s)
    }

    /// Runs one step of `1..=n_cap` tokens at `positions` and returns the `logits` output (all
    /// its rows). Token ids must index the embedding, positions must lie inside the context:
    /// anything else is an error, before any kernel runs.
    pub fn step(
        &mut self,
        pool: &rayon::ThreadPool,
        tokens: &[i32],
        positions: &[i32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let (prog, kernels) = (self.prog, self.kernels);
        let n = tokens.len();
        if n == 0 || n > self.n_cap || positions.len() != n {
            return Err(RuntimeError::Usage(format!(
                "a step takes 1..={} tokens with one position each (got {n} and {})",
                self.n_cap,
                positions.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.token_rows) {
            return Err(RuntimeError::TokenId { id: bad as i64, vocab: self.token_rows });
        }
        if let Some(&p) = positions.iter().find(|&&p| p < 0 || p as usize >= self.ctx) {
            return Err(RuntimeError::Usage(format!("position {p} is outside the context of {} tokens", self.ctx)));
        }
        self.tokens[..n].copy_from_slice(tokens);
        self.positions[..n].copy_from_slice(positions);
        self.seqs[..n].fill(0);
        let span = positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        let tables: Vec<SendPtr> = self.args.iter().map(|a| SendPtr(a.as_ptr())).collect();
        let threads = pool.current_num_threads();
        let shared = self.shared.as_mut().map(|b| b.ptr());
        let mut plan: Vec<Entry> = Vec::with_capacity(prog.calls.len());
        let mut bounds = Vec::new();
        for (ci, call) in prog.calls.iter().enumerate() {
            let n_call = call_rows(call.rows, n, 1);
            let e = entry(prog, kernels, ci, n_call, positions, span, tables[ci], self.caps[ci], threads, &mut bounds);
            push_entry(&mut plan, kernels, e, shared, threads);
        }
        run_plan(pool, prog, &plan, &bounds, &mut self.profile);
        self.logits(n, 1)
    }

    /// The `logits` output of the last step of `n` rows of `s` sequences (all its rows).
    fn logits(&self, n: usize, s: usize) -> Result<Vec<f32>, RuntimeError> {
        let prog = self.prog;
        let logits = prog.outputs.iter().find(|(name, _)| name == "logits").map_or(usize::MAX, |(_, b)| *b);
        match prog.buffers.get(logits) {
            Some(buf) => {
                let start = buf.offset * self.n_cap;
                let rows = call_rows(buf.rows, n, s);
                let arena: &[f32] =
                    // SAFETY: Block is 16 plain f32s; the arena is one contiguous allocation.
                    unsafe { std::slice::from_raw_parts(self.arena.as_ptr() as *const f32, self.arena.len() * 16) };
                Ok(arena[start..start + rows * buf.width].to_vec())
            }
            None => Ok(Vec::new()),
        }
    }
}

/// The rows a call or buffer of `rows` has in a step of `n` rows of `s` sequences.
fn call_rows(rows: Rows, n: usize, s: usize) -> usize {
    match rows {
        Rows::N => n,
        Rows::Seqs => s,
        Rows::One => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::{attention_bounds, ATTENTION_ROW_COST};

    /// The parts cover every unit once, in order, and their costs differ by at most one unit's.
    #[test]
    fn attention_bounds_share_the_keys() {
        for (kv, from, n, window, chunks) in [
            (3usize, 0i32, 512usize, None, 2usize),
            (3, 1536, 512, None, 2),
            (3, 0, 512, None, 16),
            (8, 0, 300, Some(64), 7),
            (2, 100, 3, None, 5),
            (1, 0, 1, None, 2),
        ] {
            let pos: Vec<i32> = (from..from + n as i32).collect();
            let b = attention_bounds(kv, &pos, window, chunks);
            assert_eq!(b.len(), chunks + 1);
            assert_eq!((b[0], b[chunks]), (0, kv * n));
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
            let cost = |u: usize| {
                let keys = pos[u % n] as usize + 1;
                window.map_or(keys, |w| w.min(keys)) + ATTENTION_ROW_COST
            };
            let parts: Vec<usize> = b.windows(2).map(|w| (w[0]..w[1]).map(cost).sum()).collect();
            let most = (0..kv * n).map(cost).max().unwrap_or(0);
            let total: usize = parts.iter().sum();
            for &p in &parts {
                // each part is within one unit's cost of an equal share (and at most a unit off
                // from each neighbour's boundary)
                assert!(
                    p.abs_diff(total / chunks) <= most + most / 2 + 1,
                    "parts {parts:?} of {total} (unit at most {most})"
                );
            }
        }
    }
}
