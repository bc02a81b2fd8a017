//! What a binary was built from: the commit (`-dirty` when the tree had uncommitted
//! changes) and the compiler, recorded by `build.rs` (vergen), for `--version` and
//! settle-bench's report.

/// The commit this binary was built from (`-dirty` when the tree had uncommitted
/// changes), recorded by `build.rs`; `None` when it was built outside a git tree.
pub fn commit() -> Option<String> {
    let sha = env!("VERGEN_GIT_SHA");
    // What vergen writes when it cannot read git.
    if sha.is_empty() || sha == "VERGEN_IDEMPOTENT_OUTPUT" {
        return None;
    }
    Some(if env!("VERGEN_GIT_DIRTY") == "true" {
        format!("{sha}-dirty")
    } else {
        sha.to_owned()
    })
}

/// The compiler this binary was built with (`build.rs`), e.g. `1.95.0`.
pub const RUSTC: &str = env!("VERGEN_RUSTC_SEMVER");

/// What `--version` prints after the name: the package version, the commit and the
/// compiler, e.g. `0.1.0 (a26896d, rustc 1.95.0)`.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let commit = commit().unwrap_or_else(|| "commit unknown".to_owned());
        format!("{} ({commit}, rustc {RUSTC})", env!("CARGO_PKG_VERSION"))
    })
}
