//! The `tcp-relay` binary as a test's child process: a relay (`serve`)
//! with its status endpoint, and an agent (`expose`) whose address lines
//! arrive on a channel. Both are killed (and reaped) when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use super::WAIT;

/// `tcp-relay serve` with `--metrics` on a loopback address.
pub struct RelayProcess {
    child: Child,
    pub metrics: SocketAddr, // its status endpoint
}

impl RelayProcess {
    /// `tcp-relay serve <args> --metrics <metrics> -q`; returns once the
    /// status endpoint answers (the relay listens on every port by then).
    pub fn start(args: &[impl AsRef<std::ffi::OsStr>], metrics: SocketAddr) -> RelayProcess {
        Self::try_start(args, metrics).expect("the relay exited at start (a port taken?)")
    }

    /// [`start`](Self::start), or `None` if the relay exits first: ports a
    /// test picked with `free_port` were free when picked, and a test
    /// running in parallel (or an outgoing connection's ephemeral port) may
    /// have taken one since; the caller picks new ones and tries again.
    /// Ready means its own `/metrics` answered: a bare connect could reach
    /// whatever else listens there.
    pub fn try_start(
        args: &[impl AsRef<std::ffi::OsStr>],
        metrics: SocketAddr,
    ) -> Option<RelayProcess> {
        let metrics_arg = metrics.to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
            .arg("serve")
            .args(args)
            .args(["--metrics", &metrics_arg, "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start a relay");
        let mut relay = RelayProcess { child, metrics };
        let deadline = Instant::now() + WAIT;
        while !relay.answers() {
            if !matches!(relay.child.try_wait(), Ok(None)) {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the relay never answered on {metrics}"
            );
            // A poll interval, not synchronisation: the condition is re-checked.
            thread::sleep(Duration::from_millis(2));
        }
        Some(relay)
    }

    /// Whether `/metrics` answers with the relay's own metrics.
    fn answers(&self) -> bool {
        self.scrape()
            .is_ok_and(|text| text.contains("tcp_relay_apps"))
    }

    /// `/metrics`, as text.
    fn scrape(&self) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        let request = b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        stream.write_all(request)?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    }

    /// One sample of `/metrics` by its name and labels as printed
    /// (`tcp_relay_bytes_total{direction="to_app"}`); 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.scrape().expect("the relay's metrics");
        let prefix = format!("{sample} ");
        let value = text.lines().find_map(|line| line.strip_prefix(&prefix));
        value.and_then(|v| v.parse().ok()).unwrap_or(0.0)
    }

    /// Descriptors the relay holds now.
    pub fn descriptors(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.child.id());
        std::fs::read_dir(dir).map_or(0, Iterator::count)
    }

    /// The relay's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay's /proc status");
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
        let kib = line.and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok());
        kib.expect("VmRSS in /proc status")
    }

    /// Kills it now (SIGKILL: no drain, as a crash or a lost machine).
    pub fn kill(self) {}
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tcp-relay expose`; its stdout lines (the addresses) on a channel.
pub struct ExposeProcess {
    child: Child,
    lines: Receiver<String>,
}

impl ExposeProcess {
    pub fn start(args: &[&str]) -> ExposeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
            .arg("expose")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start expose");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ExposeProcess { child, lines }
    }

    /// The next line it prints, within `patience`.
    pub fn line_within(&self, patience: Duration) -> String {
        self.lines
            .recv_timeout(patience)
            .expect("an address line from expose")
    }

    /// The next line it prints, within the tests' usual wait.
    pub fn line(&self) -> String {
        self.line_within(super::WAIT)
    }
}

impl Drop for ExposeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
