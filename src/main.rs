//! `llmc`: the command line. Library errors are typed; here they become one clear line on
//! stderr and a non-zero exit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use llmc_runtime::{generate, Artifact, Backend, Engine, Sampler, SamplerConfig, Session};
use serde_json::json;

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
    },
    /// Run a compiled artifact.
    Run(RunArgs),
    /// Measure prefill and decode speed against the memory bandwidth (JIT backend).
    Bench {
        artifact: PathBuf,
        /// Prompt tokens to prefill.
        #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
        n_prompt: usize,
        /// Tokens to decode.
        #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
        n_gen: usize,
        /// Threads (0 = all cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Also time every kernel during decode.
        #[arg(long)]
        profile: bool,
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

#[derive(clap::Args)]
struct RunArgs {
    /// The artifact written by `llmc compile`.
    artifact: PathBuf,
    /// Prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<i64>,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability mass reaches p (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than min-p × the most likely one (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty considers.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// RNG seed for sampling.
    #[arg(short = 's', long, default_value_t = 0)]
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
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Compile { model, output, weights, passes, no_opt } => {
            let pipeline = match (&passes, no_opt) {
                (_, true) => Vec::new(),
                (Some(list), _) => llmc_ir::passes::parse_pipeline(list).map_err(anyhow::Error::msg)?,
                (None, false) => llmc_ir::passes::standard_pipeline(),
            };
            let m = llmc_models::load(&model, weights.as_deref())?;
            let report = llmc_compiler::compile(&m, &output, &pipeline)?;
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
                    println!("{}", p.name());
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
            print!("{text}");
            Ok(())
        }
        Cmd::Run(args) => run(args),
        Cmd::Bench { artifact, n_prompt, n_gen, threads, json, profile } => {
            let engine = Engine::open(&artifact, threads)?;
            let r = llmc_runtime::bench::run(&engine, n_prompt, n_gen, profile)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}: {} threads", artifact.display(), r.threads);
                println!(
                    "  prefill {:>5} tokens  {:>9.1} tok/s  {:>7.1} GFLOP/s",
                    r.prefill_tokens, r.prefill_tok_s, r.prefill_gflop_s
                );
                println!("  decode  {:>5} tokens  {:>9.1} tok/s", r.decode_tokens, r.decode_tok_s);
                println!(
                    "  {:.1} MB of weights per token, bandwidth {:.1} GB/s, roofline fraction {:.2}",
                    r.bytes_per_token as f64 / 1e6,
                    r.bandwidth_gb_s,
                    r.roofline_fraction
                );
                println!(
                    "  {} kernel calls per token ({} kernels), load {:.1} ms, JIT {:.1} ms",
                    r.kernel_calls_per_token,
                    r.kernels,
                    r.load_s * 1e3,
                    r.jit_s * 1e3
                );
                for (name, ms, calls) in &r.decode_profile {
                    println!("    {ms:>8.3} ms/token  {calls:>4} calls  {name}");
                }
            }
            Ok(())
        }
    }
}

fn is_artifact(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| &magic == llmc_compiler::artifact::MAGIC)
        .unwrap_or(false)
}

fn run(a: RunArgs) -> Result<()> {
    let backend = match &a.backend {
        Some(b) => Backend::parse(b)?,
        None => Backend::fastest(),
    };
    if a.ids.is_empty() {
        bail!("no prompt: give token ids with --ids 1,2,3");
    }
    let engine = Engine::open(&a.artifact, a.threads)?;
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
    let mut session = Session::new(&engine, backend, a.ctx_size)?;
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    });
    let json_mode = a.json;
    let stdout = std::io::stdout();
    let g = generate(&mut session, &prompt, a.n_predict, &mut sampler, &[], |tok| {
        if !json_mode {
            let mut out = stdout.lock();
            let _ = write!(out, "{tok} ");
            let _ = out.flush();
        }
    })?;
    let prefill_tok_s = prompt.len() as f64 / g.prefill_s.max(1e-9);
    let decode_tok_s = g.decode_steps as f64 / g.decode_s.max(1e-9);
    if json_mode {
        let mut obj = json!({
            "prompt_ids": prompt,
            "generated_ids": g.generated,
            "timings": {
                "load_s": engine.load_s,
                "jit_s": engine.jit_s,
                "prefill_s": g.prefill_s,
                "decode_s": g.decode_s,
                "prefill_tok_s": prefill_tok_s,
                "decode_tok_s": decode_tok_s,
                "prompt_tokens": prompt.len(),
                "decode_steps": g.decode_steps,
            },
        });
        if a.logits {
            obj["logits_last"] = json!(g.logits_last);
        }
        println!("{obj}");
    } else {
        println!();
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s",
            prompt.len(),
            prefill_tok_s,
            g.generated.len(),
            decode_tok_s
        );
    }
    Ok(())
}
