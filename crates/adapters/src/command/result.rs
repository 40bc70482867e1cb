//! The `$RETRAIN_RESULT` file: reading it safely and parsing it.
//!
//! **Reading.** The file is written by user code, so it is treated as
//! untrusted input: it must be a regular file (a FIFO would block the reader
//! forever, a device could be endless), at most [`RESULT_LIMIT`] bytes, and
//! not a symbolic link pointing outside the job's state directory (a link to
//! `/etc/passwd` must not make retrain read, let alone quote, another file).
//! The type is checked before opening, the file is opened with `O_NONBLOCK |
//! O_NOFOLLOW`, and the checks are repeated on the open descriptor, so a file
//! swapped in between is caught too. The caller bounds the read by the job's
//! timeout.
//!
//! **Parsing.** Python's `json.dump` writes `NaN`, `Infinity` and
//! `-Infinity` as bare tokens, which JSON does not have. A tokenizer-aware
//! pre-pass rewrites those tokens — only in value positions outside strings,
//! never inside a string or as an object key — into tagged strings that
//! serde_json accepts, and the metric reader turns them back into `f64` NaN
//! and ±infinity. The gate then rejects such a candidate fail-closed, naming
//! the metric, instead of the run failing with "expected value at column 66".

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use retrain_core::domain::{Candidate, Metrics};
use retrain_core::ports::PortError;
use serde::Deserialize;

/// Largest result file accepted.
pub(crate) const RESULT_LIMIT: u64 = 1 << 20;

/// The `RETRAIN_RESULT` file a trainer writes.
#[derive(Debug, Deserialize)]
struct ResultFile {
    candidate: serde_json::Value,
    #[serde(default)]
    metrics: Option<serde_json::Value>,
}

/// The bare non-finite tokens Python writes, longest first.
const NON_FINITE: [(&str, f64); 3] = [
    ("-Infinity", f64::NEG_INFINITY),
    ("Infinity", f64::INFINITY),
    ("NaN", f64::NAN),
];

/// Tags a rewritten token. The NUL (escaped in the JSON text) and the
/// per-parse nonce make a collision with a real string value impossible in
/// practice.
fn tag(nonce: &str) -> String {
    format!("\u{0}retrain-non-finite-{nonce}:")
}

/// What the tokenizer expects next inside a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    /// In an object: `true` while the next string is a key.
    Object {
        expect_key: bool,
    },
    Array,
}

/// Rewrite bare `NaN`/`Infinity`/`-Infinity` value tokens outside strings
/// into tagged JSON strings. `None` when there is none (the text is then
/// parsed as is). Invalid JSON stays invalid: only whole tokens in value
/// positions are touched.
pub(super) fn rewrite_non_finite(text: &str, nonce: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 64);
    let mut stack: Vec<Container> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    let mut rewritten = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        let value_position = !matches!(stack.last(), Some(Container::Object { expect_key: true }));
        if value_position {
            let token = NON_FINITE.iter().map(|(t, _)| *t).find(|t| {
                bytes[i..].starts_with(t.as_bytes())
                    && bytes
                        .get(i + t.len())
                        .is_none_or(|next| !(next.is_ascii_alphanumeric() || *next == b'_'))
            });
            if let Some(token) = token {
                // `\u0000` is the JSON escape of the tag's NUL.
                out.extend_from_slice(b"\"\\u0000retrain-non-finite-");
                out.extend_from_slice(nonce.as_bytes());
                out.push(b':');
                out.extend_from_slice(token.as_bytes());
                out.push(b'"');
                rewritten = true;
                i += token.len();
                continue;
            }
        }
        match b {
            b'"' => in_string = true,
            b'{' => stack.push(Container::Object { expect_key: true }),
            b'[' => stack.push(Container::Array),
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(Container::Object { expect_key }) = stack.last_mut() {
                    *expect_key = false;
                }
            }
            b',' => {
                if let Some(Container::Object { expect_key }) = stack.last_mut() {
                    *expect_key = true;
                }
            }
            _ => {}
        }
        out.push(b);
        i += 1;
    }
    // Only ASCII was inserted and every other byte copied: still UTF-8.
    rewritten.then(|| String::from_utf8(out).ok()).flatten()
}

