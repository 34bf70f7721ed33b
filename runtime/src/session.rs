//! A session: one sequence's state (KV cache, position) over an opened artifact, and the
//! generation loop.

use std::path::Path;
use std::time::Instant;

use std::sync::OnceLock;

use llmc_compiler::jit::Kernels;
use llmc_ir::interp::{self, KvCache, StepInput};
use llmc_ir::Graph;

use crate::artifact::Artifact;
use crate::error::RuntimeError;
use crate::jit_exec::{AllRows, JitState};
use crate::sampler::Sampler;

/// Which executor runs the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter (slow, obviously correct).
    Interp,
    /// Native kernels compiled by Cranelift.
    Jit,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend, RuntimeError> {
        match s {
            "interp" => Ok(Backend::Interp),
            "jit" => Ok(Backend::Jit),
            other => Err(RuntimeError::Usage(format!("unknown backend `{other}` (interp or jit)"))),
        }
    }

    /// The fastest backend this build has.
    pub fn fastest() -> Backend {
        Backend::Jit
    }
}

/// An opened artifact with its kernels compiled for this CPU and a thread pool.
pub struct Engine {
    pub art: Artifact,
    pub kernels: Kernels,
    pub pool: rayon::ThreadPool,
    /// Seconds spent mapping and checking the artifact, and JIT-compiling the kernels.
    pub load_s: f64,
    pub jit_s: f64,
    /// The all-rows variant of the program (perplexity), derived on first use only.
    all_rows: OnceLock<AllRows>,
}

impl Engine {
    /// Maps the artifact, checks it against the file and the host, and JITs its kernels.
    /// `threads` = 0 uses every core.
    pub fn open(path: &Path, threads: usize) -> Result<Engine, RuntimeError> {
        Ok(Engine::open_with(path, threads, |_| ())?.0)
    }

    /// `open`, running `side` on the checked artifact in a second thread while the kernels
    /// compile (the CLI loads the tokenizer there: both take tens to hundreds of ms).
    pub fn open_with<T: Send>(
        path: &Path,
        threads: usize,
        side: impl FnOnce(&Artifact) -> T + Send,
    ) -> Result<(Engine, T), RuntimeError> {
        let t0 = Instant::now();
        let art = Artifact::open(path)?;
        let load_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let (kernels, jit_s, extra) = std::thread::scope(|s| {
            // the main thread's stack size (8 MiB), not a spawned thread's 2 MiB: the side
            // work may be a deserializer of model files
            let side = std::thread::Builder::new().stack_size(8 << 20).spawn_scoped(s, || side(&art));
            let kernels = llmc_compiler::jit::compile(&art.header.program.kernels);
            let jit_s = t1.elapsed().as_secs_f64();
            (kernels, jit_s, side.map(|h| h.join()))
        });
        let kernels =
            kernels.map_err(|e| RuntimeError::BadArtifact { path: path.to_path_buf(), msg: e.to_string() })?;
        let extra = extra
            .map_err(|e| RuntimeError::Usage(format!("starting a thread: {e}")))?
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| RuntimeError::Usage(format!("thread pool: {e}")))?;
        Ok((Engine { art, kernels, pool, load_s, jit_s, all_rows: OnceLock::new() }, extra))
    }

    /// The all-rows variant of the artifact's step (`logits` for every token), derived from
    /// the verified IR, lowered and JIT-compiled on the first call, then kept.
    pub fn all_rows(&self) -> Result<&AllRows, RuntimeError> {
        if let Some(all) = self.all_rows.get() {
            return Ok(all);
        }
        let all = AllRows::derive(&self.art)?;
        Ok(self.all_rows.get_or_init(|| all))
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

enum State<'a> {
    Interp(KvCache),
    Jit(Box<JitState<'a>>),
}

/// One sequence over an engine: its per-layer state and how many positions are filled.
pub struct Session<'a> {
    engine: &'a Engine,
    state: State<'a>,
    /// The graph the interpreter runs (the artifact's, or its all-rows variant).
    graph: &'a Graph,
    /// Whether steps produce logits for every token (`new_all_logits`) or the last only.
    all_rows: bool,
    /// Positions filled so far.
    pub pos: usize,
    pub ctx: usize,
}

/// Tokens per step of a chunked prefill (and rows of the activation arena).
pub const DEFAULT_CHUNK: usize = 256;

