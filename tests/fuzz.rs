//! Fuzzing on stable Rust: one time-bounded target per parser of outside input (config.json →
//! model builder, safetensors header and tensor table, the artifact loader with a session on
//! both backends, the IR text parser, tokenizer.json, chat templates).
//!
//! Inputs are arbitrary bytes and, mostly, *structure-aware mutations* of valid inputs taken
//! from the shared fixtures: JSON edits (a value replaced by an extreme one: 0, -1, 2^31, 2^63,
//! 1e308, "NaN", deep nesting, huge arrays; keys deleted, duplicated, renamed, grafted from
//! another family), token edits of the IR text, line deletions and swaps, and byte edits (flips,
//! truncations, insertions of dictionary tokens, huge length prefixes). Artifacts are rewritten
//! through `ArtifactBytes`, which recomputes the checksums, so mutations reach the checks behind
//! the CRC.
//!
//! Why proptest rather than bolero: proptest is already a workspace dev-dependency and builds
//! offline; its strategies describe a mutation list that shrinks when a case fails; and its
//! `TestRunner` can be driven by hand in a loop with a deadline, which is the time-bounded mode
//! wanted here. On stable, bolero's `check!` also only generates random inputs (its coverage
//! feedback needs `cargo bolero` with a fuzzing engine), so it would add a dependency tree and
//! buy nothing on these machines.
//!
//! Every target runs ~4 s in the normal suite; `LLMC_FUZZ_SECS=N` runs each for N seconds,
//! `LLMC_FUZZ_SEED=S` replays a run (the seed is printed), `LLMC_FUZZ_TRACE=FILE` keeps the
//! description of the input being run in FILE (for a crash that aborts). A panic or a broken
//! property is reported with the (shrunk) input; an input running for more than 30 s aborts
//! the process with its description (watchdog); the peak RSS is printed and must stay under
//! `LLMC_FUZZ_RSS_MB` (default 4096).
//!
//! ```text
//! cargo test --release --test fuzz
//! LLMC_FUZZ_SECS=600 cargo test --release --test fuzz -- --exact fuzz_config --nocapture
//! ```

mod common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use llmc_compiler::artifact::{ArtifactBytes, Header, PREAMBLE};
use llmc_models::ModelConfig;
use llmc_runtime::artifact::Artifact;
use llmc_runtime::session::{Backend, Engine, Session};
use llmc_runtime::text::{render_chat, Message, StreamDecoder, Text};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;

const FAMILIES: [&str; 9] =
    ["gpt2", "llama", "mistral", "qwen2", "falcon", "mixtral", "bamba", "granitemoehybrid", "bitnet"];

// ---------------------------------------------------------------------------------------------
// The driver: a deadline loop over a proptest strategy, panics caught, failures shrunk, a
// watchdog for hangs.

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

thread_local! {
    /// Inside a fuzz case: the panic hook records the panic instead of printing it.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                prev(info);
            }
        }));
    });
}

