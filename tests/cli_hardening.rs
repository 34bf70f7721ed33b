//! The CLI against hostile surroundings: outputs that are devices, FIFOs or the model's own
//! files; a closed or full stdout; interrupted and failing compiles; out-of-range options;
//! absurd thread counts; unbounded inputs (/dev/zero); runaway chat templates.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fixture, llmc, stderr};

fn bin() -> Command {
    Command::new(common::llmc_bin())
}

/// A copy of a fixture folder (writable), for tests that must not touch the shared one.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    fs::create_dir(&model).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "expected.json" {
            fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
    }
    (dir, model)
}

fn compiled(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("m.llmc");
    common::compile(&fixture(name), &art);
    (dir, art)
}

/// Asserts a failure with exactly one `error:` line on stderr and no panic; returns the line.
fn one_error_line(o: &Output) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "should fail: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(e.starts_with("error: "), "{e}");
    e
}

/// Waits for a child at most `limit`, killing it (and failing the test) past that.
fn wait_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_within(args: &[&str], limit: Duration) -> Output {
    let child = bin().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_within(child, limit, &format!("llmc {}", args.join(" ")))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

// ---- 1. outputs that are not regular files ----

#[test]
fn output_onto_a_fifo_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let model = fixture("llama");
    let o = run_within(&["compile", model.to_str().unwrap(), "-o", fifo.to_str().unwrap()], Duration::from_secs(60));
    let e = one_error_line(&o);
    assert!(e.contains(fifo.to_str().unwrap()) && e.contains("not a regular file"), "{e}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO must still be a FIFO");
    assert_eq!(names_in(dir.path()), ["pipe"], "no temp file left");

    // A folder as output is refused up front too.
    let o = llmc(&["compile", model.to_str().unwrap(), "-o", dir.path().to_str().unwrap()]);
    let e = one_error_line(&o);
    assert!(e.contains("is a folder"), "{e}");
}

// ---- 2. outputs that are the model's own files ----

#[test]
fn output_onto_an_input_file_is_refused() {
    let (_d, model) = copy_fixture("llama");
    let before: Vec<(String, Vec<u8>)> =
        names_in(&model).into_iter().map(|n| (n.clone(), fs::read(model.join(&n)).unwrap())).collect();
    let config = model.join("config.json");
    let weights = model.join("model.safetensors");
    let hard = model.parent().unwrap().join("hard-link.llmc");
    fs::hard_link(&weights, &hard).unwrap();
    let soft = model.parent().unwrap().join("soft-link.llmc");
    std::os::unix::fs::symlink(&config, &soft).unwrap();
    let dotted = model.join(".").join("config.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases = [
        (s(&config), s(&config)),
        (s(&model), s(&config)),
        (s(&model), s(&weights)),
        (s(&model), s(&model.join("generation_config.json"))),
        (s(&config), s(&dotted)),
        (s(&model), s(&hard)),
        (s(&model), s(&soft)),
    ];
    for (input, output) in &cases {
        let o = llmc(&["compile", input, "-o", output]);
        let e = one_error_line(&o);
        assert!(e.contains(output.as_str()) && e.contains("input files"), "{input} -o {output}: {e}");
    }
    for (name, bytes) in &before {
        assert_eq!(&fs::read(model.join(name)).unwrap(), bytes, "{name} was changed");
    }
    assert_eq!(names_in(&model), before.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "no temp file left");
}

// ---- 3. stdout closed or full ----

/// Runs llmc with a stdout pipe whose read end is already closed.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = bin().args(args).stdout(writer).stderr(Stdio::piped()).spawn().unwrap();
    wait_within(child, Duration::from_secs(60), &args.join(" "))
}

#[test]
fn closed_stdout_pipe_exits_quietly() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let runs: [&[&str]; 6] = [
        &["run", a, "--ids", "1", "-n", "4", "--json", "--logits"],
        &["run", a, "--ids", "1", "-n", "64"],
        &["inspect", a],
        &["inspect", a, "--json"],
        &["ir", a],
        &["ir", "--list-passes"],
    ];
    for args in runs {
        let o = run_into_closed_pipe(args);
        let e = stderr(&o);
        assert!(!e.contains("panicked") && !e.contains("Broken pipe"), "{args:?}: {e}");
        assert_eq!(o.status.code(), Some(0), "{args:?}: quiet exit expected: {e}");
        // Timings of a text run still go to stderr; nothing else may.
        assert!(e.lines().all(|l| l.starts_with("prompt eval:")), "{args:?}: {e}");
    }
}

