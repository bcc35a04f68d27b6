//! How a command fails: a one-line message and an exit code.
//!
//! | exit code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the inputs were fine but the system failed us: an output could not be written (disk full, no permission, ...) or threads could not be started |
//! | 2 | bad input: unreadable or malformed files, bad arrays or values, bad config, bad arguments; also an internal error (a bug), reported the same way |
//!
//! Every failure prints exactly one line on stderr, `error: <what>`, naming the file and
//! the array, row and column, or the config field.

use std::error::Error;
use std::fmt;
use std::process::ExitCode;

/// A failed command.
#[derive(Debug)]
pub enum Failure {
    /// Bad input of any kind: exit code 2.
    Input(String),
    /// The system failed: an output could not be written, threads could not be
    /// started. Exit code 1.
    System(String),
}

impl Failure {
    /// A bad-input failure: `context: error`, the error's sources included.
    pub fn input(context: impl fmt::Display, err: &(dyn Error + 'static)) -> Self {
        Self::Input(format!("{context}: {}", chain(err)))
    }

    /// A system failure: `context: error`, the error's sources included.
    pub fn system(context: impl fmt::Display, err: &(dyn Error + 'static)) -> Self {
        Self::System(format!("{context}: {}", chain(err)))
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Input(_) => ExitCode::from(2),
            Self::System(_) => ExitCode::from(1),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Input(msg) | Self::System(msg) => f.write_str(msg),
        }
    }
}

/// An error and its sources as one `: `-separated string, skipping a source whose text
/// its parent already shows (many error types print their source themselves).
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// Prints `error: <message>` as exactly one line on stderr, whatever the message holds.
pub fn print_error(message: &str) {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("error: {line}");
}
