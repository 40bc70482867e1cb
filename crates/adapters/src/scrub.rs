//! One scrubber for the output of jobs (trainer and prepare commands) before
//! it reaches an error message, a report or a log line.
//!
//! A job's stderr is the user's code talking: it may print a token it was
//! given (`echo $HF_TOKEN`, a stack trace with a connection string). The
//! scrubber replaces, in any text it is given, the value of
//!
//! - every secret the configuration holds (the wiring passes them: Hub token,
//!   MLflow/GitHub tokens and passwords, webhook URLs, database URLs and their
//!   passwords), and
//! - every environment variable — of this process and of the job's own
//!   configured `env` — whose name contains `TOKEN`, `SECRET`, `PASSWORD`,
//!   `PASSWD`, `CREDENTIAL`, `API_KEY` or `PRIVATE_KEY` (case-insensitive),
//!   when the value has at least [`MIN_ENV_SECRET_LEN`] characters (shorter
//!   values such as `0` or `yes` are flags, not secrets, and would blank
//!   unrelated text),
//!
//! with `***`. Percent-encoded forms (how a password appears inside a URL)
//! are replaced too. Longer values are replaced first, so a secret that
//! contains another is never left half-visible.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

/// The replacement text.
pub const MASK: &str = "***";
/// Shortest env-var value treated as a secret.
pub const MIN_ENV_SECRET_LEN: usize = 4;

/// Name fragments (upper case) that mark an environment variable as secret.
const SECRET_NAME_PARTS: [&str; 7] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "API_KEY",
    "PRIVATE_KEY",
];

/// Whether an environment variable called `name` holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_NAME_PARTS.iter().any(|part| upper.contains(part))
}

/// Replaces secret values by `***`. Cheap to clone (shared list).
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first; no empty values; no duplicates.
    secrets: Arc<Vec<SecretString>>,
}

// Never show the values, not even in `{:?}`.
impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Scrubber {
    /// A scrubber for `configured` secrets (any non-empty value) plus the
    /// secret-named variables of this process's environment.
    pub fn new(configured: impl IntoIterator<Item = SecretString>) -> Self {
        Self::empty()
            .with_secrets(configured)
            .with_env(std::env::vars_os().filter_map(|(name, value)| {
                Some((name.into_string().ok()?, value.into_string().ok()?))
            }))
    }

    /// A scrubber that replaces nothing (until secrets are added).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Add `secrets` (any non-empty value; configured secrets are secrets
    /// whatever their length).
    pub fn with_secrets(self, secrets: impl IntoIterator<Item = SecretString>) -> Self {
        let mut values: Vec<String> = self
            .secrets
            .iter()
            .map(|s| s.expose_secret().to_owned())
            .collect();
        for secret in secrets {
            add_value(&mut values, secret.expose_secret(), 1);
        }
        Self::from_values(values)
    }

    /// Add the values of the secret-named variables among `vars` (see
    /// [`is_secret_name`]) that have at least [`MIN_ENV_SECRET_LEN`] characters.
    pub fn with_env(self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut values: Vec<String> = self
            .secrets
            .iter()
            .map(|s| s.expose_secret().to_owned())
            .collect();
        for (name, value) in vars {
            if is_secret_name(&name) {
                add_value(&mut values, &value, MIN_ENV_SECRET_LEN);
            }
        }
        Self::from_values(values)
    }

    fn from_values(mut values: Vec<String>) -> Self {
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Self {
            secrets: Arc::new(values.into_iter().map(SecretString::from).collect()),
        }
    }

    /// Number of distinct values replaced (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `value` with every secret replaced by [`MASK`] in each string it
    /// holds, object keys included (a result file written by user code may
    /// quote a token anywhere in its structure).
    pub fn scrub_json(&self, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(text) => Value::String(self.scrub(&text)),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|v| self.scrub_json(v)).collect())
            }
            Value::Object(map) => Value::Object(self.scrub_map(map)),
            other => other,
        }
    }

    /// [`Scrubber::scrub_json`] of a JSON object.
    pub fn scrub_map(
        &self,
        map: serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        map.into_iter()
            .map(|(k, v)| (self.scrub(&k), self.scrub_json(v)))
            .collect()
    }

    /// `text` with every secret value replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets.iter() {
            let value = secret.expose_secret();
            if out.contains(value) {
                out = out.replace(value, MASK);
            }
        }
        out
    }
}