#[test]
fn full_stdout_is_one_error() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let runs: [&[&str]; 6] = [
        &["run", a, "--ids", "1", "-n", "4", "--json", "--logits"],
        &["run", a, "--ids", "1", "-n", "4"],
        &["inspect", a],
        &["ir", a],
        &["ir", "--list-passes"],
        &["bench", a, "-p", "2", "-n", "2"],
    ];
    for args in runs {
        // Opening /dev/full for writing does not change it.
        let full = fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let child = bin().args(args).stdout(full).stderr(Stdio::piped()).spawn().unwrap();
        let o = wait_within(child, Duration::from_secs(60), &args.join(" "));
        let e = one_error_line(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains("writing to stdout") && e.contains("No space left"), "{args:?}: {e}");
    }
}

// ---- 4. temp files of interrupted or failed compiles ----

#[test]
fn stale_temp_files_of_dead_compiles_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.llmc");
    // A PID that is no longer running: a child that has exited and been reaped.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead_pid}")).exists());
    let stale = dir.path().join(format!(".out.llmc.tmp-{dead_pid}"));
    fs::write(&stale, vec![0u8; 4096]).unwrap();
    // A live process's temp (this test's) and other files are left alone.
    let live = dir.path().join(format!(".out.llmc.tmp-{}", std::process::id()));
    fs::write(&live, b"busy").unwrap();
    let other = dir.path().join(".other.llmc.tmp-1234567");
    fs::write(&other, b"not ours").unwrap();
    common::compile(&fixture("llama"), &out);
    assert!(!stale.exists(), "the stale temp file of a dead compile must be removed");
    assert!(live.exists() && other.exists());
    assert!(out.exists());
}

