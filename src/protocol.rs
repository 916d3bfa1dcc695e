//! The control-line protocol, pure: formatting, parsing and bounded line framing.
//!
//! Wire format (compatible with the original Go relay), relay to app only:
//!
//! ```text
//! established relay address port:<PORT>\n   once, when the app is registered
//! <DIAL_PORT>\n                             once per client: dial in to this port
//! ```
//!
//! One extension, used only by apps that ask for it (so an app that does not
//! gets exactly the original protocol), app to relay:
//!
//! ```text
//! port <PORT>\n          please move my relayed port to PORT
//! ```
//!
//! answered by the relay with either a fresh
//! `established relay address port:<PORT>\n` (the old port is closed) or
//! `error <REASON>\n`, after which the relay closes the control connection.
//! Every reason the relay sends has a code ([`Refusal`]); an app decides by
//! the code, never by the text.
//! The relay ignores app lines it does not know, as the original did.
//!
//! With a shared secret (`serve --secret`), the relay speaks first with a
//! challenge, and every dial-in proves which client it is for
//! ([`crate::auth`] has the cryptography):
//!
//! ```text
//! relay → app   challenge <64 hex digits>\n     a fresh 32-byte nonce
//! app → relay   auth <64 hex digits>\n          HMAC-SHA256(secret, DOMAIN ‖ nonce)
//! relay → app   established relay address port:<PORT>\n   (or `error secret refused`)
//! relay → app   <DIAL_PORT> <32 hex digits>\n   a one-time token per client
//! dial-in → relay  <32 hex digits>\n            the token, first thing on the dial-in
//! ```
//!
//! A second extension, also only for apps that ask: `ready <N>\n` (N at most
//! [`MAX_READY`]) makes the relay keep N dial-ins of that app ready, so a new
//! client is paired at once instead of after a dial-in round trip. The relay
//! asks for them with ordinary dial lines and pairs a client with the oldest
//! ready dial-in, replacing it with a new dial line; a ready dial-in that
//! dies is noticed and replaced, never handed a client. To the app these are
//! ordinary dial-ins, so a relay that ignores the line (as the original
//! does) changes nothing. An app should serve a dial-in as soon as it has
//! it: bytes it sends before a client arrives wait for the client.
//!
//! Three more requests, each answered by the relay with the same line as it
//! will apply, so an app that needs one waits for the answer and does not
//! serve on a relay that ignored it (an old one):
//!
//! ```text
//! proxy v1|v2\n                 begin each dial-in with a PROXY header naming its client
//! allow <CIDR>[,<CIDR>...]\n    admit to my port only clients from these sources
//! rate <N>/s|<N>/m [<BURST>]\n  at most this many new clients per source
//! ```
//!
//! `allow` applies on top of the relay's `--allow-clients` (a client must
//! be on both lists); the relay answers `rate` with the stricter of the
//! app's limit and its own `--client-rate` in each respect, so an app can
//! only tighten what the relay enforces, never loosen it.
//!
//! Ports are decimal without sign, padding or spaces. Lines end in `\n`; a
//! reader tolerates a `\r` before it. Nothing here touches a socket, so the
//! parser is tested (and fuzzable) on bytes alone.

use std::fmt;

use crate::access::{AllowList, RateLimit};
use crate::auth::{DialToken, TOKEN_LINE_LEN, hex, unhex};
use crate::proxy_protocol::ProxyVersion;

/// Prefix of the line that tells an app its relayed port.
pub const ESTABLISHED_PREFIX: &str = "established relay address port:";

/// Longest control line either side accepts, terminator included. The
/// longest legitimate line is the `established` line (38 bytes); the slack
/// leaves room for later extensions while bounding what a peer can make us
/// hold (invariant *Bounded buffers*).
pub const MAX_LINE: usize = 1024;

/// The line announcing an app's relayed port.
pub fn established_line(port: u16) -> String {
    format!("{ESTABLISHED_PREFIX}{port}\n")
}

/// The line asking an app to dial in to `dial_port` for one waiting client;
/// with a secret, it carries the token the dial-in must present.
pub fn dial_line(dial_port: u16, token: Option<&DialToken>) -> String {
    match token {
        Some(token) => format!("{dial_port} {token}\n"),
        None => format!("{dial_port}\n"),
    }
}

/// The relay's challenge to an app when a secret is set.
pub fn challenge_line(nonce: &[u8]) -> String {
    format!("{CHALLENGE_PREFIX}{}\n", hex(nonce))
}

/// The app's answer to a challenge.
pub fn auth_line(answer: &[u8]) -> String {
    format!("{AUTH_PREFIX}{}\n", hex(answer))
}

/// What a dial-in sends first when a secret is set: its token.
pub fn token_line(token: &DialToken) -> String {
    format!("{token}\n")
}