/// The number a metric value stands for, if it is one.
fn metric_value(value: &serde_json::Value, tag: &str) -> Option<f64> {
    match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => {
            let token = s.strip_prefix(tag)?;
            NON_FINITE
                .iter()
                .find(|(t, _)| *t == token)
                .map(|(_, v)| *v)
        }
        _ => None,
    }
}

/// Parse a result file; the error says what is wrong (the caller names the file).
pub(crate) fn parse_result(bytes: &[u8]) -> Result<Candidate, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("is not valid result JSON: not UTF-8 ({e})"))?;
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let tag = tag(&nonce);
    let raw: ResultFile = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(original) => match rewrite_non_finite(text, &nonce) {
            Some(rewritten) => serde_json::from_str(&rewritten)
                .map_err(|e| format!("is not valid result JSON: {e}"))?,
            None => return Err(format!("is not valid result JSON: {original}")),
        },
    };
    let id = match raw.candidate {
        serde_json::Value::String(s) if s.starts_with(&tag) => {
            return Err("field `candidate` must be a string, got a bare number token".into())
        }
        serde_json::Value::String(s) if !s.trim().is_empty() => s,
        serde_json::Value::String(_) => return Err("has an empty `candidate`".into()),
        // A numeric run id is unambiguous; accept it as text.
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("field `candidate` must be a string".into()),
    };
    let mut metrics = Metrics::new();
    match raw.metrics {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (name, value) in map {
                match metric_value(&value, &tag) {
                    Some(v) => {
                        metrics.insert(name, v);
                    }
                    None => {
                        return Err(format!(
                        "metric `{name}` must be a number (NaN and Infinity included), got {value}"
                    ))
                    }
                }
            }
        }
        Some(_) => return Err("field `metrics` must be an object of numbers".into()),
    }
    Ok(Candidate { id, metrics })
}

pub(super) fn invalid(path: &Path, what: impl std::fmt::Display) -> PortError {
    PortError::InvalidResponse(format!("result file {} {what}", path.display()))
}

fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Read and parse the result file `path` of a job whose files live under
/// `state_dir`: `Ok(None)` when it does not exist. Blocking; see the module
/// doc for the rules.
pub(super) fn read_result(path: &Path, state_dir: &Path) -> Result<Option<Candidate>, PortError> {
    let Some(bytes) = read_result_bytes(path, state_dir)? else {
        return Ok(None);
    };
    parse_result(&bytes)
        .map(Some)
        .map_err(|what| invalid(path, what))
}

