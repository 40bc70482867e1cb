//! `labels.<name>.github_trigger = { repo, branch, paths? }`: a GitHub push
//! to `repo`/`branch` (touching one of `paths`, when given) starts that
//! label's cycle through `retrain-server`'s `POST /v1/hooks/github`.
//! `"none"` (handled by the caller) opts a label out of a
//! `[label_defaults]` trigger.

use serde::Deserialize;

/// As written in the configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithubTrigger {
    repo: String,
    branch: String,
    #[serde(default)]
    paths: Option<Vec<String>>,
}

/// A validated push trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubTrigger {
    /// `owner/name`, compared case-insensitively (GitHub names are).
    pub repo: String,
    /// A branch name (`refs/heads/` stripped).
    pub branch: String,
    /// Path prefixes (`data/`, `labels.csv`); a push whose commits touch none
    /// of them is ignored. Empty: every push to the branch.
    pub paths: Vec<String>,
}

impl GithubTrigger {
    /// Whether a push of `git_ref` to `repo` touching `changed` files
    /// concerns this trigger. `changed = None`: the push does not say (a
    /// ref created without commits), which matches only a trigger without
    /// paths.
    pub fn matches(&self, repo: &str, git_ref: &str, changed: Option<&[String]>) -> bool {
        if !self.repo.eq_ignore_ascii_case(repo) {
            return false;
        }
        if git_ref.strip_prefix("refs/heads/") != Some(self.branch.as_str()) {
            return false;
        }
        if self.paths.is_empty() {
            return true;
        }
        changed.is_some_and(|files| {
            files
                .iter()
                .any(|file| self.paths.iter().any(|p| path_under(file, p)))
        })
    }
}

/// `file` is `prefix` or lies under it (`data` covers `data/x.csv`, not `database.csv`).
fn path_under(file: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    file == prefix
        || file
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn valid_repo_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parse and validate a trigger as written (a table, not `"none"`).
pub(super) fn parse(value: &serde_json::Value) -> Result<GithubTrigger, String> {
    const EXPECTED: &str = "expected \"none\" or { repo, branch, paths? }";
    if !value.is_object() {
        return Err(format!("{value} is not a trigger: {EXPECTED}"));
    }
    let raw: RawGithubTrigger =
        serde_json::from_value(value.clone()).map_err(|e| format!("{e} ({EXPECTED})"))?;
    raw.validate()
}

impl RawGithubTrigger {
    /// Validate; the error says what is wrong with which field.
    fn validate(self) -> Result<GithubTrigger, String> {
        let repo = self.repo.trim();
        let valid_repo = repo
            .split_once('/')
            .is_some_and(|(owner, name)| valid_repo_part(owner) && valid_repo_part(name));
        if !valid_repo {
            return Err(format!("repo {repo:?} is not owner/name"));
        }
        let branch = self.branch.trim();
        let branch = branch.strip_prefix("refs/heads/").unwrap_or(branch);
        if branch.is_empty()
            || branch.starts_with('/')
            || branch.ends_with('/')
            || branch.contains("..")
            || branch
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
        {
            return Err(format!("branch {:?} is not a git branch name", self.branch));
        }
        let mut paths = Vec::new();
        for path in self.paths.unwrap_or_default() {
            let trimmed = path.trim();
            if trimmed.is_empty()
                || trimmed.starts_with('/')
                || trimmed.split('/').any(|segment| segment == "..")
            {
                return Err(format!(
                    "paths entry {path:?} must be a relative path in the repository (no leading /, no ..)"
                ));
            }
            paths.push(trimmed.to_owned());
        }
        Ok(GithubTrigger {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            paths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(repo: &str, branch: &str, paths: Option<&[&str]>) -> RawGithubTrigger {
        RawGithubTrigger {
            repo: repo.into(),
            branch: branch.into(),
            paths: paths.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn valid_triggers_are_normalised() {
        let t = raw("Org/Data-Repo", "refs/heads/main", Some(&["data/"]))
            .validate()
            .unwrap();
        assert_eq!(t.repo, "Org/Data-Repo");
        assert_eq!(t.branch, "main");
        assert_eq!(t.paths, vec!["data/"]);
    }

    #[test]
    fn invalid_fields_are_named() {
        for (repo, branch, paths, word) in [
            ("nope", "main", None, "repo"),
            ("a/b/c", "main", None, "repo"),
            ("a/..", "main", None, "repo"),
            ("a/b", "", None, "branch"),
            ("a/b", "feat ure", None, "branch"),
            ("a/b", "x..y", None, "branch"),
            ("a/b", "main", Some(&["/abs"][..]), "paths"),
            ("a/b", "main", Some(&["a/../b"][..]), "paths"),
            ("a/b", "main", Some(&[" "][..]), "paths"),
        ] {
            let e = raw(repo, branch, paths).validate().unwrap_err();
            assert!(e.starts_with(word), "{repo} {branch}: {e}");
        }
    }

    #[test]
    fn pushes_match_repo_branch_and_paths() {
        let any = raw("org/data", "main", None).validate().unwrap();
        assert!(any.matches("ORG/data", "refs/heads/main", None));
        assert!(!any.matches("org/data", "refs/heads/dev", None));
        assert!(!any.matches("org/data", "refs/tags/main", None));
        assert!(!any.matches("org/other", "refs/heads/main", None));

        let scoped = raw("org/data", "main", Some(&["data", "labels.csv"]))
            .validate()
            .unwrap();
        let files = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(scoped.matches("org/data", "refs/heads/main", Some(&files(&["data/a.csv"]))));
        assert!(scoped.matches("org/data", "refs/heads/main", Some(&files(&["labels.csv"]))));
        assert!(!scoped.matches(
            "org/data",
            "refs/heads/main",
            Some(&files(&["database.csv"]))
        ));
        assert!(!scoped.matches("org/data", "refs/heads/main", Some(&files(&["README.md"]))));
        assert!(!scoped.matches("org/data", "refs/heads/main", None));
    }
}
