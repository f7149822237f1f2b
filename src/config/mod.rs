//! The config pipeline: TOML text -> `keys` (report and drop unknown keys) -> `file` (serde
//! schema) -> `compile` (validate, resolve) -> `snapshot::Snapshot` (what a request reads).
//! Unknown keys are dropped before serde runs so that they do not hide the problems after them.
//!
//! Neighbours: `cli.rs` (`gatehouse check`) and `app.rs` (start and reload) call `load`; the
//! request path only ever sees the `Snapshot`. Errors carry `file:line:col`; see `error.rs`.
//! `docs/config.md` documents every key.

mod compile;
mod error;
mod file;
mod keys;
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

/// The directory that relative file names in the config (certificates, keys) start from: the
/// config file's own, as with nginx's `conf` prefix, so a config and its files move together.
fn base_dir(config: &Path) -> &Path {
    config.parent().unwrap_or(Path::new(""))
}

/// Same, from a string already read (`path` names the file in messages and is where relative
/// file names in it start from).
pub fn load_str(
    path: &Path,
    text: &str,
    metrics: &Metrics,
) -> Result<snapshot::Snapshot, ConfigError> {
    // A syntax error stops everything, so it is the only diagnostic. Unknown keys are all
    // reported, then removed, so that the checks below still run. A wrong type or a missing key
    // stops deserialization, so it is reported alone with the unknown keys; semantic problems are
    // all collected.
    let one = |e: toml::de::Error| error::Problem {
        span: e.span().unwrap_or(0..0),
        message: e.message().to_owned(),
    };
    let mut root = toml::de::DeTable::parse(text)
        .map_err(|e| ConfigError::from_problems(path, text, vec![one(e)]))?;
    let mut problems = keys::remove_unknown(root.get_mut());
    let compiled =
        <file::FileConfig as serde::Deserialize>::deserialize(toml::de::Deserializer::from(root))
            .map_err(|e| vec![one(e)])
            .and_then(|parsed| {
                // A file rejected for its unknown keys must add no names to the registry.
                let scratch;
                let metrics = if problems.is_empty() {
                    metrics
                } else {
                    scratch = Metrics::default();
                    &scratch
                };
                compile::compile(text, base_dir(path), parsed, metrics)
            });
    match compiled {
        Ok(snapshot) if problems.is_empty() => Ok(snapshot),
        Ok(_) => Err(ConfigError::from_problems(path, text, problems)),
        Err(more) => {
            problems.extend(more);
            Err(ConfigError::from_problems(path, text, problems))
        }
    }
}
