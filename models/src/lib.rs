//! llmc-models: reads Hugging Face model folders (`config.json` + safetensors) and builds the
//! IR of one forward step for each architecture family (one file per family).
//!
//! **Architecture invariant:** a family file only *describes* its graph with the shared ops of
//! `llmc-ir` (through [`builder::Builder`]); it never computes anything itself.

pub mod bamba;
pub mod bitnet;
pub mod builder;
pub mod config;
pub mod error;
pub mod falcon;
pub mod ggml_quants;
pub mod gguf;
pub mod gguf_import;
pub mod gpt2;
pub mod granitemoehybrid;
pub mod llama;
pub mod safetensors_io;
pub mod text;
pub mod weights;

use std::path::{Path, PathBuf};

use llmc_ir::Graph;
use serde_json::Value;

pub use error::{ModelError, Result};
pub use safetensors_io::WeightFiles;
pub use weights::{Transform, WeightSpec};

/// The `model_type`s llmc knows.
pub const SUPPORTED: &str = "llama, mistral, qwen2, mixtral, gpt2, falcon, bitnet, bamba, granitemoehybrid";

/// A validated config of one of the supported families.
#[derive(Clone, Debug)]
pub enum ModelConfig {
    Llama(llama::LlamaConfig),
    Gpt2(gpt2::Gpt2Config),
    Falcon(falcon::FalconConfig),
    BitNet(bitnet::BitNetConfig),
    Bamba(bamba::BambaConfig),
    GraniteMoeHybrid(granitemoehybrid::GraniteMoeHybridConfig),
}

impl ModelConfig {
    /// Parses and validates a raw `config.json` value; `path` is used in error messages.
    pub fn from_json(path: &Path, v: &Value) -> Result<ModelConfig> {
        let model_type = v
            .get("model_type")
            .ok_or_else(|| config::field_err(path, "model_type", "missing"))?
            .as_str()
            .ok_or_else(|| config::field_err(path, "model_type", "must be a string"))?;
        Ok(match model_type {
            "llama" | "mistral" | "qwen2" | "mixtral" => ModelConfig::Llama(llama::LlamaConfig::parse(path, v)?),
            "gpt2" => ModelConfig::Gpt2(gpt2::Gpt2Config::parse(path, v)?),
            "falcon" => ModelConfig::Falcon(falcon::FalconConfig::parse(path, v)?),
            "bitnet" => ModelConfig::BitNet(bitnet::BitNetConfig::parse(path, v)?),
            "bamba" => ModelConfig::Bamba(bamba::BambaConfig::parse(path, v)?),
            "granitemoehybrid" => {
                ModelConfig::GraniteMoeHybrid(granitemoehybrid::GraniteMoeHybridConfig::parse(path, v)?)
            }
            other => {
                return Err(ModelError::UnknownModelType {
                    path: path.into(),
                    model_type: other.to_string(),
                    supported: SUPPORTED,
                })
            }
        })
    }

    /// Builds the step graph and the list of weights it reads.
    pub fn build(&self) -> Result<(Graph, Vec<WeightSpec>)> {
        match self {
            ModelConfig::Llama(c) => c.build(),
            ModelConfig::Gpt2(c) => c.build(),
            ModelConfig::Falcon(c) => c.build(),
            ModelConfig::BitNet(c) => c.build(),
            ModelConfig::Bamba(c) => c.build(),
            ModelConfig::GraniteMoeHybrid(c) => c.build(),
        }
    }

    /// The longest context the model was trained for (the default context size).
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Falcon(c) => c.max_position_embeddings,
            ModelConfig::BitNet(c) => c.max_position_embeddings,
            ModelConfig::Bamba(c) => c.max_position_embeddings,
            ModelConfig::GraniteMoeHybrid(c) => c.max_position_embeddings,
        }
    }

    /// Whether positions past `max_positions` are impossible (learned position embeddings).
    pub fn hard_context_limit(&self) -> bool {
        matches!(self, ModelConfig::Gpt2(_))
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Falcon(c) => c.vocab_size,
            ModelConfig::BitNet(c) => c.vocab_size,
            ModelConfig::Bamba(c) => c.vocab_size,
            ModelConfig::GraniteMoeHybrid(c) => c.vocab_size,
        }
    }
}

