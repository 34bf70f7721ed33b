//! `llmc run`: one-shot generation from token ids or text (streamed as it is produced), and
//! interactive chat on a terminal.

use std::io::{BufRead, IsTerminal, Read};

use anyhow::{bail, Context, Result};
use llmc_runtime::text::{render_chat, Message, StreamDecoder, Text};
use llmc_runtime::{generate, Backend, Engine, Generation, Sampler, SamplerConfig, Session};
use serde_json::json;

use crate::out::{self, outln, StdoutError};
use crate::RunArgs;

pub fn run(a: RunArgs) -> Result<()> {
    let backend = match &a.backend {
        Some(b) => Backend::parse(b)?,
        None => Backend::fastest(),
    };
    // the tokenizer loads while the kernels compile
    let (engine, text) = Engine::open_with(
        &crate::gguf_cache::artifact_for(&a.artifact)?,
        crate::clamp_threads(a.threads),
        Text::from_artifact,
    )?;
    let ctx = context_size(&a, &engine);
    // A one-shot run sizes its state (the KV cache above all) from what it needs.
    let one_shot = |prompt_len: usize| ctx.min(prompt_len.saturating_add(a.n_predict).max(1));
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
        ..SamplerConfig::default()
    });
    if !a.ids.is_empty() {
        let mut session = Session::new(&engine, backend, Some(one_shot(a.ids.len())))?;
        return run_ids(&a, &engine, text.ok(), &mut session, &mut sampler);
    }
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None if std::io::stdin().is_terminal() && !a.json => {
            let mut session = Session::new(&engine, backend, Some(ctx))?;
            return chat_loop(&a, &engine, &text?, &mut session, &mut sampler);
        }
        None => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes).context("reading the prompt from stdin")?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the prompt on stdin is not valid UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                )
            })?
        }
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let text = text?;
    let ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message { role: "system".into(), content: s.clone() });
        }
        messages.push(Message { role: "user".into(), content: prompt });
        text.encode(&chat_prompt(&engine, &messages)?, false)?
    } else {
        text.encode(&prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let stop_ids = if a.ignore_eos { Vec::new() } else { eos_ids(&engine, &text) };
    let mut session = Session::new(&engine, backend, Some(one_shot(ids.len())))?;
    let (g, out) = generate_text(&a, &mut session, &mut sampler, &text, &ids, &stop_ids, !a.json)?;
    if a.json {
        print_json(&a, &engine, &ids, &g, Some(&out))?;
    } else {
        outln!()?;
        print_timings(ids.len(), &g);
    }
    Ok(())
}

/// The context to run with: `-c` or the model's default, capped at the trained context (with a
/// warning) unless `--ctx-beyond-training`. Learned-position models cannot go past it at all
/// (`Session::new` refuses).
fn context_size(a: &RunArgs, engine: &Engine) -> usize {
    let max = engine.art.header.max_positions;
    match a.ctx_size {
        None => max.min(4096),
        Some(c) if c > max && engine.art.header.hard_context_limit && !a.ctx_beyond_training => {
            eprintln!("warning: -c {c} is more than the {max} positions this model has; using {max}");
            max
        }
        Some(c) if c > max && !a.ctx_beyond_training => {
            eprintln!(
                "warning: -c {c} is more than the {max} tokens the model was trained for; using {max} \
                 (--ctx-beyond-training to allow it)"
            );
            max
        }
        Some(c) => c,
    }
}

/// `--ids`: token ids in, exactly -n tokens out (no EOS stop, like the reference fixtures).
fn run_ids(
    a: &RunArgs,
    engine: &Engine,
    text: Option<Text>,
    session: &mut Session<'_>,
    sampler: &mut Sampler,
) -> Result<()> {
    let vocab = engine.art.header.vocab_size;
    let prompt: Vec<i32> = a
        .ids
        .iter()
        .map(|&id| {
            i32::try_from(id)
                .ok()
                .filter(|&t| t >= 0 && (t as usize) < vocab)
                .with_context(|| format!("--ids: token id {id} is outside the vocabulary of {vocab}"))
        })
        .collect::<Result<_>>()?;
    let json_mode = a.json;
    let mut write_err = None;
    let g = generate(session, &prompt, a.n_predict, sampler, &[], |tok| {
        if !json_mode {
            if let Err(e) = out::out!("{tok} ") {
                write_err = Some(e); // stop generating: nobody reads the rest
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if json_mode {
        // Decode the ids as text too when the artifact has a tokenizer.
        let text = text.and_then(|t| t.decode(&g.generated).ok());
        print_json(a, engine, &prompt, &g, text.as_deref())?;
    } else {
        outln!()?;
        print_timings(prompt.len(), &g);
    }
    Ok(())
}

/// End-of-sequence ids: the artifact's, or the tokenizer's `eos_token`.
pub(crate) fn eos_ids(engine: &Engine, text: &Text) -> Vec<i32> {
    let t = &engine.art.header.text;
    let mut ids: Vec<i32> = t.eos_token_ids.iter().filter_map(|&i| i32::try_from(i).ok()).collect();
    if ids.is_empty() {
        ids.extend(t.eos_token.as_deref().and_then(|s| text.token_id(s)));
    }
    ids
}

fn chat_prompt(engine: &Engine, messages: &[Message]) -> Result<String> {
    let t = &engine.art.header.text;
    let template = t.chat_template.as_deref().context("this model has no chat template")?;
    Ok(render_chat(template, messages, t.bos_token.as_deref(), t.eos_token.as_deref())?)
}

/// Generates from `ids`, streaming text pieces to stdout when `stream`; stops at EOS or when
/// a --stop string appears (the text is cut before it). Returns the generation and its text.
fn generate_text(
    a: &RunArgs,
    session: &mut Session<'_>,
    sampler: &mut Sampler,
    text: &Text,
    ids: &[i32],
    stop_ids: &[i32],
    stream: bool,
) -> Result<(Generation, String)> {
    let mut dec = StreamDecoder::new(text);
    let mut out = String::new();
    let mut write_err: Option<StdoutError> = None;
    let g = generate(session, ids, a.n_predict, sampler, stop_ids, |tok| {
        let piece = dec.push(tok)?;
        let before = out.len();
        out.push_str(&piece);
        // A stop string may straddle pieces: search the tail that could contain it.
        let hit = a
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let from = before.saturating_sub(s.len());
                let from = (from..=before).find(|&i| out.is_char_boundary(i)).unwrap_or(before);
                out[from..].find(s.as_str()).map(|i| from + i)
            })
            .min();
        let printable_end = hit.unwrap_or(out.len());
        if stream && printable_end > before {
            if let Err(e) = out::write_bytes(&out.as_bytes()[before..printable_end]) {
                write_err = Some(e); // stop generating: nobody reads the rest
                return Ok(false);
            }
        }
        if let Some(cut) = hit {
            out.truncate(cut);
            return Ok(false);
        }
        Ok(true)
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    Ok((g, out))
}

fn print_json(
    a: &RunArgs,
    engine: &Engine,
    prompt: &[i32],
    g: &Generation,
    text: Option<&str>,
) -> Result<(), StdoutError> {
    let mut obj = json!({
        "prompt_ids": prompt,
        "generated_ids": g.generated,
        "timings": {
            "load_s": engine.load_s,
            "jit_s": engine.jit_s,
            "prefill_s": g.prefill_s,
            "decode_s": g.decode_s,
            "prefill_tok_s": prompt.len() as f64 / g.prefill_s.max(1e-9),
            "decode_tok_s": g.decode_steps as f64 / g.decode_s.max(1e-9),
            "prompt_tokens": prompt.len(),
            "decode_steps": g.decode_steps,
        },
    });
    if let Some(t) = text {
        obj["text"] = json!(t);
    }
    if a.logits {
        obj["logits_last"] = json!(g.logits_last);
    }
    outln!("{obj}")
}

/// llama.cpp-style timings on stderr.
fn print_timings(prompt_tokens: usize, g: &Generation) {
    eprintln!(
        "prompt eval: {} tokens, {:.1} ms, {:.1} tok/s | generation: {} tokens, {:.1} ms, {:.1} tok/s",
        prompt_tokens,
        g.prefill_s * 1e3,
        prompt_tokens as f64 / g.prefill_s.max(1e-9),
        g.generated.len(),
        g.decode_s * 1e3,
        g.decode_steps as f64 / g.decode_s.max(1e-9)
    );
}

/// Interactive chat: the history stays in the context; the cached prefix the new prompt shares
/// with what the model already saw is reused. `/exit` (or end of input) quits.
fn chat_loop(
    a: &RunArgs,
    engine: &Engine,
    text: &Text,
    session: &mut Session<'_>,
    sampler: &mut Sampler,
) -> Result<()> {
    chat_prompt(engine, &[])?; // fail early without a template
    let stop_ids = if a.ignore_eos { Vec::new() } else { eos_ids(engine, &text) };
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message { role: "system".into(), content: s.clone() });
    }
    let mut seen: Vec<i32> = Vec::new(); // tokens whose keys/values are in the cache
    eprintln!("chat with {} — /exit to quit", engine.art.path.display());
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                eprintln!("error: input is not valid UTF-8");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "/exit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        messages.push(Message { role: "user".into(), content: line.to_string() });
        let ids = text.encode(&chat_prompt(engine, &messages)?, false)?;
        let shared = seen.iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        let shared = session.truncate(shared);
        seen.truncate(shared);
        let room = session.ctx.saturating_sub(ids.len());
        if room == 0 {
            eprintln!("error: the conversation no longer fits the context of {} tokens; starting over", session.ctx);
            messages.clear();
            session.truncate(0);
            seen.clear();
            continue;
        }
        let mut turn = RunArgs { n_predict: a.n_predict.min(room), ..a.clone() };
        turn.stop = a.stop.clone();
        let (g, reply) = generate_text(&turn, session, sampler, &text, &ids[shared..], &stop_ids, true)?;
        outln!()?;
        seen.extend_from_slice(&ids[shared..]);
        seen.extend(g.generated.iter().take(g.decode_steps));
        messages.push(Message { role: "assistant".into(), content: reply });
    }
    Ok(())
}
