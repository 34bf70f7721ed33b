//! `GET /metrics`: the server's counters in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A latency histogram (cumulative on output, as Prometheus wants).
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {acc}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub cancelled: AtomicU64,
    pub timed_out: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub busy_slots: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Metrics {
    pub fn render(&self, slots: usize) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        one("llmc_requests_total", "counter", "Requests that reached a slot.", get(&self.requests));
        one("llmc_requests_rejected_total", "counter", "Requests refused with 429 (queue full).", get(&self.rejected));
        one(
            "llmc_requests_cancelled_total",
            "counter",
            "Requests whose client left before the end.",
            get(&self.cancelled),
        );
        one(
            "llmc_requests_timed_out_total",
            "counter",
            "Requests stopped by the per-request timeout.",
            get(&self.timed_out),
        );
        one("llmc_prompt_tokens_total", "counter", "Prompt tokens of the requests.", get(&self.prompt_tokens));
        one(
            "llmc_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens found in a slot's cache (not run again).",
            get(&self.cached_prompt_tokens),
        );
        one("llmc_generated_tokens_total", "counter", "Tokens generated.", get(&self.generated_tokens));
        one("llmc_queue_depth", "gauge", "Requests waiting for a slot.", get(&self.queue_depth));
        one("llmc_busy_slots", "gauge", "Slots running a request.", get(&self.busy_slots));
        one("llmc_slots", "gauge", "Slots (--parallel).", slots as u64);
        self.ttft.render(&mut out, "llmc_time_to_first_token_seconds", "From request to its first token.");
        self.itl.render(&mut out, "llmc_inter_token_latency_seconds", "Between consecutive tokens of a request.");
        out
    }
}
