//! `[label_defaults]`: keys every `[labels.<name>]` table takes unless it
//! sets them itself.
//!
//! A project with many labels that share a trainer, a gate, a registry and
//! notifications writes them once. The rule is shallow, key by key: a label
//! that sets `trainer` gets its own `trainer` whole, never a merge of its
//! table with the default one (a `{ command = … }` default and a
//! `{ worker = … }` label must not become a trainer with both).
//!
//! `{label}` in a default's strings is the label's name (`metadata =
//! "hf://datasets/acme/{label}/dataset_metadata.json"`), substituted as the
//! default is copied into each label.
//!
//! The defaults are copied into the labels of the merged configuration
//! *with their figment tags*, so each copied value still names the provider
//! that set it: a relative path resolves against the file (or the working
//! directory, for an environment variable) that set the default, as if the
//! label had written it (`paths.rs`). The table is checked on its own first,
//! against the same types as a label's keys, so a bad default is an error
//! naming `label_defaults.<key>`, once, and never a label's error.

use std::collections::{BTreeMap, BTreeSet};

use figment::value::Value;
use figment::Figment;

use super::{ConfigError, RawLabel};

/// The table's key in the configuration.
pub(super) const KEY: &str = "label_defaults";

/// Replaced by the label's name in the strings of a default.
pub(super) const LABEL_PLACEHOLDER: &str = "{label}";

/// Which keys each label took from `[label_defaults]`, so that an error in
/// one of them names the default the user wrote, not a key the user never
/// wrote in that label.
#[derive(Debug, Default)]
pub(super) struct Defaulted {
    /// Label name → the keys copied into it.
    taken: BTreeMap<String, BTreeSet<String>>,
    /// The default keys whose value names `{label}`: a different value for
    /// each label.
    templated: BTreeSet<String>,
}

impl Defaulted {
    /// The key to name in an error about `key` of label `label`:
    /// `label_defaults.<key>` when the label took it from the defaults,
    /// else `labels.<label>.<key>`.
    pub(super) fn key(&self, label: &str, key: &str) -> String {
        if self.took(label, key) {
            format!("{KEY}.{key}")
        } else {
            format!("labels.{label}.{key}")
        }
    }

    /// Whether `label` took `key` (or the key `key` is under, as in
    /// `registry.json` or `notify[1]`) from the defaults.
    pub(super) fn took(&self, label: &str, key: &str) -> bool {
        self.taken
            .get(label)
            .is_some_and(|keys| keys.contains(top_key(key)))
    }

    /// Whether the default `key` (or the key it is under) names `{label}`,
    /// so that each label has its own value of it.
    pub(super) fn templated(&self, key: &str) -> bool {
        self.templated.contains(top_key(key))
    }
}

/// The label key that `key` is (`trainer`) or is under (`registry.json`,
/// `notify[1]`).
fn top_key(key: &str) -> &str {
    key.split(['.', '[']).next().unwrap_or(key)
}

/// Check `[label_defaults]` in `merged` (the whole configuration, merged
/// once by the caller), then copy each of its keys into every label table
/// that does not set that key. Without the table, nothing changes.
pub(super) fn apply(merged: &mut Value, figment: &Figment) -> Result<Defaulted, ConfigError> {
    let Value::Dict(_, root) = merged else {
        return Ok(Defaulted::default());
    };
    let Some(table) = root.remove(KEY) else {
        return Ok(Defaulted::default());
    };
    let Value::Dict(_, defaults) = &table else {
        return Err(ConfigError::at(
            KEY,
            &super::origin(figment, KEY),
            "expected a table of label keys (threshold, trainer, gate, …)",
        ));
    };
    check(&table, figment)?;
    let mut defaulted = Defaulted {
        templated: defaults
            .iter()
            .filter(|(_, value)| names_label(value))
            .map(|(key, _)| key.clone())
            .collect(),
        ..Defaulted::default()
    };
    let Some(Value::Dict(_, labels)) = root.get_mut("labels") else {
        return Ok(defaulted);
    };
    for (name, label) in labels.iter_mut() {
        // Not a table: the label's own deserialisation says so, by name.
        let Value::Dict(_, keys) = label else {
            continue;
        };
        let mut taken = BTreeSet::new();
        for (key, value) in defaults {
            if !keys.contains_key(key) {
                let value = if defaulted.templated(key) {
                    for_label(value, name)
                } else {
                    value.clone()
                };
                keys.insert(key.clone(), value);
                taken.insert(key.clone());
            }
        }
        if !taken.is_empty() {
            defaulted.taken.insert(name.clone(), taken);
        }
    }
    Ok(defaulted)
}

/// The defaults must be what a label's keys may be (types, no unknown
/// key); the label-level rules (a gate needs a registry, …) are checked per
/// label, where they apply.
fn check(table: &Value, figment: &Figment) -> Result<(), ConfigError> {
    let Err(error) = table.deserialize::<RawLabel>() else {
        return Ok(());
    };
    let key = std::iter::once(KEY)
        .chain(error.path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(".");
    Err(ConfigError::at(
        &key,
        &super::origin(figment, &key),
        error.kind,
    ))
}

/// Whether a string of `value` names `{label}`.
fn names_label(value: &Value) -> bool {
    match value {
        Value::String(_, s) => s.contains(LABEL_PLACEHOLDER),
        Value::Dict(_, dict) => dict.values().any(names_label),
        Value::Array(_, values) => values.iter().any(names_label),
        _ => false,
    }
}

/// `value` with `{label}` replaced by `label` in every string, tags kept.
fn for_label(value: &Value, label: &str) -> Value {
    match value {
        Value::String(tag, s) => Value::String(*tag, s.replace(LABEL_PLACEHOLDER, label)),
        Value::Dict(tag, dict) => Value::Dict(
            *tag,
            dict.iter()
                .map(|(key, value)| (key.clone(), for_label(value, label)))
                .collect(),
        ),
        Value::Array(tag, values) => Value::Array(
            *tag,
            values.iter().map(|value| for_label(value, label)).collect(),
        ),
        other => other.clone(),
    }
}
