//! Prints the optimized CLIF of one kernel spec given as JSON, e.g.
//! `cargo run -p llmc-compiler --example clif -- '{"MatMul":{"k":576,"m":576,"bias":false}}'`
fn main() {
    let spec: llmc_compiler::program::KernelSpec =
        serde_json::from_str(&std::env::args().nth(1).expect("a KernelSpec as JSON")).expect("valid spec");
    let text = if std::env::args().nth(2).as_deref() == Some("--vcode") {
        llmc_compiler::jit::vcode_text(&spec)
    } else {
        llmc_compiler::jit::clif_text(&spec)
    };
    match text {
        Ok(t) => print!("{t}"),
        Err(e) => eprintln!("{e}"),
    }
}
