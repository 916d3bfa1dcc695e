//! A private temporary directory per test, removed when the test ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system's temp dir, unique to this process
/// and call (tests run in parallel), removed with everything in it on drop.
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// A new empty directory whose name mentions `what`.
    pub(crate) fn new(what: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tcp-relay-ops-{}-{n}-{what}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the test's temp dir");
        TestDir(path)
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
