//! Running under systemd: the units in `contrib/systemd` pass
//! `systemd-analyze verify` and keep their sandbox, agree with the code's
//! defaults, and the binary takes its secret from the credential that their
//! `LoadCredential=` provides, or from `--secret-file`.
//!
//! Tests that need `systemd-analyze` follow the project's tool policy
//! (`tests/common/tools.rs`): skipped with a line on stderr on a machine without
//! it, failed where tools are required (CI).

#[path = "common/tools.rs"]
mod tools;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use tcp_relay::Config;

/// The credential name the relay looks for (`Secret::select`), and the
/// variable systemd names the credentials' directory in.
const CREDENTIAL: &str = "tcp-relay-secret";
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A systemd time span of one unit (`20s`, `500ms`, `2min`), as the units
/// here write them.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|e| format!("{text:?}: {e}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "min" => Ok(Duration::from_secs(60 * n)),
        _ => Err(format!("{text:?}: unit {unit:?}")),
    }
}

/// The binary under test.
const BINARY: &str = env!("CARGO_BIN_EXE_tcp-relay");
/// Where the units expect the binary to be installed.
const INSTALLED: &str = "/usr/local/bin/tcp-relay";
/// The units, each with the name it is verified under: a template is
/// verified as an instance, so that `%i` is expanded as systemd would.
const UNITS: [(&str, &str); 2] = [
    ("tcp-relay.service", "tcp-relay.service"),
    ("tcp-relay-expose@.service", "tcp-relay-expose@web.service"),
];
/// How long a process may take to say what a test waits for.
const WAIT: Duration = Duration::from_secs(10);

fn systemd_analyze_installed() -> bool {
    tools::tool("systemd-analyze", "apt-get install systemd").is_some()
}

// ---------------------------------------------------------------------------
// Helpers

/// A private temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tcp-relay-systemd-{}-{n}-{what}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    /// Writes `contents` to `name` in the directory with `mode`.
    fn file(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a temp file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("set a temp file's mode");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unit file as shipped.
fn unit_text(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every value of `key=` in a unit, in order.
fn settings<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .collect()
}

/// The one value of `key=` in a unit.
fn setting<'a>(unit: &'a str, key: &str) -> &'a str {
    match settings(unit, key)[..] {
        [value] => value,
        ref values => panic!("expected one {key}=, found {values:?}"),
    }
}

/// The units copied into a temp dir with `ExecStart=` pointing at the
/// built binary, which `systemd-analyze verify` requires to exist.
fn staged_units() -> TempDir {
    let dir = TempDir::new("units");
    for (file, _) in UNITS {
        let text = unit_text(file);
        assert!(text.contains(INSTALLED), "{file} runs {INSTALLED}");
        dir.file(file, text.replace(INSTALLED, BINARY).as_bytes(), 0o644);
    }
    dir
}

fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// The units

/// `systemd-analyze verify` accepts both units without a word: an unknown
/// key, a bad value or a missing binary is a warning with exit status 0,
/// so any line about our units fails the test (lines about the host's
/// own units are not ours to judge).
#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !systemd_analyze_installed() {
        return;
    }
    let dir = staged_units();
    for (_, name) in UNITS {
        let output = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.0.join(name))
            .output()
            .expect("run systemd-analyze verify");
        let text = text_of(&output);
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("tcp-relay")).collect();
        assert!(
            output.status.success() && ours.is_empty(),
            "systemd-analyze verify {name}: {}\n{text}",
            output.status
        );
    }
}

/// The sandbox stays tight: `systemd-analyze security` rates both units at
/// most 2.0 ("OK"; they rate 1.2). Dropping a hardening line fails this.
#[test]
fn the_units_keep_their_sandbox() {
    if !systemd_analyze_installed() {
        return;
    }
    let dir = staged_units();
    for (_, name) in UNITS {
        // The threshold is in tenths of the displayed exposure level.
        let output = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(dir.0.join(name))
            .output()
            .expect("run systemd-analyze security");
        assert!(
            output.status.success(),
            "systemd-analyze security {name}: {}\n{}",
            output.status,
            text_of(&output)
        );
    }
}

