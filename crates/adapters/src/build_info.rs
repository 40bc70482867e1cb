//! What this binary was built from, for run manifests and logs (§9). Set by
//! `build.rs`; a build without git (a crates.io tarball) says `unknown`.

/// Commit of the build (`RETRAIN_GIT_SHA` at build time wins over `git`).
pub const GIT_SHA: &str = match option_env!("RETRAIN_GIT_SHA") {
    Some(sha) => sha,
    None => "unknown",
};

/// `rustc --version` of the compiler that built this binary.
pub const RUSTC_VERSION: &str = match option_env!("RETRAIN_RUSTC_VERSION") {
    Some(version) => version,
    None => "unknown",
};

/// Operating system and architecture (`linux x86_64`).
pub fn os() -> String {
    format!("{} {}", std::env::consts::OS, std::env::consts::ARCH)
}
