//! The engine thread of `llmc serve`: it owns the model and one session (KV cache) per slot,
//! takes jobs from the bounded queue into free slots between steps, and advances the busy
//! slots by one shared step per round (each weight read once for all of them,
//! `llmc_runtime::Batcher`): a token of every decoding slot and the next prompt chunk (at most
//! `PREFILL_CHUNK` tokens) of the slots still prefilling, as rows of several sequences.
//! Requests join and leave between steps, and a long prompt does not stall the others. A job
//! whose client went away is dropped at the next round; its slot is free again.
//!
//! Prompt cache: a new job takes the free slot whose cached tokens share the longest prefix
//! with its prompt and keeps that prefix (`Session::truncate`), so a chat that resends its
//! history only prefills the new turn.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use llmc_runtime::text::{StreamDecoder, Text};
use llmc_runtime::{Backend, Batcher, Engine, Sampler, SamplerConfig, Session};
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// Most prompt tokens one slot runs per round.
pub const PREFILL_CHUNK: usize = 256;

/// Why a generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine tells a request.
#[derive(Debug)]
pub enum Event {
    /// Text to append (UTF-8-safe: a character split over tokens comes whole, with the token
    /// that completes it; text that might begin a stop string is held back until it cannot).
    Text {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    Error {
        status: u16,
        message: String,
    },
}

/// One request, as the HTTP side hands it over.
pub struct Job {
    pub prompt: Vec<i32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and its `n` best alternatives.
    pub logprobs: Option<usize>,
    pub deadline: Instant,
    pub submitted: Instant,
    pub events: UnboundedSender<Event>,
}

struct Active {
    job: Job,
    /// Tokens to run through the model before the next sample.
    pending: VecDeque<i32>,
    sampler: Sampler,
    history: Vec<i32>,
    generated: usize,
    cached_tokens: usize,
    out: String,
    sent: usize,
    last_token_at: Option<Instant>,
}

struct Slot<'e> {
    session: Session<'e>,
    /// The tokens whose keys and values the session holds, in order.
    cached: Vec<i32>,
    active: Option<Active>,
    text: &'e Text,
    decoder: Option<StreamDecoder<'e>>,
}

/// Runs the engine until `shutdown` is set (or the queue closes) and every job is done.
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &Engine,
    text: Arc<Text>,
    eos: Vec<i32>,
    slots: usize,
    slot_ctx: usize,
    rx: Receiver<Job>,
    metrics: Arc<Metrics>,
    shutdown: &AtomicBool,
    ready: impl FnOnce(),
) -> Result<(), llmc_runtime::RuntimeError> {
    let text: &Text = &text;
    let mut slots: Vec<Slot<'_>> = (0..slots)
        .map(|_| {
            Ok(Slot {
                session: Session::new(engine, Backend::Jit, Some(slot_ctx))?,
                cached: Vec::new(),
                active: None,
                text,
                decoder: None,
            })
        })
        .collect::<Result<_, llmc_runtime::RuntimeError>>()?;
    // the busy slots share one batched step: a row per decoding slot and room for a prompt
    // chunk
    let mut batcher = if slots.len() > 1 {
        match Batcher::new(engine, slot_ctx, slots.len() + PREFILL_CHUNK) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("llmc serve: slots step one by one ({e})");
                None
            }
        }
    } else {
        None
    };
    ready();
    let mut open = true;
    loop {
        // take jobs into free slots (waiting for one when nothing runs)
        while open && slots.iter().any(|s| s.active.is_none()) {
            let busy = slots.iter().any(|s| s.active.is_some());
            let job = if busy {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) if !shutdown.load(Ordering::Relaxed) => continue,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            };
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            start(&mut slots, job, &metrics);
        }
        if !open && slots.iter().all(|s| s.active.is_none()) {
            return Ok(());
        }
        round_all(&mut slots, batcher.as_mut(), &eos, slot_ctx, &metrics);
        metrics.busy_slots.store(slots.iter().filter(|s| s.active.is_some()).count() as u64, Ordering::Relaxed);
    }
}

