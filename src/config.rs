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
        }
    }
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
