//! A session: one sequence's state (KV cache, position) over an opened artifact, and the
//! generation loop.

use std::time::Instant;

use llmc_ir::interp::{self, KvCache, StepInput};

use crate::artifact::Artifact;
use crate::error::RuntimeError;
use crate::sampler::Sampler;

/// Which executor runs the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter (slow, obviously correct).
    Interp,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend, RuntimeError> {
        match s {
            "interp" => Ok(Backend::Interp),
            "jit" => Err(RuntimeError::Usage(
                "the JIT backend is not available in this build yet; use --backend interp".into(),
            )),
            other => Err(RuntimeError::Usage(format!(
                "unknown backend `{other}` (interp or jit)"
            ))),
        }
    }

    /// The fastest backend this build has.
    pub fn fastest() -> Backend {
        Backend::Interp
    }
}

pub struct Session<'a> {
    art: &'a Artifact,
    backend: Backend,
    cache: KvCache,
    /// Positions filled so far.
    pub pos: usize,
    pub ctx: usize,
}

impl<'a> Session<'a> {
    /// A new sequence with room for `ctx` positions (default: the model's trained context).
    pub fn new(
        art: &'a Artifact,
        backend: Backend,
        ctx: Option<usize>,
    ) -> Result<Session<'a>, RuntimeError> {
        let max = art.header.max_positions;
        let ctx = ctx.unwrap_or(max.min(4096));
        if ctx == 0 || (art.header.hard_context_limit && ctx > max) {
            return Err(RuntimeError::Usage(format!(
                "context size {ctx} must be in 1..={max} for this model"
            )));
        }
        Ok(Session {
            art,
            backend,
            cache: KvCache::new(&art.graph, ctx),
            pos: 0,
            ctx,
        })
    }

    /// Runs the tokens through the model at the next positions; returns the logits of the last.
    pub fn step(&mut self, tokens: &[i32]) -> Result<Vec<f32>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Usage(
                "a step needs at least one token".into(),
            ));
        }
        let vocab = self.art.header.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(RuntimeError::TokenId {
                id: bad as i64,
                vocab,
            });
        }
        if self.pos + tokens.len() > self.ctx {
            return Err(RuntimeError::Context {
                need: self.pos + tokens.len(),
                ctx: self.ctx,
                max: self.art.header.max_positions,
            });
        }
        let positions: Vec<i32> = (self.pos..self.pos + tokens.len())
            .map(|p| p as i32)
            .collect();
        let out = match self.backend {
            Backend::Interp => interp::run(
                &self.art.graph,
                StepInput {
                    tokens,
                    positions: &positions,
                },
                self.art,
                &mut self.cache,
            )?,
        };
        self.pos += tokens.len();
        let logits = out
            .get("logits")
            .ok_or_else(|| RuntimeError::Usage("the graph has no logits output".into()))?;
        Ok(logits.data.clone())
    }
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

/// Prefills `prompt` and generates up to `n` tokens, calling `on_token` for each.
pub fn generate(
    session: &mut Session<'_>,
    prompt: &[i32],
    n: usize,
    sampler: &mut Sampler,
    stop: &[i32],
    mut on_token: impl FnMut(i32),
) -> Result<Generation, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Usage("the prompt is empty".into()));
    }
    let need = session.pos + prompt.len() + n.saturating_sub(1);
    if need > session.ctx {
        return Err(RuntimeError::Context {
            need,
            ctx: session.ctx,
            max: session.art.header.max_positions,
        });
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
        on_token(tok);
        if stop.contains(&tok) || i + 1 == n {
            break;
        }
        logits = session.step(&[tok])?;
        g.decode_steps += 1;
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}
