//! systemd service notifications (`sd_notify`): ready, stopping, the watchdog
//! and a status line, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! The protocol (sd_notify(3)): one datagram of newline-separated
//! `KEY=VALUE` assignments to the `AF_UNIX` datagram socket that
//! `$NOTIFY_SOCKET` names, either a path (`/run/systemd/notify`) or, on
//! Linux, an abstract name written with a leading `@`. systemd learns the
//! sender's pid from the socket's credentials; with `NotifyAccess=main` only
//! the main process may notify, and every thread of ours is that process.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`)
//! there is no [`Notifier`] and nothing is sent. A notification is a
//! courtesy: a failed send is logged once per run of failures and never
//! stops the relay. The socket is non-blocking, so a systemd too busy to
//! drain its queue costs one dropped message (the watchdog is pinged at
//! twice the rate it needs, so one loss is harmless), never a stalled loop.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The variable through which systemd passes its notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds, set when the unit has `WatchdogSec=`.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid the watchdog is meant for; a child that inherited the variables
/// must not ping on its parent's behalf.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram, // unbound and non-blocking; sends to `addr`
    addr: SocketAddr,     // systemd's socket
    name: String,         // `$NOTIFY_SOCKET` as given, for log lines
    failing: bool,        // the last send failed and was logged
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for, or `None` when it is unset or
    /// empty (then the caller sends nothing). An address this code cannot
    /// use (a `vsock:` one, a relative path) is logged and ignored: the
    /// relay runs anyway, and systemd will report that it never got ready.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        if value.is_empty() {
            return None;
        }
        Notifier::new(&value)
            .inspect_err(|e| log::warn!("ignoring {NOTIFY_SOCKET}={value:?}: {e}"))
            .ok()
    }

    /// A notifier sending to `socket`: an absolute path, or `@name` for a
    /// Linux abstract socket.
    pub fn new(socket: &OsStr) -> io::Result<Notifier> {
        let addr = socket_addr(socket.as_bytes())?;
        let sender = UnixDatagram::unbound()?;
        sender.set_nonblocking(true)?;
        Ok(Notifier {
            socket: sender,
            addr,
            name: socket.to_string_lossy().into_owned(),
            failing: false,
        })
    }

    /// Startup is over and the relay is serving (`READY=1`): systemd
    /// considers the unit started and starts the units ordered after it.
    pub fn ready(&mut self) -> bool {
        self.send("READY=1")
    }

    /// The relay is shutting down (`STOPPING=1`), e.g. draining pipes after
    /// SIGTERM, so systemd shows the unit as deactivating.
    pub fn stopping(&mut self) -> bool {
        self.send("STOPPING=1")
    }

    /// The loop is alive (`WATCHDOG=1`); send at half of
    /// [`watchdog_interval`], or systemd kills and restarts the unit.
    pub fn watchdog(&mut self) -> bool {
        self.send("WATCHDOG=1")
    }

    /// A one-line status for `systemctl status` (`STATUS=…`). A newline
    /// would end the assignment and start another, so each becomes a space.
    pub fn status(&mut self, text: &str) -> bool {
        self.send(&format!("STATUS={}", text.replace(['\n', '\r'], " ")))
    }

    /// Sends `assignments` (newline-separated `KEY=VALUE` lines, e.g.
    /// `READY=1\nSTATUS=serving`) as one datagram; returns whether it was
    /// delivered. The first failure of a run is logged, the next ones are
    /// not, and the first success after them says so.
    pub fn send(&mut self, assignments: &str) -> bool {
        match self.socket.send_to_addr(assignments.as_bytes(), &self.addr) {
            Ok(_) => {
                if self.failing {
                    log::info!("systemd notifications to {} work again", self.name);
                    self.failing = false;
                }
                true
            }
            Err(e) => {
                if !self.failing {
                    log::warn!(
                        "cannot notify systemd at {}: {e} (further failures are not logged)",
                        self.name
                    );
                    self.failing = true;
                }
                false
            }
        }
    }
}

