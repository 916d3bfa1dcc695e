//! Real servers a test starts (nginx, HAProxy): a private temporary
//! directory for their configuration, logs and pid files, a loopback port
//! the OS picked, and a process that is stopped when the test ends,
//! whether it passes or fails.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
const START: Duration = Duration::from_secs(10);

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name mentions `what`.
    pub fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tcp-relay-test-{}-{n}-{what}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a file in the temp dir");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port free right now (the OS picked it; a server started
/// next binds it). Servers configured by file cannot take port 0 and report
/// what they got, so this is the next best thing.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    listener.local_addr().expect("probe address").port()
}

/// A server process, killed (and reaped) when dropped.
pub struct Daemon {
    child: Child,       // the server
    name: &'static str, // for messages
    stderr: PathBuf,    // where its stderr went
}

impl Daemon {
    /// Starts `program args` with stderr to `dir/<name>.err`, and waits
    /// until something accepts connections on `port`.
    pub fn start(
        name: &'static str,
        program: &Path,
        args: &[&str],
        dir: &TempDir,
        port: u16,
    ) -> Daemon {
        let stderr = dir.path().join(format!("{name}.err"));
        let file = std::fs::File::create(&stderr).expect("create the stderr file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut daemon = Daemon {
            child,
            name,
            stderr,
        };
        daemon.wait_for_port(port);
        daemon
    }

    /// Waits until `port` accepts a connection, failing with the server's
    /// stderr if it exits or takes too long.
    fn wait_for_port(&mut self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}): {}", self.name, self.errors());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {port} within {START:?}: {}",
                self.name,
                self.errors()
            );
            // A poll interval, not synchronisation: the port is re-checked.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server wrote to stderr so far.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
