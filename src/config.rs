//! Relay settings: [`Config`], [`RelayStyle`] and [`Secret`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::access::{AllowList, RateLimit};

/// How the relay picks each app's relayed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayStyle {
    /// The lowest free port above the registration port: reg-port+1 for the
    /// first app, +2 for the next while the first holds its port, and so on.
    #[default]
    Increment,
    /// A port the operating system assigns.
    Random,
}

impl FromStr for RelayStyle {
    type Err = String;

    /// `increment` or `random`; `1` and `0` too, as the original relay took.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "increment" | "1" => Ok(RelayStyle::Increment),
            "random" | "0" => Ok(RelayStyle::Random),
            _ => Err(format!(
                "unknown relay style {s:?} (use increment, random, 1 or 0)"
            )),
        }
    }
}

impl fmt::Display for RelayStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelayStyle::Increment => "increment",
            RelayStyle::Random => "random",
        })
    }
}

/// Everything [`crate::Relay::bind`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every listener binds (registration, relayed and dial-in ports).
    pub bind: IpAddr,
    /// The registration port; 0 lets the OS choose (tests do).
    pub reg_port: u16,
    /// How relayed ports are chosen.
    pub relay_style: RelayStyle,
    /// How long a client waits for its dial-in before it is closed.
    pub dial_in_timeout: Duration,
    /// Clients one app may have waiting for dial-ins; more are closed at once.
    pub max_waiting_per_app: usize,
    /// Capacity of each ring buffer, per direction of an active pipe.
    pub buffer_size: usize,
    /// The shared secret apps must prove they know (challenge–response), and
    /// that makes every dial-in present a one-time token. `None`: the
    /// original protocol, dial-ins checked by source address.
    pub secret: Option<Secret>,
    /// Most apps registered (or registering) at once.
    pub max_apps: usize,
    /// Most sockets held for peers at once (apps, clients, dial-ins);
    /// connections beyond it are reset at once.
    pub max_connections: usize,
    /// Longest control line accepted from an app, `\n` included.
    pub max_line: usize,
    /// Where relayed ports may be: `None` is everything above the
    /// registration port (increment style) or any port (random style).
    pub port_range: Option<(u16, u16)>,
    /// How long an app may take to authenticate, and a dial-in to present
    /// its token (slow or silent peers are closed).
    pub register_timeout: Duration,
    /// How long a half-closed pipe may sit with no bytes moving before it is
    /// closed, so that nothing lingers in CLOSE_WAIT forever.
    pub half_close_timeout: Duration,
    /// On SIGINT/SIGTERM, how long open pipes may drain before the relay
    /// exits anyway.
    pub grace: Duration,
    /// Move bytes with `splice(2)` through kernel pipes instead of copying
    /// them through rings (Linux; two more descriptors per active direction,
    /// and a ring whenever no pipe can be had). On by default on Linux: it
    /// measured 1.3-1.5x the ring path's bulk throughput through a tunnel.
    pub splice: bool,
    /// Listen backlog of every listener: connections the kernel completes
    /// and queues for us between two accepts. Linux caps it at
    /// `net.core.somaxconn`; the relay logs it at start when it is capped.
    /// It also bounds the dial lines an app has outstanding (see the crate
    /// docs, invariant *A dial-in is never dropped*).
    pub backlog: u32,
    /// Client connections from these sources (a balancer in front of the
    /// relay: HAProxy, nginx stream, a cloud L4 balancer) must begin with a
    /// PROXY protocol header (v1 or v2), whose address then stands for the
    /// client everywhere after. `None`: no source is trusted, and a header
    /// is just client data.
    pub accept_proxy_from: Option<AllowList>,
    /// Serve the status endpoint here (`GET /metrics` in Prometheus text,
    /// `GET /status` as JSON, `GET /` a page showing it live), on the
    /// relay's own loop. `None`: no socket at all. It shows app addresses:
    /// keep it on loopback (or behind a firewall) and reach it through an
    /// SSH tunnel.
    pub metrics: Option<std::net::SocketAddr>,
    /// Apps may register only from these sources; others are closed at
    /// once, before a byte is read. `None`: any source.
    pub allow_apps: Option<AllowList>,
    /// Clients may connect to relayed ports only from these sources (the
    /// address a trusted PROXY header names, when there is one); others are
    /// closed at once. `None`: any source.
    pub allow_clients: Option<AllowList>,
    /// New client connections per source address (token bucket: a burst,
    /// then a sustained rate), over every relayed port; beyond it a client
    /// is closed at once. `None`: no limit.
    pub client_rate: Option<RateLimit>,
}

/// A secret, kept out of debug output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl Secret {
    /// The secret a command line selects, from, in order: `given` (a flag
    /// or an environment variable), the file at `file` (one trailing
    /// newline dropped; a file that others may read is warned about), or the
    /// systemd credential `tcp-relay-secret` in `$CREDENTIALS_DIRECTORY`
    /// when there is one (so the secret appears in neither argv nor the
    /// environment); `None` when none is set. A file named but unusable
    /// (missing, unreadable, empty) is an error naming its path.
    pub fn select(given: Option<String>, file: Option<&Path>) -> Result<Option<Secret>, String> {
        crate::ops::secret::from_args(given, file)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            reg_port: 8080,
            relay_style: RelayStyle::Increment,
            dial_in_timeout: Duration::from_secs(10),
            // As many as the listen backlog queues: a burst the kernel takes
            // for an app, its queue takes too (with 1024, 2,000 clients
            // arriving at once through `expose --ready 8` lost a few hundred
            // whenever the relay accepted them faster than the app dialed
            // in). Still a quarter of the connection limit at most.
            max_waiting_per_app: 4096,
            // 64 KiB: a loopback read rarely returns more, so larger rings buy
            // little throughput; each active direction holds at most this.
            buffer_size: 64 * 1024,
            secret: None,
            max_apps: 1024,
            // Two sockets per relayed client: 16,384 clients. Far above what
            // a small VM's descriptors allow by default; the fd limit (raised
            // to the hard limit by the command line) usually binds first, and
            // running out of descriptors is handled (accepts back off).
            max_connections: 32 * 1024,
            max_line: crate::protocol::MAX_LINE,
            port_range: None,
            register_timeout: Duration::from_secs(10),
            half_close_timeout: Duration::from_secs(600),
            grace: Duration::from_secs(10),
            splice: cfg!(target_os = "linux"),
            // 4096: nginx and HAProxy size their backlogs to what the system
            // allows, and 4096 is Linux's own somaxconn since 5.4. A queue
            // costs nothing until connections wait in it.
            backlog: 4096,
            accept_proxy_from: None,
            metrics: None,
            allow_apps: None,
            allow_clients: None,
            client_rate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_accept_names_and_the_original_digits() {
        assert_eq!("increment".parse(), Ok(RelayStyle::Increment));
        assert_eq!("1".parse(), Ok(RelayStyle::Increment));
        assert_eq!("Random".parse(), Ok(RelayStyle::Random));
        assert_eq!("0".parse(), Ok(RelayStyle::Random));
        assert!("2".parse::<RelayStyle>().is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let config = Config {
            secret: Some(Secret(b"hunter2".to_vec())),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
