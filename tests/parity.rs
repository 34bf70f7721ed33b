//! Hugging Face parity: every fixture family compiled and run through the `llmc` binary must
//! match transformers' logits (1e-4 · max(1, max|expected|)) and all 24 greedy ids.

mod common;

#[test]
fn gpt2_interp() {
    common::check_parity("gpt2", "interp");
}

#[test]
fn llama_interp() {
    common::check_parity("llama", "interp");
}

#[test]
fn mistral_interp() {
    common::check_parity("mistral", "interp");
}

#[test]
fn qwen2_interp() {
    common::check_parity("qwen2", "interp");
}

#[test]
fn falcon_interp() {
    common::check_parity("falcon", "interp");
}