/// Aborts the process when one input runs for more than `limit`, naming the input.
struct Watchdog {
    beat: Arc<AtomicU64>,
    current: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(target: &'static str, limit: Duration) -> Watchdog {
        let (beat, current, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(String::new())), Arc::new(AtomicBool::new(false)));
        let (b, c, s) = (beat.clone(), current.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut last = (0, Instant::now());
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = b.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > limit {
                    let desc = c.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("fuzz {target}: HANG: one input ran for more than {limit:?}; the input: {desc}");
                    std::process::abort();
                }
            }
        });
        Watchdog { beat, current, stop }
    }

    fn enter(&self, desc: String) {
        *self.current.lock().unwrap() = desc;
        self.beat.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn describe<T: Debug>(v: &T) -> String {
    let mut s = format!("{v:?}");
    if s.len() > 4000 {
        let mut cut = 4000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Peak resident memory of the process, in MiB.
fn peak_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// A failing case: `Err(message)` from the body (a broken property) or a caught panic.
fn run_case<V>(body: &mut dyn FnMut(&V) -> Result<&'static str, String>, v: &V) -> Result<&'static str, String> {
    QUIET.with(|q| q.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| body(v)));
    QUIET.with(|q| q.set(false));
    match r {
        Ok(r) => r,
        Err(p) => {
            let hook = LAST_PANIC.with(|l| l.borrow_mut().take());
            let payload =
                p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("PANIC {}", hook.or(payload).unwrap_or_default()))
        }
    }
}

/// The part of a failure message that identifies the bug (a panic's location line).
fn failure_key(msg: &str) -> String {
    msg.lines().next().unwrap_or("").chars().take(120).collect()
}

/// Runs `body` on inputs drawn from `strategy` until the time budget is spent. The body returns
/// a short outcome label (counted) or `Err` for a broken property; panics are failures too.
fn fuzz<S>(target: &'static str, strategy: S, mut body: impl FnMut(&S::Value) -> Result<&'static str, String>)
where
    S: Strategy,
    S::Value: Clone + Debug,
{
    install_panic_hook();
    let secs = env_u64("LLMC_FUZZ_SECS").unwrap_or(4);
    let seed = env_u64("LLMC_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let rss_cap = env_u64("LLMC_FUZZ_RSS_MB").unwrap_or(4096);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..16].copy_from_slice(&(target.len() as u64).to_le_bytes());
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let dog = Watchdog::start(target, Duration::from_secs(env_u64("LLMC_FUZZ_CASE_SECS").unwrap_or(30)));
    // A stack overflow or an allocation failure aborts the process before anything can be
    // reported: LLMC_FUZZ_TRACE=FILE writes each input's description there before it runs.
    let trace = std::env::var_os("LLMC_FUZZ_TRACE").map(PathBuf::from);
    eprintln!("fuzz {target}: seed {seed}, {secs} s");
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut inputs = 0u64;
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    let mut rss_reported = false;
    while Instant::now() < deadline {
        let mut tree = match strategy.new_tree(&mut runner) {
            Ok(t) => t,
            Err(e) => panic!("fuzz {target}: cannot generate an input: {e}"),
        };
        let v = tree.current();
        let desc = describe(&v);
        if let Some(t) = &trace {
            let _ = std::fs::write(t, &desc);
        }
        dog.enter(desc);
        inputs += 1;
        match run_case(&mut body, &v) {
            Ok(label) => *outcomes.entry(label).or_default() += 1,
            Err(msg) => {
                *outcomes.entry("FAILED").or_default() += 1;
                let key = failure_key(&msg);
                if failures.contains_key(&key) || failures.len() >= 20 {
                    continue;
                }
                // Shrink: simplify while the same failure reproduces (bounded in time and steps).
                let (mut best, mut best_msg) = (v, msg);
                let shrink_deadline = Instant::now() + Duration::from_secs(20);
                let mut steps = 0;
                if tree.simplify() {
                    while steps < 2000 && Instant::now() < shrink_deadline {
                        steps += 1;
                        let c = tree.current();
                        dog.enter(describe(&c));
                        match run_case(&mut body, &c) {
                            Err(m) if failure_key(&m) == key => {
                                (best, best_msg) = (c, m);
                                if !tree.simplify() {
                                    break;
                                }
                            }
                            _ => {
                                if !tree.complicate() {
                                    break;
                                }
                            }
                        }
                    }
                }
                eprintln!("fuzz {target}: FAILURE (seed {seed}): {best_msg}\n  input: {}", describe(&best));
                failures.insert(key, format!("{best_msg}\n  input: {}", describe(&best)));
            }
        }
        let rss = peak_rss_mb();
        if rss > rss_cap && !rss_reported {
            rss_reported = true;
            let msg =
                format!("peak RSS {rss} MiB over the {rss_cap} MiB cap after input: {}", describe(&tree.current()));
            eprintln!("fuzz {target}: {msg}");
            failures.insert("rss".into(), msg);
        }
    }
    drop(dog);
    eprintln!(
        "fuzz {target}: {inputs} inputs in {:.1} s (seed {seed}, peak RSS {} MiB): {outcomes:?}",
        t0.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
    assert!(inputs > 0, "fuzz {target}: no input ran");
    assert!(
        failures.is_empty(),
        "fuzz {target}: {} distinct failures (seed {seed}):\n{}",
        failures.len(),
        failures.values().cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Mutators shared by the targets.

/// Where a byte edit lands: anywhere, in the focus region (a header), or near the end.
#[derive(Clone, Debug)]
enum Pos {
    Any(u64),
    Focus(u64),
    FromEnd(u16),
}

#[derive(Clone, Debug)]
enum ByteMut {
    Flip(Pos, u8),
    Set(Pos, u8),
    Truncate(Pos),
    Delete(Pos, u16),
    Insert(Pos, Vec<u8>),
    /// A token of the target's dictionary (or the generic one).
    Token(Pos, u16),
    /// A span copied several times in place.
    Repeat(Pos, u16, u8),
}

const GENERIC_TOKENS: &[&str] = &[
    "0",
    "-1",
    "1",
    "4294967296",
    "2147483648",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "1e400",
    "-0",
    "NaN",
    "inf",
    "null",
    "true",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    " ",
    "\n",
    "\u{0}",
    "\u{feff}",
    "é",
    "😀",
];

fn pos_strategy() -> impl Strategy<Value = Pos> {
    prop_oneof![
        3 => any::<u64>().prop_map(Pos::Any),
        4 => any::<u64>().prop_map(Pos::Focus),
        1 => any::<u16>().prop_map(Pos::FromEnd),
    ]
}

fn byte_mut_strategy() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        4 => (pos_strategy(), 0u8..8).prop_map(|(p, b)| ByteMut::Flip(p, b)),
        2 => (pos_strategy(), any::<u8>()).prop_map(|(p, b)| ByteMut::Set(p, b)),
        1 => pos_strategy().prop_map(ByteMut::Truncate),
        2 => (pos_strategy(), 1u16..64).prop_map(|(p, n)| ByteMut::Delete(p, n)),
        2 => (pos_strategy(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| ByteMut::Insert(p, b)),
        4 => (pos_strategy(), any::<u16>()).prop_map(|(p, t)| ByteMut::Token(p, t)),
        1 => (pos_strategy(), 1u16..64, 1u8..8).prop_map(|(p, n, k)| ByteMut::Repeat(p, n, k)),
    ]
}

fn byte_muts(max: usize) -> impl Strategy<Value = Vec<ByteMut>> {
    prop::collection::vec(byte_mut_strategy(), 0..=max)
}

/// Byte edits on top of structured ones, in a third of the cases (they mostly break the
/// syntax, which the other cases should get past).
fn some_byte_muts(max: usize) -> impl Strategy<Value = Vec<ByteMut>> {
    prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(byte_mut_strategy(), 1..=max)]
}

fn at_pos(p: &Pos, len: usize, focus: &std::ops::Range<usize>) -> usize {
    match p {
        Pos::Any(x) => (*x % (len as u64 + 1)) as usize,
        Pos::Focus(x) => {
            let (s, e) = (focus.start.min(len), focus.end.min(len));
            s + (*x % ((e - s) as u64 + 1)) as usize
        }
        Pos::FromEnd(x) => len.saturating_sub(*x as usize % 256),
    }
}

fn apply_byte_muts(buf: &mut Vec<u8>, muts: &[ByteMut], focus: std::ops::Range<usize>, dict: &[&str]) {
    for m in muts {
        let len = buf.len();
        match m {
            ByteMut::Flip(p, bit) => {
                let i = at_pos(p, len, &focus);
                if i < len {
                    buf[i] ^= 1 << bit;
                }
            }
            ByteMut::Set(p, b) => {
                let i = at_pos(p, len, &focus);
                if i < len {
                    buf[i] = *b;
                }
            }
            ByteMut::Truncate(p) => buf.truncate(at_pos(p, len, &focus)),
            ByteMut::Delete(p, n) => {
                let i = at_pos(p, len, &focus);
                buf.drain(i..(i + *n as usize).min(len));
            }
            ByteMut::Insert(p, bytes) => {
                let i = at_pos(p, len, &focus);
                buf.splice(i..i, bytes.iter().copied());
            }
            ByteMut::Token(p, t) => {
                let i = at_pos(p, len, &focus);
                let all = dict.len() + GENERIC_TOKENS.len();
                let t = *t as usize % all;
                let tok = if t < dict.len() { dict[t] } else { GENERIC_TOKENS[t - dict.len()] };
                buf.splice(i..i, tok.bytes());
            }
            ByteMut::Repeat(p, n, k) => {
                let i = at_pos(p, len, &focus);
                let span = buf[i..(i + *n as usize).min(len)].to_vec();
                for _ in 0..*k {
                    buf.splice(i..i, span.iter().copied());
                }
            }
        }
    }
}

/// A replacement JSON value: extremes, strings of the target's dictionary, odd shapes.
#[derive(Clone, Debug)]
enum Val {
    Int(u8),
    Float(u8),
    Str(u16),
    /// The current value changed a little (±1, ×2, ÷2, ×1000), when it is a number.
    Near(u8),
    Bool(bool),
    Null,
    EmptyArr,
    EmptyObj,
    /// An array of `n` copies of a small number.
    BigArr(u16),
    LongStr(u32),
}

const INTS: &[i128] = &[
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    64,
    255,
    256,
    4096,
    65535,
    65536,
    1 << 20,
    (1 << 24) - 1,
    1 << 24,
    (1 << 24) + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 53,
    1 << 62,
    i64::MAX as i128,
    1 << 63,
    u64::MAX as i128,
    i64::MIN as i128,
    -(1 << 31),
];

const FLOATS: &[f64] = &[0.0, -0.0, 0.5, 1.5, -1.0, 1e-300, 5e-324, 1e10, 1e38, 3.5e38, 1e308, -1e308, f64::MAX, 1e-45];

const EXTREME_STRINGS: &[&str] =
    &["NaN", "nan", "inf", "-inf", "Infinity", "", "0", "-1", "1e308", " ", "\u{0}", "é😀"];

fn int_value(i: i128) -> Value {
    if i >= 0 {
        Value::from(i as u64)
    } else {
        Value::from(i as i64)
    }
}

fn val_strategy() -> impl Strategy<Value = Val> {
    prop_oneof![
        6 => any::<u8>().prop_map(Val::Int),
        2 => any::<u8>().prop_map(Val::Float),
        3 => any::<u16>().prop_map(Val::Str),
        4 => any::<u8>().prop_map(Val::Near),
        1 => any::<bool>().prop_map(Val::Bool),
        1 => Just(Val::Null),
        1 => Just(Val::EmptyArr),
        1 => Just(Val::EmptyObj),
        1 => (0u16..20000).prop_map(Val::BigArr),
        1 => (0u32..200_000).prop_map(Val::LongStr),
    ]
}

/// Edits of a JSON document. Node numbers are taken modulo the number of candidate nodes.
#[derive(Clone, Debug)]
enum JsonMut {
    /// Replace a number (the likeliest place for size bugs).
    SetNumber(u64, Val),
    /// Replace any node.
    Set(u64, Val),
    Delete(u64),
    Swap(u64, u64),
    /// A node of another document of the pool (cross-family fields).
    Graft(u64, u64, u64),
    /// Add a key of the pool's key set to an object.
    AddKey(u64, u16, Val),
    /// Emit an object's key a second time (textually duplicated, with another value).
    DupKey(u64, Val),
    /// Wrap a node in `depth` arrays or objects.
    Nest(u64, u8, bool),
    /// Append copies of an array's element.
    Grow(u64, u16),
}

fn json_mut_strategy() -> impl Strategy<Value = JsonMut> {
    prop_oneof![
        8 => (any::<u64>(), val_strategy()).prop_map(|(n, v)| JsonMut::SetNumber(n, v)),
        3 => (any::<u64>(), val_strategy()).prop_map(|(n, v)| JsonMut::Set(n, v)),
        3 => any::<u64>().prop_map(JsonMut::Delete),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| JsonMut::Swap(a, b)),
        2 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, d, b)| JsonMut::Graft(a, d, b)),
        2 => (any::<u64>(), any::<u16>(), val_strategy()).prop_map(|(a, k, v)| JsonMut::AddKey(a, k, v)),
        1 => (any::<u64>(), val_strategy()).prop_map(|(a, v)| JsonMut::DupKey(a, v)),
        1 => (any::<u64>(), 1u8..=200, any::<bool>()).prop_map(|(a, d, o)| JsonMut::Nest(a, d, o)),
        1 => (any::<u64>(), 1u16..2000).prop_map(|(a, k)| JsonMut::Grow(a, k)),
    ]
}

fn json_muts(max: usize) -> impl Strategy<Value = Vec<JsonMut>> {
    prop::collection::vec(json_mut_strategy(), 0..=max)
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// How many nodes below the root satisfy `pred`.
fn count_nodes(v: &Value, pred: &dyn Fn(&Value) -> bool) -> u64 {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(a) => Box::new(a.iter()),
        Value::Object(o) => Box::new(o.values()),
        _ => return 0,
    };
    children.map(|x| pred(x) as u64 + count_nodes(x, pred)).sum()
}

/// Finds the path of the `n`-th node satisfying `pred`, depth first (memory: one path, so a
/// huge or deeply nested document costs time, not memory).
fn nth_node(v: &Value, pred: &dyn Fn(&Value) -> bool, n: &mut u64, path: &mut Vec<Step>) -> bool {
    let children: Vec<(Step, &Value)> = match v {
        Value::Array(a) => a.iter().enumerate().map(|(i, x)| (Step::Index(i), x)).collect(),
        Value::Object(o) => o.iter().map(|(k, x)| (Step::Key(k.clone()), x)).collect(),
        _ => return false,
    };
    for (step, x) in children {
        path.push(step);
        if pred(x) {
            if *n == 0 {
                return true;
            }
            *n -= 1;
        }
        if nth_node(x, pred, n, path) {
            return true;
        }
        path.pop();
    }
    false
}

/// The path of the node number `pick` (modulo their count) among those satisfying `pred`.
fn pick_path(v: &Value, pred: &dyn Fn(&Value) -> bool, pick: u64) -> Option<Vec<Step>> {
    let count = count_nodes(v, pred);
    if count == 0 {
        return None;
    }
    let (mut n, mut path) = (pick % count, Vec::new());
    nth_node(v, pred, &mut n, &mut path).then_some(path)
}

fn node_mut<'v>(v: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    path.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

fn node_ref<'v>(v: &'v Value, path: &[Step]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get(k.as_str()),
        Step::Index(i) => v.get(*i),
    })
}

/// The documents a JSON target mutates, with the keys and strings they contain (the
/// dictionary of replacements) and extra words of the target.
struct JsonPool {
    docs: Vec<Value>,
    keys: Vec<String>,
    strings: Vec<String>,
}