/// The bytes of the untrusted result file `path` (`Ok(None)` when it does
/// not exist), read under the rules of the module doc. Blocking.
pub(super) fn read_result_bytes(
    path: &Path,
    state_dir: &Path,
) -> Result<Option<Vec<u8>>, PortError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PortError::Failed(format!(
                "cannot read result file {}: {e}",
                path.display()
            )))
        }
    };
    let target: PathBuf = if meta.file_type().is_symlink() {
        let root = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        match std::fs::canonicalize(path) {
            Ok(resolved) if resolved.starts_with(&root) => resolved,
            Ok(resolved) => {
                return Err(invalid(
                    path,
                    format!(
                        "is a symbolic link to {}, outside the job's state directory {}; \
                         $RETRAIN_RESULT must be a regular file (links only within that directory)",
                        resolved.display(),
                        root.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    path,
                    format!("is a symbolic link that cannot be resolved ({e}); $RETRAIN_RESULT must be a regular file"),
                ))
            }
        }
    } else {
        path.to_owned()
    };
    let check = |meta: &std::fs::Metadata| -> Result<(), PortError> {
        if !meta.is_file() {
            return Err(invalid(
                path,
                format!(
                    "is {}; $RETRAIN_RESULT must be a regular file",
                    file_kind(meta.file_type())
                ),
            ));
        }
        if meta.len() > RESULT_LIMIT {
            return Err(invalid(
                path,
                format!(
                    "is {} bytes, over the {} byte (1 MiB) limit for $RETRAIN_RESULT",
                    meta.len(),
                    RESULT_LIMIT
                ),
            ));
        }
        Ok(())
    };
    let target_meta = std::fs::symlink_metadata(&target).map_err(|e| {
        PortError::Failed(format!("cannot read result file {}: {e}", path.display()))
    })?;
    check(&target_meta)?;
    // Never block on a FIFO swapped in after the check, never follow a link.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(&target)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                invalid(path, "became a symbolic link while being read; $RETRAIN_RESULT must be a regular file")
            } else {
                PortError::Failed(format!("cannot open result file {}: {e}", path.display()))
            }
        })?;
    let open_meta = file.metadata().map_err(|e| {
        PortError::Failed(format!("cannot read result file {}: {e}", path.display()))
    })?;
    check(&open_meta)?;
    let mut bytes = Vec::new();
    file.take(RESULT_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            PortError::Failed(format!("cannot read result file {}: {e}", path.display()))
        })?;
    if bytes.len() as u64 > RESULT_LIMIT {
        return Err(invalid(
            path,
            format!("grew over the {RESULT_LIMIT} byte (1 MiB) limit for $RETRAIN_RESULT while being read"),
        ));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_files_are_validated() {
        let ok = parse_result(br#"{"candidate":"run-1","metrics":{"dice":0.81,"iou":1},"x":true}"#)
            .unwrap();
        assert_eq!(ok.id, "run-1");
        assert_eq!(ok.metrics["iou"], 1.0);
        let err = parse_result(br#"{"candidate":"r","metrics":{"dice":null}}"#).unwrap_err();
        assert!(err.contains("`dice`"), "{err}");
        let err = parse_result(br#"{"candidate":"r","metrics":{"dice":"0.8"}}"#).unwrap_err();
        assert!(err.contains("`dice`"), "{err}");
        assert!(parse_result(br#"{"metrics":{}}"#).is_err());
        assert!(parse_result(b"nope").is_err());
    }

    #[test]
    fn python_non_finite_tokens_become_non_finite_metrics() {
        let c = parse_result(
            br#"{"candidate": "c1", "metrics": {"acc": NaN, "f1": Infinity, "loss": -Infinity}}"#,
        )
        .unwrap();
        assert_eq!(c.id, "c1");
        assert!(c.metrics["acc"].is_nan());
        assert_eq!(c.metrics["f1"], f64::INFINITY);
        assert_eq!(c.metrics["loss"], f64::NEG_INFINITY);
        // In arrays and nested values too; whitespace and newlines around.
        let c = parse_result(
            b"{\"candidate\":\"c\",\"extra\":[NaN,\n-Infinity ],\"metrics\":{\"a\":\nNaN\n}}",
        )
        .unwrap();
        assert!(c.metrics["a"].is_nan());
    }

    #[test]
    fn strings_mentioning_nan_are_untouched() {
        let c = parse_result(
            br#"{"candidate": "NaN-run \"Infinity\" -Infinity", "note": "NaN", "metrics": {"acc": 0.5, "f1": NaN}}"#,
        )
        .unwrap();
        assert_eq!(c.id, r#"NaN-run "Infinity" -Infinity"#);
        assert_eq!(c.metrics["acc"], 0.5);
        assert!(c.metrics["f1"].is_nan());
        // A metric given as the *string* "NaN" is still not a number.
        let err = parse_result(br#"{"candidate":"c","metrics":{"acc":"NaN"}}"#).unwrap_err();
        assert!(err.contains("metric `acc`"), "{err}");
    }

    #[test]
    fn bare_tokens_are_not_keys_identifiers_or_candidates() {
        // As a key: still invalid JSON, not a metric named after the tag.
        assert!(parse_result(br#"{"candidate":"c","metrics":{NaN: 1}}"#).is_err());
        // Part of a longer identifier: untouched, so invalid.
        assert!(parse_result(br#"{"candidate":"c","metrics":{"a": NaNx}}"#).is_err());
        assert!(parse_result(br#"{"candidate":"c","metrics":{"a": Infinityy}}"#).is_err());
        let err = parse_result(br#"{"candidate": NaN, "metrics": {}}"#).unwrap_err();
        assert!(err.contains("`candidate`"), "{err}");
    }

    #[test]
    fn rewrite_leaves_escaped_quotes_alone() {
        let text = r#"{"a": "x\" NaN \\", "b": NaN}"#;
        let out = rewrite_non_finite(text, "n").unwrap();
        assert!(out.starts_with(r#"{"a": "x\" NaN \\", "b": ""#), "{out}");
        assert_eq!(rewrite_non_finite(r#"{"a": "NaN"}"#, "n"), None);
    }
}