/// A model folder opened for compilation: its config, the raw JSON, its step graph, the
/// weights the graph reads and the files they come from.
pub struct Model {
    pub config_path: PathBuf,
    pub raw_config: Value,
    pub config: ModelConfig,
    pub graph: Graph,
    pub specs: Vec<WeightSpec>,
    pub files: WeightFiles,
    /// Tokenizer, chat template, special tokens, generation defaults (all optional).
    pub text: text::TextAssets,
}

/// Whether `path` is a GGUF file (by its name, or its first four bytes `GGUF`).
pub fn is_gguf_path(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && gguf::is_gguf(&magic)
}

impl Model {
    /// Whether the checkpoint's weight matrices are already quantized (a GGUF of a blocked
    /// type): then the compiler keeps them as they are and does not fold norm scales in.
    pub fn is_quantized(&self) -> bool {
        self.files
            .tensors
            .values()
            .any(|l| l.gguf.as_ref().is_some_and(|g| llmc_ir::quant::is_blocked(ggml_quants::storage_type(g.ty))))
    }

    /// The storage type the checkpoint gives the tensor `name` (its own float type, or for a
    /// GGUF tensor `ggml_quants::storage_type`).
    pub fn checkpoint_storage(&self, name: &str) -> Option<llmc_ir::DType> {
        let l = self.files.get(name)?;
        Some(match (&l.gguf, l.dtype) {
            (Some(g), _) => ggml_quants::storage_type(g.ty),
            (None, safetensors::Dtype::BF16) => llmc_ir::DType::BF16,
            (None, safetensors::Dtype::F16) => llmc_ir::DType::F16,
            _ => llmc_ir::DType::F32,
        })
    }
}

/// Reads only the config and builds the graph (no weights needed).
pub fn load_config(path: &Path) -> Result<(PathBuf, Value, ModelConfig)> {
    let config_path = config::config_path(path);
    let raw = config::read_json(&config_path)?;
    let config = ModelConfig::from_json(&config_path, &raw)?;
    Ok((config_path, raw, config))
}

/// Opens a model: `path` is a `config.json` (any name) or a folder holding one; the weights are
/// `weights` if given, else `model.safetensors` or `model.safetensors.index.json` beside the
/// config. Every tensor the graph reads is checked to exist with the right shape and dtype.
pub fn load(path: &Path, weights: Option<&Path>) -> Result<Model> {
    if is_gguf_path(path) {
        if weights.is_some() {
            return Err(ModelError::Config {
                path: path.into(),
                msg: "a GGUF file holds its own weights: drop --weights".into(),
            });
        }
        return gguf_import::load_gguf(path);
    }
    let (config_path, raw_config, config) = load_config(path)?;
    let (graph, specs) = config.build()?;
    let files = match weights {
        Some(w) => WeightFiles::open(w)?,
        None => WeightFiles::find_beside(&config_path)?,
    };
    for spec in &specs {
        check_spec(&files, spec)?;
    }
    let dir = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let text = text::TextAssets::load(&dir, &raw_config)?;
    Ok(Model { config_path, raw_config, config, graph, specs, files, text })
}

impl Model {
    /// Every file the model was read from: the config, the shard index, the safetensors
    /// files and the text side files (a compile must not write over any of them).
    pub fn inputs(&self) -> Vec<PathBuf> {
        let mut v = vec![self.config_path.clone()];
        v.extend(self.files.index.iter().cloned());
        v.extend(self.files.paths.iter().cloned());
        v.extend(self.text.files.iter().cloned());
        v
    }
}

pub(crate) fn check_spec(files: &WeightFiles, spec: &WeightSpec) -> Result<()> {
    let (src, loc) = spec
        .candidates
        .iter()
        .find_map(|c| files.get(c).map(|l| (c, l)))
        .ok_or_else(|| ModelError::MissingTensor { name: spec.name.clone(), files: files.describe_files() })?;
    if loc.shape != spec.stored_shape() {
        return Err(ModelError::TensorShape {
            path: files.path_of(loc).to_path_buf(),
            name: src.clone(),
            expected: spec.stored_shape(),
            actual: loc.shape.clone(),
        });
    }
    use safetensors::tensor::Dtype;
    let ok = match spec.dtype {
        llmc_ir::DType::U8 => loc.dtype == Dtype::U8,
        _ => matches!(loc.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16),
    };
    if !ok {
        return Err(ModelError::TensorDtype {
            path: files.path_of(loc).to_path_buf(),
            name: src.clone(),
            dtype: format!("{:?}", loc.dtype),
        });
    }
    Ok(())
}