impl JsonPool {
    fn new(docs: Vec<Value>, extra_words: &[&str]) -> JsonPool {
        let mut keys = std::collections::BTreeSet::new();
        let mut strings = std::collections::BTreeSet::new();
        fn walk(
            v: &Value,
            keys: &mut std::collections::BTreeSet<String>,
            strings: &mut std::collections::BTreeSet<String>,
        ) {
            match v {
                Value::String(s) if s.len() < 200 && strings.len() < 5000 => {
                    strings.insert(s.clone());
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, keys, strings)),
                Value::Object(o) => {
                    for (k, x) in o {
                        if keys.len() < 5000 {
                            keys.insert(k.clone());
                        }
                        walk(x, keys, strings);
                    }
                }
                _ => {}
            }
        }
        for d in &docs {
            walk(d, &mut keys, &mut strings);
        }
        strings.extend(extra_words.iter().map(|s| s.to_string()));
        strings.extend(EXTREME_STRINGS.iter().map(|s| s.to_string()));
        keys.extend(extra_words.iter().map(|s| s.to_string()));
        JsonPool { docs, keys: keys.into_iter().collect(), strings: strings.into_iter().collect() }
    }

    fn make(&self, val: &Val, current: Option<&Value>) -> Value {
        match val {
            Val::Int(i) => int_value(INTS[*i as usize % INTS.len()]),
            Val::Float(i) => Value::from(FLOATS[*i as usize % FLOATS.len()]),
            Val::Str(i) => Value::from(self.strings[*i as usize % self.strings.len()].clone()),
            Val::Near(k) => match current.and_then(Value::as_f64) {
                Some(x) if current.is_some_and(|c| c.is_i64() || c.is_u64()) => {
                    let x = current.and_then(Value::as_i64).map_or(x as i128, |i| i as i128);
                    int_value([x + 1, x - 1, x * 2, x / 2, x * 1000, -x][*k as usize % 6])
                }
                Some(x) => Value::from([x + 1.0, x - 1.0, x * 2.0, x / 2.0, x * 1e6, -x][*k as usize % 6]),
                None => int_value(INTS[*k as usize % INTS.len()]),
            },
            Val::Bool(b) => Value::from(*b),
            Val::Null => Value::Null,
            Val::EmptyArr => Value::Array(Vec::new()),
            Val::EmptyObj => Value::Object(Default::default()),
            Val::BigArr(n) => Value::Array(vec![Value::from(1); *n as usize]),
            Val::LongStr(n) => Value::from("a".repeat(*n as usize)),
        }
    }

    /// Applies the edits to document `base` and serializes it (duplicated keys are spliced in
    /// textually: a `Value` cannot hold them).
    fn mutate(&self, base: usize, muts: &[JsonMut]) -> Vec<u8> {
        let mut v = self.docs[base % self.docs.len()].clone();
        self.mutate_value(&mut v, muts);
        let text = serde_json::to_string(&v).unwrap_or_default();
        text.replace("\\u0001DUP\"", "\"").into_bytes()
    }

    fn mutate_value(&self, v: &mut Value, muts: &[JsonMut]) {
        for m in muts {
            let pick = |v: &Value, n: u64, numbers: bool| {
                if numbers {
                    pick_path(v, &Value::is_number, n)
                } else {
                    pick_path(v, &|_| true, n)
                }
            };
            match m {
                JsonMut::SetNumber(n, val) | JsonMut::Set(n, val) => {
                    let Some(p) = pick(v, *n, matches!(m, JsonMut::SetNumber(..))).or_else(|| pick(v, *n, false))
                    else {
                        continue;
                    };
                    let new = self.make(val, node_ref(v, &p));
                    if let Some(x) = node_mut(v, &p) {
                        *x = new;
                    }
                }
                JsonMut::Delete(n) => {
                    let Some(mut p) = pick(v, *n, false) else { continue };
                    let last = p.pop();
                    match (node_mut(v, &p), last) {
                        (Some(Value::Object(o)), Some(Step::Key(k))) => {
                            o.remove(&k);
                        }
                        (Some(Value::Array(a)), Some(Step::Index(i))) if i < a.len() => {
                            a.remove(i);
                        }
                        _ => {}
                    }
                }
                JsonMut::Swap(a, b) => {
                    let (Some(pa), Some(pb)) = (pick(v, *a, false), pick(v, *b, false)) else { continue };
                    let (Some(va), Some(vb)) = (node_ref(v, &pa).cloned(), node_ref(v, &pb).cloned()) else { continue };
                    if let Some(x) = node_mut(v, &pa) {
                        *x = vb;
                    }
                    if let Some(x) = node_mut(v, &pb) {
                        *x = va;
                    }
                }
                JsonMut::Graft(a, d, b) => {
                    let donor = &self.docs[(*d % self.docs.len() as u64) as usize];
                    let (Some(pa), Some(pb)) = (pick(v, *a, false), pick(donor, *b, false)) else { continue };
                    let Some(new) = node_ref(donor, &pb).cloned() else { continue };
                    // Under the same key when the donor's node has one (a field of another family).
                    match (pb.last(), pa.split_last()) {
                        (Some(Step::Key(k)), Some((_, parent))) => {
                            if let Some(Value::Object(o)) = node_mut(v, parent) {
                                o.insert(k.clone(), new);
                            }
                        }
                        _ => {
                            if let Some(x) = node_mut(v, &pa) {
                                *x = new;
                            }
                        }
                    }
                }
                JsonMut::AddKey(a, k, val) => {
                    // The root (if an object) or an object below it.
                    let below = count_nodes(v, &Value::is_object);
                    let root = v.is_object() as u64;
                    if below + root == 0 {
                        continue;
                    }
                    let k_obj = *a % (below + root);
                    let p = if k_obj < root {
                        Vec::new()
                    } else {
                        let Some(p) = pick_path(v, &Value::is_object, k_obj - root) else { continue };
                        p
                    };
                    let p = &p;
                    let key = self.keys.get(*k as usize % self.keys.len().max(1)).cloned().unwrap_or_default();
                    let new = self.make(val, None);
                    if let Some(Value::Object(o)) = node_mut(v, p) {
                        o.insert(key, new);
                    }
                }
                JsonMut::DupKey(a, val) => {
                    let Some(p) = pick(v, *a, false) else { continue };
                    let (Some(Step::Key(k)), Some((_, parent))) = (p.last(), p.split_last()) else { continue };
                    let new = self.make(val, node_ref(v, &p));
                    if let Some(Value::Object(o)) = node_mut(v, parent) {
                        o.insert(format!("{k}\u{1}DUP"), new);
                    }
                }
                JsonMut::Nest(a, depth, obj) => {
                    let Some(p) = pick(v, *a, false) else { continue };
                    if let Some(x) = node_mut(v, &p) {
                        let mut inner = x.take();
                        for _ in 0..*depth {
                            inner = if *obj { serde_json::json!({ "a": inner }) } else { Value::Array(vec![inner]) };
                        }
                        *x = inner;
                    }
                }
                JsonMut::Grow(a, k) => {
                    let non_empty = |x: &Value| x.as_array().is_some_and(|a| !a.is_empty());
                    let Some(p) = pick_path(v, &non_empty, *a) else { continue };
                    if let Some(Value::Array(arr)) = node_mut(v, &p) {
                        let x = arr[*k as usize % arr.len()].clone();
                        // At most ~100k new nodes per edit: the document stays a size a real
                        // file could have.
                        let size = 1 + count_nodes(&x, &|_| true);
                        let copies = (*k as u64).min(100_000 / size) as usize;
                        arr.extend(std::iter::repeat_n(x, copies));
                    }
                }
            }
        }
    }
}

/// Edits of a text at the level of its tokens and lines (structure-aware for the IR and
/// templates).
#[derive(Clone, Debug)]
enum TextMut {
    Byte(ByteMut),
    DeleteLine(u64),
    DupLine(u64, u64),
    SwapLines(u64, u64),
    /// Replace a token by an extreme number, another token of the text, or a dictionary word.
    Token(u64, TokChoice),
}

#[derive(Clone, Debug)]
enum TokChoice {
    Extreme(u8),
    Other(u64),
    Dict(u16),
}

fn text_mut_strategy() -> impl Strategy<Value = TextMut> {
    let choice = prop_oneof![
        3 => any::<u8>().prop_map(TokChoice::Extreme),
        3 => any::<u64>().prop_map(TokChoice::Other),
        2 => any::<u16>().prop_map(TokChoice::Dict),
    ];
    prop_oneof![
        3 => byte_mut_strategy().prop_map(TextMut::Byte),
        1 => any::<u64>().prop_map(TextMut::DeleteLine),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| TextMut::DupLine(a, b)),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| TextMut::SwapLines(a, b)),
        6 => (any::<u64>(), choice).prop_map(|(a, c)| TextMut::Token(a, c)),
    ]
}

const EXTREME_TOKENS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "16",
    "65536",
    "16777216",
    "16777217",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "1e-45",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "-0",
    "0.5",
    "n",
    "",
];

/// Byte spans of tokens: runs of word characters, or single other characters.
fn token_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-' || c == b'+';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let s0 = i;
        if word(b[i]) {
            while i < b.len() && word(b[i]) {
                i += 1;
            }
        } else {
            i += 1;
            while i < b.len() && !s.is_char_boundary(i) {
                i += 1;
            }
        }
        if !b[s0].is_ascii_whitespace() {
            out.push((s0, i));
        }
    }
    out
}