/// Parses a dial-in's token line ([`TOKEN_LINE_LEN`] bytes, `\n` last).
pub fn parse_token_line(line: &[u8]) -> Option<DialToken> {
    let (last, token) = line.split_last()?;
    if *last != b'\n' || line.len() != TOKEN_LINE_LEN {
        return None;
    }
    DialToken::parse(std::str::from_utf8(token).ok()?)
}

/// Prefix of the relay's challenge line.
const CHALLENGE_PREFIX: &str = "challenge ";
/// Prefix of the app's answer.
const AUTH_PREFIX: &str = "auth ";

/// The extension line asking the relay for relayed port `port`.
pub fn port_request_line(port: u16) -> String {
    format!("port {port}\n")
}

/// The line refusing an app: `error <REASON>`, the reason flattened to one
/// line. Every refusal the relay sends has a code ([`Refusal`]), whose text
/// an app parses back to the same code.
pub fn error_line(reason: &Refusal) -> String {
    let flat: String = reason
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{ERROR_PREFIX}{flat}\n")
}

/// Prefix of the relay's refusal line.
pub const ERROR_PREFIX: &str = "error ";

/// Prefix of the app's port request.
const PORT_PREFIX: &str = "port ";

/// A line an app sent to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppLine {
    /// `port <PORT>`: move my relayed port there.
    Port(u16),
    /// `auth <HEX>`: the answer to the challenge.
    Auth(Vec<u8>),
    /// `ready <N>`: keep N dial-ins ready for my next clients.
    Ready(usize),
    /// `proxy <v1|v2>`: begin each of my dial-ins with a PROXY protocol
    /// header naming its client.
    Proxy(ProxyVersion),
    /// `allow <CIDR>[,<CIDR>...]`: only clients from these sources.
    Allow(AllowList),
    /// `rate <N>/s|<N>/m [<BURST>]`: new clients per source, at most.
    Rate(RateLimit),
    /// Anything else: ignored, as the original relay ignored everything.
    Other,
}

/// Parses an app's line. A line that starts like a request this side
/// knows (`auth`, `port`, `ready`, `proxy`, `allow`, `rate`) but does not
/// parse is an error; any other line is [`AppLine::Other`].
pub fn parse_app_line(line: &str) -> Result<AppLine, ProtocolError> {
    if let Some(list) = line.strip_prefix(ALLOW_PREFIX) {
        return parse_allow(list).map(AppLine::Allow);
    }
    if let Some(limit) = line.strip_prefix(RATE_PREFIX) {
        return parse_rate(limit).map(AppLine::Rate);
    }
    if let Some(answer) = line.strip_prefix(AUTH_PREFIX) {
        return unhex(answer)
            .map(AppLine::Auth)
            .ok_or_else(|| ProtocolError::Unexpected(truncated(line)));
    }
    if let Some(count) = line.strip_prefix(READY_PREFIX) {
        return parse_ready(count).map(AppLine::Ready);
    }
    if let Some(version) = line.strip_prefix(PROXY_PREFIX) {
        return parse_proxy(version).map(AppLine::Proxy);
    }
    match line.strip_prefix(PORT_PREFIX) {
        Some(port) => parse_port(port).map(AppLine::Port),
        None => Ok(AppLine::Other),
    }
}

/// Most dial-ins an app may keep ready: enough to hide the dial-in round
/// trip from a burst of clients, few enough that an app cannot make the
/// relay hold many idle sockets for it.
pub const MAX_READY: usize = 64;

/// Prefix of the app's request for ready dial-ins.
const READY_PREFIX: &str = "ready ";

/// The extension line asking the relay to keep `count` dial-ins ready.
pub fn ready_line(count: usize) -> String {
    format!("{READY_PREFIX}{count}\n")
}

/// Parses the count of a `ready` request: 0..=[`MAX_READY`], canonical.
fn parse_ready(field: &str) -> Result<usize, ProtocolError> {
    let bad = || ProtocolError::Unexpected(format!("ready {}", truncated(field)));
    let canonical =
        field == "0" || (!field.is_empty() && field.len() <= 2 && !field.starts_with('0'));
    if !canonical || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    field
        .parse()
        .ok()
        .filter(|&n| n <= MAX_READY)
        .ok_or_else(bad)
}

/// Prefix of the app's PROXY protocol request, and of the relay's answer.
const PROXY_PREFIX: &str = "proxy ";

/// The line asking for (app to relay), or granting (relay to app), a PROXY
/// protocol header of `version` on every dial-in.
pub fn proxy_line(version: ProxyVersion) -> String {
    format!("{PROXY_PREFIX}{version}\n")
}

