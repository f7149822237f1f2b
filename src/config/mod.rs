//! The config pipeline: TOML text -> `file` (serde schema) -> `compile` (validate, resolve) ->
//! `snapshot::Snapshot` (what a request reads).
//!
//! Neighbours: `cli.rs` (`gatehouse check`) and `app.rs` (start and reload) call `load`; the
//! request path only ever sees the `Snapshot`. Errors carry `file:line:col`; see `error.rs`.
//! `docs/config.md` documents every key.

mod compile;
mod error;
mod file;
pub mod snapshot;
mod values;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};

use crate::metrics::Metrics;

/// Reads, parses, validates and compiles the file.
pub fn load(path: &Path, metrics: &Metrics) -> Result<snapshot::Snapshot, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::at_start(path, format!("cannot read file: {e}")))?;
    load_str(path, &text, metrics)
}

/// Same, from a string already read (`path` is only used in messages).
pub fn load_str(
    path: &Path,
    text: &str,
    metrics: &Metrics,
) -> Result<snapshot::Snapshot, ConfigError> {
    // Syntax and schema errors (bad TOML, unknown key, wrong type, missing key) stop the parse,
    // so there is exactly one; semantic problems below are all collected.
    let parsed: file::FileConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ConfigError::from_problems(
            path,
            text,
            vec![error::Problem {
                span,
                message: e.message().to_owned(),
            }],
        )
    })?;
    compile::compile(text, parsed, metrics)
        .map_err(|problems| ConfigError::from_problems(path, text, problems))
}