fn apply_text_muts(text: &str, muts: &[TextMut], dict: &[&str]) -> String {
    let mut s = text.to_string();
    for m in muts {
        match m {
            TextMut::Byte(b) => {
                let mut bytes = s.into_bytes();
                let len = bytes.len();
                apply_byte_muts(&mut bytes, std::slice::from_ref(b), 0..len, dict);
                s = String::from_utf8_lossy(&bytes).into_owned();
            }
            TextMut::DeleteLine(a) | TextMut::DupLine(a, _) | TextMut::SwapLines(a, _) => {
                let mut lines: Vec<&str> = s.split('\n').collect();
                let n = lines.len() as u64;
                let i = (*a % n) as usize;
                match m {
                    TextMut::DeleteLine(_) => {
                        lines.remove(i);
                    }
                    TextMut::DupLine(_, b) => lines.insert((*b % (n + 1)) as usize, lines[i]),
                    TextMut::SwapLines(_, b) => lines.swap(i, (*b % n) as usize),
                    _ => {}
                }
                s = lines.join("\n");
            }
            TextMut::Token(a, choice) => {
                let spans = token_spans(&s);
                if spans.is_empty() {
                    continue;
                }
                let (st, en) = spans[(*a % spans.len() as u64) as usize];
                let new = match choice {
                    TokChoice::Extreme(k) => EXTREME_TOKENS[*k as usize % EXTREME_TOKENS.len()].to_string(),
                    TokChoice::Other(k) => {
                        let (os, oe) = spans[(*k % spans.len() as u64) as usize];
                        s[os..oe].to_string()
                    }
                    TokChoice::Dict(k) => {
                        let all = dict.len() + GENERIC_TOKENS.len();
                        let k = *k as usize % all;
                        (if k < dict.len() { dict[k] } else { GENERIC_TOKENS[k - dict.len()] }).to_string()
                    }
                };
                s.replace_range(st..en, &new);
            }
        }
    }
    s
}

fn text_muts(max: usize) -> impl Strategy<Value = Vec<TextMut>> {
    prop::collection::vec(text_mut_strategy(), 1..=max)
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn fixture_file(family: &str, file: &str) -> PathBuf {
    common::fixture(family).join(file)
}

fn fixture_configs() -> Vec<Value> {
    FAMILIES
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(fixture_file(f, "config.json")).unwrap()).unwrap())
        .collect()
}

/// Graphs of every family as printed IR text: as built, and after the standard pipeline.
fn fixture_ir_texts() -> &'static [String] {
    static TEXTS: OnceLock<Vec<String>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let mut out = Vec::new();
        for (f, v) in FAMILIES.iter().zip(fixture_configs()) {
            let cfg = ModelConfig::from_json(Path::new(f), &v).unwrap();
            let (mut g, _) = cfg.build().unwrap();
            out.push(llmc_ir::text::print(&g));
            llmc_ir::passes::run_pipeline(&mut g, &llmc_ir::passes::standard_pipeline()).unwrap();
            out.push(llmc_ir::text::print(&g));
        }
        out
    })
}

/// Checks the parse → print → parse round trip of an accepted graph.
fn check_round_trip(g: &llmc_ir::Graph) -> Result<(), String> {
    let printed = llmc_ir::text::print(g);
    let again = llmc_ir::text::parse(&printed).map_err(|e| format!("printed graph does not parse again: {e}"))?;
    let reprinted = llmc_ir::text::print(&again);
    if reprinted != printed {
        return Err("print(parse(print(g))) differs from print(g)".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. config.json → model builder.

#[derive(Clone, Debug)]
enum ConfigCase {
    Bytes(Vec<u8>),
    Mutated { base: usize, json: Vec<JsonMut>, bytes: Vec<ByteMut> },
}

const CONFIG_WORDS: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "mixtral",
    "gpt2",
    "falcon",
    "bitnet",
    "bamba",
    "granitemoehybrid",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "linear",
    "llama3",
    "yarn",
    "factor",
    "sliding_window",
    "tie_word_embeddings",
    "layer_types",
    "layers_block_type",
    "mamba",
    "attention",
    "num_local_experts",
    "num_experts_per_tok",
    "partial_rotary_factor",
    "hidden_act",
    "silu",
    "gelu",
    "relu2",
    "gelu_new",
    "mamba_n_heads",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_n_groups",
    "mamba_expand",
    "mamba_d_head",
];

fn config_case() -> impl Strategy<Value = ConfigCase> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(ConfigCase::Bytes),
        12 => (0..FAMILIES.len(), json_muts(6), some_byte_muts(2))
            .prop_map(|(base, json, bytes)| ConfigCase::Mutated { base, json, bytes }),
    ]
}

