//! Perplexity with llama.cpp's method (`llama-perplexity`'s default mode), so the numbers can
//! be compared with it:
//!
//! - the text is tokenized once; when the tokenizer adds a BOS token, the sequence starts with
//!   it (see [`crate::text::Text::bos_added`]);
//! - it is cut into `count = tokens / n_ctx` non-overlapping chunks of `n_ctx` tokens (the
//!   rest is dropped); each chunk runs from an empty state at positions `0..n_ctx`, with its
//!   first token replaced by BOS when the tokenizer adds one;
//! - only the second half of each chunk is scored: with `first = n_ctx / 2`, the logits at
//!   positions `first ..= n_ctx - 2` predict tokens `first + 1 ..= n_ctx - 1`, so each chunk
//!   scores `n_ctx - first - 1` tokens, every one with at least `first` tokens of context;
//! - the estimate after each chunk is `exp(mean NLL)` over all tokens scored so far, and its
//!   uncertainty is the standard error of the mean NLL carried through the exponential:
//!   `ppl · sqrt(var / (count - 1))`, with `var = mean(NLL²) - mean(NLL)²`.

use rayon::prelude::*;

use crate::error::RuntimeError;
use crate::session::{Backend, Engine, Session};

/// Running sums of per-token negative log-likelihoods (natural log).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Nll {
    pub sum: f64,
    pub sum_sq: f64,
    /// Tokens scored.
    pub count: usize,
}

impl Nll {
    pub fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    /// `exp(mean NLL)`; NaN before any token is scored.
    pub fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    /// The standard error of the perplexity, llama.cpp's formula: `ppl · sqrt(v / (count-1))`
    /// where `v = sum_sq/count - (sum/count)²` is the (biased) variance of the per-token NLL.
    /// 0 when there is no spread to measure (fewer than two tokens, or `v <= 0` by rounding).
    pub fn ppl_stderr(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum_sq / n - mean * mean;
        if var > 0.0 {
            (var / (n - 1.0)).sqrt() * self.ppl()
        } else {
            0.0
        }
    }
}

/// `-log softmax(logits)[target]`: the max is subtracted first, the sum of exponentials is
/// accumulated in f64.
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    sum.ln() - (logits[target] - max) as f64
}

/// How a text of `n_tokens` tokens is cut for a context of `n_ctx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunks {
    pub n_ctx: usize,
    /// Number of chunks: `n_tokens / n_ctx`.
    pub count: usize,
    /// The first position whose logits are scored: `n_ctx / 2`.
    pub first: usize,
}

/// The smallest context that scores anything: with `n_ctx = 3`, position 1 predicts token 2.
pub const MIN_CTX: usize = 3;

impl Chunks {
    /// The plan for `n_tokens` tokens; at least two chunks, as llama.cpp requires
    /// (`tokens >= 2 · n_ctx`), and a context that scores at least one token per chunk.
    pub fn new(n_tokens: usize, n_ctx: usize) -> Result<Chunks, RuntimeError> {
        if n_ctx < MIN_CTX {
            return Err(RuntimeError::Usage(format!(
                "-c {n_ctx} is too small: perplexity scores positions n_ctx/2+1 .. n_ctx-1 of each chunk, \
                 so -c must be at least {MIN_CTX}"
            )));
        }
        if n_tokens < n_ctx.saturating_mul(2) {
            return Err(RuntimeError::Usage(format!(
                "the text has {n_tokens} tokens; perplexity with -c {n_ctx} needs at least {} (two chunks)",
                2 * n_ctx
            )));
        }
        Ok(Chunks { n_ctx, count: n_tokens / n_ctx, first: n_ctx / 2 })
    }

    /// Tokens scored per chunk.
    pub fn scored_per_chunk(&self) -> usize {
        self.n_ctx - self.first - 1
    }
}

/// Runs perplexity over `tokens` (already tokenized, BOS included when the tokenizer adds
/// one) with chunks of `n_ctx` tokens on `backend`. `bos`: the token that replaces the first
/// of every chunk (llama.cpp does this when the vocabulary adds BOS). `on_chunk(i, sums)` is
/// called after chunk `i` (0-based) with the sums so far. Returns the final sums.
pub fn perplexity(
    engine: &Engine,
    backend: Backend,
    tokens: &[i32],
    n_ctx: usize,
    bos: Option<i32>,
    mut on_chunk: impl FnMut(usize, &Nll),
) -> Result<Nll, RuntimeError> {
    let max = engine.art.header.max_positions;
    if n_ctx > max {
        return Err(RuntimeError::Usage(format!(
            "-c {n_ctx} is more than the {max} positions of this model's context"
        )));
    }
    let plan = Chunks::new(tokens.len(), n_ctx)?;
    let mut session = Session::new_all_logits(engine, backend, Some(n_ctx))?;
    let mut total = Nll::default();
    let mut chunk = vec![0i32; n_ctx];
    for i in 0..plan.count {
        let start = i * n_ctx;
        chunk.copy_from_slice(&tokens[start..start + n_ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.truncate(0);
        let targets = &tokens[start..start + n_ctx];
        session.step_rows(&chunk, |row0, width, logits| {
            // rows row0.. of this step that are scored: first ..= n_ctx - 2
            let rows = logits.len() / width;
            let (lo, hi) = (plan.first.max(row0), (n_ctx - 1).min(row0 + rows));
            if lo >= hi {
                return Ok(());
            }
            if let Some(&bad) = targets[lo + 1..hi + 1].iter().find(|&&t| t < 0 || t as usize >= width) {
                return Err(RuntimeError::TokenId { id: bad as i64, vocab: width });
            }
            let nll: Vec<f64> = engine.pool.install(|| {
                (lo..hi)
                    .into_par_iter()
                    .map(|r| token_nll(&logits[(r - row0) * width..(r - row0 + 1) * width], targets[r + 1] as usize))
                    .collect()
            });
            // summed in token order: the result does not depend on the thread count
            nll.into_iter().for_each(|v| total.add(v));
            Ok(())
        })?;
        on_chunk(i, &total);
    }
    Ok(total)
}