impl<'a> Session<'a> {
    /// A new sequence with room for `ctx` positions (default: the model's trained context,
    /// at most 4096).
    pub fn new(engine: &'a Engine, backend: Backend, ctx: Option<usize>) -> Result<Session<'a>, RuntimeError> {
        Session::build(engine, backend, ctx, false)
    }

    /// A sequence whose steps compute logits for every token ([`Session::step_rows`]), not
    /// only the last: the engine's [`AllRows`] program. What perplexity runs; generation uses
    /// [`Session::new`], which computes the last row only.
    pub fn new_all_logits(
        engine: &'a Engine,
        backend: Backend,
        ctx: Option<usize>,
    ) -> Result<Session<'a>, RuntimeError> {
        Session::build(engine, backend, ctx, true)
    }

    fn build(
        engine: &'a Engine,
        backend: Backend,
        ctx: Option<usize>,
        all_rows: bool,
    ) -> Result<Session<'a>, RuntimeError> {
        let art = &engine.art;
        let max = art.header.max_positions;
        let ctx = ctx.unwrap_or(max.min(4096));
        if ctx == 0 || ctx > llmc_ir::op::MAX_DIM || (art.header.hard_context_limit && ctx > max) {
            return Err(RuntimeError::Usage(format!("context size {ctx} must be in 1..={max} for this model")));
        }
        let all = if all_rows { Some(engine.all_rows()?) } else { None };
        let graph = all.map_or(&art.graph, AllRows::graph);
        // An all-rows step hands back a copy of its logits: rows × vocab floats.
        let rows_copy = if all_rows {
            let width = graph_logits_width(graph).unwrap_or(0) as u64;
            (DEFAULT_CHUNK.min(ctx) as u64).checked_mul(width).and_then(|f| f.checked_mul(4))
        } else {
            Some(0)
        };
        let what = format!("a context of {ctx} tokens");
        let state = match backend {
            Backend::Interp => {
                let need = interp_state_bytes(graph, ctx).zip(rows_copy).and_then(|(a, b)| a.checked_add(b));
                crate::jit_exec::check_memory(need, &what)?;
                State::Interp(KvCache::new(graph, ctx))
            }
            Backend::Jit => match all {
                None => State::Jit(Box::new(JitState::new(art, &engine.kernels, ctx, DEFAULT_CHUNK)?)),
                Some(all) => {
                    let state = crate::jit_exec::state_bytes(all.program(), ctx, DEFAULT_CHUNK.min(ctx));
                    let need = state.zip(rows_copy).and_then(|(a, b)| a.checked_add(b));
                    crate::jit_exec::check_memory(need, &what)?;
                    State::Jit(Box::new(JitState::all_rows(art, all, ctx, DEFAULT_CHUNK)?))
                }
            },
        };
        Ok(Session { engine, state, graph, all_rows, pos: 0, ctx })
    }

    /// Turns per-kernel timing on (JIT backend only).
    pub fn enable_profile(&mut self) {
        if let State::Jit(st) = &mut self.state {
            st.profile = Some(Vec::new());
        }
    }

    /// Seconds and calls per kernel since profiling was enabled.
    pub fn profile(&self) -> Option<&[(f64, usize)]> {
        match &self.state {
            State::Jit(st) => st.profile.as_deref(),
            State::Interp(_) => None,
        }
    }

    /// Forgets every position from `pos` on (the next step writes there): lets a chat reuse
    /// the cached prefix its new prompt shares with the old one. A recurrent (Mamba2) state
    /// cannot be rewound: the sequence restarts from 0. Returns the position kept.
    pub fn truncate(&mut self, pos: usize) -> usize {
        if pos >= self.pos {
            return self.pos;
        }
        let recurrent = match &mut self.state {
            State::Interp(c) => {
                let r = !c.mamba.is_empty();
                if r {
                    for (conv, ssm) in c.mamba.values_mut() {
                        conv.fill(0.0);
                        ssm.fill(0.0);
                    }
                }
                r
            }
            State::Jit(st) => {
                let r = st.has_recurrent_state();
                if r {
                    st.reset_recurrent();
                }
                r
            }
        };
        self.pos = if recurrent { 0 } else { pos };
        self.pos
    }

    /// Runs the tokens through the model at the next positions; returns the logits of the
    /// last. Long inputs run as several steps of at most `DEFAULT_CHUNK` tokens.
    pub fn step(&mut self, tokens: &[i32]) -> Result<Vec<f32>, RuntimeError> {
        self.check_step(tokens)?;
        let mut logits = Vec::new();
        let mut last = 0;
        for chunk in tokens.chunks(DEFAULT_CHUNK) {
            logits = self.run_chunk(chunk)?;
            last = chunk.len();
        }
        if self.all_rows {
            // keep the last row of the last chunk
            let width = logits.len() / last.max(1);
            logits.drain(..logits.len() - width);
        }
        Ok(logits)
    }

    /// Runs the tokens like [`Session::step`] on a session made by
    /// [`Session::new_all_logits`], handing the logits of every token to `on_rows` as they are
    /// computed: `on_rows(i, width, logits)` gets the rows of tokens `i..` (row-major, `width`
    /// logits per token, at most `DEFAULT_CHUNK` rows per call), so the whole input's logits
    /// are never held at once.
    pub fn step_rows(
        &mut self,
        tokens: &[i32],
        mut on_rows: impl FnMut(usize, usize, &[f32]) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        if !self.all_rows {
            return Err(RuntimeError::Usage(
                "this session computes the last token's logits only (use Session::new_all_logits)".into(),
            ));
        }
        self.check_step(tokens)?;
        let mut row = 0;
        for chunk in tokens.chunks(DEFAULT_CHUNK) {
            let logits = self.run_chunk(chunk)?;
            if logits.is_empty() || logits.len() % chunk.len() != 0 {
                return Err(RuntimeError::Usage(format!(
                    "the all-rows step returned {} logits for {} tokens",
                    logits.len(),
                    chunk.len()
                )));
            }
            on_rows(row, logits.len() / chunk.len(), &logits)?;
            row += chunk.len();
        }
        Ok(())
    }

    /// Token ids inside the vocabulary, positions inside the context.
    fn check_step(&self, tokens: &[i32]) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Usage("a step needs at least one token".into()));
        }
        let art = &self.engine.art;
        let vocab = art.header.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(RuntimeError::TokenId { id: bad as i64, vocab });
        }
        if self.pos + tokens.len() > self.ctx {
            return Err(RuntimeError::Context {
                need: self.pos + tokens.len(),
                ctx: self.ctx,
                max: art.header.max_positions,
            });
        }
        Ok(())
    }

    /// One step of at most `DEFAULT_CHUNK` checked tokens at the next positions; its logits.
    fn run_chunk(&mut self, chunk: &[i32]) -> Result<Vec<f32>, RuntimeError> {
        let art = &self.engine.art;
        let positions: Vec<i32> = (self.pos..self.pos + chunk.len()).map(|p| p as i32).collect();
        let logits = match &mut self.state {
            State::Interp(cache) => {
                let mut out = interp::run(self.graph, StepInput { tokens: chunk, positions: &positions }, art, cache)?;
                out.remove("logits").ok_or_else(|| RuntimeError::Usage("the graph has no logits output".into()))?.data
            }
            State::Jit(st) => st.step(&self.engine.pool, chunk, &positions)?,
        };
        self.pos += chunk.len();
        Ok(logits)
    }
}