#[test]
fn fuzz_config() {
    let pool = JsonPool::new(fixture_configs(), CONFIG_WORDS);
    let path = Path::new("fuzz/config.json");
    fuzz("config", config_case(), |case| {
        let bytes = match case {
            ConfigCase::Bytes(b) => b.clone(),
            ConfigCase::Mutated { base, json, bytes } => {
                let mut b = pool.mutate(*base, json);
                let len = b.len();
                apply_byte_muts(&mut b, bytes, 0..len, CONFIG_WORDS);
                b
            }
        };
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { return Ok("not json") };
        let cfg = match ModelConfig::from_json(path, &v) {
            Ok(c) => c,
            Err(e) => {
                if e.to_string().is_empty() {
                    return Err("empty error message".into());
                }
                return Ok("config refused");
            }
        };
        let _ = (cfg.max_positions(), cfg.vocab_size(), cfg.hard_context_limit());
        match cfg.build() {
            Ok((g, _specs)) => {
                g.verify().map_err(|e| format!("built graph does not verify: {e}"))?;
                // (The round trip of a graph near the node cap takes seconds; ir_text covers it.)
                if g.node_count() < 50_000 {
                    check_round_trip(&g)?;
                }
                Ok("built")
            }
            Err(_) => Ok("build refused"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. safetensors header and tensor table.

#[derive(Clone, Debug)]
enum LenMut {
    Value(u8),
    Delta(i8),
}

#[derive(Clone, Debug)]
enum StCase {
    Bytes(Vec<u8>),
    /// A small length prefix followed by arbitrary bytes.
    Prefixed(u16, Vec<u8>),
    Mutated {
        base: usize,
        header: Vec<JsonMut>,
        len: Option<LenMut>,
        bytes: Vec<ByteMut>,
        /// Opened through a shard index (itself mutated).
        index: Option<Vec<JsonMut>>,
    },
}

const ST_WORDS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "F32",
    "F16",
    "BF16",
    "U8",
    "I8",
    "I16",
    "I32",
    "I64",
    "F64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F4",
    "F7",
    "weight_map",
    "metadata",
    "model.safetensors",
    "../model.safetensors",
    "shard.safetensors",
    "missing.safetensors",
];

fn st_case() -> impl Strategy<Value = StCase> {
    let len = prop_oneof![any::<u8>().prop_map(LenMut::Value), any::<i8>().prop_map(LenMut::Delta)];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(StCase::Bytes),
        1 => (any::<u16>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(n, b)| StCase::Prefixed(n, b)),
        12 => (0..FAMILIES.len(), json_muts(5), prop::option::weighted(0.15, len), byte_muts(3),
               prop::option::weighted(0.15, json_muts(3)))
            .prop_map(|(base, header, len, bytes, index)| StCase::Mutated { base, header, len, bytes, index }),
    ]
}

/// Splits a safetensors file into its header JSON and data.
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

#[test]
fn fuzz_safetensors() {
    let files: Vec<(Value, Vec<u8>)> = FAMILIES
        .iter()
        .map(|f| split_safetensors(&std::fs::read(fixture_file(f, "model.safetensors")).unwrap()))
        .collect();
    let pool = JsonPool::new(files.iter().map(|(h, _)| h.clone()).collect(), ST_WORDS);
    let index_pool = JsonPool::new(
        vec![
            serde_json::json!({"metadata": {"total_size": 1}, "weight_map": {"a": "shard.safetensors", "b": "shard.safetensors"}}),
        ],
        ST_WORDS,
    );
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("model.safetensors");
    let shard = dir.path().join("shard.safetensors");
    let index_path = dir.path().join("model.safetensors.index.json");
    fuzz("safetensors", st_case(), |case| {
        let (bytes, index) = match case {
            StCase::Bytes(b) => (b.clone(), None),
            StCase::Prefixed(n, b) => {
                let mut out = (*n as u64).to_le_bytes().to_vec();
                out.extend_from_slice(b);
                (out, None)
            }
            StCase::Mutated { base, header, len, bytes, index } => {
                let (h, data) = &files[*base % files.len()];
                let json = pool.mutate_one(h, header);
                let n = json.len() as u64;
                let n = match len {
                    None => n,
                    Some(LenMut::Value(i)) => INTS[*i as usize % INTS.len()] as u64,
                    Some(LenMut::Delta(d)) => n.wrapping_add(*d as i64 as u64),
                };
                let mut out = n.to_le_bytes().to_vec();
                out.extend_from_slice(&json);
                out.extend_from_slice(data);
                apply_byte_muts(&mut out, bytes, 0..8 + json.len(), ST_WORDS);
                // The index lists the header's tensors in the shard, then is mutated itself.
                let index = index.as_ref().map(|muts| {
                    let names: serde_json::Map<String, Value> = h
                        .as_object()
                        .map(|o| {
                            o.keys()
                                .filter(|k| *k != "__metadata__")
                                .map(|k| (k.clone(), "shard.safetensors".into()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let mut doc = serde_json::json!({"metadata": {}, "weight_map": names});
                    index_pool.mutate_value(&mut doc, muts);
                    serde_json::to_vec(&doc).unwrap()
                });
                (out, index)
            }
        };
        let wf = match &index {
            Some(idx) => {
                std::fs::write(&shard, &bytes).unwrap();
                std::fs::write(&index_path, idx).unwrap();
                llmc_models::WeightFiles::open(&index_path)
            }
            None => {
                std::fs::write(&single, &bytes).unwrap();
                llmc_models::WeightFiles::open(&single)
            }
        };
        let Ok(files) = wf else { return Ok("refused") };
        let names: Vec<String> = files.tensors.keys().cloned().collect();
        let mut read = 0;
        for name in &names {
            let loc = files.get(name).ok_or("listed tensor not found")?.clone();
            let numel = loc.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if let Ok(v) = files.read_f32(name) {
                if Some(v.len()) != numel {
                    return Err(format!(
                        "tensor `{name}` {:?}: read {} values for shape {:?}",
                        loc.dtype,
                        v.len(),
                        loc.shape
                    ));
                }
                read += 1;
            }
            if let Ok(v) = files.read_u8(name) {
                if Some(v.len()) != numel {
                    return Err(format!("u8 tensor `{name}`: read {} bytes for shape {:?}", v.len(), loc.shape));
                }
                read += 1;
            }
        }
        let _ = files.read_f32("no such tensor");
        Ok(if read > 0 { "opened, tensors read" } else { "opened, no tensor read" })
    });
}

impl JsonPool {
    fn mutate_one(&self, doc: &Value, muts: &[JsonMut]) -> Vec<u8> {
        let mut v = doc.clone();
        self.mutate_value(&mut v, muts);
        serde_json::to_string(&v).unwrap_or_default().replace("\\u0001DUP\"", "\"").into_bytes()
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The artifact loader, with a session on both backends.

const ARTIFACT_FAMILIES: [&str; 4] = ["llama", "gpt2", "granitemoehybrid", "bitnet"];

/// The fixtures compiled once per process (in memory). The llama one is compiled from a copy
/// of its folder with a tokenizer and a chat template added, so the artifact has a tokenizer
/// section and text fields to corrupt.
fn compiled_artifacts() -> &'static [Vec<u8>] {
    static ARTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    ARTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        ARTIFACT_FAMILIES
            .iter()
            .map(|f| {
                let mut folder = common::fixture(f);
                if *f == "llama" {
                    folder = dir.path().join("llama-text");
                    std::fs::create_dir(&folder).unwrap();
                    for file in ["config.json", "model.safetensors", "generation_config.json"] {
                        std::fs::copy(fixture_file(f, file), folder.join(file)).unwrap();
                    }
                    let bases = tokenizer_bases();
                    let tok = &bases[if bases.len() > 4 { 4 } else { 0 }];
                    std::fs::write(folder.join("tokenizer.json"), serde_json::to_vec(tok).unwrap()).unwrap();
                    let tc = serde_json::json!({"chat_template": template_bases().last().unwrap(),
                                                "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
                    std::fs::write(folder.join("tokenizer_config.json"), tc.to_string()).unwrap();
                }
                let model = llmc_models::load(&folder, None).unwrap();
                let out = dir.path().join(format!("{f}.llmc"));
                llmc_writer::compile(
                    &model,
                    &out,
                    &llmc_ir::passes::standard_pipeline(),
                    llmc_writer::Storage::Checkpoint,
                    llmc_writer::Activations::Q8,
                    &mut |_| {},
                )
                .unwrap();
                std::fs::read(&out).unwrap()
            })
            .collect()
    })
}

#[derive(Clone, Debug)]
enum ArtCase {
    Junk(bool, Vec<u8>),
    /// Raw byte edits; `fix_crc` recomputes the header's checksum afterwards.
    Raw {
        base: usize,
        bytes: Vec<ByteMut>,
        fix_crc: bool,
    },
    /// Header JSON edits (checksums recomputed by `ArtifactBytes::with_header`).
    Header {
        base: usize,
        json: Vec<JsonMut>,
        bytes: Vec<ByteMut>,
    },
    /// IR text edits; `relower` stores the program lowered from the edited IR (a consistent
    /// forgery that reaches the verifier and the executors).
    Ir {
        base: usize,
        ir: Vec<TextMut>,
        relower: bool,
    },
}

const ART_WORDS: &[&str] =
    &["f32", "u8", "i32", "RowMajor", "Panel16", "Padded16", "x86_64", "aarch64", "avx2", "sse4.1"];

fn art_case() -> impl Strategy<Value = ArtCase> {
    prop_oneof![
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 0..200)).prop_map(|(m, b)| ArtCase::Junk(m, b)),
        3 => (0..ARTIFACT_FAMILIES.len(), byte_muts(4), any::<bool>())
            .prop_map(|(base, bytes, fix_crc)| ArtCase::Raw { base, bytes, fix_crc }),
        6 => (0..ARTIFACT_FAMILIES.len(), json_muts(4), some_byte_muts(1))
            .prop_map(|(base, json, bytes)| ArtCase::Header { base, json, bytes }),
        6 => (0..ARTIFACT_FAMILIES.len(), text_muts(4), prop::bool::weighted(0.8))
            .prop_map(|(base, ir, relower)| ArtCase::Ir { base, ir, relower }),
    ]
}

/// Opens the artifact and, if it opens, runs a step on both backends (ctx 8).
fn open_and_run(path: &Path) -> &'static str {
    let Ok(art) = Artifact::open(path) else { return "refused" };
    let _ = (art.verify_weights(), art.weight_bytes());
    if let Ok(text) = Text::from_artifact(&art) {
        let h = &art.header.text;
        let msgs = [Message { role: "user".into(), content: "Hello".into() }];
        if let Some(t) = &h.chat_template {
            if let Ok(prompt) = render_chat(t, &msgs, h.bos_token.as_deref(), h.eos_token.as_deref()) {
                let _ = text.encode(&prompt, false).map(|ids| text.decode(&ids));
            }
        }
    }
    let vocab = art.header.vocab_size;
    drop(art);
    let Ok(engine) = Engine::open(path, 1) else { return "refused by the engine" };
    let tokens: Vec<i32> = [0, 1, 2].iter().map(|&t| (t % vocab) as i32).collect();
    let mut ran = 0;
    for backend in [Backend::Interp, Backend::Jit] {
        if let Ok(mut s) = Session::new(&engine, backend, Some(8)) {
            ran += s.step(&tokens).is_ok() as usize;
        }
    }
    if ran == 2 {
        "ran on both backends"
    } else {
        "opened, a session or step refused"
    }
}

#[test]
fn fuzz_artifact() {
    let arts = compiled_artifacts();
    let parsed: Vec<ArtifactBytes> = arts.iter().map(|a| ArtifactBytes::parse(a).unwrap()).collect();
    let headers: Vec<Value> = parsed.iter().map(|p| serde_json::from_slice(p.header_json()).unwrap()).collect();
    let pool = JsonPool::new(headers, ART_WORDS);
    let irs: Vec<String> = parsed.iter().map(|p| String::from_utf8(p.ir_text().to_vec()).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.llmc");
    fuzz("artifact", art_case(), |case| {
        let bytes = match case {
            ArtCase::Junk(magic, b) => {
                let mut out = Vec::new();
                if *magic {
                    out.extend_from_slice(&arts[0][..PREAMBLE]);
                }
                out.extend_from_slice(b);
                out
            }
            ArtCase::Raw { base, bytes, fix_crc } => {
                let mut out = arts[*base % arts.len()].clone();
                let hl = u64::from_le_bytes(out[12..20].try_into().unwrap()) as usize;
                apply_byte_muts(&mut out, bytes, 0..PREAMBLE + hl, ART_WORDS);
                if *fix_crc && out.len() >= PREAMBLE {
                    let hl = u64::from_le_bytes(out[12..20].try_into().unwrap());
                    if let Some(h) =
                        out.get(PREAMBLE..(PREAMBLE as u64).saturating_add(hl).min(usize::MAX as u64) as usize)
                    {
                        let crc = crc32fast::hash(h).to_le_bytes();
                        out[20..24].copy_from_slice(&crc);
                    }
                }
                out
            }
            ArtCase::Header { base, json, bytes } => {
                let i = *base % arts.len();
                let mut h = pool.mutate(i, json);
                let len = h.len();
                apply_byte_muts(&mut h, bytes, 0..len, ART_WORDS);
                match parsed[i].with_header(&h) {
                    Some(b) => b,
                    None => return Ok("header too big for its room"),
                }
            }
            ArtCase::Ir { base, ir, relower } => {
                let i = *base % arts.len();
                let text = apply_text_muts(&irs[i], ir, IR_WORDS);
                let mut h: Header = serde_json::from_slice(parsed[i].header_json()).unwrap();
                if *relower {
                    if let Ok(g) = llmc_ir::text::parse(&text) {
                        if let Ok(p) = llmc_compiler::lower::lower(&g) {
                            h.program = p;
                        }
                    }
                }
                match parsed[i].with_ir(&text, &serde_json::to_vec(&h).unwrap()) {
                    Some(b) => b,
                    None => return Ok("IR or header too big for its room"),
                }
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        Ok(open_and_run(&path))
    });
}

// ---------------------------------------------------------------------------------------------
// 4. The IR text parser.

const IR_WORDS: &[&str] = &[
    "%0",
    "%1",
    "%99999999",
    " = ",
    " : ",
    "f32[n, 64]",
    "f32[]",
    "i32[n]",
    "u8[4]",
    "f32[n]",
    "[",
    "]",
    "(",
    ")",
    "graph \"x\" {",
    "output logits = %0",
    "input kind=tokens",
    "input kind=positions",
    "weight name=\"w\"",
    "kind=tokens",
    "kind=positions",
    "matmul",
    "linear",
    "embedding",
    "rms_norm",
    "layer_norm",
    "attention",
    "attend",
    "qkv_rope",
    "rope",
    "add",
    "mul",
    "silu",
    "gelu",
    "softmax",
    "moe",
    "mamba2",
    "kv_cache",
    "concat_rows",
    "interleave_rows8",
    "scale_cols",
    "weight_matvec",
    "rope_interleave",
    "slice",
    "reshape",
    "transpose",
    "eps=",
    "theta=",
    "layer=",
    "window=",
    "heads=",
    "kv_heads=",
    "head_dim=",
    "\"",
    "\\\"",
    ";",
];

#[derive(Clone, Debug)]
enum IrCase {
    Arbitrary(String),
    /// Random lines in the IR's shape.
    Lines(Vec<String>),
    Mutated {
        base: usize,
        muts: Vec<TextMut>,
    },
}

fn ir_case(bases: usize) -> impl Strategy<Value = IrCase> {
    let line = prop_oneof![
        "%[0-9]{1,3} = [a-z_0-9]{1,12}(\\(%[0-9]{1,2}(, %[0-9]{1,2}){0,3}\\))?( [a-z_]{1,8}=[a-z0-9.\"-]{1,8}){0,3} : (f32|i32|u8)\\[(n|[0-9]{1,6})(, [0-9]{1,6}){0,3}\\]",
        "output [a-z]{1,6} = %[0-9]{1,2}",
        ".{0,40}",
    ];
    prop_oneof![
        1 => any::<String>().prop_map(IrCase::Arbitrary),
        2 => prop::collection::vec(line, 0..12).prop_map(IrCase::Lines),
        10 => (0..bases, text_muts(5)).prop_map(|(base, muts)| IrCase::Mutated { base, muts }),
    ]
}

#[test]
fn fuzz_ir_text() {
    let bases = fixture_ir_texts();
    fuzz("ir_text", ir_case(bases.len()), |case| {
        let text = match case {
            IrCase::Arbitrary(s) => s.clone(),
            IrCase::Lines(lines) => format!("graph \"fuzz\" {{\n  {}\n}}\n", lines.join("\n  ")),
            IrCase::Mutated { base, muts } => apply_text_muts(&bases[*base], muts, IR_WORDS),
        };
        match llmc_ir::text::parse(&text) {
            Ok(g) => {
                check_round_trip(&g)?;
                // The loader lowers every IR it accepts.
                Ok(if llmc_compiler::lower::lower(&g).is_ok() { "parsed and lowered" } else { "parsed, not lowered" })
            }
            Err(_) => Ok("refused"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 5. tokenizer.json.

/// Tokenizers to mutate: small hand-written ones of each model type, and (when the shared
/// folder has it) SmolLM2's real byte-level BPE, whole and cut down to its first 400 tokens.
fn tokenizer_bases() -> &'static [Value] {
    static BASES: OnceLock<Vec<Value>> = OnceLock::new();
    BASES.get_or_init(|| {
        let mut out = vec![
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false,
                                  "rstrip": false, "normalized": false, "special": true}],
                "normalizer": {"type": "Lowercase"},
                "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": null,
                "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
                "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2, "!": 3, "the": 4},
                          "unk_token": "<unk>"}
            }),
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": {"type": "NFC"},
                "pre_tokenizer": {"type": "BertPreTokenizer"},
                "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]},
                "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
                "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                          "max_input_chars_per_word": 100,
                          "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "he": 3, "##llo": 4, "world": 5, "##s": 6}}
            }),
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
                "post_processor": null,
                "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
                "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": false,
                          "vocab": [["<unk>", 0.0], ["▁", -1.0], ["▁he", -2.0], ["llo", -2.5], ["h", -3.0],
                                    ["e", -3.0], ["l", -3.0], ["o", -3.0]]}
            }),
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [{"id": 6, "content": "<s>", "single_word": false, "lstrip": false,
                                  "rstrip": false, "normalized": false, "special": true}],
                "normalizer": null,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                "post_processor": {"type": "TemplateProcessing",
                                   "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                   "special_tokens": {"<s>": {"id": "<s>", "ids": [6], "tokens": ["<s>"]}}},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5},
                          "merges": [["h", "e"], ["l", "l"]]}
            }),
        ];
        let real = common::shared().join("tools/smollm2/tokenizer.json");
        if let Ok(bytes) = std::fs::read(&real) {
            if let Ok(full) = serde_json::from_slice::<Value>(&bytes) {
                let mut small = full.clone();
                if let Some(model) = small.get_mut("model") {
                    let keep = |t: &str, m: &serde_json::Map<String, Value>| m.contains_key(t);
                    let vocab: serde_json::Map<String, Value> = model["vocab"]
                        .as_object()
                        .map(|o| o.iter().filter(|(_, id)| id.as_u64().is_some_and(|i| i < 400)).map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default();
                    let merges: Vec<Value> = model["merges"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter(|m| {
                                    let parts: Vec<String> = match m {
                                        Value::String(s) => s.split(' ').map(str::to_string).collect(),
                                        Value::Array(p) => p.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                                        _ => vec![],
                                    };
                                    parts.len() == 2 && parts.iter().all(|p| keep(p, &vocab)) && keep(&parts.concat(), &vocab)
                                })
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    model["vocab"] = Value::Object(vocab);
                    model["merges"] = Value::Array(merges);
                }
                out.push(small);
                out.push(full);
            }
        }
        out
    })
}

#[derive(Clone, Debug)]
enum TokCase {
    Bytes(Vec<u8>),
    Mutated { base: usize, json: Vec<JsonMut>, bytes: Vec<ByteMut>, inputs: Vec<String>, ids: Vec<i32> },
}

const TOK_WORDS: &[&str] = &[
    "BPE",
    "WordLevel",
    "WordPiece",
    "Unigram",
    "ByteLevel",
    "Metaspace",
    "Sequence",
    "Split",
    "Regex",
    "String",
    "Lowercase",
    "NFC",
    "NFKD",
    "Replace",
    "Strip",
    "ByteFallback",
    "Fuse",
    "TemplateProcessing",
    "RobertaProcessing",
    "BertProcessing",
    "content",
    "special",
    "id",
    "ids",
    "vocab",
    "merges",
    "unk_token",
    "unk_id",
    "type",
    "pattern",
    "behavior",
    "Isolated",
    "(?i:'s|'t)",
    "\\p{L}+",
    "(((((a*)*)*)*)*)b",
    "[",
    "(?=x)",
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
];

fn tok_case(bases: usize) -> impl Strategy<Value = TokCase> {
    // The whole SmolLM2 tokenizer (the last base, 3.5 MB) is slow to mutate: draw it rarely.
    let base = prop_oneof![100 => 0..bases.saturating_sub(1).max(1), 1 => Just(bases - 1)];
    let input = prop_oneof![
        3 => any::<String>(),
        1 => "(<unk>|<s>|</s>|<\\|im_start\\|>|hello|world|##|▁| |\n|é|😀|[a-z]{1,5}){0,12}",
    ];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(TokCase::Bytes),
        12 => (base, json_muts(4), some_byte_muts(2), prop::collection::vec(input, 1..4),
               prop::collection::vec(prop_oneof![0i32..600, any::<i32>()], 0..8))
            .prop_map(|(base, json, bytes, inputs, ids)| TokCase::Mutated { base, json, bytes, inputs, ids }),
    ]
}

#[test]
fn fuzz_tokenizer() {
    let bases = tokenizer_bases();
    let pool = JsonPool::new(bases[..bases.len().min(5)].to_vec(), TOK_WORDS);
    fuzz("tokenizer", tok_case(bases.len()), |case| {
        let (bytes, inputs, extra_ids) = match case {
            TokCase::Bytes(b) => (b.clone(), vec!["hello world".to_string()], vec![]),
            TokCase::Mutated { base, json, bytes, inputs, ids } => {
                let mut b = pool.mutate_one(&bases[*base % bases.len()], json);
                let len = b.len();
                apply_byte_muts(&mut b, bytes, 0..len, TOK_WORDS);
                (b, inputs.clone(), ids.clone())
            }
        };
        let Ok(text) = Text::from_bytes(&bytes) else { return Ok("refused") };
        let _ = (text.vocab_size(), text.token_id("<s>"), text.token_id(""));
        for s in &inputs {
            for special in [false, true] {
                if let Ok(ids) = text.encode(s, special) {
                    let _ = text.decode(&ids);
                    let mut stream = StreamDecoder::new(&text);
                    for &id in &ids {
                        let _ = stream.push(id);
                    }
                    let _ = stream.text();
                }
            }
        }
        let _ = text.decode(&extra_ids);
        let mut stream = StreamDecoder::new(&text);
        for &id in &extra_ids {
            let _ = stream.push(id);
        }
        Ok("loaded, encoded and decoded")
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Chat templates.

/// Templates in the styles real models ship (ChatML from SmolLM2 when available, Llama-3,
/// Mistral with `raise_exception`, Zephyr with namespaces).
fn template_bases() -> Vec<String> {
    let mut out = vec![
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}".to_string(),
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}".to_string(),
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content %}{% endif %}{% endfor %}{% if ns.sys %}<|system|>\n{{ ns.sys }}</s>\n{% endif %}{% for m in messages if m.role != 'system' %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}".to_string(),
        "{% macro fmt(m) %}{{ m.role|upper }}: {{ m.content|replace('\\n', ' ')|truncate(50) }}{% endmacro %}{% for m in messages|reverse %}{{ fmt(m) }}{{ loop.length }}{% endfor %}{{ messages|length }}{{ messages[0].content[::-1] if messages else '' }}".to_string(),
    ];
    if let Ok(t) = std::fs::read_to_string(common::shared().join("tools/smollm2/chat_template.jinja")) {
        out.push(t);
    }
    out
}

/// Jinja fragments for insertion: control flow, filters, errors, recursion, big values.
const JINJA_WORDS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{% if x %}",
    "{% endif %}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{{ m.content }}",
    "{{ messages[-1] }}",
    "{{ messages[99] }}",
    "{{ raise_exception('fuzz') }}",
    "{{ raise_exception() }}",
    "{{ raise_exception(1) }}",
    "{% macro r(n) %}{{ r(n) }}{% endmacro %}{{ r(1) }}",
    "{% set x = namespace(a=1) %}",
    "{{ range(100)|join(',') }}",
    "{{ 'ab' * 1000 }}",
    "{{ messages|tojson }}",
    "{{ loop.index }}",
    "{{ 1 / 0 }}",
    "{{ 1 // 0 }}",
    "{{ 9999999999999999999 * 9999999999999999999 }}",
    "{{ -9223372036854775808 // -1 }}",
    "{{ 'x'[1:0:-1] }}",
    "{{ undefined_var.attr }}",
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{% include 'chat' %}",
    "{% extends 'chat' %}",
    "{% filter upper %}",
    "{% endfilter %}",
    "{% raw %}",
    "{% endraw %}",
    "|trim",
    "|length",
    "|tojson",
    "|int",
    "|first",
    "|batch(0)",
    "|slice(0)",
    "|indent(100000)",
    "|center(100000)",
    "|round(400)",
    "|format(1)",
    "|dictsort",
    "|unique",
    "message['role']",
    "add_generation_prompt",
    "loop.cycle()",
    "loop(messages)",
];

