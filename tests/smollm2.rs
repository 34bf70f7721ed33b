//! A real trained model end to end: SmolLM2-135M-Instruct (f32) through the JIT must produce
//! transformers' 32 greedy tokens and its top-5 logits at the last prompt position.
//! Ignored by default (it fetches and runs a 538 MB model); `scripts/test` runs it.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The model folder, fetched once per test process (the tests run in parallel threads; the
/// fetcher must not run twice at the same time into one folder).
fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(fetch_model).clone()
}

fn fetch_model() -> PathBuf {
    let dir = match std::env::var_os("LLMC_SMOLLM2") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/smollm2"),
    };
    if !dir.join("model.safetensors").exists() || !dir.join("tokenizer.json").exists() {
        let tool = common::shared().join("tools/get-smollm2");
        let st = Command::new(&tool).arg(&dir).status().expect("run get-smollm2");
        assert!(st.success(), "{} failed", tool.display());
    }
    dir
}

/// The compiled artifact, compiled once per test process into target/models (not a temp dir:
/// statics are never dropped, and 540 MB must not pile up in /tmp).
fn compiled() -> ((), PathBuf) {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    let art = ART.get_or_init(|| {
        let dir = model_dir();
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models");
        std::fs::create_dir_all(&out).unwrap();
        let art = out.join("smollm2-test.llmc");
        common::compile(&dir, &art);
        art
    });
    ((), art.clone())
}

fn expected() -> serde_json::Value {
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::shared().join("tools/smollm2/expected.json")).unwrap())
            .unwrap();
    e["prompts"][0].clone()
}