/// Parses the version of a `proxy` line: exactly `v1` or `v2`.
fn parse_proxy(field: &str) -> Result<ProxyVersion, ProtocolError> {
    match field {
        "v1" => Ok(ProxyVersion::V1),
        "v2" => Ok(ProxyVersion::V2),
        _ => Err(ProtocolError::Unexpected(format!(
            "proxy {}",
            truncated(field)
        ))),
    }
}

/// Prefix of the app's allow-list request, and of the relay's answer.
const ALLOW_PREFIX: &str = "allow ";

/// The line asking for (app to relay), or granting (relay to app), an
/// allow-list of client sources for the app's relayed port.
pub fn allow_line(list: &AllowList) -> String {
    format!("{ALLOW_PREFIX}{list}\n")
}

/// Parses the list of an `allow` line: CIDR blocks, comma-separated.
fn parse_allow(field: &str) -> Result<AllowList, ProtocolError> {
    field
        .parse()
        .map_err(|e| ProtocolError::Unexpected(format!("allow {}: {e}", truncated(field))))
}

/// Prefix of the app's rate request, and of the relay's answer.
const RATE_PREFIX: &str = "rate ";

/// The line asking for (app to relay), or granting (relay to app), a limit
/// of new clients per source: `rate <N>/s|<N>/m <BURST>`.
pub fn rate_line(limit: RateLimit) -> String {
    format!("{RATE_PREFIX}{} {}\n", limit.rate, limit.burst)
}

/// Parses the limit of a `rate` line: a rate, then optionally a burst.
fn parse_rate(field: &str) -> Result<RateLimit, ProtocolError> {
    let bad = || ProtocolError::Unexpected(format!("rate {}", truncated(field)));
    let (rate, burst) = match field.split_once(' ') {
        Some((rate, burst)) => (rate, Some(burst)),
        None => (field, None),
    };
    let rate = rate.parse().map_err(|_| bad())?;
    let burst = burst
        .map(|b| crate::access::parse_burst(b).map_err(|_| bad()))
        .transpose()?;
    Ok(RateLimit::new(rate, burst))
}

/// A line the relay sent to an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayLine {
    /// `established relay address port:<PORT>`.
    Established(u16),
    /// `<DIAL_PORT>` or `<DIAL_PORT> <TOKEN>`: dial in for one client.
    Dial(u16, Option<DialToken>),
    /// `challenge <HEX>`: prove you know the secret.
    Challenge(Vec<u8>),
    /// `error <REASON>`: the app or a request of its was refused.
    Error(Refusal),
    /// `proxy <v1|v2>`: the relay will begin every dial-in with a PROXY
    /// protocol header of that version (the answer to the app's request).
    Proxy(ProxyVersion),
    /// `allow <CIDR>[,...]`: the relay admits to the app's port only
    /// clients from these sources (the answer to the app's request).
    Allow(AllowList),
    /// `rate <N>/s|<N>/m <BURST>`: the per-source limit the relay applies
    /// to the app's port (the app's request, made no looser than the
    /// relay's own).
    Rate(RateLimit),
}

/// Parses a relay's line (without `\n`). An error line always parses: a
/// reason this side does not know is kept as [`Refusal::Other`]. Its text is
/// kept whole (a detail may be long, e.g. an OS error): the line it came in
/// is already bounded by its [`LineReader`].
pub fn parse_relay_line(line: &str) -> Result<RelayLine, ProtocolError> {
    if let Some(reason) = line.strip_prefix(ERROR_PREFIX) {
        return Ok(RelayLine::Error(Refusal::parse(reason)));
    }
    if line.starts_with(ESTABLISHED_PREFIX) {
        return parse_established(line).map(RelayLine::Established);
    }
    if let Some(nonce) = line.strip_prefix(CHALLENGE_PREFIX) {
        return unhex(nonce)
            .map(RelayLine::Challenge)
            .ok_or_else(|| ProtocolError::Unexpected(truncated(line)));
    }
    if let Some(version) = line.strip_prefix(PROXY_PREFIX) {
        return parse_proxy(version).map(RelayLine::Proxy);
    }
    if let Some(list) = line.strip_prefix(ALLOW_PREFIX) {
        return parse_allow(list).map(RelayLine::Allow);
    }
    if let Some(limit) = line.strip_prefix(RATE_PREFIX) {
        return parse_rate(limit).map(RelayLine::Rate);
    }
    match line.split_once(' ') {
        Some((port, token)) => {
            let token = DialToken::parse(token)
                .ok_or_else(|| ProtocolError::Unexpected(truncated(line)))?;
            Ok(RelayLine::Dial(parse_dial(port)?, Some(token)))
        }
        None => Ok(RelayLine::Dial(parse_dial(line)?, None)),
    }
}

