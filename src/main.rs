//! `llmc`: the command line. Library errors are typed; here they become one clear line on
//! stderr and a non-zero exit.

mod gguf_cache;
mod inspect;
mod out;
mod perplexity;
mod run;
mod serve;
mod signals;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use llmc_runtime::{Artifact, Engine};
use out::outln;

#[derive(Parser)]
#[command(name = "llmc", version, about = "Ahead-of-time compiler and runtime for language models on CPUs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a model (config.json + safetensors) into an artifact.
    Compile {
        /// The model's config.json (any file name) or the folder that holds it.
        model: PathBuf,
        /// Where to write the artifact.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The weights (a .safetensors file or a .safetensors.index.json); default: beside the config.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Run these passes (comma-separated, in order) instead of the standard pipeline.
        #[arg(long, conflicts_with = "no_opt")]
        passes: Option<String>,
        /// Run no optimization pass.
        #[arg(long)]
        no_opt: bool,
        /// No progress bar.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Storage type of the weight matrices: f32, f16, bf16, q8_0 or q4_0 (ggml's blocks).
        /// Default: the checkpoint's own float type. Norms, biases and vectors stay f32.
        #[arg(long, value_parser = storage_dtype)]
        dtype: Option<llmc_ir::DType>,
        /// Activation precision of the projections over q8_0/q4_0 weights. `q8_0` (default):
        /// their inputs are rounded to int8 blocks of 32 and multiplied with integer dot
        /// products (as llama.cpp does). `f32`: weights are widened to f32 in registers, so
        /// the logits are those of the f32 model on the dequantized weights. `bf16`: as
        /// `q8_0`, and the inputs of projections over bf16 weights are rounded to bf16, which
        /// AMD hosts with AVX512_BF16 multiply with `vdpbf16ps` (as llama.cpp runs BF16 weights).
        #[arg(long, value_parser = ["q8_0", "f32", "bf16"], default_value = "q8_0")]
        activations: String,
    },
    /// Run a compiled artifact.
    Run(RunArgs),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve {
        /// The artifact (or a .gguf, compiled into the cache on first use).
        model: PathBuf,
        /// Address to listen on (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free port; the one taken is printed on stderr).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Slots: requests generated at the same time, each with its own KV cache.
        #[arg(long = "parallel", short = 'n', default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        parallel: u64,
        /// Context size in tokens, shared evenly by the slots (llama-server's -c); default: the
        /// model's trained context, at most 16384.
        #[arg(short = 'c', long = "ctx-size", value_parser = clap::value_parser!(u64).range(16..=1 << 24))]
        ctx_size: Option<u64>,
        /// Threads (0 = all cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        /// Require `Authorization: Bearer KEY` on every endpoint but /health and /metrics.
        #[arg(long)]
        api_key: Option<String>,
        /// Requests that may wait for a slot; beyond them the server answers 429.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=1 << 16))]
        queue: u64,
        /// Per-request time limit in seconds (408 when it passes).
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        timeout: u64,
    },
    /// Perplexity of a text file, with llama-perplexity's method (second half of each chunk).
    Perplexity(PerplexityArgs),
    /// Measure prefill and decode speed against the memory bandwidth (JIT backend).
    Bench {
        artifact: PathBuf,
        /// Prompt tokens to prefill.
        #[arg(short = 'p', long = "n-prompt", default_value_t = 128, value_parser = at_least_one, allow_negative_numbers = true)]
        n_prompt: usize,
        /// Tokens to decode.
        #[arg(short = 'n', long = "n-gen", default_value_t = 64, value_parser = at_least_one, allow_negative_numbers = true)]
        n_gen: usize,
        /// Threads (0 = all cores).
        #[arg(short = 't', long, default_value_t = 0, allow_negative_numbers = true)]
        threads: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Also decode this many sequences at once (batched steps, as `llmc serve` runs them)
        /// and report their aggregate rate (batch_decode_tok_s).
        #[arg(short = 'b', long = "batch", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
        batch: u64,
        /// Also time every kernel during decode, and during the prefill (run once more).
        #[arg(long)]
        profile: bool,
    },
    /// Describe a compiled artifact: architecture, parameters, sizes, target, tokenizer.
    Inspect {
        artifact: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Also check every weight section against its checksum (reads the whole file).
        #[arg(long)]
        verify: bool,
    },
    /// Print the IR of a model (config.json, model folder or artifact).
    Ir {
        /// A config.json, a model folder or an artifact (whose IR is already optimized).
        model: Option<PathBuf>,
        /// Print the graph after the standard pipeline has run up to and including this pass.
        #[arg(long)]
        after: Option<String>,
        /// List the passes of the standard pipeline, in order.
        #[arg(long)]
        list_passes: bool,
    },
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The artifact written by `llmc compile`.
    artifact: PathBuf,
    /// Prompt text. Without -p and --ids: interactive chat on a terminal, else the prompt is
    /// read from stdin.
    #[arg(short = 'p', long = "prompt")]
    prompt: Option<String>,
    /// Prompt as token ids, comma-separated (generates exactly -n tokens: no EOS stop).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt", allow_hyphen_values = true)]
    ids: Vec<i64>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat and interactive chat.
    #[arg(long)]
    system: Option<String>,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64, allow_negative_numbers = true)]
    n_predict: usize,
    /// Context size in tokens (default: the model's, at most 4096). Capped at the context the
    /// model was trained for unless --ctx-beyond-training; a one-shot run allocates only what
    /// its prompt and -n need.
    #[arg(short = 'c', long = "ctx-size", value_parser = at_least_one, allow_negative_numbers = true)]
    ctx_size: Option<usize>,
    /// Let -c exceed the model's trained context (RoPE models only; quality usually degrades).
    #[arg(long = "ctx-beyond-training")]
    ctx_beyond_training: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_parser = temperature, allow_hyphen_values = true)]
    temp: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 40, allow_negative_numbers = true)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability mass reaches p (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95, value_parser = top_p, allow_hyphen_values = true)]
    top_p: f32,
    /// Drop tokens less likely than min-p × the most likely one (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05, value_parser = min_p, allow_hyphen_values = true)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0, value_parser = repeat_penalty, allow_hyphen_values = true)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty considers.
    #[arg(long = "repeat-last-n", default_value_t = 64, allow_negative_numbers = true)]
    repeat_last_n: usize,
    /// RNG seed for sampling.
    #[arg(short = 's', long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// With --json: include the full logits at the last prompt position.
    #[arg(long)]
    logits: bool,
    /// Executor: interp (reference interpreter) or jit. Default: the fastest available.
    #[arg(long)]
    backend: Option<String>,
    /// Threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0, allow_negative_numbers = true)]
    threads: usize,
}