/// What the units assume of the code holds: the credential's name, a stop
/// timeout that outlasts the default drain, descriptors for the default
/// connection limit, and a notify-type service with a watchdog.
#[test]
fn the_units_agree_with_the_code() {
    let defaults = Config::default();
    for (file, _) in UNITS {
        let unit = unit_text(file);
        let (credential, _) = setting(&unit, "LoadCredential")
            .split_once(':')
            .expect("LoadCredential=NAME:PATH");
        assert_eq!(credential, CREDENTIAL, "{file}");
        let stop = parse_duration(setting(&unit, "TimeoutStopSec")).expect("a duration");
        assert!(stop > defaults.grace, "{file}: stop {stop:?} vs grace");
        assert_eq!(setting(&unit, "Type"), "notify", "{file}");
        assert_eq!(setting(&unit, "NotifyAccess"), "main", "{file}");
        parse_duration(setting(&unit, "WatchdogSec")).expect("a watchdog");
        let families = setting(&unit, "RestrictAddressFamilies");
        assert!(
            families.contains("AF_UNIX"),
            "{file}: sd_notify needs AF_UNIX"
        );
        assert_eq!(settings(&unit, "CapabilityBoundingSet"), [""], "{file}");
    }
    let relay = unit_text("tcp-relay.service");
    let files: usize = setting(&relay, "LimitNOFILE").parse().expect("a number");
    let worst = 3 * defaults.max_connections + 2 * defaults.max_apps + 64;
    assert!(files >= worst, "LimitNOFILE={files} < {worst}");
}

// ---------------------------------------------------------------------------
// The secret, as systemd passes it

/// A `tcp-relay` process whose output lines arrive on channels; killed
/// when dropped, so a failing test leaves nothing running.
struct Process {
    child: Child,
    stdout: Receiver<String>, // stdout, a line at a time
    stderr: Receiver<String>, // stderr (the log), a line at a time
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, &Path)]) -> Process {
        let mut command = Command::new(BINARY);
        command
            .args(args)
            .env_remove("TCP_RELAY_SECRET")
            .env_remove(CREDENTIALS_DIRECTORY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start tcp-relay");
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        Process {
            child,
            stdout,
            stderr,
        }
    }

    /// The first line on `lines` that contains `needle`; fails after
    /// [`WAIT`] or when the stream ends first.
    fn line_with(lines: &Receiver<String>, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?}; saw {seen:?}");
    }

    /// The exit status, within [`WAIT`].
    fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            // A poll interval, not synchronisation: the exit is re-checked.
            thread::sleep(Duration::from_millis(5));
        }
        panic!("still running after {WAIT:?}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A relay whose only secret is the credential systemd would load admits
/// an app that read the same secret from `--secret-file`, and refuses one
/// whose file holds another.
#[test]
fn the_relay_takes_its_credential_and_the_app_its_secret_file() {
    let dir = TempDir::new("credential");
    dir.file(CREDENTIAL, b"correct horse battery staple\n", 0o400);
    let right = dir.file("right", b"correct horse battery staple\r\n", 0o600);
    let wrong = dir.file("wrong", b"Tr0ub4dor&3\n", 0o600);

    let args = ["serve", "--bind", "127.0.0.1", "--reg-port", "0"];
    let relay = Process::spawn(&args, &[(CREDENTIALS_DIRECTORY, &dir.0)]);
    let listening = Process::line_with(&relay.stderr, "listening for apps on ");
    assert!(listening.contains("secret required"), "{listening}");
    let reg = listening
        .split("listening for apps on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("the registration address");

    let right = right.to_str().expect("a UTF-8 temp path");
    let admitted = Process::spawn(&["echo", "--relay", reg, "--secret-file", right], &[]);
    let address = Process::line_with(&admitted.stdout, "127.0.0.1:");
    assert!(address.parse::<std::net::SocketAddr>().is_ok(), "{address}");

    let wrong = wrong.to_str().expect("a UTF-8 temp path");
    let mut refused = Process::spawn(&["echo", "--relay", reg, "--secret-file", wrong], &[]);
    Process::line_with(&refused.stderr, "secret refused");
    assert_eq!(refused.exit_status().code(), Some(1));
}

/// A named secret file that cannot be used stops the command at start with
/// its path; `--secret` with `--secret-file` is a usage error (status 2).
#[test]
fn a_secret_file_that_cannot_be_used_stops_the_command() {
    let dir = TempDir::new("bad-secret");
    let empty = dir.file("empty", b"\n", 0o600);
    let missing = dir.0.join("missing");
    for (path, why) in [(&empty, "is empty"), (&missing, "No such file")] {
        let path = path.to_str().expect("a UTF-8 temp path");
        for command in [
            &["serve", "--bind", "127.0.0.1", "--reg-port", "0"][..],
            &["echo"],
            &["expose", "--local", "127.0.0.1:1"],
        ] {
            let mut args = command.to_vec();
            args.extend(["--secret-file", path]);
            let mut process = Process::spawn(&args, &[]);
            let error = Process::line_with(&process.stderr, "tcp-relay: error:");
            assert!(
                error.contains(path) && error.contains(why),
                "{args:?}: {error}"
            );
            assert_eq!(process.exit_status().code(), Some(1), "{args:?}");
        }
    }
    let path = empty.to_str().expect("a UTF-8 temp path");
    let mut both = Process::spawn(&["serve", "--secret", "x", "--secret-file", path], &[]);
    Process::line_with(&both.stderr, "cannot be used with");
    assert_eq!(both.exit_status().code(), Some(2));
}
