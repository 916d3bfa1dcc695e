//! The values users type, both ways: parsing durations, port ranges,
//! bursts and services, and writing durations back as they are typed.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use tcp_relay::{AllowList, ProxyVersion, Rate};

/// One service to publish: a `--local [NAME=]HOST:PORT[@PORT]`, or a
/// `[[service]]` table of a config file (which may also set its own
/// `ready`, `proxy_protocol`, `allow_clients`, `client_rate` and
/// `client_burst`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LocalSpec {
    pub name: Option<String>,                 // NAME=, if given
    pub local: String,                        // HOST:PORT, resolved when the agent starts
    pub port: Option<u16>,                    // @PORT, if given
    pub ready: Option<u16>,                   // the table's ready; None: --ready's
    pub proxy_protocol: Option<ProxySetting>, // the table's; None: --proxy-protocol's
    pub allow_clients: Option<AllowList>,     // the table's; None: --allow-clients'
    pub client_rate: Option<Rate>,            // the table's; None: --client-rate's
    pub client_burst: Option<NonZeroU32>,     // the table's; None: --client-burst's
}

/// `--proxy-protocol` and `proxy_protocol`: a header version, or `none`,
/// with which a `[[service]]` table turns off the file's top-level setting
/// for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxySetting {
    /// Ask for headers of this version.
    Header(ProxyVersion),
    /// Ask for none (the default).
    None,
}

impl ProxySetting {
    /// The version to ask for, if any.
    pub(crate) fn version(self) -> Option<ProxyVersion> {
        match self {
            ProxySetting::Header(version) => Some(version),
            ProxySetting::None => None,
        }
    }
}

impl FromStr for ProxySetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(ProxySetting::None),
            _ => text.parse().map(ProxySetting::Header).map_err(|_| {
                format!("unknown PROXY protocol version {text:?} (use v1, v2 or none)")
            }),
        }
    }
}

impl fmt::Display for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxySetting::Header(version) => version.fmt(f),
            ProxySetting::None => f.write_str("none"),
        }
    }
}

/// Parses `[NAME=]HOST:PORT[@PORT]`. A name is letters, digits, `-`, `_`
/// and `.` (it is printed before the address, so no spaces); the host may
/// be a bracketed IPv6 address (`[::1]:22`).
pub(crate) fn parse_local(text: &str) -> Result<LocalSpec, String> {
    let (name, rest) = match text.split_once('=') {
        Some((name, rest)) => (Some(name), rest),
        None => (None, text),
    };
    if let Some(name) = name {
        check_name(name)?;
    }
    let (local, port) = match rest.rsplit_once('@') {
        Some((local, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("bad relayed port {port:?} after '@' (1-65535)"))?;
            (local, Some(port))
        }
        None => (rest, None),
    };
    let port_ok = local
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(format!(
            "bad local address {local:?} (use [NAME=]HOST:PORT[@PORT], e.g. web=127.0.0.1:3000@8081)"
        ));
    }
    Ok(LocalSpec {
        name: name.map(str::to_owned),
        local: local.to_owned(),
        port,
        ..LocalSpec::default()
    })
}

/// A service name: letters, digits, `-`, `_` and `.`, since it is printed
/// before the address on the address lines (so no spaces).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(ok) {
        return Err(format!(
            "bad service name {name:?} (letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// Parses `--client-burst <N>`: a positive decimal integer (digits only:
/// no sign, no spaces).
pub(crate) fn parse_burst(text: &str) -> Result<NonZeroU32, String> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| text.parse().ok())
        .flatten()
        .ok_or_else(|| format!("not a positive integer: {text:?} (1-{})", u32::MAX))
}

/// Parses a port range `MIN-MAX` (inclusive, 1 <= MIN <= MAX).
pub(crate) fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
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
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
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

/// Writes a duration as [`parse_duration`] reads it back: in the largest
/// unit that divides it (`2m`, `1500ms`), or in seconds with as many
/// decimals as it needs (`0.0000015s`).
pub(crate) fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    let units: [(u128, &str); 4] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
    ];
    match units.iter().find(|(size, _)| nanos.is_multiple_of(*size)) {
        Some((size, unit)) if nanos > 0 => format!("{}{unit}", nanos / size),
        Some(_) => "0s".into(),
        None => {
            let fraction = format!("{:09}", nanos % 1_000_000_000);
            format!(
                "{}.{}s",
                nanos / 1_000_000_000,
                fraction.trim_end_matches('0')
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("20000-20999"), Ok((20000, 20999)));
        assert_eq!(parse_port_range("80-80"), Ok((80, 80)));
        for bad in ["", "80", "0-10", "10-9", "a-b", "1-70000", "-5"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn locals_parse_with_name_and_port() {
        let spec = |name: Option<&str>, local: &str, port| LocalSpec {
            name: name.map(str::to_owned),
            local: local.into(),
            port,
            ..LocalSpec::default()
        };
        assert_eq!(
            parse_local("127.0.0.1:3000"),
            Ok(spec(None, "127.0.0.1:3000", None))
        );
        assert_eq!(
            parse_local("web=127.0.0.1:3000@8081"),
            Ok(spec(Some("web"), "127.0.0.1:3000", Some(8081)))
        );
        assert_eq!(
            parse_local("ssh=[::1]:22"),
            Ok(spec(Some("ssh"), "[::1]:22", None))
        );
        assert_eq!(
            parse_local("localhost:22@2222"),
            Ok(spec(None, "localhost:22", Some(2222)))
        );
        for bad in [
            "",
            "web=",
            "=127.0.0.1:1",
            "a b=127.0.0.1:1",
            "127.0.0.1",
            "127.0.0.1:x",
            "127.0.0.1:1@0",
            "127.0.0.1:1@70000",
            "127.0.0.1:1@",
            ":80",
        ] {
            assert!(parse_local(bad).is_err(), "{bad:?} must not parse");
        }
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

    #[test]
    fn durations_print_as_they_parse() {
        for (duration, text) in [
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1_500), "0.0000015s"),
            (Duration::from_nanos(2_000_000_001), "2.000000001s"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "{text} reads back");
        }
    }

    #[test]
    fn bursts_are_positive_integers() {
        assert_eq!(parse_burst("20").map(NonZeroU32::get), Ok(20));
        for bad in ["", "0", "-1", "+5", " 5", "1.5", "4294967296"] {
            assert!(parse_burst(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
