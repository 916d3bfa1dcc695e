//! The command line's own pieces, not library API: parsing the values
//! users type for durations and port ranges.

use std::time::Duration;

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