/// Add `value` (trimmed of surrounding whitespace, as shells and `.env`
/// files do) and its percent-encoded form when it has `min_len` characters.
fn add_value(values: &mut Vec<String>, value: &str, min_len: usize) {
    for candidate in [value, value.trim()] {
        if candidate.chars().count() < min_len.max(1) {
            continue;
        }
        values.push(candidate.to_owned());
        let encoded: String = url::form_urlencoded::byte_serialize(candidate.as_bytes()).collect();
        if encoded != candidate {
            values.push(encoded.replace('+', "%20"));
            values.push(encoded);
        }
    }
}

/// The secrets inside a URL that may itself be a secret (a database or
/// webhook URL): the whole URL and, when present, its password.
pub fn url_secrets(raw: &str) -> Vec<SecretString> {
    let mut out = vec![SecretString::from(raw.to_owned())];
    if let Ok(url) = url::Url::parse(raw) {
        if let Some(password) = url.password().filter(|p| !p.is_empty()) {
            out.push(SecretString::from(password.to_owned()));
            let decoded = percent_encoding::percent_decode_str(password)
                .decode_utf8_lossy()
                .into_owned();
            if decoded != password {
                out.push(SecretString::from(decoded));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_and_env_secrets_are_masked_longest_first() {
        let scrubber = Scrubber::empty()
            .with_secrets([
                SecretString::from("hf_abcdef"),
                SecretString::from("hf_abc"),
            ])
            .with_env([
                ("MY_API_TOKEN".to_owned(), "tok-1234".to_owned()),
                ("DB_PASSWORD".to_owned(), "p@ss word".to_owned()),
                ("SHORT_SECRET".to_owned(), "abc".to_owned()),
                ("PATH".to_owned(), "/usr/bin".to_owned()),
            ]);
        let out = scrubber
            .scrub("token hf_abcdef and hf_abc; tok-1234; p@ss word / p%40ss+word; abc /usr/bin");
        assert_eq!(out, "token *** and ***; ***; *** / ***; abc /usr/bin");
        assert!(!format!("{scrubber:?}").contains("hf_abc"));
    }

    #[test]
    fn json_strings_and_keys_are_masked_at_any_depth() {
        let scrubber = Scrubber::empty().with_secrets([SecretString::from("hf_abcdef")]);
        let value = serde_json::json!({
            "ok": 1,
            "note": "token hf_abcdef",
            "nested": [{"hf_abcdef": true}, "x hf_abcdef", null, 2.5],
        });
        let scrubbed = scrubber.scrub_json(value);
        assert_eq!(
            scrubbed,
            serde_json::json!({
                "ok": 1,
                "note": "token ***",
                "nested": [{"***": true}, "x ***", null, 2.5],
            })
        );
    }

    #[test]
    fn secret_names() {
        for name in [
            "HF_TOKEN",
            "aws_secret_access_key",
            "PGPASSWORD",
            "OPENAI_API_KEY",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["PATH", "HOME", "RETRAIN_RESULT", "AWS_REGION"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn url_secrets_include_the_password() {
        let secrets: Vec<String> = url_secrets("postgres://u:p%40ssw0rd@db/x")
            .iter()
            .map(|s| s.expose_secret().to_owned())
            .collect();
        assert_eq!(
            secrets,
            ["postgres://u:p%40ssw0rd@db/x", "p%40ssw0rd", "p@ssw0rd"]
        );
    }
}
