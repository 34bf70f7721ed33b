//! `llmc perplexity`: llama-perplexity's measurement (see `llmc_runtime::perplexity`) on a
//! text file tokenized with the artifact's tokenizer.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llmc_runtime::perplexity::{perplexity, Chunks, MIN_CTX};
use llmc_runtime::text::Text;
use llmc_runtime::{Backend, Engine};
use serde_json::json;

use crate::out::outln;
use crate::PerplexityArgs;

pub fn run(a: PerplexityArgs) -> Result<()> {
    let backend = match &a.backend {
        Some(b) => Backend::parse(b)?,
        None => Backend::fastest(),
    };
    if a.ctx_size < MIN_CTX as i64 {
        bail!(
            "-c {} is too small: perplexity scores positions n_ctx/2+1 .. n_ctx-1 of each chunk, so -c must be at least {MIN_CTX}",
            a.ctx_size
        );
    }
    let n_ctx = usize::try_from(a.ctx_size)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (invalid byte at offset {})",
            a.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let engine = Engine::open(&crate::gguf_cache::artifact_for(&a.artifact)?, crate::clamp_threads(a.threads))?;
    if engine.art.tokenizer_json().is_none() {
        bail!(
            "{} has no tokenizer (its model folder had no tokenizer.json); perplexity needs one to tokenize the text",
            a.artifact.display()
        );
    }
    let max = engine.art.header.max_positions;
    if n_ctx > max {
        bail!("-c {n_ctx} is more than the {max} positions of this model's context");
    }
    let tok = Text::from_artifact(&engine.art)?;
    let t0 = Instant::now();
    let bos = tok.bos_added()?;
    let tokens: Vec<i32> = bos.into_iter().chain(tok.encode_document(&text)?).collect();
    let tokenize_s = t0.elapsed().as_secs_f64();
    let plan = Chunks::new(tokens.len(), n_ctx)
        .with_context(|| format!("{} is too short for perplexity", a.file.display()))?;
    eprintln!(
        "perplexity: {} tokens ({}; tokenized in {:.0} ms), {} chunks of {n_ctx}, scoring the last {} tokens of each",
        tokens.len(),
        bos.map_or("no BOS".to_string(), |b| format!("BOS {b} first and at the start of every chunk")),
        tokenize_s * 1e3,
        plan.count,
        plan.scored_per_chunk()
    );
    let t1 = Instant::now();
    let nll = perplexity(&engine, backend, &tokens, n_ctx, bos, |i, sums| {
        // llama.cpp's progress line: [chunk]estimate, ...
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "[{}]{:.4},", i + 1, sums.ppl());
        let _ = err.flush();
    })?;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!();
    eprintln!(
        "perplexity: {:.2} s, {:.1} tokens/s ({} threads, {})",
        secs,
        (plan.count * n_ctx) as f64 / secs,
        engine.threads(),
        if backend == Backend::Jit { "jit" } else { "interp" }
    );
    let (ppl, err) = (nll.ppl(), nll.ppl_stderr());
    if a.json {
        // `tokens`: the tokens scored (llama.cpp's `count`), chunks × (n_ctx - n_ctx/2 - 1).
        let o = json!({ "ppl": ppl, "ppl_stderr": err, "chunks": plan.count, "tokens": nll.count });
        outln!("{o}")?;
    } else {
        outln!("Final estimate: PPL = {ppl:.4} +/- {err:.5}")?;
    }
    Ok(())
}