/// Loops and values big enough to render for hours or fill memory: rendering has no fuel or
/// output limit yet (being added to `render_chat`), so these are drawn only with
/// `LLMC_FUZZ_TEMPLATE_LOOPS=1` until it has one.
const JINJA_BIG_WORDS: &[&str] = &[
    "{% for i in range(100000) %}",
    "{% for j in range(100000) %}",
    "{{ 'x' * 100000 }}",
    "{% endfor %}",
    "{% endfor %}",
];

#[derive(Clone, Debug)]
enum TplSource {
    Arbitrary(String),
    Mutated(usize, Vec<TextMut>),
    /// A sequence of fragments glued together.
    Fragments(Vec<u16>),
}

#[derive(Clone, Debug)]
struct TplCase {
    template: TplSource,
    messages: Vec<(String, String)>,
    bos: Option<String>,
    eos: Option<String>,
}

fn tpl_case(bases: usize) -> impl Strategy<Value = TplCase> {
    let source = prop_oneof![
        1 => any::<String>().prop_map(TplSource::Arbitrary),
        6 => (0..bases, text_muts(4)).prop_map(|(b, m)| TplSource::Mutated(b, m)),
        3 => prop::collection::vec(any::<u16>(), 1..10).prop_map(TplSource::Fragments),
    ];
    let role = prop_oneof![
        Just("user".to_string()),
        Just("assistant".to_string()),
        Just("system".to_string()),
        any::<String>()
    ];
    let content = prop_oneof![3 => any::<String>(), 1 => "(\\{\\{|\\}\\}|\\{%|%\\}|<s>|[a-z ]{0,10}|\n|😀)*"];
    (
        source,
        prop::collection::vec((role, content), 0..5),
        prop::option::of(any::<String>()),
        prop::option::of(prop_oneof![Just("</s>".to_string()), any::<String>()]),
    )
        .prop_map(|(template, messages, bos, eos)| TplCase { template, messages, bos, eos })
}

