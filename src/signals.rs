//! `llmc compile` and signals: the artifact is written to a temporary file beside the output
//! and renamed when complete. A write error removes it (in `llmc_writer::compile`); here
//! SIGINT, SIGTERM and SIGHUP remove it too before exiting, and SIGXFSZ (the file size limit)
//! becomes a write error instead of killing the process. After SIGKILL the next compile to the
//! same output removes the file (`remove_stale_temps` in the compiler).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::iterator::Signals;

/// Installs the handlers for a compile whose temporary file is `temp`. The handler runs on its
/// own thread (signal-hook's self-pipe), not in signal context, so it may touch the file
/// system; it exits with 128 + the signal number, as a shell reports a killed process.
pub fn clean_up_on_signal(temp: PathBuf) {
    // With any handler installed, a write past RLIMIT_FSIZE fails with EFBIG.
    let _ = signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)));
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "warning: cannot install signal handlers ({e}); an interrupted compile may leave {}",
                temp.display()
            );
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = std::fs::remove_file(&temp);
            std::process::exit(128 + sig);
        }
    });
}