/// Why the relay refused an app: the reason of an `error <REASON>` line.
///
/// The relay writes a refusal with `Display`, which gives exactly the wire
/// text (the relay's own words since the `port` extension: an app of any
/// version reads the same line); an app reads it back with
/// [`Refusal::parse`], so it decides by code, never by matching text.
/// `parse(&r.to_string()) == r` for every refusal but `Other`, and
/// `parse(s).to_string() == s` for every text.
///
/// Adding a reason takes one block here: the variant, its text in `fmt`, its
/// rule in `parse_known` (the round-trip tests list every variant), and
/// whether it is final in `is_final`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `secret refused`: the answer to the challenge was wrong.
    SecretRefused,
    /// `too many apps`: the relay holds all the apps it may.
    TooManyApps,
    /// `no relayed port: <DETAIL>`: the relay could not open a port for us.
    NoRelayedPort(String),
    /// `bad port request: <DETAIL>`: our `port` line named no port.
    BadPortRequest(String),
    /// `port <PORT> is outside the relay's range <LO>-<HI>` (`--port-range`).
    PortOutsideRange {
        port: u16, // the port asked for
        lo: u16,   // the relay's lowest relayed port
        hi: u16,   // and its highest
    },
    /// `port <PORT> is taken`: another app holds it, or it is the
    /// registration port.
    PortTaken(u16),
    /// `port <PORT> is unavailable: <DETAIL>`: binding it failed.
    PortUnavailable(u16, String),
    /// `bad ready request: <DETAIL>`: our `ready` line was not a count.
    BadReadyRequest(String),
    /// `bad proxy request: <DETAIL>`: our `proxy` line named no version.
    BadProxyRequest(String),
    /// `bad allow request: <DETAIL>`: our `allow` line was not a list of
    /// CIDR blocks.
    BadAllowRequest(String),
    /// `bad rate request: <DETAIL>`: our `rate` line was not a rate and
    /// burst.
    BadRateRequest(String),
    /// A reason this side does not know (a newer relay's), verbatim.
    Other(String),
}

/// The texts of the refusals, shared by `fmt` and `parse_known` so the two
/// cannot drift apart.
const SECRET_REFUSED: &str = "secret refused";
const TOO_MANY_APPS: &str = "too many apps";
const NO_RELAYED_PORT: &str = "no relayed port: ";
const BAD_PORT_REQUEST: &str = "bad port request: ";
const BAD_READY_REQUEST: &str = "bad ready request: ";
const BAD_PROXY_REQUEST: &str = "bad proxy request: ";
const BAD_ALLOW_REQUEST: &str = "bad allow request: ";
const BAD_RATE_REQUEST: &str = "bad rate request: ";
const PORT_WORD: &str = "port ";
const IS_TAKEN: &str = "is taken";
const IS_UNAVAILABLE: &str = "is unavailable: ";
const IS_OUTSIDE_RANGE: &str = "is outside the relay's range ";

impl Refusal {
    /// The refusal `reason` (the text after `error `) stands for.
    pub fn parse(reason: &str) -> Refusal {
        Refusal::parse_known(reason).unwrap_or_else(|| Refusal::Other(reason.to_owned()))
    }

    /// Whether asking again cannot help: a wrong secret, or a refused
    /// request of ours (`port`, `ready`), stands however often we ask. The
    /// relay being full or out of ports may pass, and so may a reason we do
    /// not know, so a reconnecting agent retries those.
    pub fn is_final(&self) -> bool {
        match self {
            Refusal::SecretRefused
            | Refusal::BadPortRequest(_)
            | Refusal::PortOutsideRange { .. }
            | Refusal::PortTaken(_)
            | Refusal::PortUnavailable(..)
            | Refusal::BadReadyRequest(_)
            | Refusal::BadProxyRequest(_)
            | Refusal::BadAllowRequest(_)
            | Refusal::BadRateRequest(_) => true,
            Refusal::TooManyApps | Refusal::NoRelayedPort(_) | Refusal::Other(_) => false,
        }
    }

    /// The inverse of `fmt` for the reasons this side knows.
    fn parse_known(reason: &str) -> Option<Refusal> {
        let detail = |prefix: &str| reason.strip_prefix(prefix).map(str::to_owned);
        if reason == SECRET_REFUSED {
            return Some(Refusal::SecretRefused);
        }
        if reason == TOO_MANY_APPS {
            return Some(Refusal::TooManyApps);
        }
        if let Some(detail) = detail(NO_RELAYED_PORT) {
            return Some(Refusal::NoRelayedPort(detail));
        }
        if let Some(detail) = detail(BAD_PORT_REQUEST) {
            return Some(Refusal::BadPortRequest(detail));
        }
        if let Some(detail) = detail(BAD_READY_REQUEST) {
            return Some(Refusal::BadReadyRequest(detail));
        }
        if let Some(detail) = detail(BAD_PROXY_REQUEST) {
            return Some(Refusal::BadProxyRequest(detail));
        }
        if let Some(detail) = detail(BAD_ALLOW_REQUEST) {
            return Some(Refusal::BadAllowRequest(detail));
        }
        if let Some(detail) = detail(BAD_RATE_REQUEST) {
            return Some(Refusal::BadRateRequest(detail));
        }
        Refusal::parse_port_refusal(reason.strip_prefix(PORT_WORD)?)
    }

