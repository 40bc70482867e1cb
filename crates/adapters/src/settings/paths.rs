//! Config-relative paths.
//!
//! A relative path (or `sqlite://`/`file://` URL) written in the config
//! *file* means "relative to that file's directory", as Cargo does for a
//! manifest's `path =` and docker compose for a compose file's volumes; one
//! given by an environment variable or a flag means "relative to the working
//! directory". figment records which provider set each value
//! ([`Figment::find_metadata`]), so each value is resolved against its own
//! origin, after validation, into an absolute path:
//!
//! - `state`, `state_dir`, `counts.database` (SQLite only);
//! - `labels.<l>.metadata` (`file://…` or a plain path);
//! - `labels.<l>.registry.json`;
//! - `server.artifacts_dir` (default `<state_dir>/artifacts`), `server.log_file`;
//! - command jobs (`prepare`, `labels.<l>.prepare`, `labels.<l>.trainer`,
//!   `labels.<l>.dataset_check`):
//!   a program given as a relative path containing a `/` (`./train.sh`),
//!   the `workdir`, and the working directory itself, which defaults to the
//!   config file's directory for a command written in the file (so
//!   `["python3", "train.py"]` finds `train.py` next to the config from any
//!   working directory) and to the working directory otherwise.
//!
//! The defaults of `state` and `state_dir` belong to the config file when
//! there is one (`.retrain/` next to it), else to the working directory.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::label_defaults::{self, Defaulted};
use super::{CommandConfig, ConfigError, JobSpec, RegistrySpec, Settings};

/// The directories relative values resolve against.
struct Bases<'a> {
    figment: &'a Figment,
    /// The figment's merged value, computed once by the caller:
    /// `Figment::find_value` and `find_metadata` merge (clone) the whole
    /// configuration on every call, which made resolving 10,000 labels'
    /// paths take minutes.
    merged: &'a figment::value::Value,
    /// The config file, when one was used, and its directory (computed
    /// once: canonicalising it per value was ≈ 3 % of loading 10,000 labels).
    file: Option<(&'a Path, PathBuf)>,
    cwd: PathBuf,
}

impl Bases<'_> {
    /// Whether the configuration has a value at `key`.
    fn has(&self, key: &str) -> bool {
        self.value(key).is_some()
    }

    fn value(&self, key: &str) -> Option<&figment::value::Value> {
        self.merged.find_ref(key)
    }

    /// Who set the value at `key` (its provider's metadata).
    fn metadata(&self, key: &str) -> Option<&figment::Metadata> {
        self.figment.get_metadata(self.value(key)?.tag())
    }

    /// The metadata of the value at `key` or of its nearest parent that has
    /// one.
    fn nearest_metadata(&self, key: &str) -> Option<&figment::Metadata> {
        let mut probe = key;
        loop {
            if let Some(meta) = self.metadata(probe) {
                return Some(meta);
            }
            probe = &probe[..probe.rfind('.')?];
        }
    }

    /// The directory a value at `key` is relative to: its file's directory
    /// when the file set it, the working directory when an env var or a flag
    /// did, and the config file's directory (if any) for a default.
    fn of(&self, key: &str) -> PathBuf {
        match self.nearest_metadata(key) {
            Some(meta) => match &meta.source {
                Some(figment::Source::File(path)) => match &self.file {
                    Some((file, dir)) if file == path => dir.clone(),
                    _ => file_dir(path, &self.cwd),
                },
                _ => self.cwd.clone(),
            },
            None => match &self.file {
                Some((_, dir)) => dir.clone(),
                None => self.cwd.clone(),
            },
        }
    }

    /// Whether the value at `key` (or its nearest parent) came from a file.
    fn set_in_file(&self, key: &str) -> bool {
        self.nearest_metadata(key)
            .is_some_and(|meta| matches!(meta.source, Some(figment::Source::File(_))))
    }
}