/// The socket address `$NOTIFY_SOCKET` names: a path, or an abstract name.
fn socket_addr(value: &[u8]) -> io::Result<SocketAddr> {
    match value.first() {
        Some(b'/') => SocketAddr::from_pathname(OsStr::from_bytes(value)),
        Some(b'@') => abstract_addr(&value[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not an absolute path or an @abstract name",
        )),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// How often systemd expects `WATCHDOG=1`, from `$WATCHDOG_USEC`, if the
/// unit has a watchdog and it is meant for this process. Ping at half this.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var(WATCHDOG_USEC).ok();
    let pid = std::env::var(WATCHDOG_PID).ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// The watchdog interval from the two variables' values, as
/// `sd_watchdog_enabled(3)` reads them: `usec` must be a positive integer,
/// and `pid`, when set, must be `our_pid` (else the watchdog is another
/// process's). Anything unparsable means no watchdog.
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&n| n > 0)?;
    let ours = match pid {
        Some(pid) => pid.parse::<u32>().ok()? == our_pid,
        None => true,
    };
    ours.then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testdir::TestDir;

    /// A blocking receiver with a timeout, so a lost datagram fails the test.
    fn receiver(addr: &SocketAddr) -> UnixDatagram {
        let socket = UnixDatagram::bind_addr(addr).expect("bind the test's notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set a read timeout");
        socket
    }

    fn recv_text(socket: &UnixDatagram) -> String {
        let mut buf = [0; 512];
        let n = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..n].to_vec()).expect("notifications are text")
    }

    fn assert_each_message_arrives(notifier: &mut Notifier, systemd: &UnixDatagram) {
        assert!(notifier.ready());
        assert_eq!(recv_text(systemd), "READY=1");
        assert!(notifier.stopping());
        assert_eq!(recv_text(systemd), "STOPPING=1");
        assert!(notifier.watchdog());
        assert_eq!(recv_text(systemd), "WATCHDOG=1");
        assert!(notifier.status("2 apps\n5 pipes"));
        assert_eq!(recv_text(systemd), "STATUS=2 apps 5 pipes");
    }

    #[test]
    fn a_path_socket_receives_exactly_each_message() {
        let dir = TestDir::new("notify-path");
        let path = dir.path().join("notify");
        let systemd = receiver(&SocketAddr::from_pathname(&path).expect("a short path"));
        let mut notifier = Notifier::new(path.as_os_str()).expect("a path is accepted");
        assert_each_message_arrives(&mut notifier, &systemd);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_abstract_socket_receives_exactly_each_message() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tcp-relay-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("a short name");
        let systemd = receiver(&addr);
        let mut notifier = Notifier::new(OsStr::new(&format!("@{name}"))).expect("@name works");
        assert_each_message_arrives(&mut notifier, &systemd);
    }

    #[test]
    fn a_failed_send_is_reported_and_the_next_success_recovers() {
        let dir = TestDir::new("notify-gone");
        let path = dir.path().join("notify");
        let mut notifier = Notifier::new(path.as_os_str()).expect("a path is accepted");
        assert!(!notifier.ready(), "nobody listens yet");
        assert!(notifier.failing);
        assert!(!notifier.watchdog(), "still nobody");
        let systemd = receiver(&SocketAddr::from_pathname(&path).expect("a short path"));
        assert!(notifier.watchdog());
        assert!(!notifier.failing);
        assert_eq!(recv_text(&systemd), "WATCHDOG=1");
    }

    #[test]
    fn unusable_addresses_are_refused() {
        for bad in ["vsock:2:1234", "relative/notify", "notify"] {
            assert!(Notifier::new(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(Notifier::new(OsStr::new(&too_long)).is_err());
    }

    #[test]
    fn the_watchdog_interval_is_parsed_as_sd_watchdog_enabled_does() {
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), thirty);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), thirty);
        assert_eq!(
            parse_watchdog(Some("1"), None, 7),
            Some(Duration::from_micros(1))
        );
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("8"), 7),
            None,
            "not ours"
        );
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
        for bad in [
            "",
            "0",
            "-5",
            "30s",
            "1e6",
            " 30",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_watchdog(Some(bad), None, 7), None, "usec {bad:?}");
        }
        for bad in ["", "x", "-7", "7 "] {
            assert_eq!(parse_watchdog(Some("5"), Some(bad), 7), None, "pid {bad:?}");
        }
    }
}