    /// The `port <PORT> ...` family, from after `port `.
    fn parse_port_refusal(rest: &str) -> Option<Refusal> {
        let (port, rest) = rest.split_once(' ')?;
        let port = parse_number(port)?;
        if rest == IS_TAKEN {
            return Some(Refusal::PortTaken(port));
        }
        if let Some(detail) = rest.strip_prefix(IS_UNAVAILABLE) {
            return Some(Refusal::PortUnavailable(port, detail.to_owned()));
        }
        let (lo, hi) = rest.strip_prefix(IS_OUTSIDE_RANGE)?.split_once('-')?;
        let (lo, hi) = (parse_number(lo)?, parse_number(hi)?);
        Some(Refusal::PortOutsideRange { port, lo, hi })
    }
}

impl fmt::Display for Refusal {
    /// Exactly the wire text (before [`error_line`] flattens it to one line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::SecretRefused => f.write_str(SECRET_REFUSED),
            Refusal::TooManyApps => f.write_str(TOO_MANY_APPS),
            Refusal::NoRelayedPort(detail) => write!(f, "{NO_RELAYED_PORT}{detail}"),
            Refusal::BadPortRequest(detail) => write!(f, "{BAD_PORT_REQUEST}{detail}"),
            Refusal::PortOutsideRange { port, lo, hi } => {
                write!(f, "{PORT_WORD}{port} {IS_OUTSIDE_RANGE}{lo}-{hi}")
            }
            Refusal::PortTaken(port) => write!(f, "{PORT_WORD}{port} {IS_TAKEN}"),
            Refusal::PortUnavailable(port, detail) => {
                write!(f, "{PORT_WORD}{port} {IS_UNAVAILABLE}{detail}")
            }
            Refusal::BadReadyRequest(detail) => write!(f, "{BAD_READY_REQUEST}{detail}"),
            Refusal::BadProxyRequest(detail) => write!(f, "{BAD_PROXY_REQUEST}{detail}"),
            Refusal::BadAllowRequest(detail) => write!(f, "{BAD_ALLOW_REQUEST}{detail}"),
            Refusal::BadRateRequest(detail) => write!(f, "{BAD_RATE_REQUEST}{detail}"),
            Refusal::Other(reason) => f.write_str(reason),
        }
    }
}

/// A number as `Display` writes a `u16`: decimal, no sign or padding (so
/// that parsing it back gives the same text).
fn parse_number(field: &str) -> Option<u16> {
    let canonical = field == "0" || !field.starts_with('0');
    let digits = !field.is_empty() && field.len() <= 5 && field.bytes().all(|b| b.is_ascii_digit());
    if canonical && digits {
        field.parse().ok()
    } else {
        None
    }
}