/// Columns of the graph's `logits` output (the vocabulary), if it has one.
fn graph_logits_width(g: &Graph) -> Option<usize> {
    let id = g.outputs.iter().find(|(name, _)| name == "logits")?.1;
    g.node(id).ty.shape.last_const()
}

/// Bytes of the interpreter's per-sequence state (f32 K and V per position and kv head, and
/// the Mamba2 windows and states), with checked arithmetic.
fn interp_state_bytes(g: &llmc_ir::Graph, ctx: usize) -> Option<u64> {
    let mut total = 0u64;
    for (_, kv, hd) in g.kv_layers() {
        total = total.checked_add((ctx as u64).checked_mul(kv as u64)?.checked_mul(hd as u64)?.checked_mul(8)?)?;
    }
    for (_, ch, d_conv, st) in g.mamba_layers() {
        total = total.checked_add((ch as u64).checked_mul(d_conv as u64)?.checked_add(st as u64)?.checked_mul(4)?)?;
    }
    Some(total)
}

/// The result of a generation.
#[derive(Debug, Default)]
pub struct Generation {
    pub generated: Vec<i32>,
    /// Logits at the last prompt position, before sampling.
    pub logits_last: Vec<f32>,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decode_steps: usize,
}

/// Prefills `prompt` and generates up to `n` tokens. A token in `stop` (EOS) ends generation
/// (it is recorded in `generated` but not passed on); every other token goes to `on_token`,
/// which returns `false` to stop (a stop string was seen).
pub fn generate(
    session: &mut Session<'_>,
    prompt: &[i32],
    n: usize,
    sampler: &mut Sampler,
    stop: &[i32],
    mut on_token: impl FnMut(i32) -> Result<bool, RuntimeError>,
) -> Result<Generation, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Usage("the prompt is empty".into()));
    }
    let need = session.pos + prompt.len() + n.saturating_sub(1);
    if need > session.ctx {
        return Err(RuntimeError::Context { need, ctx: session.ctx, max: session.engine.art.header.max_positions });
    }
    let mut g = Generation::default();
    let t0 = Instant::now();
    let logits = session.step(prompt)?;
    g.prefill_s = t0.elapsed().as_secs_f64();
    g.logits_last = logits.clone();
    let mut history: Vec<i32> = prompt.to_vec();
    let mut logits = logits;
    let t1 = Instant::now();
    for i in 0..n {
        let tok = sampler.sample(&logits, &history);
        g.generated.push(tok);
        history.push(tok);
        if stop.contains(&tok) || !on_token(tok)? || i + 1 == n {
            break;
        }
        logits = session.step(&[tok])?;
        g.decode_steps += 1;
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}