#[derive(clap::Args, Clone)]
pub struct PerplexityArgs {
    /// The artifact written by `llmc compile` (it must bundle a tokenizer).
    artifact: PathBuf,
    /// The text file to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Tokens per chunk (the context of every evaluation); the second half of each is scored.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, allow_negative_numbers = true)]
    ctx_size: i64,
    /// Threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0, allow_negative_numbers = true)]
    threads: usize,
    /// Print one JSON object on stdout: {"ppl", "ppl_stderr", "chunks", "tokens"}.
    #[arg(long)]
    json: bool,
    /// Executor: interp (reference interpreter) or jit. Default: the fastest available.
    #[arg(long)]
    backend: Option<String>,
}

/// An f32 option value; `ok` says whether it is in range, `range` is said when it is not.
fn float_in(s: &str, ok: fn(f32) -> bool, range: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("not a number (must be {range})"))?;
    if ok(v) {
        Ok(v)
    } else {
        Err(format!("out of range (must be {range})"))
    }
}

fn storage_dtype(s: &str) -> Result<llmc_ir::DType, String> {
    use llmc_ir::DType;
    match DType::parse(s) {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1)) => Ok(d),
        _ => Err(format!("`{s}` is not a storage type (f32, f16, bf16, q8_0, q4_0)")),
    }
}

fn temperature(s: &str) -> Result<f32, String> {
    float_in(s, |v| v.is_finite() && v >= 0.0, "a finite number >= 0; 0 is greedy")
}

fn top_p(s: &str) -> Result<f32, String> {
    float_in(s, |v| v > 0.0 && v <= 1.0, "in (0, 1]; 1 is off")
}

fn min_p(s: &str) -> Result<f32, String> {
    float_in(s, |v| (0.0..=1.0).contains(&v), "in [0, 1]; 0 is off")
}

fn repeat_penalty(s: &str) -> Result<f32, String> {
    float_in(s, |v| v.is_finite() && v > 0.0, "a finite number > 0; 1 is off")
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(_) => Err("must be a whole number >= 1".into()),
    }
}

