//! Config errors that point at the file: `FILE:LINE:COL: message`, the form editors and CI jump to.
//!
//! Neighbours: `mod.rs` turns a TOML/serde error into a `Problem`, `keys.rs` reports every unknown
//! key and `compile.rs` every semantic problem as a `Problem` (a byte span and a message), and
//! `gatehouse check` prints the resulting `ConfigError`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file, at a 1-based line and column (the column counts characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Why a config file was rejected: every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// One diagnostic at the start of the file, for problems that belong to no value.
    pub(crate) fn at_start(file: &Path, message: String) -> ConfigError {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: file.to_path_buf(),
                line: 1,
                col: 1,
                message,
            }],
        }
    }

    /// Locates each problem in `text` and sorts them by position (stable, so problems at the
    /// same place keep the order the checks found them in).
    pub(crate) fn from_problems(file: &Path, text: &str, problems: Vec<Problem>) -> ConfigError {
        let mut located: Vec<(usize, Diagnostic)> = problems
            .into_iter()
            .map(|p| {
                let (line, col) = line_col(text, p.span.start);
                let diagnostic = Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    col,
                    message: p.message,
                };
                (p.span.start, diagnostic)
            })
            .collect();
        located.sort_by_key(|(offset, _)| *offset);
        ConfigError {
            diagnostics: located.into_iter().map(|(_, d)| d).collect(),
        }
    }
}

/// A semantic problem found by `compile.rs`: the byte span of the offending value in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub span: Range<usize>,
    pub message: String,
}

/// 1-based line and column of byte `offset` in `text`; the column counts characters, not bytes,
/// so that a non-ASCII string earlier on the line does not shift it. An offset past the end or
/// inside a character is clamped to the nearest character boundary before it.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let text = "a = 1\nb = \"é\" x\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'x' follows a two-byte character: byte 15, character column 9.
        assert_eq!(text.find('x'), Some(15));
        assert_eq!(line_col(text, 15), (2, 9));
        assert_eq!(line_col(text, 999), (3, 1));
    }

    #[test]
    fn display_is_one_diagnostic_per_line() {
        let e = ConfigError::from_problems(
            Path::new("g.toml"),
            "a\nb\n",
            vec![
                Problem {
                    span: 2..3,
                    message: "second".into(),
                },
                Problem {
                    span: 0..1,
                    message: "first".into(),
                },
            ],
        );
        assert_eq!(e.to_string(), "g.toml:1:1: first\ng.toml:2:1: second");
    }
}