/// `llmc run -p "The capital of France is" -n 32 --temp 0` streams transformers' greedy text,
/// stopping at the end-of-sequence token; with --ignore-eos all 32 tokens come out.
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_text_prompt() {
    let (_d, art) = compiled();
    let case = expected();
    let full = case["greedy_text"].as_str().unwrap();
    let a = art.to_str().unwrap();
    let o = common::llmc(&["run", a, "-p", case["text"].as_str().unwrap(), "-n", "32", "--temp", "0"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    let until_eos = &full[..full.find("<|im_end|>").unwrap()];
    assert_eq!(stdout.trim_end_matches('\n'), until_eos.trim_end_matches('\n'));
    assert!(stdout.starts_with(" Paris."));
    assert!(common::stderr(&o).contains("tok/s"), "timings line on stderr");
    let o = common::llmc(&[
        "run",
        a,
        "-p",
        case["text"].as_str().unwrap(),
        "-n",
        "32",
        "--temp",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), full);
    assert_eq!(common::ints(&v["prompt_ids"]), common::ints(&case["prompt_ids"]));
    assert_eq!(common::ints(&v["generated_ids"]), common::ints(&case["greedy_ids"]));
}

#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_chat_sampling_and_stops() {
    let (_d, art) = compiled();
    let a = art.to_str().unwrap();
    // chat: the reply to a simple question, greedy
    let o = common::llmc(&["run", a, "-p", "What is the capital of France?", "--chat", "-n", "24", "--temp", "0"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Paris"), "{}", String::from_utf8_lossy(&o.stdout));
    // same seed, same text; another seed, (almost surely) another text
    let sample = |seed: &str| {
        let o = common::llmc(&["run", a, "-p", "Once upon a time", "-n", "24", "--temp", "1.0", "-s", seed, "--json"]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(sample("7"), sample("8"));
    // --stop cuts the text before the stop string
    let o = common::llmc(&[
        "run",
        a,
        "-p",
        "The capital of France is",
        "-n",
        "32",
        "--temp",
        "0",
        "--stop",
        "answer",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), " Paris.\n\nThe ");
    // a prompt longer than the context is a clear error
    let o = common::llmc(&["run", a, "-p", "one two three four five six seven eight nine ten", "-c", "8", "-n", "4"]);
    assert!(!o.status.success() && common::stderr(&o).contains("context"), "{}", common::stderr(&o));
    // inspect describes the artifact
    let o = common::llmc(&["inspect", a, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["tokenizer"]["vocab_size"], 49152);
    assert_eq!(v["chat_template"], true);
    assert!(v["parameters"].as_u64().unwrap() > 134_000_000);
}

#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_greedy_matches_transformers() {
    let (_tmp, art) = compiled();
    let case = &expected();
    let prompt = common::ints(&case["prompt_ids"]);
    let out = common::run_json(&art, &prompt, 32, &["--logits", "--backend", "jit"]);
    assert_eq!(common::ints(&out["generated_ids"]), common::ints(&case["greedy_ids"]), "greedy tokens");
    let logits = common::floats(&out["logits_last"]);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top5: Vec<i64> = idx[..5].iter().map(|&i| i as i64).collect();
    assert_eq!(top5, common::ints(&case["last_top5_ids"]), "top-5 ids");
    for (i, want) in idx[..5].iter().zip(common::floats(&case["last_top5_values"])) {
        let got = logits[*i];
        assert!((got - want).abs() <= 1e-3 * want.abs(), "logit {i}: {got} vs {want}");
    }
}

/// Interactive chat on a terminal (a pseudo-terminal from util-linux `script`): the history is
/// kept in the context across turns, and /exit quits.
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_interactive_chat() {
    use std::io::Write;
    let (_d, art) = compiled();
    let cmd = format!("{} run {} --temp 0 -n 24", env!("CARGO_BIN_EXE_llmc"), art.display());
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("`script` (util-linux) provides the terminal for this test");
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\nAnd of Italy?\n/exit\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    let paris = out.find("Paris").expect("first answer");
    let rome = out.find("Rome").expect("second answer, which needs the first turn in the context");
    assert!(paris < rome, "{out}");
}

/// An artifact rewritten in place while llmc runs (`cp other.llmc live.llmc` truncates it)
/// loses the pages llmc has mapped: the next read is one `error:` line and exit 1, not a
/// SIGBUS. Deterministic: llmc maps the artifact, then blocks reading the prompt from stdin;
/// the test truncates the file once the mapping shows in /proc, then closes stdin, and llmc
/// reads the tokenizer section from the map.
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn artifact_truncated_while_running_is_an_error_not_a_signal() {
    use std::io::Write;
    use std::process::Stdio;
    let (_d, art) = compiled();
    let live = art.with_file_name("smollm2-live-truncated.llmc");
    std::fs::copy(&art, &live).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmc"))
        .args(["run", live.to_str().unwrap(), "-n", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let maps = format!("/proc/{}/maps", child.id());
    let name = live.file_name().unwrap().to_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&maps).unwrap_or_default().contains(&name) {
        assert!(t0.elapsed().as_secs() < 60, "llmc never mapped the artifact");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::OpenOptions::new().write(true).open(&live).unwrap().set_len(4096).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // llmc may already have touched a truncated page while loading (and exited with the
    // error below) before it reads the prompt: then this write meets a closed pipe.
    let _ = stdin.write_all(b"The capital of France is");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&live);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "status {:?}: {err}", out.status);
    assert!(err.trim().starts_with("error:") && err.contains("truncated or rewritten"), "{err}");
}

/// A context whose state cannot fit this machine is refused before anything is allocated,
/// with the memory it would take (SmolLM2's KV cache is 46 KB per position: 16M positions
/// would take 740 GB).
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn context_larger_than_memory_is_refused_with_its_size() {
    let (_d, art) = compiled();
    let engine = llmc_runtime::Engine::open(&art, 1).unwrap();
    for backend in [llmc_runtime::Backend::Jit, llmc_runtime::Backend::Interp] {
        let e = match llmc_runtime::Session::new(&engine, backend, Some(16_000_000)) {
            Ok(_) => panic!("a 16M-token context cannot fit"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("GiB") && e.contains("16000000"), "{e}");
    }
}

/// `llmc compile` works a few tensors at a time (one per core, at most 4): its peak RSS stays
/// below the artifact's size plus a few times the largest tensor in f32 plus 200 MB (it held
/// every folded weight at once before: 1.11 GB for this 542 MB artifact; 0.58 GB now). Measured with
/// `getrusage(RUSAGE_CHILDREN)`, the largest of this test process's finished children.
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn compile_peak_memory_is_a_few_tensors_at_a_time() {
    let dir = model_dir();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/smollm2-rss.llmc");
    common::compile(&dir, &out);
    let size = std::fs::metadata(&out).unwrap().len();
    let _ = std::fs::remove_file(&out);
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) }, 0);
    let peak = ru.ru_maxrss as u64 * 1024;
    let largest_f32 = 49152 * 576 * 4; // the embedding
    let bound = size + 3 * largest_f32 + (200 << 20);
    eprintln!("compile peak RSS {} MB, artifact {} MB, bound {} MB", peak >> 20, size >> 20, bound >> 20);
    assert!(peak < bound, "peak RSS {peak} above {bound}");
}

/// SmolLM2 at every storage type runs, its artifact shrinks accordingly, and bf16, f16 and
/// q8_0 still answer the quick-start prompt with " Paris." (greedy).
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn smollm2_every_dtype_says_paris() {
    let dir = model_dir();
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models");
    for (dt, max_mb) in [("bf16", 280), ("f16", 280), ("q8_0", 160), ("q4_0", 105)] {
        let art = out_dir.join(format!("smollm2-test-{dt}.llmc"));
        let o = common::llmc(&["compile", dir.to_str().unwrap(), "-o", art.to_str().unwrap(), "-q", "--dtype", dt]);
        assert!(o.status.success(), "{dt}: {}", common::stderr(&o));
        let mb = std::fs::metadata(&art).unwrap().len() >> 20;
        let o =
            common::llmc(&["run", art.to_str().unwrap(), "-p", "The capital of France is", "-n", "3", "--temp", "0"]);
        let _ = std::fs::remove_file(&art);
        assert!(o.status.success(), "{dt}: {}", common::stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        eprintln!("{dt}: {mb} MB: {text:?}");
        // q4_0 (re-quantized from the Q4_1 weights SmolLM2 ships as; PPL 22.5 on GPL-3 against
        // llama.cpp's 23.1 for its Q4_0 of the same weights) ranks " Paris" below
        // " approximately" for this prompt: its quality is checked by perplexity instead.
        if dt != "q4_0" {
            assert!(text.starts_with(" Paris"), "{dt}: {text:?}");
        } else {
            assert!(!text.trim().is_empty(), "{dt}: {text:?}");
        }
        assert!(mb <= max_mb, "{dt}: {mb} MB");
    }
}

/// Quantization quality by perplexity on a fixed text (GPL-3, -c 512, llama-perplexity's
/// method): q8_0 within 0.5% of f32, q4_0 within 3% of llama.cpp's Q4_0 of the same weights
/// (23.08, measured with llama-perplexity; f32 llmc 18.13, llama.cpp 18.30 with its digit
/// splitting). Slow (two full runs): about three minutes on two cores.
#[test]
#[ignore = "fetches and runs a 538 MB model; scripts/test runs it in release mode"]
fn quantized_perplexity_matches_llama_cpp_quality() {
    let dir = model_dir();
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models");
    let ppl = |dt: &str| -> f64 {
        let art = out_dir.join(format!("smollm2-ppl-{dt}.llmc"));
        let o = common::llmc(&["compile", dir.to_str().unwrap(), "-o", art.to_str().unwrap(), "-q", "--dtype", dt]);
        assert!(o.status.success(), "{dt}: {}", common::stderr(&o));
        let o = common::llmc(&[
            "perplexity",
            art.to_str().unwrap(),
            "-f",
            "/usr/share/common-licenses/GPL-3",
            "-c",
            "512",
            "--json",
        ]);
        let _ = std::fs::remove_file(&art);
        assert!(o.status.success(), "{dt}: {}", common::stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["ppl"].as_f64().unwrap()
    };
    let (f32_ppl, q8, q4) = (ppl("f32"), ppl("q8_0"), ppl("q4_0"));
    eprintln!("perplexity f32 {f32_ppl:.3}, q8_0 {q8:.3}, q4_0 {q4:.3} (llama.cpp Q4_0: 23.08)");
    assert!((q8 - f32_ppl).abs() / f32_ppl < 0.005, "q8_0 {q8} vs f32 {f32_ppl}");
    assert!((q4 - 23.08).abs() / 23.08 < 0.03, "q4_0 {q4} vs llama.cpp's 23.08");
}
