//! Records the commit the binary is built from (`git rev-parse HEAD`), for `--version` and bench
//! reports; "unknown" outside a git checkout.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|out| out.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LLAMA_WEBGPU_COMMIT={commit}");
    // Rerun when HEAD moves: HEAD and the refs a commit rewrites, loose or packed, wherever git
    // keeps them (a worktree's .git is a file). Only paths that exist: cargo counts a missing one
    // as changed, which rebuilt the crate on every cargo command in a checkout without packed refs.
    for name in ["HEAD", "refs/heads", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]).filter(|path| Path::new(path).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
