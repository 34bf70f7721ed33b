use std::path::PathBuf;

/// `../shared` beside the checkout (override with `LLMC_SHARED`).
pub fn shared() -> PathBuf {
    match std::env::var_os("LLMC_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    let p = shared().join("fixtures").join(name);
    assert!(p.join("config.json").exists(), "fixture {} not found (set LLMC_SHARED)", p.display());
    p
}
