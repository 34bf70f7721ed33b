//! Prints the optimized CLIF of one kernel spec given as JSON, e.g.
//! `cargo run -p llmc-compiler --example clif -- '{"MatMul":{"k":576,"m":576,"bias":false}}'`
fn main() {
    let spec: llmc_compiler::program::KernelSpec =
        serde_json::from_str(&std::env::args().nth(1).expect("a KernelSpec as JSON")).expect("valid spec");
    match llmc_compiler::jit::clif_text(&spec) {
        Ok(t) => print!("{t}"),
        Err(e) => eprintln!("{e}"),
    }
}
