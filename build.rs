//! Records what a binary is built from, for `settle --version` and settle-bench's
//! report: the git commit (and whether the tree had uncommitted changes) and the
//! compiler. Without git (a source tarball) the values are left out, with a warning.

use vergen_gitcl::{Emitter, GitclBuilder, RustcBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // vergen reruns this on a new commit (.git/HEAD and its ref); a change to the
    // sources must rerun it too, or a build from an edited tree would not say so.
    // `static/` is built into the server (rust-embed). "-dirty", as `git describe
    // --dirty` means it: uncommitted changes to any tracked file.
    for path in [
        "src",
        "static",
        "examples",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let git = GitclBuilder::default().sha(true).dirty(false).build()?;
    let rustc = RustcBuilder::default().semver(true).build()?;
    Emitter::default()
        .add_instructions(&git)?
        .add_instructions(&rustc)?
        .emit()?;
    Ok(())
}