/// A control line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The line is not the expected kind of line.
    Unexpected(String),
    /// A port field is not a decimal number in 1..=65535.
    BadPort(String),
    /// A line grew past the reader's limit ([`MAX_LINE`] by default).
    LineTooLong,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Unexpected(line) => write!(f, "unexpected line {line:?}"),
            ProtocolError::BadPort(field) => write!(f, "bad port {field:?}"),
            ProtocolError::LineTooLong => write!(f, "line longer than {MAX_LINE} bytes"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Parses a decimal port in 1..=65535: digits only, as the relay writes it.
pub fn parse_port(field: &str) -> Result<u16, ProtocolError> {
    let bad = || ProtocolError::BadPort(truncated(field));
    // Canonical form only: no sign, no padding (a leading zero), no spaces.
    let canonical = !field.is_empty() && field.len() <= 5 && !field.starts_with('0');
    if !canonical || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match field.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// Parses the `established relay address port:<PORT>` line (without `\n`).
pub fn parse_established(line: &str) -> Result<u16, ProtocolError> {
    match line.strip_prefix(ESTABLISHED_PREFIX) {
        Some(port) => parse_port(port),
        None => Err(ProtocolError::Unexpected(truncated(line))),
    }
}

/// Parses a `<DIAL_PORT>` line (without `\n`).
pub fn parse_dial(line: &str) -> Result<u16, ProtocolError> {
    parse_port(line)
}

/// At most 64 characters of `s`, for error messages about hostile input.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
///
/// Holds at most one partial line, so its memory is bounded whatever the
/// peer sends.
#[derive(Debug)]
pub struct LineReader {
    partial: Vec<u8>, // bytes of the line not yet terminated
    limit: usize,     // longest line accepted, terminator included
}

impl Default for LineReader {
    fn default() -> Self {
        LineReader::with_limit(MAX_LINE)
    }
}

impl LineReader {
    /// An empty reader for lines of at most [`MAX_LINE`] bytes.
    pub fn new() -> Self {
        LineReader::default()
    }

    /// An empty reader for lines of at most `limit` bytes (at least 2).
    pub fn with_limit(limit: usize) -> Self {
        LineReader {
            partial: Vec::new(),
            limit: limit.max(2),
        }
    }

    /// Feeds `data`, calling `on_line` with each completed line (without its
    /// `\n` or `\r\n`, lossily decoded as UTF-8). Fails once a line grows past
    /// the limit (a terminated line of more than `limit` bytes, or an
    /// unterminated tail of `limit` bytes or more); the reader must then be
    /// discarded with its connection.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on_line: impl FnMut(&str),
    ) -> Result<(), ProtocolError> {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.len() + end + 1 > self.limit {
                return Err(ProtocolError::LineTooLong);
            }
            self.partial.extend_from_slice(&rest[..end]);
            if self.partial.last() == Some(&b'\r') {
                self.partial.pop();
            }
            on_line(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
            rest = &rest[end + 1..];
        }
        if self.partial.len() + rest.len() >= self.limit {
            return Err(ProtocolError::LineTooLong);
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(reader: &mut LineReader, data: &[u8]) -> Result<Vec<String>, ProtocolError> {
        let mut out = Vec::new();
        reader.feed(data, |l| out.push(l.to_owned()))?;
        Ok(out)
    }

    #[test]
    fn lines_are_exactly_the_original_wire_format() {
        assert_eq!(
            established_line(8081),
            "established relay address port:8081\n"
        );
        assert_eq!(dial_line(40123, None), "40123\n");
    }

    #[test]
    fn formatted_lines_parse_back() {
        for port in [1u16, 80, 8081, 65535] {
            let est = established_line(port);
            assert_eq!(parse_established(est.trim_end_matches('\n')), Ok(port));
            let dial = dial_line(port, None);
            assert_eq!(parse_dial(dial.trim_end_matches('\n')), Ok(port));
        }
    }

    #[test]
    fn bad_ports_are_refused() {
        for field in [
            "", "0", "65536", "99999", "-1", "+80", " 80", "80 ", "8o", "0x50", "123456", "080",
        ] {
            assert!(parse_port(field).is_err(), "{field:?} must not parse");
        }
    }

    #[test]
    fn established_needs_its_prefix() {
        assert!(matches!(
            parse_established("8081"),
            Err(ProtocolError::Unexpected(_))
        ));
        assert!(matches!(
            parse_established("established relay address port:"),
            Err(ProtocolError::BadPort(_))
        ));
    }

    #[test]
    fn port_requests_parse_and_other_lines_are_ignored() {
        assert_eq!(port_request_line(9000), "port 9000\n");
        assert_eq!(parse_app_line("port 9000"), Ok(AppLine::Port(9000)));
        assert!(parse_app_line("port 0").is_err());
        assert!(parse_app_line("port 70000").is_err());
        assert_eq!(parse_app_line("hello"), Ok(AppLine::Other));
        assert_eq!(parse_app_line(""), Ok(AppLine::Other));
    }

    #[test]
    fn ready_requests_parse_within_bounds() {
        assert_eq!(ready_line(8), "ready 8\n");
        assert_eq!(parse_app_line("ready 8"), Ok(AppLine::Ready(8)));
        assert_eq!(parse_app_line("ready 0"), Ok(AppLine::Ready(0)));
        assert_eq!(parse_app_line("ready 64"), Ok(AppLine::Ready(MAX_READY)));
        for bad in [
            "ready 65",
            "ready 08",
            "ready -1",
            "ready ",
            "ready x",
            "ready 100",
        ] {
            assert!(parse_app_line(bad).is_err(), "{bad:?}");
        }
    }

    /// `allow` and `rate` lines round trip both ways (the app's request
    /// and the relay's answer have one format), the burst defaulting to the
    /// rate's count; malformed ones are errors, not ignored lines.
    #[test]
    fn allow_and_rate_lines_round_trip() {
        for text in ["127.0.0.1/32", "10.0.0.0/8,192.0.2.7/32,2001:db8::/32"] {
            let list: AllowList = text.parse().expect("a list");
            let line = allow_line(&list);
            assert_eq!(line, format!("allow {text}\n"));
            let line = line.trim_end();
            assert_eq!(parse_app_line(line), Ok(AppLine::Allow(list.clone())));
            assert_eq!(parse_relay_line(line), Ok(RelayLine::Allow(list)));
        }
        for (text, canonical) in [
            ("10/s", "10/s 10"),
            ("30/m 5", "30/m 5"),
            ("1/s 1", "1/s 1"),
        ] {
            let AppLine::Rate(limit) = parse_app_line(&format!("rate {text}")).expect("parses")
            else {
                panic!("not a rate line: {text}");
            };
            assert_eq!(rate_line(limit), format!("rate {canonical}\n"));
            let again = parse_relay_line(&format!("rate {canonical}"));
            assert_eq!(again, Ok(RelayLine::Rate(limit)));
        }
        for bad in [
            "allow ",
            "allow 10.0.0.0/33",
            "allow 10.0.0.0/8,",
            "allow host.example",
            "rate ",
            "rate 0/s",
            "rate 5/h",
            "rate 5/s 0",
            "rate 5/s x",
            "rate -1/s",
        ] {
            assert!(parse_app_line(bad).is_err(), "{bad:?}");
            assert!(parse_relay_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relay_lines_parse_into_their_kinds() {
        let est = established_line(8081);
        assert_eq!(
            parse_relay_line(est.trim_end()),
            Ok(RelayLine::Established(8081))
        );
        assert_eq!(parse_relay_line("40000"), Ok(RelayLine::Dial(40000, None)));
        let err = error_line(&Refusal::Other("port 22 is taken\nsecond line".into()));
        assert_eq!(err.matches('\n').count(), 1, "an error line is one line");
        assert_eq!(
            parse_relay_line(err.trim_end()),
            Ok(RelayLine::Error(Refusal::Other(
                "port 22 is taken second line".into()
            )))
        );
        assert_eq!(
            parse_relay_line("error port 22 is taken"),
            Ok(RelayLine::Error(Refusal::PortTaken(22)))
        );
        assert!(parse_relay_line("established relay address port:x").is_err());
        assert!(parse_relay_line("garbage").is_err());
    }

    /// One refusal of every kind. `kind` names every variant, so a new one
    /// does not compile until it is listed there, and the test below fails
    /// until it has a sample here.
    fn every_refusal() -> Vec<Refusal> {
        vec![
            Refusal::SecretRefused,
            Refusal::TooManyApps,
            Refusal::NoRelayedPort("Too many open files (os error 24)".into()),
            Refusal::BadPortRequest("bad port \"0\"".into()),
            Refusal::PortOutsideRange {
                port: 80,
                lo: 20000,
                hi: 20099,
            },
            Refusal::PortTaken(8080),
            Refusal::PortUnavailable(22, "Permission denied (os error 13)".into()),
            Refusal::BadReadyRequest("unexpected line \"ready 65\"".into()),
            Refusal::BadProxyRequest("unexpected line \"proxy v3\"".into()),
            Refusal::BadAllowRequest("unexpected line \"allow 10.0.0.0/33\"".into()),
            Refusal::BadRateRequest("unexpected line \"rate 0/s\"".into()),
            Refusal::Other("rate limited".into()),
        ]
    }

    fn kind(refusal: &Refusal) -> usize {
        match refusal {
            Refusal::SecretRefused => 0,
            Refusal::TooManyApps => 1,
            Refusal::NoRelayedPort(_) => 2,
            Refusal::BadPortRequest(_) => 3,
            Refusal::PortOutsideRange { .. } => 4,
            Refusal::PortTaken(_) => 5,
            Refusal::PortUnavailable(..) => 6,
            Refusal::BadReadyRequest(_) => 7,
            Refusal::BadProxyRequest(_) => 8,
            Refusal::BadAllowRequest(_) => 9,
            Refusal::BadRateRequest(_) => 10,
            Refusal::Other(_) => 11,
        }
    }

    #[test]
    fn every_refusal_parses_back_to_itself_through_its_line() {
        let all = every_refusal();
        let kinds: std::collections::BTreeSet<usize> = all.iter().map(kind).collect();
        assert_eq!(kinds, (0..=11).collect(), "one sample of every kind");
        for refusal in all {
            let line = error_line(&refusal);
            assert_eq!(line, format!("error {refusal}\n"));
            let mut reader = LineReader::new();
            let got = lines(&mut reader, line.as_bytes()).expect("one line");
            assert_eq!(parse_relay_line(&got[0]), Ok(RelayLine::Error(refusal)));
        }
    }

    #[test]
    fn refusals_are_exactly_the_relays_words() {
        let texts: Vec<String> = every_refusal().iter().map(Refusal::to_string).collect();
        assert_eq!(
            texts,
            [
                "secret refused",
                "too many apps",
                "no relayed port: Too many open files (os error 24)",
                "bad port request: bad port \"0\"",
                "port 80 is outside the relay's range 20000-20099",
                "port 8080 is taken",
                "port 22 is unavailable: Permission denied (os error 13)",
                "bad ready request: unexpected line \"ready 65\"",
                "bad proxy request: unexpected line \"proxy v3\"",
                "bad allow request: unexpected line \"allow 10.0.0.0/33\"",
                "bad rate request: unexpected line \"rate 0/s\"",
                "rate limited",
            ]
        );
    }

    /// The rule the agent applied to the text before reasons had codes.
    fn final_by_text(reason: &str) -> bool {
        reason.starts_with("secret") || reason.starts_with("port ") || reason.starts_with("bad ")
    }

    #[test]
    fn known_refusals_are_final_exactly_as_the_text_rule_said() {
        for refusal in every_refusal() {
            if let Refusal::Other(_) = refusal {
                assert!(!refusal.is_final(), "an unknown reason may pass");
            } else {
                assert_eq!(refusal.is_final(), final_by_text(&refusal.to_string()));
            }
        }
    }

    #[test]
    fn near_misses_are_other_and_keep_their_text() {
        for text in [
            "",
            "secret refused!",
            "Too many apps",
            "no relayed port:",
            "port 080 is taken",
            "port 80 is taken ",
            "port  80 is taken",
            "port 65536 is taken",
            "port 80 is outside the relay's range 1-",
            "port 80 is outside the relay's range 1-2-3",
            "port 80 is unavailable:",
            "port -1 is taken",
        ] {
            let parsed = Refusal::parse(text);
            assert_eq!(parsed, Refusal::Other(text.into()), "{text:?}");
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(Refusal::parse("port 0 is taken"), Refusal::PortTaken(0));
    }

    #[test]
    fn authenticated_lines_round_trip() {
        let token = DialToken([0xab; 16]);
        let line = dial_line(4000, Some(&token));
        assert_eq!(line, format!("4000 {}\n", "ab".repeat(16)));
        match parse_relay_line(line.trim_end()) {
            Ok(RelayLine::Dial(4000, Some(t))) => assert!(t.matches(&token)),
            other => panic!("{other:?}"),
        }
        assert!(parse_relay_line("4000 nothex").is_err());
        let challenge = challenge_line(&[1, 2, 255]);
        assert_eq!(challenge, "challenge 0102ff\n");
        assert_eq!(
            parse_relay_line(challenge.trim_end()),
            Ok(RelayLine::Challenge(vec![1, 2, 255]))
        );
        assert_eq!(
            parse_app_line(auth_line(&[9, 10]).trim_end()),
            Ok(AppLine::Auth(vec![9, 10]))
        );
        assert!(parse_app_line("auth xyz").is_err());
        let token_bytes = token_line(&token);
        assert!(parse_token_line(token_bytes.as_bytes()).is_some_and(|t| t.matches(&token)));
        assert!(parse_token_line(&token_bytes.as_bytes()[1..]).is_none());
        assert!(parse_token_line(&[b'a'; TOKEN_LINE_LEN]).is_none());
    }

    #[test]
    fn reader_honours_a_custom_limit() {
        let mut r = LineReader::with_limit(4);
        assert_eq!(lines(&mut r, b"abc\n").unwrap(), vec!["abc"]);
        assert_eq!(lines(&mut r, b"abcd\n"), Err(ProtocolError::LineTooLong));
    }

    #[test]
    fn reader_splits_across_feeds_and_strips_crlf() {
        let mut r = LineReader::new();
        assert_eq!(lines(&mut r, b"12").unwrap(), Vec::<String>::new());
        assert_eq!(lines(&mut r, b"34\r\n56\n7").unwrap(), vec!["1234", "56"]);
        assert_eq!(lines(&mut r, b"\n").unwrap(), vec!["7"]);
    }

    #[test]
    fn reader_refuses_overlong_lines_without_a_terminator() {
        let mut r = LineReader::new();
        let long = vec![b'x'; MAX_LINE];
        assert_eq!(lines(&mut r, &long), Err(ProtocolError::LineTooLong));
    }

    #[test]
    fn reader_refuses_overlong_lines_built_from_small_pieces() {
        let mut r = LineReader::new();
        let mut result = Ok(Vec::new());
        for _ in 0..MAX_LINE {
            result = lines(&mut r, b"y");
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ProtocolError::LineTooLong));
    }

    #[test]
    fn reader_accepts_a_line_of_exactly_max_bytes() {
        let mut r = LineReader::new();
        let mut line = vec![b'z'; MAX_LINE - 1];
        line.push(b'\n');
        assert_eq!(lines(&mut r, &line).unwrap().len(), 1);
    }

    #[test]
    fn reader_survives_binary_garbage() {
        let mut r = LineReader::new();
        let garbage: Vec<u8> = (0..=255u8).cycle().take(600).collect();
        let got = lines(&mut r, &garbage).unwrap();
        assert_eq!(got.len(), 3, "0x0a appears at 10, 266 and 522");
    }
}
