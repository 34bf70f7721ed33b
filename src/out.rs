//! Writing to stdout without panicking: `print!` panics when stdout is a closed pipe or a full
//! device. These write, flush and return the error, which `main` turns into a quiet exit (a
//! closed pipe: the reader has all it wanted, as `head` expects) or one `error:` line.

use std::fmt;
use std::io::Write;

/// A failed write to stdout.
#[derive(Debug)]
pub struct StdoutError(pub std::io::Error);

impl fmt::Display for StdoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing to stdout: {}", self.0)
    }
}

impl std::error::Error for StdoutError {}

impl StdoutError {
    /// The reader went away (EPIPE): not an error worth reporting.
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes `args` to stdout and flushes.
pub fn write_out(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut o = std::io::stdout().lock();
    o.write_fmt(args).and_then(|()| o.flush()).map_err(StdoutError)
}

/// Writes bytes to stdout and flushes.
pub fn write_bytes(bytes: &[u8]) -> Result<(), StdoutError> {
    let mut o = std::io::stdout().lock();
    o.write_all(bytes).and_then(|()| o.flush()).map_err(StdoutError)
}

/// `print!` that returns `Result<(), StdoutError>`.
macro_rules! out {
    ($($t:tt)*) => { $crate::out::write_out(format_args!($($t)*)) };
}

/// `println!` that returns `Result<(), StdoutError>`.
macro_rules! outln {
    () => { $crate::out::write_bytes(b"\n") };
    ($($t:tt)*) => { $crate::out::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

pub(crate) use {out, outln};
