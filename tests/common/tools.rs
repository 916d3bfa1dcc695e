//! Real servers and tools some tests run (nginx, HAProxy, systemd-analyze,
//! Chromium, a Prometheus parser), and the policy when one is missing.
//!
//! CI (`.ci/run`) installs every tool a test needs, so there a missing tool
//! fails the test: CI never skips. On a developer's fresh machine `cargo
//! test` must still pass, so there a missing tool skips the test with one
//! line on stderr saying what to install. `CI` set (as `.ci/run` runs) or
//! `TCP_RELAY_REQUIRE_TOOLS=1` makes the tools required.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where to look for a tool besides `$PATH`: Debian puts daemons in sbin,
/// which is not on an unprivileged user's `$PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// The path of `tool`, or `None` after saying the test is skipped (or
/// failing the test when tools are required). `install` says how to get it,
/// e.g. `apt-get install nginx-light`.
pub fn tool(tool: &str, install: &str) -> Option<PathBuf> {
    if let Some(path) = find(tool) {
        return Some(path);
    }
    let required = std::env::var_os("CI").is_some()
        || std::env::var("TCP_RELAY_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{tool} not installed ({install}), and tools are required here"
    );
    // Straight to stderr: the test harness captures `eprintln!` of passing
    // tests, and this line is for the person running them.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {tool} not installed ({install})"
    );
    None
}

/// `tool` on `$PATH` or in the sbin directories, if it is an executable file.
fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
