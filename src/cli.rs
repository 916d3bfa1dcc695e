//! The command line's own pieces, not library API: parsing the values
//! users type for durations, port ranges and services.

use std::time::Duration;

/// One `--local [NAME=]HOST:PORT[@PORT]`: a local service to publish, its
/// name and the relayed port to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalSpec {
    pub name: Option<String>, // NAME=, if given
    pub local: String,        // HOST:PORT, resolved when the agent starts
    pub port: Option<u16>,    // @PORT, if given
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
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || !name.chars().all(ok) {
            return Err(format!(
                "bad service name {name:?} (letters, digits, '-', '_', '.')"
            ));
        }
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
    })
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
}