#[test]
fn fuzz_chat_template() {
    let bases = template_bases();
    let mut words = JINJA_WORDS.to_vec();
    if env_u64("LLMC_FUZZ_TEMPLATE_LOOPS").unwrap_or(0) != 0 {
        words.extend_from_slice(JINJA_BIG_WORDS);
    }
    fuzz("chat_template", tpl_case(bases.len()), |case| {
        let template = match &case.template {
            TplSource::Arbitrary(s) => s.clone(),
            TplSource::Mutated(b, muts) => apply_text_muts(&bases[*b % bases.len()], muts, &words),
            TplSource::Fragments(f) => f.iter().map(|&i| words[i as usize % words.len()]).collect(),
        };
        let messages: Vec<Message> = case
            .messages
            .iter()
            .map(|(role, content)| Message { role: role.clone(), content: content.clone() })
            .collect();
        match render_chat(&template, &messages, case.bos.as_deref(), case.eos.as_deref()) {
            Ok(_) => Ok("rendered"),
            Err(_) => Ok("refused"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7. GGUF files.

/// A GGUF writer for the fuzz bases; also returns where every count, length, dim, type and
/// offset field sits (`(byte offset, width)`), for targeted number edits.
struct GgufBuilder {
    b: Vec<u8>,
    fields: Vec<(usize, usize)>,
}

impl GgufBuilder {
    fn num(&mut self, v: u64, width: usize) {
        self.fields.push((self.b.len(), width));
        self.b.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    fn str(&mut self, s: &str) {
        self.num(s.len() as u64, 8);
        self.b.extend_from_slice(s.as_bytes());
    }
    /// `kv`: (key, value type, value writer); tensors: (name, ne, type id, data).
    fn file(
        kv: &[(&str, Box<dyn Fn(&mut GgufBuilder)>)],
        tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
        align: usize,
    ) -> GgufBuilder {
        let mut g = GgufBuilder { b: b"GGUF".to_vec(), fields: Vec::new() };
        g.num(3, 4);
        g.num(tensors.len() as u64, 8);
        g.num(kv.len() as u64, 8);
        for (k, w) in kv {
            g.str(k);
            w(&mut g);
        }
        let mut off = 0u64;
        for (name, ne, ty, data) in tensors {
            g.str(name);
            g.num(ne.len() as u64, 4);
            for &d in ne {
                g.num(d, 8);
            }
            g.num(*ty as u64, 4);
            g.num(off, 8);
            off += (data.len() as u64).div_ceil(align as u64) * align as u64;
        }
        for (_, _, _, data) in tensors {
            while g.b.len() % align != 0 {
                g.b.push(0);
            }
            g.b.extend_from_slice(data);
        }
        g
    }
}

fn gguf_bases() -> Vec<GgufBuilder> {
    let s = |v: &'static str| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(8, 4);
            g.str(v)
        })
    };
    let u32v = |v: u64| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(4, 4);
            g.num(v, 4)
        })
    };
    let f32v = |v: f32| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(6, 4);
            g.b.extend_from_slice(&v.to_le_bytes())
        })
    };
    let strs = |v: &'static [&'static str]| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(9, 4);
            g.num(8, 4);
            g.num(v.len() as u64, 8);
            for x in v {
                g.str(x)
            }
        })
    };
    let nested: Box<dyn Fn(&mut GgufBuilder)> = Box::new(|g| {
        g.num(9, 4);
        g.num(9, 4);
        g.num(2, 8);
        for _ in 0..2 {
            g.num(5, 4);
            g.num(3, 8);
            for i in 0..3 {
                g.num(i, 4);
            }
        }
    });
    let f32s = |n: usize| (0..n).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect::<Vec<u8>>();
    let q8 = |blocks: usize| {
        (0..blocks)
            .flat_map(|b| {
                let mut v = half::f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes().to_vec();
                v.extend((0..32).map(|i| (i as i8 - 16) as u8));
                v
            })
            .collect::<Vec<u8>>()
    };
    let i32s = |v: &'static [i32]| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(9, 4);
            g.num(5, 4);
            g.num(v.len() as u64, 8);
            for &x in v {
                g.num(x as u32 as u64, 4)
            }
        })
    };
    let boolv = |v: bool| -> Box<dyn Fn(&mut GgufBuilder)> {
        Box::new(move |g| {
            g.num(7, 4);
            g.b.push(v as u8)
        })
    };
    let halfs = |n: usize, bf: bool| {
        (0..n)
            .flat_map(|i| {
                let v = (i % 7) as f32 * 0.01 - 0.03;
                if bf {
                    half::bf16::from_f32(v).to_le_bytes()
                } else {
                    half::f16::from_f32(v).to_le_bytes()
                }
            })
            .collect::<Vec<u8>>()
    };
    let q4 = |blocks: usize, with_min: bool| {
        (0..blocks)
            .flat_map(|b| {
                let mut v = half::f16::from_f32(0.01 * (b % 5 + 1) as f32).to_le_bytes().to_vec();
                if with_min {
                    v.extend(half::f16::from_f32(-0.05).to_le_bytes());
                }
                v.extend((0..16).map(|i| (i * 37 + b) as u8));
                v
            })
            .collect::<Vec<u8>>()
    };
    // A whole (tiny) llama model with a gpt2 tokenizer: llmc_models::load takes it.
    let model = GgufBuilder::file(
        &[
            ("general.architecture", s("llama")),
            ("llama.embedding_length", u32v(32)),
            ("llama.feed_forward_length", u32v(64)),
            ("llama.block_count", u32v(1)),
            ("llama.attention.head_count", u32v(2)),
            ("llama.attention.head_count_kv", u32v(1)),
            ("llama.rope.dimension_count", u32v(16)),
            ("llama.context_length", u32v(64)),
            ("llama.attention.layer_norm_rms_epsilon", f32v(1e-5)),
            ("llama.rope.freq_base", f32v(10000.0)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("smollm")),
            ("tokenizer.ggml.tokens", strs(&["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa", "c", "<|im_start|>"])),
            ("tokenizer.ggml.token_type", i32s(&[3, 1, 1, 1, 1, 1, 1, 3])),
            ("tokenizer.ggml.merges", strs(&["a b", "Ġ a"])),
            ("tokenizer.ggml.bos_token_id", u32v(7)),
            ("tokenizer.ggml.eos_token_id", u32v(0)),
            ("tokenizer.ggml.add_bos_token", boolv(false)),
            ("tokenizer.chat_template", s("{% for m in messages %}{{ m.content }}{% endfor %}")),
        ],
        &[
            ("token_embd.weight", vec![32, 8], 0, f32s(256)),
            ("output_norm.weight", vec![32], 0, f32s(32)),
            ("blk.0.attn_norm.weight", vec![32], 0, f32s(32)),
            ("blk.0.ffn_norm.weight", vec![32], 0, f32s(32)),
            ("blk.0.attn_q.weight", vec![32, 32], 8, q8(32)),
            ("blk.0.attn_k.weight", vec![32, 16], 3, q4(16, true)),
            ("blk.0.attn_v.weight", vec![32, 16], 2, q4(16, false)),
            ("blk.0.attn_output.weight", vec![32, 32], 1, halfs(1024, false)),
            ("blk.0.ffn_gate.weight", vec![32, 64], 0, f32s(2048)),
            ("blk.0.ffn_up.weight", vec![32, 64], 30, halfs(2048, true)),
            ("blk.0.ffn_down.weight", vec![64, 32], 8, q8(64)),
        ],
        32,
    );
    // Blocks of the other quantized types (ggml ids: Q5_0 6, Q5_1 7, Q4_K 12, Q5_K 13,
    // Q6_K 14), `n` ggml blocks of `bytes` each, their f16 scale fields at `scales` finite.
    let kq = |n: usize, bytes: usize, scales: &'static [usize]| {
        (0..n)
            .flat_map(|b| {
                let mut v: Vec<u8> = (0..bytes).map(|i| (i * 37 + b * 11) as u8).collect();
                for &at in scales {
                    v[at..at + 2].copy_from_slice(&half::f16::from_f32(0.002 * (b % 3 + 1) as f32).to_le_bytes());
                }
                v
            })
            .collect::<Vec<u8>>()
    };
    // A llama model of hidden size 256 (K-quant rows) with a SentencePiece tokenizer.
    let spm = GgufBuilder::file(
        &[
            ("general.architecture", s("llama")),
            ("llama.embedding_length", u32v(256)),
            ("llama.feed_forward_length", u32v(256)),
            ("llama.block_count", u32v(1)),
            ("llama.attention.head_count", u32v(2)),
            ("llama.attention.head_count_kv", u32v(1)),
            ("llama.context_length", u32v(64)),
            ("llama.attention.layer_norm_rms_epsilon", f32v(1e-5)),
            ("tokenizer.ggml.model", s("llama")),
            ("tokenizer.ggml.tokens", strs(&["<unk>", "<s>", "</s>", "▁", "a", "▁a", "<0x61>", "b"])),
            ("tokenizer.ggml.token_type", i32s(&[2, 3, 3, 1, 1, 1, 6, 1])),
            ("tokenizer.ggml.bos_token_id", u32v(1)),
            ("tokenizer.ggml.eos_token_id", u32v(2)),
            ("tokenizer.ggml.unknown_token_id", u32v(0)),
        ],
        &[
            ("token_embd.weight", vec![256, 8], 0, f32s(2048)),
            ("output_norm.weight", vec![256], 0, f32s(256)),
            ("blk.0.attn_norm.weight", vec![256], 0, f32s(256)),
            ("blk.0.ffn_norm.weight", vec![256], 0, f32s(256)),
            ("blk.0.attn_q.weight", vec![256, 256], 12, kq(256, 144, &[0, 2])),
            ("blk.0.attn_k.weight", vec![256, 128], 14, kq(128, 210, &[208])),
            ("blk.0.attn_v.weight", vec![256, 128], 13, kq(128, 176, &[0, 2])),
            ("blk.0.attn_output.weight", vec![256, 256], 6, kq(2048, 22, &[0])),
            ("blk.0.ffn_gate.weight", vec![256, 256], 7, kq(2048, 24, &[0, 2])),
            ("blk.0.ffn_up.weight", vec![256, 256], 12, kq(256, 144, &[0, 2])),
            ("blk.0.ffn_down.weight", vec![256, 256], 14, kq(256, 210, &[208])),
        ],
        32,
    );
    vec![
        model,
        spm,
        GgufBuilder::file(
            &[
                ("general.architecture", s("llama")),
                ("llama.block_count", u32v(1)),
                ("llama.attention.layer_norm_rms_epsilon", f32v(1e-5)),
                ("tokenizer.ggml.tokens", strs(&["<unk>", "a", "b", "ab"])),
                ("x.nested", nested),
            ],
            &[("token_embd.weight", vec![32, 4], 8, q8(4)), ("output_norm.weight", vec![32], 0, f32s(32))],
            32,
        ),
        GgufBuilder::file(
            &[("general.alignment", u32v(64)), ("general.name", s("two"))],
            &[
                ("a", vec![3, 2], 0, f32s(6)),
                ("b", vec![2, 2, 2, 2], 1, vec![0x3c; 32]),
                ("c", vec![32], 3, vec![1; 20]),
            ],
            64,
        ),
    ]
}

