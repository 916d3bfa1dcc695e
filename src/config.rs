//! Relay settings, and parsing of the values users type for them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

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
}

/// A secret, kept out of debug output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

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
            max_waiting_per_app: 1024,
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
        }
    }
}

/// Parses a port range `MIN-MAX` (inclusive, 1 <= MIN <= MAX).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("bad port range {text:?} (use MIN-MAX, e.g. 20000-20999)");
    let (min, max) = text.split_once('-').ok_or_else(bad)?;
    let min: u16 = min.trim().parse().map_err(|_| bad())?;
    let max: u16 = max.trim().parse().map_err(|_| bad())?;
    if min == 0 || min > max {
        return Err(bad());
    }
    Ok((min, max))
}

/// Parses a duration: a number with unit `ms`, `s`, `m` or `h`; a bare
/// number means seconds. `1.5s` works; negative or unitless garbage fails.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?} (try 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "bad duration unit {unit:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("duration {text:?} out of range"))
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
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("20000-20999"), Ok((20000, 20999)));
        assert_eq!(parse_port_range("80-80"), Ok((80, 80)));
        for bad in ["", "80", "0-10", "10-9", "a-b", "1-70000", "-5"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let config = Config {
            secret: Some(Secret(b"hunter2".to_vec())),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "-1s", "10x", "1e9999s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