/// The absolute directory holding the config file at `path`: the directory
/// itself is canonicalised (no `..`), a symlinked file is not followed (its
/// relative paths are relative to where the link is, like the file's name).
fn file_dir(path: &Path, cwd: &Path) -> PathBuf {
    let absolute = join(cwd, path);
    let dir = absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cwd.to_path_buf());
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// `base/path` unless `path` is absolute, without `.` components
/// (`./train.sh` → `/base/train.sh`). `..` is kept: removing it lexically
/// would be wrong across symlinks.
pub(super) fn join(base: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// `sqlite://rel.db?x` → `sqlite:///base/rel.db?x`; anything else unchanged.
pub(super) fn resolve_sqlite_url(raw: &str, base: &Path) -> String {
    let trimmed = raw.trim();
    let Some(rest) = trimmed
        .strip_prefix("sqlite://")
        .or_else(|| trimmed.strip_prefix("sqlite:"))
    else {
        return raw.to_owned();
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() || path.contains(":memory:") || path.starts_with('/') {
        return raw.to_owned();
    }
    let absolute = join(base, Path::new(path));
    match query {
        Some(q) => format!("sqlite://{}?{q}", absolute.display()),
        None => format!("sqlite://{}", absolute.display()),
    }
}

/// A metadata location: `file://rel` or a plain relative path become
/// absolute; remote locations are unchanged.
pub(super) fn resolve_metadata(raw: &str, base: &Path) -> String {
    let trimmed = raw.trim();
    if let Some(rest) = trimmed
        .strip_prefix("file://")
        .or_else(|| trimmed.strip_prefix("file:"))
    {
        // `file://localhost/abs` and `file:///abs` are absolute already.
        if rest.starts_with('/') || rest.starts_with("localhost/") || rest.is_empty() {
            return raw.to_owned();
        }
        return format!("file://{}", join(base, Path::new(rest)).display());
    }
    if trimmed.contains("://") || trimmed.is_empty() {
        return raw.to_owned();
    }
    join(base, Path::new(trimmed)).display().to_string()
}

/// Resolve a command job written at `key`; returns its display value.
fn resolve_command(config: &mut CommandConfig, key: &str, bases: &Bases<'_>) -> Value {
    let table_form = bases.has(&format!("{key}.command"));
    let command_key = if table_form {
        format!("{key}.command")
    } else {
        key.to_owned()
    };
    let base = bases.of(&command_key);
    if let Some(program) = config.argv.first_mut() {
        let path = Path::new(program.as_str());
        if program.contains('/') && path.is_relative() {
            *program = join(&base, path).display().to_string();
        }
    }
    config.workdir = Some(match &config.workdir {
        Some(dir) => join(&bases.of(&format!("{key}.workdir")), dir),
        // A command written in the file runs next to it; one from the
        // environment runs where retrain runs.
        None if bases.set_in_file(&command_key) => base,
        None => bases.cwd.clone(),
    });
    let workdir = config
        .workdir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    json!({ "command": config.argv, "workdir": workdir })
}

/// Resolve every relative path of `settings` against its origin (see the
/// module docs). Returns the resolved values as (dotted key, value) pairs,
/// which `config show` merges over the loaded configuration.
pub(super) fn resolve(
    settings: &mut Settings,
    figment: &Figment,
    merged: &figment::value::Value,
    file: Option<&Path>,
    defaulted: &Defaulted,
) -> Result<Vec<(String, Value)>, ConfigError> {
    let cwd = std::env::current_dir().map_err(|e| ConfigError {
        key: None,
        message: format!("cannot read the working directory (relative paths need it): {e}"),
    })?;
    let bases = Bases {
        figment,
        merged,
        file: file.map(|f| (f, file_dir(f, &cwd))),
        cwd,
    };
    let mut shown: Vec<(String, Value)> = Vec::new();

    let state = resolve_sqlite_url(settings.state.expose_secret(), &bases.of("state"));
    if state.starts_with("sqlite:") {
        shown.push(("state".into(), json!(state)));
    }
    settings.state = SecretString::from(state);
    settings.state_dir = join(&bases.of("state_dir"), &settings.state_dir);
    shown.push((
        "state_dir".into(),
        json!(settings.state_dir.display().to_string()),
    ));

    // `[server]`: an explicit artifacts_dir/log_file is relative to its
    // origin; the default artifacts_dir follows the (resolved) state_dir.
    let server = &mut settings.server;
    server.artifacts_dir = if bases.has("server.artifacts_dir") {
        join(&bases.of("server.artifacts_dir"), &server.artifacts_dir)
    } else {
        settings.state_dir.join("artifacts")
    };
    if let Some(file) = &mut server.log.file {
        *file = join(&bases.of("server.log_file"), file);
    }

    if let Some(counts) = &mut settings.counts {
        let database = resolve_sqlite_url(
            counts.database.expose_secret(),
            &bases.of("counts.database"),
        );
        if database.starts_with("sqlite:") {
            shown.push(("counts.database".into(), json!(database)));
        }
        counts.database = SecretString::from(database);
    }

    // The top-level `prepare` is each label's default; shown once, at its key.
    let mut shown_prepare = false;
    // So is a key taken from `[label_defaults]`: the same value (resolved
    // against the same origin) for every label that took it.
    let mut shown_defaults = BTreeSet::new();
    for (label, label_settings) in &mut settings.labels {
        let key = |k: &str| format!("labels.{label}.{k}");
        let mut show = |k: &str, value: Value| {
            // A default naming `{label}` is each label's own value.
            if !defaulted.took(label.as_str(), k) || defaulted.templated(k) {
                shown.push((key(k), value));
            } else if shown_defaults.insert(k.to_owned()) {
                shown.push((format!("{}.{k}", label_defaults::KEY), value));
            }
        };
        let metadata = resolve_metadata(&label_settings.metadata, &bases.of(&key("metadata")));
        if metadata != label_settings.metadata {
            show("metadata", json!(metadata));
            label_settings.metadata = metadata;
        }
        if let Some(RegistrySpec::Json { path, .. }) = &mut label_settings.registry {
            *path = join(&bases.of(&key("registry.json")), path);
            show("registry.json", json!(path.display().to_string()));
        }
        if let JobSpec::Command(config) = &mut label_settings.trainer {
            show("trainer", resolve_command(config, &key("trainer"), &bases));
        }
        if let Some(config) = &mut label_settings.dataset_check {
            show(
                "dataset_check",
                resolve_command(config, &key("dataset_check"), &bases),
            );
        }
        if let Some(JobSpec::Command(config)) = &mut label_settings.prepare {
            if bases.has(&key("prepare")) {
                // The label's own, or one it took from `[label_defaults]`.
                show("prepare", resolve_command(config, &key("prepare"), &bases));
            } else {
                let value = resolve_command(config, "prepare", &bases);
                if !shown_prepare {
                    shown.push(("prepare".into(), value));
                    shown_prepare = true;
                }
            }
        }
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_resolve_against_the_base() {
        let base = Path::new("/cfg");
        assert_eq!(
            resolve_sqlite_url("sqlite://.retrain/state.db", base),
            "sqlite:///cfg/.retrain/state.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite:./f.db?mode=ro", base),
            "sqlite:///cfg/f.db?mode=ro"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite:///abs.db", base),
            "sqlite:///abs.db"
        );
        assert_eq!(
            resolve_sqlite_url("sqlite::memory:", base),
            "sqlite::memory:"
        );
        assert_eq!(
            resolve_sqlite_url("postgres://u:p@h/db", base),
            "postgres://u:p@h/db"
        );
    }

    #[test]
    fn metadata_locations_resolve_only_when_local_and_relative() {
        let base = Path::new("/cfg");
        assert_eq!(
            resolve_metadata("file://datasets/m.json", base),
            "file:///cfg/datasets/m.json"
        );
        assert_eq!(resolve_metadata("m.json", base), "/cfg/m.json");
        assert_eq!(
            resolve_metadata("file:///abs/m.json", base),
            "file:///abs/m.json"
        );
        assert_eq!(
            resolve_metadata("hf://datasets/o/n/m.json", base),
            "hf://datasets/o/n/m.json"
        );
        assert_eq!(resolve_metadata("s3://b/k", base), "s3://b/k");
    }

    #[test]
    fn join_drops_dot_components() {
        assert_eq!(
            join(Path::new("/cfg"), Path::new("./train.sh")),
            PathBuf::from("/cfg/train.sh")
        );
        assert_eq!(
            join(Path::new("/cfg"), Path::new("/abs/x")),
            PathBuf::from("/abs/x")
        );
    }

    /// The config file's values resolve against its directory, wherever
    /// retrain runs; env values against the working directory.
    #[test]
    fn file_values_resolve_against_the_file_env_values_against_the_cwd() {
        use super::super::{load, ConfigSources};
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(
            root.join("retrain.toml"),
            r#"
state = "sqlite://.retrain/state.db"
[counts]
database = "sqlite://feedback.db"
query = "SELECT label, 1, 1 WHERE $1 IS NOT NULL"
[prepare]
command = ["./prepare.sh", "--fast"]
[labels.a]
threshold = 1
metadata = "file://datasets/dataset_metadata.json"
trainer = { command = ["python3", "train.py"], workdir = "jobs" }
registry = { json = "registry.json", model = "m" }
gate = "none"
[labels.b]
threshold = 1
metadata = "meta/b.json"
trainer = "command:bin/train --label b"
"#,
        )
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        let loaded = load(&ConfigSources {
            file: Some(root.join("retrain.toml")),
            env: vec![("RETRAIN_STATE_DIR".into(), "work".into())],
            overrides: Vec::new(),
        })
        .unwrap();
        let s = &loaded.settings;
        let r = root.display();
        assert_eq!(
            s.state.expose_secret(),
            format!("sqlite://{r}/.retrain/state.db")
        );
        assert_eq!(s.state_dir, cwd.join("work"), "env values: the cwd");
        assert_eq!(
            s.counts.as_ref().unwrap().database.expose_secret(),
            format!("sqlite://{r}/feedback.db")
        );
        let a = &s.labels[&retrain_core::domain::Label::new("a").unwrap()];
        assert_eq!(
            a.metadata,
            format!("file://{r}/datasets/dataset_metadata.json")
        );
        assert_eq!(
            a.registry,
            Some(RegistrySpec::Json {
                path: root.join("registry.json"),
                model: "m".into()
            })
        );
        let JobSpec::Command(trainer) = &a.trainer else {
            panic!("{:?}", a.trainer)
        };
        assert_eq!(
            trainer.argv,
            ["python3", "train.py"],
            "a bare program is looked up in PATH"
        );
        assert_eq!(trainer.workdir, Some(root.join("jobs")));
        let Some(JobSpec::Command(prepare)) = &a.prepare else {
            panic!("{:?}", a.prepare)
        };
        assert_eq!(prepare.argv[0], format!("{r}/prepare.sh"));
        assert_eq!(
            prepare.argv[1], "--fast",
            "arguments are the program's business"
        );
        assert_eq!(
            prepare.workdir,
            Some(root.clone()),
            "file commands run next to the file"
        );
        let b = &s.labels[&retrain_core::domain::Label::new("b").unwrap()];
        assert_eq!(b.metadata, format!("{r}/meta/b.json"));
        let JobSpec::Command(trainer) = &b.trainer else {
            panic!("{:?}", b.trainer)
        };
        assert_eq!(
            trainer.argv,
            [format!("{r}/bin/train"), "--label".into(), "b".into()]
        );

        // `config show` prints the resolved paths.
        let shown = super::super::redacted_toml(&loaded.effective()).unwrap();
        assert!(
            shown.contains(&format!("sqlite://{r}/feedback.db")),
            "{shown}"
        );
        assert!(shown.contains(&format!("{r}/prepare.sh")), "{shown}");
        assert!(
            shown.contains(&format!("workdir = \"{r}/jobs\"")),
            "{shown}"
        );
        assert!(
            shown.contains(&cwd.join("work").display().to_string()),
            "{shown}"
        );

        // Without a file, everything is relative to the working directory,
        // and commands from the environment run there.
        let loaded = load(&ConfigSources {
            file: None,
            env: vec![
                ("RETRAIN_LABELS__C__THRESHOLD".into(), "1".into()),
                ("RETRAIN_LABELS__C__METADATA".into(), "file://m.json".into()),
                ("RETRAIN_LABELS__C__TRAINER".into(), "command:./t.sh".into()),
            ],
            overrides: Vec::new(),
        })
        .unwrap();
        let s = &loaded.settings;
        assert_eq!(
            s.state.expose_secret(),
            format!("sqlite://{}/.retrain/state.db", cwd.display())
        );
        let c = &s.labels[&retrain_core::domain::Label::new("c").unwrap()];
        assert_eq!(c.metadata, format!("file://{}/m.json", cwd.display()));
        let JobSpec::Command(trainer) = &c.trainer else {
            panic!("{:?}", c.trainer)
        };
        assert_eq!(trainer.argv, [cwd.join("t.sh").display().to_string()]);
        assert_eq!(trainer.workdir, Some(cwd.clone()));
    }
}
