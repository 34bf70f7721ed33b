//! Tokenizers built from GGUF metadata against transformers' ids on llama.cpp's tokenizer test
//! vocabularies (`ggml-vocab-NAME.gguf`: a real model's `tokenizer.ggml.*` and no tensors, with
//! test texts and the ids Hugging Face's tokenizer of that model gives them; fetched once per
//! test process by scripts/get-ggml-vocab). Every vocabulary whose `tokenizer.ggml.pre` (or
//! SentencePiece model) llmc supports must give transformers' ids for every text; every other
//! one must be refused with an error naming what is unsupported.

mod common;

use std::path::{Path, PathBuf};

use llmc_runtime::text::Text;

/// The test texts of `NAME.gguf.inp` and the ids of `NAME.gguf.out`, in order.
fn cases(gguf: &Path) -> Vec<(String, Vec<i32>)> {
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let texts: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
    let ids: Vec<Vec<i32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{}", gguf.display());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

/// The vocabularies llmc must tokenize exactly (by file name), the pre-tokenizers among
/// them; SmolLM2's `smollm` is gpt-2's pre-tokenizer under another name.
const SUPPORTED: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "starcoder",
    "refact",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "mpt",
    "llama-spm",
    "phi-3",
];

#[test]
#[ignore = "fetches llama-cpp-python's 75 MB source distribution; scripts/test runs it"]
fn gguf_tokenizers_give_transformers_ids() {
    let dir = common::ggml_vocab();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf") && p.with_extension("gguf.out").exists())
        .collect();
    files.sort();
    let mut report = Vec::new();
    let mut checked = Vec::new();
    for gguf in &files {
        let name = gguf.file_stem().unwrap().to_str().unwrap().strip_prefix("ggml-vocab-").unwrap().to_string();
        let text = match llmc_models::gguf_import::load_gguf_text(gguf) {
            Ok(t) => t,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("is not supported") && e.lines().count() == 1, "{name}: {e}");
                report.push(format!("{name}: refused ({})", e.rsplit(": ").next().unwrap_or(&e)));
                continue;
            }
        };
        let tok = match Text::from_bytes(text.tokenizer_json.as_deref().unwrap()) {
            Ok(t) => t,
            Err(e) => {
                report.push(format!("{name}: difference: its tokenizer.json does not load: {e}"));
                continue;
            }
        };
        let cases = cases(gguf);
        let bad: Vec<String> = cases
            .iter()
            .filter_map(|(t, want)| {
                let got = tok.encode(t, false).unwrap();
                (&got != want).then(|| format!("{t:?}: got {got:?}, transformers {want:?}"))
            })
            .collect();
        report.push(format!("{name}: {}/{} texts equal", cases.len() - bad.len(), cases.len()));
        report.extend(bad.iter().take(3).map(|b| format!("  difference: {b}")));
        if bad.is_empty() {
            checked.push(name);
        }
    }
    let report = report.join("\n");
    eprintln!("{report}");
    for name in SUPPORTED {
        assert!(checked.iter().any(|c| c == name), "{name} must give transformers' ids:\n{report}");
    }
    // a vocabulary llmc loads is one it tokenizes exactly: no guessed pre-tokenizer
    assert!(!report.contains("difference:"), "{report}");
}
