//! The corrupted-artifact experiment: an artifact compiled from a fixture, then edited the way
//! an attacker (or a bad disk) would: every integer of the JSON header (the stored program's
//! kernel specs, calls, buffers, the tensor table, vocab and context fields) changed to several
//! values, integers of the IR text changed with the stored program re-lowered to match (so the
//! edit reaches the verifier, not just the program comparison), and random byte flips in the
//! header. Every edited file is opened and, when it opens, run on both backends. Nothing may
//! crash, panic or hang: an edit is either refused with an error or runs (checked in-process;
//! a signal would kill the test, a panic is caught and reported, a watchdog aborts on a hang).
//! A sample also goes through the binary, which must print one `error:` line and exit 1.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, llmc, stderr};
use llmc_compiler::artifact::{ArtifactBytes, Header};
use llmc_runtime::session::{Backend, Engine, Session};
use serde_json::Value;

/// Deterministic pseudo-random numbers (xorshift64*), so a failure names a reproducible case.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// JSON paths of every integer in `v`.
fn int_paths(v: &Value, path: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    match v {
        Value::Number(n) if n.is_u64() || n.is_i64() => out.push(path.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(PathStep::Index(i));
                int_paths(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(PathStep::Key(k.clone()));
                int_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'v>(v: &'v mut Value, path: &[PathStep]) -> &'v mut Value {
    path.iter().fold(v, |v, s| match s {
        PathStep::Key(k) => &mut v[k.as_str()],
        PathStep::Index(i) => &mut v[*i],
    })
}

/// What happened to one edited artifact.
#[derive(Debug, Default)]
struct Tally {
    refused: usize,
    ran: usize,
    step_errors: usize,
}

/// Opens the artifact and, if it opens, runs a prefill and a decode step on both backends.
/// Panics are caught and returned as errors naming the case.
fn try_artifact(path: &Path, tally: &mut Tally) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| -> (bool, usize) {
        let Ok(engine) = Engine::open(path, 1) else { return (false, 0) };
        let mut errors = 0;
        for backend in [Backend::Jit, Backend::Interp] {
            let Ok(mut s) = Session::new(&engine, backend, Some(16)) else {
                errors += 1;
                continue;
            };
            errors += s.step(&[1, 2, 3]).is_err() as usize;
            errors += s.step(&[4]).is_err() as usize;
        }
        (true, errors)
    });
    match outcome {
        Ok((false, _)) => tally.refused += 1,
        Ok((true, e)) => {
            tally.ran += 1;
            tally.step_errors += e;
        }
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            return Err(format!("panicked: {}", msg.unwrap_or_default()));
        }
    }
    Ok(())
}

/// Aborts the whole test process if no case finishes for `limit` (a hang is a failure too).
fn watchdog(limit: Duration, current: Arc<Mutex<String>>) -> Arc<AtomicU64> {
    let beat = Arc::new(AtomicU64::new(0));
    let b = beat.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut last = (0, Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = b.load(Ordering::Relaxed);
            if now == u64::MAX {
                return;
            }
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > limit {
                eprintln!(
                    "HANG after {:?}: case `{}` ran for more than {limit:?}",
                    t0.elapsed(),
                    current.lock().map(|c| c.clone()).unwrap_or_default()
                );
                std::process::abort();
            }
        }
    });
    beat
}

