//! Build information for run manifests: the git commit (if this is a git
//! checkout with `git` available) and the `rustc` version. Never fails.

use std::process::Command;

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Watch `path` only if it exists (a missing file would rerun every build).
fn watch(path: &str) {
    if std::path::Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=RETRAIN_GIT_SHA");
    let sha = std::env::var("RETRAIN_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| output("git", &["rev-parse", "HEAD"]));
    if let Some(sha) = sha {
        println!("cargo:rustc-env=RETRAIN_GIT_SHA={sha}");
    }
    // Rebuild when HEAD moves: the HEAD file (branch switch) and the ref it
    // points to (commit), wherever this checkout (or worktree) keeps them.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = output("git", &["rev-parse", "--git-path", path]) {
            watch(&p);
        }
    }
    if let Some(head) = output("git", &["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = output("git", &["rev-parse", "--git-path", &head]) {
            watch(&p);
        }
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if let Some(version) = output(&rustc, &["--version"]) {
        println!("cargo:rustc-env=RETRAIN_RUSTC_VERSION={version}");
    }
}