/// Length of the common prefix of two token lists.
fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Puts `job` into the free slot that has the longest prefix of its prompt cached.
fn start(slots: &mut [Slot<'_>], job: Job, metrics: &Metrics) {
    let Some(slot) =
        slots.iter_mut().filter(|s| s.active.is_none()).max_by_key(|s| common_prefix(&s.cached, &job.prompt))
    else {
        return;
    };
    // keep at least the last prompt token to run: its logits start the generation
    let keep = common_prefix(&slot.cached, &job.prompt).min(job.prompt.len().saturating_sub(1));
    let kept = slot.session.truncate(keep);
    slot.cached.truncate(kept);
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    metrics.prompt_tokens.fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    metrics.cached_prompt_tokens.fetch_add(kept as u64, Ordering::Relaxed);
    slot.decoder = Some(StreamDecoder::new(slot.text));
    slot.active = Some(Active {
        pending: job.prompt[kept..].iter().copied().collect(),
        sampler: Sampler::new(job.sampler.clone()),
        history: job.prompt.clone(),
        generated: 0,
        cached_tokens: kept,
        out: String::new(),
        sent: 0,
        last_token_at: None,
        job,
    });
}

/// One round: every busy slot advances. When several are busy they share one batched step
/// (rows of several sequences): each decoding slot's token, then each prefilling slot's next
/// prompt chunk (at most `PREFILL_CHUNK` tokens) while the step has rows left, so every weight
/// is read once for all of them; a slot left without rows waits for the next round. A single
/// busy slot, or a batch refused as a whole, steps alone.
fn round_all<'e>(
    slots: &mut [Slot<'e>],
    batcher: Option<&mut Batcher<'e>>,
    eos: &[i32],
    ctx: usize,
    metrics: &Metrics,
) {
    for slot in slots.iter_mut() {
        if let Some(a) = slot.active.as_ref() {
            if let Some(end) = gate(a, metrics) {
                end_job(slot, end);
            }
        }
    }
    let pending = |s: &Slot<'_>| s.active.as_ref().map_or(0, |a| a.pending.len());
    let busy: Vec<usize> = (0..slots.len()).filter(|&i| pending(&slots[i]) > 0).collect();
    if let (Some(b), true) = (batcher, busy.len() > 1) {
        // decoding slots first (one row each), then prompt chunks in the rows left
        let mut order: Vec<usize> = busy.iter().copied().filter(|&i| pending(&slots[i]) == 1).collect();
        order.extend(busy.iter().copied().filter(|&i| pending(&slots[i]) > 1));
        let mut rows_left = b.max_rows();
        let mut members: Vec<(usize, Vec<i32>)> = Vec::new();
        for i in order {
            let n = pending(&slots[i]).min(PREFILL_CHUNK).min(rows_left);
            if n == 0 {
                break;
            }
            rows_left -= n;
            let chunk = slots[i].active.as_ref().map_or_else(Vec::new, |a| a.pending.iter().take(n).copied().collect());
            members.push((i, chunk));
        }
        let chunks: Vec<&[i32]> = members.iter().map(|(_, c)| c.as_slice()).collect();
        // the members' sessions, in member order (each slot at most once)
        let mut by_slot: Vec<Option<&mut Session<'e>>> = slots.iter_mut().map(|s| Some(&mut s.session)).collect();
        let mut sessions: Vec<&mut Session<'e>> = members.iter().filter_map(|(i, _)| by_slot[*i].take()).collect();
        let result = b.step_rows(&mut sessions, &chunks);
        drop(sessions);
        drop(by_slot);
        // the batch is refused as a whole (nothing ran): the slots step one by one below
        if let Ok(logits) = result {
            for ((i, chunk), l) in members.iter().zip(logits) {
                let slot = &mut slots[*i];
                let done = match slot.active.as_mut() {
                    Some(a) => {
                        a.pending.drain(..chunk.len());
                        a.pending.is_empty()
                    }
                    None => false,
                };
                slot.cached.extend_from_slice(chunk);
                if done {
                    if let Some(end) = after_logits(slot, &l, eos, ctx, metrics) {
                        end_job(slot, end);
                    }
                }
            }
            return;
        }
    }
    for slot in slots.iter_mut() {
        if slot.active.is_none() {
            continue;
        }
        if let Some(end) = step_one(slot, eos, ctx, metrics) {
            end_job(slot, end);
        }
    }
}

/// Ends the slot's job; `Some(finish)` reports `Done` with the token counts.
fn end_job(slot: &mut Slot<'_>, end: Option<Finish>) {
    slot.decoder = None;
    if let (Some(a), Some(finish)) = (slot.active.take(), end) {
        let _ = a.job.events.send(Event::Done {
            finish,
            prompt_tokens: a.job.prompt.len(),
            completion_tokens: a.generated,
            cached_tokens: a.cached_tokens,
        });
    }
}

/// Sends what is left of the text.
fn flush(a: &mut Active) {
    if a.sent < a.out.len() {
        let text = a.out[a.sent..].to_string();
        a.sent = a.out.len();
        let _ = a.job.events.send(Event::Text { text, logprob: None });
    }
}

/// Whether a job must end before its next step: its client left, or its time is up.
fn gate(a: &Active, metrics: &Metrics) -> Option<Option<Finish>> {
    if a.job.events.is_closed() {
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return Some(None);
    }
    if Instant::now() > a.job.deadline {
        let _ = a.job.events.send(Event::Error { status: 408, message: "the request timed out".into() });
        metrics.timed_out.fetch_add(1, Ordering::Relaxed);
        return Some(None);
    }
    None
}

/// Runs the slot's pending tokens (at most `PREFILL_CHUNK`) alone, then samples if they are
/// done. `Some(end)` when the job ended (see `end_job`).
fn step_one(slot: &mut Slot<'_>, eos: &[i32], ctx: usize, metrics: &Metrics) -> Option<Option<Finish>> {
    let a = slot.active.as_mut()?;
    let n = a.pending.len().min(PREFILL_CHUNK);
    let chunk: Vec<i32> = a.pending.drain(..n).collect();
    let more = !a.pending.is_empty();
    let logits = match slot.session.step(&chunk) {
        Ok(l) => l,
        Err(e) => {
            // the cache may hold part of the chunk: forget what it holds
            slot.session.truncate(0);
            slot.cached.clear();
            let _ = a.job.events.send(Event::Error { status: 500, message: e.to_string() });
            return Some(None);
        }
    };
    slot.cached.extend_from_slice(&chunk);
    if more {
        return None;
    }
    after_logits(slot, &logits, eos, ctx, metrics)
}

/// Samples the next token from the logits of the slot's last step, sends its text, and
/// queues it as the next step's input unless the job ends here.
fn after_logits(
    slot: &mut Slot<'_>,
    logits: &[f32],
    eos: &[i32],
    ctx: usize,
    metrics: &Metrics,
) -> Option<Option<Finish>> {
    let a = slot.active.as_mut()?;
    let tok = a.sampler.sample(logits, &a.history);
    let now = Instant::now();
    match a.last_token_at {
        None => metrics.ttft.observe(now.duration_since(a.job.submitted).as_secs_f64()),
        Some(t) => metrics.itl.observe(now.duration_since(t).as_secs_f64()),
    }
    a.last_token_at = Some(now);
    a.generated += 1;
    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    a.history.push(tok);
    if eos.contains(&tok) {
        flush(a);
        return Some(Some(Finish::Stop));
    }
    let logprob = a.job.logprobs.map(|top| logprob_of(slot.text, logits, tok, top));
    let piece = match slot.decoder.as_mut().map(|d| d.push(tok)) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            let _ = a.job.events.send(Event::Error { status: 500, message: e.to_string() });
            return Some(None);
        }
        None => String::new(),
    };
    let before = a.out.len();
    a.out.push_str(&piece);
    let hit = stop_hit(&a.out, before, &a.job.stop);
    let send_to = match hit {
        Some(cut) => cut,
        None => a.out.len() - held_back(&a.out, &a.job.stop),
    }
    .max(a.sent);
    // a token's log-probability goes with the text it ends, or alone when it ends none
    if send_to > a.sent || logprob.is_some() {
        let text = a.out[a.sent..send_to].to_string();
        a.sent = send_to;
        if a.job.events.send(Event::Text { text, logprob }).is_err() {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return Some(None);
        }
    }
    if hit.is_some() {
        return Some(Some(Finish::Stop));
    }
    // the next step writes position `cached.len()`; the context holds `ctx` positions
    if a.generated >= a.job.max_tokens || slot.cached.len() >= ctx {
        flush(a);
        return Some(Some(Finish::Length));
    }
    a.pending.push_back(tok);
    None
}