fn experiment(name: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("orig.llmc");
    let mut args = vec![
        "compile".to_string(),
        fixture(name).to_str().unwrap().to_string(),
        "-o".into(),
        art.to_str().unwrap().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = llmc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    let orig = ArtifactBytes::parse(&std::fs::read(&art).unwrap()).unwrap();
    let header: Value = serde_json::from_slice(orig.header_json()).unwrap();
    let edited = dir.path().join("edited.llmc");
    let current = Arc::new(Mutex::new(String::new()));
    let beat = watchdog(Duration::from_secs(60), current.clone());
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let mut cases = 0u64;
    let mut check = |label: String, bytes: Vec<u8>, tally: &mut Tally| {
        *current.lock().unwrap() = label.clone();
        std::fs::write(&edited, bytes).unwrap();
        if let Err(e) = try_artifact(&edited, tally) {
            failures.push(format!("{label}: {e}"));
        }
        cases += 1;
        beat.store(cases, Ordering::Relaxed);
    };

    // 1. Every integer of the header, each set to several values.
    let mut paths = Vec::new();
    int_paths(&header, &mut Vec::new(), &mut paths);
    for path in &paths {
        let mut h = header.clone();
        let v = at(&mut h, path).as_i64().unwrap_or(0);
        for new in [v + 1, v.saturating_mul(9).saturating_add(7), 0, 1 << 31, -1, i64::MAX] {
            *at(&mut h, path) = new.into();
            let label = format!("header {path:?} {v} -> {new}");
            match orig.with_header(&serde_json::to_vec(&h).unwrap()) {
                Some(bytes) => check(label, bytes, &mut tally),
                None => tally.refused += 1, // the header grew past its reserved space
            }
        }
    }

    // 2. Integers of the IR text, with the stored program re-lowered from the edited IR
    // whenever it lowers (a consistent forgery), else left as it was.
    let ir = std::str::from_utf8(orig.ir_text()).unwrap().to_string();
    let numbers: Vec<(usize, usize)> = {
        let b = ir.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'.') {
                let s = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                // skip decimals of floats (`1e-5`, `0.5`): only plain integers
                if i < b.len() && (b[i] == b'.' || b[i] == b'e') {
                    continue;
                }
                out.push((s, i));
            }
            i += 1;
        }
        out
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &(s, e) in &numbers {
        let v: u64 = ir[s..e].parse().unwrap_or(0);
        let new = match rng.below(4) {
            0 => v + 1,
            1 => v.saturating_sub(1),
            2 => v * 2 + rng.below(3) as u64,
            _ => rng.below(70) as u64,
        };
        let text = format!("{}{new}{}", &ir[..s], &ir[e..]);
        let mut h: Header = serde_json::from_slice(orig.header_json()).unwrap();
        let mut forged = false;
        if let Ok(g) = llmc_ir::text::parse(&text) {
            if let Ok(p) = llmc_compiler::lower::lower(&g) {
                h.program = p;
                forged = true;
            }
        }
        let label = format!("IR bytes {s}..{e} `{}` -> {new} (program re-lowered: {forged})", &ir[s..e]);
        match orig.with_ir(&text, &serde_json::to_vec(&h).unwrap()) {
            Some(bytes) => check(label, bytes, &mut tally),
            None => tally.refused += 1,
        }
    }

    // 3. Random single-byte flips in the header JSON.
    for i in 0..150 {
        let mut json = orig.header_json().to_vec();
        let at = rng.below(json.len());
        json[at] ^= 1 << rng.below(8);
        let label = format!("header flip {i} at byte {at}");
        match orig.with_header(&json) {
            Some(bytes) => check(label, bytes, &mut tally),
            None => tally.refused += 1,
        }
    }
    beat.store(u64::MAX, Ordering::Relaxed);
    eprintln!(
        "{name}: {cases} edited artifacts ({} header integers, {} IR integers): {} refused at open, {} ran ({} step errors)",
        paths.len(),
        numbers.len(),
        tally.refused,
        tally.ran,
        tally.step_errors
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(tally.refused > 0 && tally.ran > 0, "the experiment must both refuse and run edits: {tally:?}");
}

#[test]
fn corrupted_llama_artifacts_never_crash() {
    experiment("llama", &[]);
}

#[test]
fn corrupted_quantized_artifacts_never_crash() {
    experiment("llama", &["--dtype", "q4_0"]);
}

#[test]
fn corrupted_gpt2_artifacts_never_crash() {
    experiment("gpt2", &["--dtype", "bf16"]);
}

#[test]
fn corrupted_mamba_moe_artifacts_never_crash() {
    experiment("granitemoehybrid", &["--dtype", "q8_0"]);
}

/// The examples of the issue, through the binary: one `error:` line, exit 1.
#[test]
fn lying_headers_are_one_error_line_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Box<dyn Fn(&mut Value)>)> = vec![
        ("llama", Box::new(|h| h["program"]["calls"][1]["layer"] = 16.into())),
        ("llama", Box::new(|h| h["program"]["calls"][0]["kernel"] = 16.into())),
        ("llama", Box::new(|h| h["vocab_size"] = (1u64 << 31).into())),
        ("llama", Box::new(|h| h["program"]["arena_width"] = 16.into())),
        ("llama", Box::new(|h| h["rms[eps"] = 1.into())),
        ("gpt2", Box::new(|h| h["hard_context_limit"] = false.into())),
        ("gpt2", Box::new(|h| h["max_positions"] = 100_000.into())),
    ];
    for (i, (name, edit)) in cases.iter().enumerate() {
        let art = dir.path().join(format!("{i}.llmc"));
        common::compile(&fixture(name), &art);
        let orig = ArtifactBytes::parse(&std::fs::read(&art).unwrap()).unwrap();
        let mut h: Value = serde_json::from_slice(orig.header_json()).unwrap();
        edit(&mut h);
        std::fs::write(&art, orig.with_header(&serde_json::to_vec(&h).unwrap()).unwrap()).unwrap();
        for backend in ["jit", "interp"] {
            let o = llmc(&["run", art.to_str().unwrap(), "--ids", "1,2", "-n", "2", "--backend", backend]);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "case {i} ({backend}): {e}");
            assert_eq!(e.trim().lines().count(), 1, "case {i}: {e}");
            assert!(e.starts_with("error:"), "case {i}: {e}");
        }
    }
}