/// Steps of several sessions at once, the weights read once for all of them (see
/// [`JitState::step_batch`]): decode steps (one token each), and prefill chunks sharing a step
/// with them. Its own state runs the engine's program over rows of several sequences
/// (`take_last` gives one row per session); the sessions keep their own KV caches and
/// recurrent states.
pub struct Batcher<'a> {
    engine: &'a Engine,
    state: Box<JitState<'a>>,
}

impl<'a> Batcher<'a> {
    /// A batcher for steps of up to `max_rows` rows (sessions, and their prefill tokens)
    /// whose positions stay below `ctx`.
    pub fn new(engine: &'a Engine, ctx: usize, max_rows: usize) -> Result<Batcher<'a>, RuntimeError> {
        let state = Box::new(JitState::batch(&engine.art, &engine.kernels, ctx, max_rows)?);
        Ok(Batcher { engine, state })
    }

    /// The most rows a step takes.
    pub fn max_rows(&self) -> usize {
        self.state.n_cap
    }

    /// Turns per-kernel timing of the batched steps on.
    pub fn enable_profile(&mut self) {
        self.state.profile = Some(Vec::new());
    }

    /// Seconds and calls per kernel of the batched steps so far (indexed like the program's
    /// kernels), with profiling on.
    pub fn profile(&self) -> Option<&[(f64, usize)]> {
        self.state.profile.as_deref()
    }

    /// Runs `tokens[i]` through `sessions[i]` at its next position, all in one step; returns
    /// each session's logits. Sessions must be JIT sessions of this engine.
    pub fn step(&mut self, sessions: &mut [&mut Session<'a>], tokens: &[i32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let chunks: Vec<&[i32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.step_rows(sessions, &chunks)
    }

    /// Runs `chunks[i]` (one token or more) through `sessions[i]` at its next positions, all
    /// in one step; returns each session's logits for its last token. Sessions must be JIT
    /// sessions of this engine; a session's chunk must fit its own steps (`n_cap`).
    pub fn step_rows(
        &mut self,
        sessions: &mut [&mut Session<'a>],
        chunks: &[&[i32]],
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if chunks.len() != sessions.len() {
            return Err(RuntimeError::Usage(format!(
                "{} sessions but {} chunks of tokens",
                sessions.len(),
                chunks.len()
            )));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for (s, c) in sessions.iter().zip(chunks) {
            s.check_step(c)?;
            if !std::ptr::eq(s.engine, self.engine) {
                return Err(RuntimeError::Usage("a batched session belongs to another engine".into()));
            }
            tokens.extend_from_slice(c);
            positions.extend((s.pos..s.pos + c.len()).map(|p| p as i32));
        }
        let lens: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let mut states: Vec<&mut JitState<'a>> = Vec::with_capacity(sessions.len());
        for s in sessions.iter_mut() {
            match &mut s.state {
                State::Jit(st) => states.push(st),
                State::Interp(_) => return Err(RuntimeError::Usage("batched steps run on the JIT backend".into())),
            }
        }
        let logits = self.state.step_batch(&self.engine.pool, &mut states, &tokens, &positions, &lens)?;
        let n = sessions.len();
        if logits.len() % n.max(1) != 0 {
            return Err(RuntimeError::Usage(format!(
                "the batch step returned {} logits for {n} sequences",
                logits.len()
            )));
        }
        let width = logits.len() / n.max(1);
        for (s, c) in sessions.iter_mut().zip(chunks) {
            s.pos += c.len();
        }
        Ok(logits.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
    }
}