/// The earliest occurrence of a stop string that ends after byte `before` of `out`.
fn stop_hit(out: &str, before: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let from = before.saturating_sub(s.len());
            let from = (from..=before).find(|&i| out.is_char_boundary(i)).unwrap_or(before);
            out[from..].find(s.as_str()).map(|i| from + i)
        })
        .min()
}

/// Bytes at the end of `out` that could be the start of a stop string (held back from the
/// stream until the next tokens show whether the stop string completes).
fn held_back(out: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len().min(out.len() + 1)).rev() {
            if k <= hold {
                break;
            }
            if s.is_char_boundary(k) && out.ends_with(&s[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

/// `log softmax(logits)[tok]` and the `top` most likely tokens' log-probabilities.
fn logprob_of(text: &Text, logits: &[f32], tok: i32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let piece = |i: i32| text.decode(&[i]).unwrap_or_default();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(idx.len());
    if top > 0 {
        idx.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(top);
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    } else {
        idx.clear();
    }
    TokenLogprob {
        token: piece(tok),
        logprob: usize::try_from(tok).ok().filter(|&i| i < logits.len()).map_or(f32::NEG_INFINITY, lp),
        top: idx.into_iter().map(|i| (piece(i as i32), lp(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_pieces_and_held_back() {
        let stops = vec!["\n\nUser".to_string()];
        assert_eq!(stop_hit("Hi\n\nUs", 3, &stops), None);
        assert_eq!(held_back("Hi\n\nUs", &stops), 4);
        assert_eq!(stop_hit("Hi\n\nUser:", 6, &stops), Some(2));
        assert_eq!(held_back("Hello", &stops), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
    }
}