/// `-t`: at most the cores this process may use (0 = all of them), with a warning when asked
/// for more: thousands of spinning threads on two cores make every step crawl.
fn clamp_threads(t: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if t > cores {
        eprintln!("warning: -t {t} is more than the {cores} cores here; using {cores}");
        return cores;
    }
    t
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // A bad option value is one line naming the option; other usage errors keep
            // clap's usage text; --help and --version print and exit 0.
            if matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
                let text = e.render().to_string();
                eprintln!("{}", text.lines().next().unwrap_or("error: invalid option value"));
                return ExitCode::from(2);
            }
            e.exit();
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The reader of our stdout went away (`llmc ... | head`): exit quietly.
            if e.chain().any(|c| c.downcast_ref::<out::StdoutError>().is_some_and(out::StdoutError::is_broken_pipe)) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The standard pass pipeline; weights in blocked types (q8_0/q4_0) keep their RMSNorm scales
/// unfolded. q4_0 weight blocks: folding a norm scale into a matrix's columns puts the norm's
/// largest columns into every block's scale (SmolLM2, GPL-3, -c 512: PPL 32.4 folded vs 22.5
/// unfolded; llama.cpp's Q4_0 on the same weights: 23.1). Int8 activations: a folded norm
/// leaves the raw residual stream (with its outlier channels) to be quantized, where
/// llama.cpp quantizes the normed one (q8_0: PPL 18.28 folded, 18.18 unfolded, f32 18.13).
/// A GGUF's quantized blocks are kept as they are, so nothing may be folded into them.
pub(crate) fn default_pipeline(blocked: bool) -> Vec<Box<dyn llmc_ir::passes::Pass>> {
    let all = llmc_ir::passes::standard_pipeline();
    if blocked {
        all.into_iter().filter(|p| p.name() != "fold_norm").collect()
    } else {
        all
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Compile { model, output, weights, passes, no_opt, quiet, dtype, activations } => {
            let m = llmc_models::load(&model, weights.as_deref())?;
            // a GGUF of a blocked type without --dtype keeps its quantized blocks
            let blocked = dtype.map_or(m.is_quantized(), llmc_ir::quant::is_blocked);
            let pipeline = match (&passes, no_opt) {
                (_, true) => Vec::new(),
                (Some(list), _) => llmc_ir::passes::parse_pipeline(list).map_err(anyhow::Error::msg)?,
                (None, false) => default_pipeline(blocked),
            };
            // SIGINT/SIGTERM/SIGHUP remove the temporary artifact before exiting.
            signals::clean_up_on_signal(llmc_writer::temp_path(&output));
            let bar = progress_bar(quiet);
            let storage = dtype.map_or(llmc_writer::Storage::Checkpoint, llmc_writer::Storage::All);
            let act = match activations.as_str() {
                "f32" => llmc_writer::Activations::F32,
                "bf16" => llmc_writer::Activations::Bf16,
                _ => llmc_writer::Activations::Q8,
            };
            let report = llmc_writer::compile(&m, &output, &pipeline, storage, act, &mut |p| match p {
                llmc_writer::Progress::Stage(s) => bar.set_message(s),
                llmc_writer::Progress::Bytes { done, total } => {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            });
            bar.finish_and_clear();
            let report = report?;
            eprintln!(
                "compiled {} → {} ({} nodes, {} tensors, {:.1} MB)",
                m.config_path.display(),
                report.path.display(),
                report.nodes,
                report.tensors,
                report.bytes as f64 / 1e6
            );
            Ok(())
        }
        Cmd::Ir { model, after, list_passes } => {
            if list_passes {
                for p in llmc_ir::passes::standard_pipeline() {
                    outln!("{}", p.name())?;
                }
                return Ok(());
            }
            let Some(model) = model else { bail!("give a config.json, a model folder or an artifact") };
            let text = if is_artifact(&model) {
                if after.is_some() {
                    bail!(
                        "{}: an artifact holds the IR after its whole pipeline; --after needs a model",
                        model.display()
                    );
                }
                Artifact::open(&model)?.ir_text
            } else {
                let (_, _, cfg) = llmc_models::load_config(&model)?;
                let (mut g, _) = cfg.build()?;
                if let Some(stop) = after {
                    let all = llmc_ir::passes::standard_pipeline();
                    let upto = all
                        .iter()
                        .position(|p| p.name() == stop)
                        .with_context(|| format!("unknown pass `{stop}` (see --list-passes)"))?;
                    llmc_ir::passes::run_pipeline(&mut g, &all[..=upto])?;
                }
                llmc_ir::text::print(&g)
            };
            out::write_bytes(text.as_bytes())?;
            Ok(())
        }
        Cmd::Run(args) => run::run(args),
        Cmd::Perplexity(args) => perplexity::run(args),
        Cmd::Serve { model, host, port, parallel, ctx_size, threads, api_key, queue, timeout } => {
            serve::serve(serve::ServeArgs {
                model,
                host,
                port,
                parallel: parallel as usize,
                ctx: ctx_size.map(|c| c as usize),
                threads,
                api_key,
                queue: queue as usize,
                timeout: std::time::Duration::from_secs(timeout),
            })
        }
        Cmd::Inspect { artifact, json, verify } => inspect::inspect(&artifact, json, verify),
        Cmd::Bench { artifact, n_prompt, n_gen, threads, json, profile, batch } => {
            let engine = Engine::open(&gguf_cache::artifact_for(&artifact)?, clamp_threads(threads))?;
            let mut r = llmc_runtime::bench::run(&engine, n_prompt, n_gen, profile)?;
            if batch > 1 {
                r.batch = Some(batch as usize);
                let (rate, prof) =
                    llmc_runtime::bench::batch_decode(&engine, n_prompt, n_gen, batch as usize, profile)?;
                r.batch_decode_tok_s = Some(rate);
                r.batch_profile = prof;
            }
            if json {
                outln!("{}", serde_json::to_string(&r)?)?;
            } else {
                outln!("{}: {} threads, ISA level {}", artifact.display(), r.threads, r.isa)?;
                outln!(
                    "  prefill {:>5} tokens  {:>9.1} tok/s  {:>7.1} GFLOP/s ({:.2} of the {:.0} GFLOP/s f32 FMA peak)",
                    r.prefill_tokens,
                    r.prefill_tok_s,
                    r.prefill_gflop_s,
                    r.prefill_peak_fraction,
                    r.fma_peak_gflop_s
                )?;
                if let Some(bf) = r.bf16_dot_peak_gflop_s {
                    outln!("  (vdpbf16ps peak {bf:.0} GFLOP/s: bf16 pairs, for comparison)")?;
                }
                outln!("  decode  {:>5} tokens  {:>9.1} tok/s", r.decode_tokens, r.decode_tok_s)?;
                if let (Some(b), Some(t)) = (r.batch, r.batch_decode_tok_s) {
                    outln!(
                        "  decode  {b} sequences at once  {t:>9.1} tok/s in all ({:.2}x one sequence)",
                        t / r.decode_tok_s
                    )?;
                }
                outln!(
                    "  {:.1} MB of weights per token, bandwidth {:.1} GB/s, roofline fraction {:.2}",
                    r.bytes_per_token as f64 / 1e6,
                    r.bandwidth_gb_s,
                    r.roofline_fraction
                )?;
                outln!(
                    "  {} kernel calls per token ({} kernels), load {:.1} ms, JIT {:.1} ms",
                    r.kernel_calls_per_token,
                    r.kernels,
                    r.load_s * 1e3,
                    r.jit_s * 1e3
                )?;
                for (name, ms, calls) in &r.decode_profile {
                    outln!("    {ms:>8.3} ms/token  {calls:>4} calls  {name}")?;
                }
                if !r.prefill_profile.is_empty() {
                    outln!("  prefill of {} tokens:", r.prefill_tokens)?;
                }
                for (name, ms, calls) in &r.prefill_profile {
                    outln!("    {ms:>8.3} ms        {calls:>4} calls  {name}")?;
                }
                if !r.batch_profile.is_empty() {
                    outln!("  batched decode steps:")?;
                }
                for (name, ms, calls) in &r.batch_profile {
                    outln!("    {ms:>8.3} ms/step   {calls:>4} calls  {name}")?;
                }
            }
            Ok(())
        }
    }
}

/// A byte progress bar on stderr, hidden with -q or when stderr is not a terminal.
fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{msg:28} [{bar:40}] {bytes}/{total_bytes} ({eta})")
        .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

fn is_artifact(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| &magic == llmc_compiler::artifact::MAGIC)
        .unwrap_or(false)
}
