//! Fuzzes every control-line parser: none panics on any input, each gives
//! what the wire format in `tcp_relay::protocol` says (checked against small
//! independent oracles), and what parses formats back to a line that parses
//! to the same thing. A refusal's reason parses to its code (`Refusal`) and
//! prints back as itself.
//!
//! Input: any bytes; `parse_token_line` gets them raw, the line parsers get
//! them decoded as lossy UTF-8 (as `LineReader` hands lines over).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tcp_relay::auth::{DialToken, TOKEN_LINE_LEN};
use tcp_relay::protocol::{
    AppLine, ESTABLISHED_PREFIX, MAX_READY, ProtocolError, Refusal, RelayLine, auth_line,
    challenge_line, dial_line, error_line, established_line, parse_app_line, parse_dial,
    parse_established, parse_port, parse_relay_line, parse_token_line, token_line,
};

fuzz_target!(|data: &[u8]| {
    check_token_line(data);
    let line = String::from_utf8_lossy(data);
    check_port(&line);
    check_established(&line);
    check_app_line(&line);
    check_relay_line(&line);
    check_error_line(&line);
    check_refusal(&line);
});

/// One to five ASCII digits worth 1..=65535, without a leading zero
/// ("decimal without sign, padding or spaces").
fn port_value(field: &str) -> Option<u16> {
    let digits = !field.is_empty() && field.len() <= 5 && field.bytes().all(|b| b.is_ascii_digit());
    let value = digits.then(|| field.parse::<u32>().ok()).flatten()?;
    let unpadded = !field.starts_with('0');
    u16::try_from(value).ok().filter(|&p| p != 0 && unpadded)
}

/// A count of 0..=MAX_READY as `Display` writes it.
fn ready_value(field: &str) -> Option<usize> {
    let n = field.parse::<usize>().ok()?;
    (n.to_string() == field && n <= MAX_READY).then_some(n)
}

/// A number as the relay writes a `u16`: one that formats back to itself.
fn number_value(field: &str) -> Option<u16> {
    field.parse::<u16>().ok().filter(|n| n.to_string() == field)
}

/// An even number of ASCII hex digits, either case.
fn hex_value(field: &str) -> Option<Vec<u8>> {
    if !field.len().is_multiple_of(2) || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let pair = |i: usize| u8::from_str_radix(&field[i..i + 2], 16).ok();
    (0..field.len()).step_by(2).map(pair).collect()
}

fn token_value(field: &str) -> Option<DialToken> {
    hex_value(field)?.try_into().ok().map(DialToken)
}

/// `line` as `LineReader` hands it over: without its `\n`. (Not
/// `trim_end`, which would also eat the space of an empty `auth \n`.)
fn unframed(line: &str) -> &str {
    line.strip_suffix('\n').unwrap_or(line)
}

/// Errors compare by kind: their text quotes the input.
fn assert_same<T: PartialEq + std::fmt::Debug>(
    got: Result<T, ProtocolError>,
    want: Result<T, ProtocolError>,
) {
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w),
        (Err(g), Err(w)) => assert_eq!(
            std::mem::discriminant(g),
            std::mem::discriminant(w),
            "{g:?} vs {w:?}"
        ),
        _ => panic!("got {got:?}, want {want:?}"),
    }
}

fn check_token_line(bytes: &[u8]) {
    let want = match bytes.split_last() {
        Some((b'\n', field)) if bytes.len() == TOKEN_LINE_LEN => {
            std::str::from_utf8(field).ok().and_then(token_value)
        }
        _ => None,
    };
    let got = parse_token_line(bytes);
    assert_eq!(got, want);
    if let Some(token) = got {
        assert_eq!(parse_token_line(token_line(&token).as_bytes()), Some(token));
    }
}

fn check_port(field: &str) {
    let port = parse_port(field);
    assert_eq!(parse_dial(field), port, "a dial port is just a port");
    assert_eq!(port.clone().ok(), port_value(field), "{field:?}");
    match port {
        Ok(p) => {
            let est = established_line(p);
            assert_eq!(
                parse_relay_line(unframed(&est)),
                Ok(RelayLine::Established(p))
            );
            let dial = dial_line(p, None);
            assert_eq!(
                parse_relay_line(unframed(&dial)),
                Ok(RelayLine::Dial(p, None))
            );
        }
        Err(e) => assert!(matches!(e, ProtocolError::BadPort(_))),
    }
}

fn check_established(line: &str) {
    let got = parse_established(line);
    match line.strip_prefix(ESTABLISHED_PREFIX) {
        Some(field) => assert_eq!(got, parse_port(field)),
        None => assert!(matches!(got, Err(ProtocolError::Unexpected(_)))),
    }
}