#[derive(Clone, Debug)]
enum GgufCase {
    Bytes(Vec<u8>),
    /// Numbers set at fields of the base (field index, value index into INTS), then byte edits.
    Mutated {
        base: usize,
        nums: Vec<(u16, u16)>,
        bytes: Vec<ByteMut>,
    },
}

/// The two model bases load and compile unmutated (so the fuzzer starts from files that reach
/// every stage: the gpt2 and SentencePiece tokenizers, every tensor type).
#[test]
fn gguf_bases_compile() {
    let dir = tempfile::tempdir().unwrap();
    for (i, g) in gguf_bases().iter().take(2).enumerate() {
        let file = dir.path().join(format!("base{i}.gguf"));
        std::fs::write(&file, &g.b).unwrap();
        let model = llmc_models::load(&file, None).unwrap_or_else(|e| panic!("base {i}: {e}"));
        let tok = model.text.tokenizer_json.as_ref().expect("a tokenizer");
        Text::from_bytes(tok).unwrap_or_else(|e| panic!("base {i}: {e}"));
        let out = dir.path().join(format!("base{i}.llmc"));
        let pipeline = llmc_ir::passes::standard_pipeline();
        llmc_writer::compile(
            &model,
            &out,
            &pipeline,
            llmc_writer::Storage::Checkpoint,
            llmc_writer::Activations::Q8,
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("base {i}: {e}"));
    }
}

#[test]
fn fuzz_gguf() {
    let bases = gguf_bases();
    let strategy = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|mut b| {
            if b.len() >= 8 {
                b[..4].copy_from_slice(b"GGUF");
                b[4..8].copy_from_slice(&3u32.to_le_bytes());
            }
            GgufCase::Bytes(b)
        }),
        8 => (0..bases.len(), prop::collection::vec((any::<u16>(), any::<u16>()), 0..3), some_byte_muts(3))
            .prop_map(|(base, nums, bytes)| GgufCase::Mutated { base, nums, bytes }),
    ];
    let path = Path::new("fuzz.gguf");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fuzz.gguf");
    let out = dir.path().join("fuzz.llmc");
    fuzz("gguf", strategy, |case| {
        let bytes = match case {
            GgufCase::Bytes(b) => b.clone(),
            GgufCase::Mutated { base, nums, bytes } => {
                let g = &bases[*base];
                let mut b = g.b.clone();
                for &(f, v) in nums {
                    let (at, width) = g.fields[f as usize % g.fields.len()];
                    let val = INTS[v as usize % INTS.len()] as u64;
                    b[at..at + width].copy_from_slice(&val.to_le_bytes()[..width]);
                }
                let len = b.len();
                apply_byte_muts(&mut b, bytes, 0..len, &["GGUF"]);
                b
            }
        };
        let header = llmc_models::gguf::Gguf::parse(path, &bytes);
        if header.is_ok() {
            // the whole import: metadata → config, tensors, tokenizer; then compile
            std::fs::write(&file, &bytes).map_err(|e| e.to_string())?;
            if let Ok(model) = llmc_models::load(&file, None) {
                if let Some(tok) = &model.text.tokenizer_json {
                    if let Ok(t) = Text::from_bytes(tok) {
                        let _ = t.encode("ab c<|im_start|>", true).map(|ids| t.decode(&ids));
                    }
                }
                let _ = std::fs::remove_file(&out);
                let pipeline = llmc_ir::passes::standard_pipeline();
                let storage = llmc_writer::Storage::Checkpoint;
                return Ok(
                    match llmc_writer::compile(
                        &model,
                        &out,
                        &pipeline,
                        storage,
                        llmc_writer::Activations::Q8,
                        &mut |_| {},
                    ) {
                        Ok(_) => "loaded and compiled",
                        Err(_) => "loaded, compile refused",
                    },
                );
            }
        }
        match header {
            Err(_) => Ok("refused"),
            Ok(g) => {
                let mut spans: Vec<(usize, usize)> = Vec::new();
                for t in &g.tensors {
                    if t.start > t.end || t.end > bytes.len() || t.shape.is_empty() || t.shape.len() > 4 {
                        return Err(format!(
                            "tensor `{}` accepted with span {}..{} of {}",
                            t.name,
                            t.start,
                            t.end,
                            bytes.len()
                        ));
                    }
                    spans.push((t.start, t.end));
                }
                spans.sort_unstable();
                if spans.windows(2).any(|w| w[1].0 < w[0].1 && w[0].1 > w[0].0 && w[1].1 > w[1].0) {
                    return Err("overlapping tensors accepted".into());
                }
                Ok("parsed")
            }
        }
    });
}