#[test]
fn compile_over_the_file_size_limit_leaves_nothing() {
    // RLIMIT_FSIZE of 64 blocks: the write fails part way (SIGXFSZ used to kill llmc and leave
    // its temp file).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.llmc");
    let o = Command::new("sh")
        .args(["-c", "ulimit -f 64 && exec \"$0\" \"$@\""])
        .arg(common::llmc_bin())
        .args(["compile", fixture("llama").to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let e = one_error_line(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("too large"), "{e}");
    assert_eq!(names_in(dir.path()), Vec::<String>::new(), "nothing may be left: {e}");
}

/// A llama model with a large vocabulary (about 64 MB of embeddings), so that writing its
/// artifact takes long enough to be interrupted.
fn big_model(dir: &Path) -> PathBuf {
    let model = dir.join("big");
    fs::create_dir(&model).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixture("llama").join("config.json")).unwrap()).unwrap();
    let (vocab, hidden) = (65536usize, cfg["hidden_size"].as_u64().unwrap() as usize);
    cfg["vocab_size"] = vocab.into();
    fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let bytes = fs::read(fixture("llama").join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut new_header = serde_json::Map::new();
    let mut blob: Vec<u8> = Vec::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let start = blob.len();
        let mut shape = t["shape"].clone();
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            shape = serde_json::json!([vocab, hidden]);
            // Small varied values (not all zero, so nothing can be skipped).
            blob.extend((0..vocab * hidden).flat_map(|i| ((i % 97) as f32 * 1e-3).to_le_bytes()));
        } else {
            let (a, b) =
                (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
            blob.extend_from_slice(&data[a..b]);
        }
        new_header.insert(
            name.clone(),
            serde_json::json!({"dtype": t["dtype"], "shape": shape, "data_offsets": [start, blob.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&new_header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&blob);
    fs::write(model.join("model.safetensors"), file).unwrap();
    model
}

#[test]
fn sigterm_during_the_write_removes_the_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = big_model(dir.path());
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("big.llmc");
    for attempt in 0..3 {
        let mut child = bin()
            .args(["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tmp = out_dir.join(format!(".big.llmc.tmp-{}", child.id()));
        let t0 = Instant::now();
        let mut seen = false;
        while t0.elapsed() < Duration::from_secs(120) && child.try_wait().unwrap().is_none() {
            if tmp.exists() {
                seen = true;
                assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let o = wait_within(child, Duration::from_secs(60), "compile after SIGTERM");
        assert!(!tmp.exists(), "the temp file must be removed (attempt {attempt}): {}", stderr(&o));
        if !seen {
            // Finished before the temp file was noticed: try again.
            let _ = fs::remove_file(&out);
            continue;
        }
        eprintln!("SIGTERM sent {:?} after the start; exit {:?}", t0.elapsed(), o.status.code());
        match o.status.code() {
            Some(143) => assert!(!out.exists(), "no artifact after an interrupted compile"),
            Some(0) => assert!(out.exists(), "the signal came after the rename: the artifact is complete"),
            other => panic!("exit {other:?} after SIGTERM (143 expected): {}", stderr(&o)),
        }
        assert_eq!(names_in(&out_dir).iter().filter(|n| n.contains(".tmp-")).count(), 0);
        return;
    }
    panic!("the compile always finished before its temp file could be seen");
}

// ---- 5. out-of-range options ----

#[test]
fn out_of_range_options_are_one_line_errors() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--temp", "nan"], "--temp"),
        (&["--temp", "-1"], "--temp"),
        (&["--temp", "-inf"], "--temp"),
        (&["--temp", "inf"], "--temp"),
        (&["--top-p", "2"], "--top-p"),
        (&["--top-p", "nan"], "--top-p"),
        (&["--top-p", "-1"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
        (&["--min-p", "1.5"], "--min-p"),
        (&["--min-p", "nan"], "--min-p"),
        (&["--min-p", "-1"], "--min-p"),
        (&["--repeat-penalty", "0"], "--repeat-penalty"),
        (&["--repeat-penalty", "nan"], "--repeat-penalty"),
        (&["--repeat-penalty", "-1"], "--repeat-penalty"),
        (&["-c", "0"], "--ctx-size"),
        (&["-n", "-1"], "--n-predict"),
    ];
    for (extra, option) in cases {
        let mut args = vec!["run", a, "--ids", "1", "--json"];
        args.extend_from_slice(extra);
        let o = llmc(&args);
        let e = one_error_line(&o);
        assert!(e.contains(option), "{extra:?}: {e}");
    }
    for (extra, option) in [(["-p", "0"], "--n-prompt"), (["-n", "0"], "--n-gen")] {
        let mut args = vec!["bench", a, "--json"];
        args.extend_from_slice(&extra);
        let e = one_error_line(&llmc(&args));
        assert!(e.contains(option), "{extra:?}: {e}");
    }
    // The edges of the ranges are fine.
    for extra in [
        &["--temp", "0"][..],
        &["--top-p", "1", "--min-p", "0"],
        &["--min-p", "1", "--temp", "1"],
        &["--repeat-penalty", "1.5", "--top-k", "0"],
    ] {
        let mut args = vec!["run", a, "--ids", "1", "-n", "2", "--json"];
        args.extend_from_slice(extra);
        let o = llmc(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    }
    // A negative token id is a vocabulary error, not an unknown option.
    let e = one_error_line(&llmc(&["run", a, "--ids", "-1,2", "-n", "1", "--json"]));
    assert!(e.contains("token id -1"), "{e}");
}

// ---- 6. -t far above the core count ----

#[test]
fn threads_above_the_core_count_are_clamped_with_a_warning() {
    let (_d, art) = compiled("llama");
    let a = art.to_str().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let want = format!("warning: -t 10000 is more than the {cores} cores here; using {cores}");
    let t0 = Instant::now();
    let o = run_within(&["run", a, "--ids", "1", "-n", "1", "-t", "10000", "--json"], Duration::from_secs(30));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), want);
    let o = run_within(&["bench", a, "-p", "2", "-n", "2", "-t", "10000", "--json"], Duration::from_secs(60));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), want);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["threads"], cores);
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
}

// ---- 7. unbounded inputs ----

#[test]
fn dev_zero_and_oversized_side_files_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.llmc");
    let o = out.to_str().unwrap();
    let llama = fixture("llama");
    let limit = Duration::from_secs(20);
    for args in [
        &["compile", "/dev/zero", "-o", o][..],
        &["ir", "/dev/zero"],
        &["compile", llama.to_str().unwrap(), "--weights", "/dev/zero", "-o", o],
    ] {
        let out = run_within(args, limit);
        let e = one_error_line(&out);
        assert!(e.contains("/dev/zero"), "{args:?}: {e}");
    }
    assert!(!out.exists());

    // Side files: a config.json over the limit (sparse: no disk used), a FIFO as
    // tokenizer_config.json (reading it would block forever), a symlink to /dev/zero.
    let (_d, model) = copy_fixture("llama");
    let m = model.to_str().unwrap();
    let cfg = model.join("config.json");
    let good_cfg = fs::read(&cfg).unwrap();
    fs::File::options().write(true).open(&cfg).unwrap().set_len(17 << 20).unwrap();
    let e = one_error_line(&run_within(&["ir", m], limit));
    assert!(e.contains("config.json") && e.contains("16 MiB"), "{e}");
    fs::write(&cfg, &good_cfg).unwrap();

    let tc = model.join("tokenizer_config.json");
    assert!(Command::new("mkfifo").arg(&tc).status().unwrap().success());
    let e = one_error_line(&run_within(&["compile", m, "-o", o], limit));
    assert!(e.contains("tokenizer_config.json") && e.contains("not a regular file"), "{e}");
    fs::remove_file(&tc).unwrap();

    std::os::unix::fs::symlink("/dev/zero", model.join("tokenizer.json")).unwrap();
    let e = one_error_line(&run_within(&["compile", m, "-o", o], limit));
    assert!(e.contains("tokenizer.json") && e.contains("not a regular file"), "{e}");
    assert!(!out.exists());
}

// ---- 8. runaway chat templates ----

const NESTED_LOOPS: &str =
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}{{ messages[0].content }}";

#[test]
fn runaway_chat_templates_are_template_errors() {
    use llmc_runtime::text::{render_chat, Message};
    let msgs = [Message { role: "user".into(), content: "hi".into() }];
    let t0 = Instant::now();
    let e = render_chat(NESTED_LOOPS, &msgs, None, None).unwrap_err().to_string();
    assert!(e.contains("chat template") && e.contains("steps"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    // Few steps, much output: 100000 × 1 KiB.
    let wide = format!("{{% for i in range(100000) %}}{}{{% endfor %}}", "x".repeat(1024));
    let e = render_chat(&wide, &msgs, None, None).unwrap_err().to_string();
    assert!(e.contains("chat template") && e.contains("MiB"), "{e}");
    // Ordinary templates still render.
    let ok = render_chat("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", &msgs, None, None);
    assert_eq!(ok.unwrap(), "<user>hi");
}

/// A word-level tokenizer.json over the byte-ish vocabulary of the fixtures (256 tokens).
fn tiny_tokenizer() -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    for i in 1..256 {
        vocab.insert(format!("w{i}"), i.into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

#[test]
fn runaway_chat_template_in_a_model_fails_the_chat_run() {
    let (_d, model) = copy_fixture("llama");
    fs::write(model.join("tokenizer.json"), tiny_tokenizer()).unwrap();
    fs::write(model.join("tokenizer_config.json"), serde_json::json!({ "chat_template": NESTED_LOOPS }).to_string())
        .unwrap();
    let art = model.parent().unwrap().join("chat.llmc");
    common::compile(&model, &art);
    let a = art.to_str().unwrap();
    // Plain text prompts do not touch the template.
    let o = run_within(&["run", a, "-p", "w1 w2", "-n", "2", "--temp", "0"], Duration::from_secs(30));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_within(&["run", a, "--chat", "-p", "w1 w2", "-n", "2"], Duration::from_secs(30));
    let e = one_error_line(&o);
    assert!(e.contains("chat template"), "{e}");
}

// ---- 9. other hostile input ----

#[test]
fn configs_asking_for_millions_of_layers_or_experts_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    for (family, field) in [("llama", "num_hidden_layers"), ("gpt2", "n_layer"), ("mixtral", "num_local_experts")] {
        let mut cfg: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(fixture(family).join("config.json")).unwrap()).unwrap();
        cfg[field] = (1u64 << 24).into();
        let path = dir.path().join(format!("{family}.json"));
        fs::write(&path, cfg.to_string()).unwrap();
        let e = one_error_line(&run_within(&["ir", path.to_str().unwrap()], Duration::from_secs(20)));
        assert!(e.contains(field), "{family}: {e}");
    }
    // Many experts in many layers: the product is bounded too.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixture("mixtral").join("config.json")).unwrap()).unwrap();
    cfg["num_local_experts"] = 1024.into();
    cfg["num_hidden_layers"] = 1024.into();
    let path = dir.path().join("mixtral-big.json");
    fs::write(&path, cfg.to_string()).unwrap();
    let e = one_error_line(&run_within(&["ir", path.to_str().unwrap()], Duration::from_secs(20)));
    assert!(e.contains("num_local_experts"), "{e}");
}