fn check_app_line(line: &str) {
    let got = parse_app_line(line);
    let want = if let Some(field) = line.strip_prefix("auth ") {
        hex_value(field)
            .map(AppLine::Auth)
            .ok_or(ProtocolError::Unexpected(String::new()))
    } else if let Some(field) = line.strip_prefix("ready ") {
        ready_value(field)
            .map(AppLine::Ready)
            .ok_or(ProtocolError::Unexpected(String::new()))
    } else if let Some(field) = line.strip_prefix("port ") {
        parse_port(field).map(AppLine::Port)
    } else {
        Ok(AppLine::Other)
    };
    if let Ok(AppLine::Auth(answer)) = &got {
        assert_eq!(parse_app_line(unframed(&auth_line(answer))), got.clone());
    }
    assert_same(got, want);
}

fn check_relay_line(line: &str) {
    let got = parse_relay_line(line);
    let bad_port = || ProtocolError::BadPort(String::new());
    let unexpected = || ProtocolError::Unexpected(String::new());
    let want = if let Some(reason) = line.strip_prefix("error ") {
        Ok(RelayLine::Error(refusal_value(reason)))
    } else if let Some(field) = line.strip_prefix(ESTABLISHED_PREFIX) {
        parse_port(field).map(RelayLine::Established)
    } else if let Some(field) = line.strip_prefix("challenge ") {
        hex_value(field)
            .map(RelayLine::Challenge)
            .ok_or_else(unexpected)
    } else if let Some((port, token)) = line.split_once(' ') {
        match token_value(token) {
            Some(t) => port_value(port)
                .map(|p| RelayLine::Dial(p, Some(t)))
                .ok_or_else(bad_port),
            None => Err(unexpected()),
        }
    } else {
        port_value(line)
            .map(|p| RelayLine::Dial(p, None))
            .ok_or_else(bad_port)
    };
    match &got {
        Ok(RelayLine::Dial(p, Some(t))) => {
            let again = dial_line(*p, Some(t));
            assert_eq!(parse_relay_line(unframed(&again)), got.clone());
        }
        Ok(RelayLine::Challenge(nonce)) => {
            let again = challenge_line(nonce);
            assert_eq!(parse_relay_line(unframed(&again)), got.clone());
        }
        _ => {}
    }
    assert_same(got, want);
}

/// An error line is one line and carries the reason, flattened, whole.
fn check_error_line(reason: &str) {
    let line = error_line(&Refusal::Other(reason.to_owned()));
    assert_eq!(line.find('\n'), Some(line.len() - 1), "one LF, at the end");
    let flat: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let want = RelayLine::Error(refusal_value(&flat));
    assert_eq!(parse_relay_line(&line[..line.len() - 1]), Ok(want));
}

/// What `Refusal::parse` must make of `reason`, from the relay's words: a
/// known shape whose numbers are written as the relay writes them, or
/// `Other`, verbatim.
fn refusal_value(reason: &str) -> Refusal {
    let detail = |prefix: &str| reason.strip_prefix(prefix).map(String::from);
    let known = if reason == "secret refused" {
        Some(Refusal::SecretRefused)
    } else if reason == "too many apps" {
        Some(Refusal::TooManyApps)
    } else if let Some(d) = detail("no relayed port: ") {
        Some(Refusal::NoRelayedPort(d))
    } else if let Some(d) = detail("bad port request: ") {
        Some(Refusal::BadPortRequest(d))
    } else if let Some(d) = detail("bad ready request: ") {
        Some(Refusal::BadReadyRequest(d))
    } else {
        port_refusal_value(reason)
    };
    known.unwrap_or_else(|| Refusal::Other(reason.into()))
}

/// The `port <P> ...` reasons, rebuilt from the numbers found.
fn port_refusal_value(reason: &str) -> Option<Refusal> {
    let port = number_value(reason.strip_prefix("port ")?.split(' ').next()?)?;
    if reason == format!("port {port} is taken") {
        return Some(Refusal::PortTaken(port));
    }
    if let Some(d) = reason.strip_prefix(&format!("port {port} is unavailable: ")) {
        return Some(Refusal::PortUnavailable(port, d.into()));
    }
    let (lo, hi) = reason.rsplit_once(' ')?.1.split_once('-')?;
    let (lo, hi) = (number_value(lo)?, number_value(hi)?);
    let range = format!("port {port} is outside the relay's range {lo}-{hi}");
    (reason == range).then_some(Refusal::PortOutsideRange { port, lo, hi })
}

/// A reason parses to its code and prints back as itself; the relay's
/// reasons are final as the old text rule said, unknown ones may pass.
fn check_refusal(reason: &str) {
    let refusal = Refusal::parse(reason);
    assert_eq!(refusal, refusal_value(reason));
    assert_eq!(refusal.to_string(), reason);
    let by_text =
        reason.starts_with("secret") || reason.starts_with("port ") || reason.starts_with("bad ");
    match &refusal {
        Refusal::Other(_) => assert!(!refusal.is_final()),
        known => assert_eq!(known.is_final(), by_text, "{known:?}"),
    }
}
