//! The app's end of the control connection, without I/O: registering with a
//! relay and reading its dial lines, shared by the agent and
//! [`crate::RelayedApp`].
//!
//! The caller owns the socket and the clock. It feeds [`Client::feed`]
//! whatever it read from the control connection and acts on the returned
//! [`Event`]s in order: it writes every [`Event::Send`] whole at once,
//! dials in for every [`Event::Dial`], and ends the connection after
//! [`Event::Failed`]. Deadlines (connecting, registering) stay with the
//! caller; [`Client::phase`] says which one applies.
//!
//! ```text
//! Connected ─ challenge: send auth + requests ─► Registering ─ established ─► Registered(port)
//!     │                                            ▲  (the last one needed:   │
//!     └─ established: send requests, count it ─────┘   2nd after `port N`)    ▼ dial lines
//! any phase: `error <REASON>`, an overlong line, a challenge without a secret ─► Failed
//! ```
//!
//! The wire format is in [`crate::protocol`]; this module only decides what
//! each line means at each point of the registration.

use std::fmt;

use crate::access::{AllowList, RateLimit};
use crate::auth::{self, DialToken};
use crate::config::Secret;
use crate::protocol::{
    LineReader, MAX_LINE, MAX_READY, ProtocolError, Refusal, RelayLine, allow_line, auth_line,
    parse_relay_line, port_request_line, proxy_line, rate_line, ready_line,
};
use crate::proxy_protocol::ProxyVersion;

/// What an app asks of the relay when it registers.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// The relay's shared secret, to answer its challenge with.
    pub secret: Option<Secret>,
    /// Ask for this relayed port (the `port` extension).
    pub port: Option<u16>,
    /// Keep this many dial-ins ready (the `ready` extension; 0 sends
    /// nothing, more than [`MAX_READY`] asks for [`MAX_READY`]).
    pub ready: usize,
    /// Begin every dial-in with a PROXY protocol header of this version
    /// naming its client (the `proxy` extension); the relay says yes with a
    /// `proxy` line of its own, and registration waits for it.
    pub proxy: Option<ProxyVersion>,
    /// Admit to our port only clients from these sources (the `allow`
    /// extension), on top of the relay's own list; the relay says yes with
    /// the same line, and registration waits for it.
    pub allow: Option<AllowList>,
    /// At most this many new clients per source (the `rate` extension); the
    /// relay answers with the limit it will apply (ours, or stricter where
    /// its own is), and registration waits for it.
    pub rate: Option<RateLimit>,
}

/// The requests the relay answers with a line of its own (`proxy`,
/// `allow`, `rate`) that are still unanswered: registration waits for them,
/// so an app that needs one never serves on a relay that ignored it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unanswered {
    /// Our `proxy` request.
    pub proxy: bool,
    /// Our `allow` request.
    pub allow: bool,
    /// Our `rate` request.
    pub rate: bool,
}

impl Unanswered {
    /// What `registration` asks that needs an answer.
    fn of(registration: &Registration) -> Unanswered {
        Unanswered {
            proxy: registration.proxy.is_some(),
            allow: registration.allow.is_some(),
            rate: registration.rate.is_some(),
        }
    }

    /// The first request still unanswered, by its line's name.
    pub fn first(&self) -> Option<&'static str> {
        [
            (self.proxy, "proxy"),
            (self.allow, "allow"),
            (self.rate, "rate"),
        ]
        .into_iter()
        .find_map(|(pending, name)| pending.then_some(name))
    }
}

/// Where a registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected; the relay has not spoken yet. Its first line says whether
    /// it wants the secret proved before it registers us.
    Connected,
    /// Greeted; `seen` established lines have come, not yet all we need
    /// (with a `port` request, `seen == 1` means the relay has not answered
    /// the request yet), or a request that needs an answer has none yet.
    Registering {
        seen: usize,            // established lines so far
        unanswered: Unanswered, // requests still waiting for the relay's answer
    },
    /// Registered on this relayed port; dial lines follow.
    Registered(u16),
    /// The connection is of no further use ([`Event::Failed`] said why).
    Failed,
}

/// What a chunk of the relay's bytes meant, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write these bytes to the relay now, whole: our greeting (the `auth`
    /// answer, then our requests). A few dozen bytes on a fresh connection,
    /// whose send buffer is empty: anything short of a full write means the
    /// connection is bad.
    Send(Vec<u8>),
    /// Registered: clients reach us on this relayed port. Reported once.
    Registered(u16),
    /// A client waits: dial in to `port` at the relay's address, and send
    /// `token` first if there is one. May come before [`Event::Registered`]
    /// (the relay announces clients as soon as it has registered us, while
    /// our `port` request may still be unanswered).
    Dial {
        port: u16,                // the relay's dial-in port
        token: Option<DialToken>, // to present first, with a secret
    },
    /// An `established` line after we were registered; nothing changes.
    ExtraEstablished(u16),
    /// A line that does not parse; nothing changes, and the caller decides
    /// whether that is the end.
    Unparsable(ProtocolError),
    /// The registration failed and the connection is of no further use;
    /// nothing more is reported.
    Failed(Failure),
}

/// Why a control connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `error <REASON>`: the relay refused us, and closes the connection.
    Refused(Refusal),
    /// The relay challenged us and we have no secret to answer with.
    NoSecret,
    /// The relay sent a line longer than [`MAX_LINE`]: its framing is lost.
    LineTooLong,
}

impl Failure {
    /// Whether connecting again cannot help (see [`Refusal::is_final`]).
    pub fn is_final(&self) -> bool {
        match self {
            Failure::Refused(refusal) => refusal.is_final(),
            Failure::NoSecret => true,
            // A garbled stream is the connection's fault, not ours.
            Failure::LineTooLong => false,
        }
    }
}

impl fmt::Display for Failure {
    /// What went wrong; a refusal is the relay's reason alone, so callers
    /// add their context ("the relay refused: ...").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused(refusal) => write!(f, "{refusal}"),
            Failure::NoSecret => f.write_str("the relay requires a secret and we have none"),
            Failure::LineTooLong => {
                write!(f, "the relay sent a line longer than {MAX_LINE} bytes")
            }
        }
    }
}

impl std::error::Error for Failure {}

/// The registration state machine of one control connection. A new
/// connection needs a new `Client`.
#[derive(Debug)]
pub struct Client {
    registration: Registration, // what we ask for
    lines: LineReader,          // frames the relay's lines
    phase: Phase,               // where the registration stands
    last_port: u16,             // the port of the last established line
}

impl Client {
    /// A client for a fresh connection, asking for `registration`.
    pub fn new(registration: Registration) -> Client {
        Client {
            registration,
            lines: LineReader::new(),
            phase: Phase::Connected,
            last_port: 0,
        }
    }

    /// Where the registration stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The relayed port, once registered.
    pub fn registered_port(&self) -> Option<u16> {
        match self.phase {
            Phase::Registered(port) => Some(port),
            Phase::Connected | Phase::Registering { .. } | Phase::Failed => None,
        }
    }

    /// Takes bytes read from the control connection (any split: a line may
    /// arrive byte by byte) and says what they meant. After a failure,
    /// bytes are ignored.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Event> {
        if self.phase == Phase::Failed {
            return Vec::new();
        }
        let mut lines = Vec::new();
        let framed = self
            .lines
            .feed(data, |line| lines.push(parse_relay_line(line)));
        let mut events = Vec::new();
        for line in lines {
            self.take(line, &mut events);
            if self.phase == Phase::Failed {
                return events;
            }
        }
        if framed.is_err() {
            self.fail(Failure::LineTooLong, &mut events);
        }
        events
    }

    /// One line of the relay's, at the current phase.
    fn take(&mut self, line: Result<RelayLine, ProtocolError>, events: &mut Vec<Event>) {
        match line {
            Ok(RelayLine::Challenge(nonce)) => self.greet(Some(nonce.as_slice()), events),
            Ok(RelayLine::Established(port)) => {
                self.greet(None, events);
                self.established(port, events);
            }
            Ok(RelayLine::Dial(port, token)) => events.push(Event::Dial { port, token }),
            Ok(RelayLine::Error(refusal)) => self.fail(Failure::Refused(refusal), events),
            Ok(RelayLine::Proxy(version)) => self.proxy_granted(version, events),
            Ok(RelayLine::Allow(list)) => self.allow_granted(list, events),
            Ok(RelayLine::Rate(limit)) => self.rate_granted(limit, events),
            Err(e) => events.push(Event::Unparsable(e)),
        }
    }

    /// Answers the relay's first line, challenge or established: Connected
    /// => Registering. Later challenges are ignored, as the relay sends one
    /// per connection.
    fn greet(&mut self, nonce: Option<&[u8]>, events: &mut Vec<Event>) {
        if self.phase != Phase::Connected {
            return;
        }
        match self.greeting(nonce) {
            Ok(bytes) => {
                let unanswered = Unanswered::of(&self.registration);
                self.phase = Phase::Registering {
                    seen: 0,
                    unanswered,
                };
                if !bytes.is_empty() {
                    events.push(Event::Send(bytes.into_bytes()));
                }
            }
            Err(failure) => self.fail(failure, events),
        }
    }

    /// Our first words, in one write: the `auth` answer if challenged, then
    /// every request we have (an app that asks for nothing sends nothing,
    /// as the original protocol has it). A new request line goes here.
    fn greeting(&self, nonce: Option<&[u8]>) -> Result<String, Failure> {
        let wanted = &self.registration;
        let mut lines = String::new();
        if let Some(nonce) = nonce {
            let secret = wanted.secret.as_ref().ok_or(Failure::NoSecret)?;
            lines += &auth_line(&auth::response(&secret.0, nonce));
        }
        if let Some(port) = wanted.port {
            lines += &port_request_line(port);
        }
        if wanted.ready > 0 {
            lines += &ready_line(wanted.ready.min(MAX_READY));
        }
        if let Some(version) = wanted.proxy {
            lines += &proxy_line(version);
        }
        if let Some(list) = &wanted.allow {
            lines += &allow_line(list);
        }
        if let Some(limit) = wanted.rate {
            lines += &rate_line(limit);
        }
        Ok(lines)
    }

    /// How many established lines register us: the relay sends one when it
    /// registers us, and answers a `port` request with another (`ready` is
    /// answered with dial lines only).
    fn established_needed(&self) -> usize {
        1 + usize::from(self.registration.port.is_some())
    }

    /// An established line: counted while registering; with the last one
    /// needed (and our `proxy` request answered, if we made one), we are
    /// registered on its port.
    fn established(&mut self, port: u16, events: &mut Vec<Event>) {
        match self.phase {
            Phase::Registering { seen, unanswered } => {
                self.phase = Phase::Registering {
                    seen: seen + 1,
                    unanswered,
                };
                self.registered_if_answered(port, events);
            }
            Phase::Registered(_) => events.push(Event::ExtraEstablished(port)),
            // `greet` has just left Connected, or failed.
            Phase::Connected | Phase::Failed => {}
        }
    }

    /// The relay's `proxy` line: the answer to our request, if it grants
    /// the version we asked for; anything else changes nothing.
    fn proxy_granted(&mut self, version: ProxyVersion, events: &mut Vec<Event>) {
        let granted = self.registration.proxy == Some(version);
        self.answered(granted, |u| &mut u.proxy, proxy_line(version), events);
    }

    /// The relay's `allow` line: the answer to our request, if it names
    /// the list we asked for.
    fn allow_granted(&mut self, list: AllowList, events: &mut Vec<Event>) {
        let granted = self.registration.allow.as_ref() == Some(&list);
        self.answered(granted, |u| &mut u.allow, allow_line(&list), events);
    }

    /// The relay's `rate` line: the answer to our request, if the limit it
    /// will apply is no looser than ours (it may be stricter: its own).
    fn rate_granted(&mut self, limit: RateLimit, events: &mut Vec<Event>) {
        let granted = self
            .registration
            .rate
            .is_some_and(|asked| limit.stricter(asked) == limit);
        if granted && self.registration.rate != Some(limit) {
            log::info!("the relay limits our clients to {limit} per source (its own limit)");
        }
        self.answered(granted, |u| &mut u.rate, rate_line(limit), events);
    }

    /// An answer to a request of ours: if it grants what we asked while we
    /// wait for it, it is answered (and we may be registered now); any
    /// other such line changes nothing.
    fn answered(
        &mut self,
        granted: bool,
        which: fn(&mut Unanswered) -> &mut bool,
        line: String,
        events: &mut Vec<Event>,
    ) {
        if let Phase::Registering {
            seen,
            mut unanswered,
        } = self.phase
            && granted
            && *which(&mut unanswered)
        {
            *which(&mut unanswered) = false;
            self.phase = Phase::Registering { seen, unanswered };
            return self.registered_if_answered(self.last_port, events);
        }
        let line = line.trim_end().to_owned();
        events.push(Event::Unparsable(ProtocolError::Unexpected(line)));
    }

    /// Registering => Registered once every answer we wait for has come:
    /// the established lines (one, or two after a `port` request), and the
    /// answers to `proxy`, `allow` and `rate` if we asked.
    fn registered_if_answered(&mut self, port: u16, events: &mut Vec<Event>) {
        self.last_port = port;
        if let Phase::Registering { seen, unanswered } = self.phase
            && unanswered == Unanswered::default()
            && seen >= self.established_needed()
        {
            self.phase = Phase::Registered(port);
            events.push(Event::Registered(port));
        }
    }

    /// Any phase => Failed, reported once.
    fn fail(&mut self, failure: Failure, events: &mut Vec<Event>) {
        self.phase = Phase::Failed;
        events.push(Event::Failed(failure));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{challenge_line, dial_line, error_line, established_line};

    const SECRET: &[u8] = b"the shared secret";

    fn client(port: Option<u16>, secret: bool, ready: usize) -> Client {
        Client::new(Registration {
            secret: secret.then(|| Secret(SECRET.to_vec())),
            port,
            ready,
            ..Registration::default()
        })
    }

    /// Feeds `data` one byte at a time, as a slow relay would deliver it.
    fn feed_bytewise(client: &mut Client, data: &[u8]) -> Vec<Event> {
        data.iter().flat_map(|b| client.feed(&[*b])).collect()
    }

    fn send(text: &str) -> Event {
        Event::Send(text.as_bytes().to_vec())
    }

    #[test]
    fn the_original_protocol_registers_on_the_first_established_line() {
        let mut c = client(None, false, 0);
        assert_eq!(c.phase(), Phase::Connected);
        let events = c.feed(established_line(8081).as_bytes());
        assert_eq!(events, [Event::Registered(8081)], "nothing to send");
        assert_eq!(c.registered_port(), Some(8081));
        assert_eq!(
            c.feed(dial_line(40000, None).as_bytes()),
            [Event::Dial {
                port: 40000,
                token: None
            }]
        );
    }

    #[test]
    fn a_port_request_registers_on_the_second_established_line() {
        let mut c = client(Some(9000), false, 8);
        let events = c.feed(established_line(8081).as_bytes());
        assert_eq!(events, [send("port 9000\nready 8\n")], "one write");
        assert_eq!(
            c.phase(),
            Phase::Registering {
                seen: 1,
                unanswered: Unanswered::default()
            }
        );
        assert_eq!(c.registered_port(), None);
        let events = c.feed(established_line(9000).as_bytes());
        assert_eq!(events, [Event::Registered(9000)]);
        assert_eq!(c.phase(), Phase::Registered(9000));
    }

    #[test]
    fn a_later_established_line_is_reported_and_changes_nothing() {
        let mut c = client(None, false, 0);
        let both = established_line(8081) + &established_line(8082);
        assert_eq!(
            c.feed(both.as_bytes()),
            [Event::Registered(8081), Event::ExtraEstablished(8082)]
        );
        assert_eq!(c.registered_port(), Some(8081));
    }

    #[test]
    fn bytes_split_anywhere_mean_the_same() {
        let mut token = [0u8; 16];
        token[0] = 7;
        let token = DialToken(token);
        let wire = [
            established_line(8081),
            dial_line(4000, Some(&token)),
            "\r\n".into(), // an empty line (a CR before the LF is tolerated)
            established_line(9000),
            dial_line(4000, None).replace('\n', "\r\n"),
        ]
        .concat();
        let whole = client(Some(9000), false, 0).feed(wire.as_bytes());
        let bytewise = feed_bytewise(&mut client(Some(9000), false, 0), wire.as_bytes());
        assert_eq!(whole, bytewise);
        let dial = |token| Event::Dial { port: 4000, token };
        assert!(matches!(
            &whole[2],
            Event::Unparsable(ProtocolError::BadPort(_))
        ));
        assert_eq!(whole.len(), 5, "{whole:?}");
        assert_eq!(
            [&whole[..2], &whole[3..]].concat(),
            [
                send("port 9000\n"),
                dial(Some(token)),
                Event::Registered(9000),
                dial(None)
            ]
        );
    }

    #[test]
    fn a_dial_line_before_registration_is_reported_in_order() {
        // The relay announces a client between its two established lines.
        let mut c = client(Some(9000), false, 0);
        let wire = established_line(8081) + &dial_line(4000, None) + &established_line(9000);
        let events = c.feed(wire.as_bytes());
        assert_eq!(
            events,
            [
                send("port 9000\n"),
                Event::Dial {
                    port: 4000,
                    token: None
                },
                Event::Registered(9000),
            ]
        );
    }

    #[test]
    fn a_challenge_is_answered_before_the_requests() {
        let nonce = [0x5a; 32];
        let mut c = client(Some(9000), true, 2);
        let events = feed_bytewise(&mut c, challenge_line(&nonce).as_bytes());
        let auth = auth_line(&auth::response(SECRET, &nonce));
        assert_eq!(events, [send(&format!("{auth}port 9000\nready 2\n"))]);
        assert_eq!(
            c.phase(),
            Phase::Registering {
                seen: 0,
                unanswered: Unanswered::default()
            }
        );
        // A second challenge is not answered again.
        assert_eq!(c.feed(challenge_line(&[1; 32]).as_bytes()), []);
        assert_eq!(c.feed(established_line(8081).as_bytes()), []);
        assert_eq!(
            c.feed(established_line(9000).as_bytes()),
            [Event::Registered(9000)]
        );
    }

    /// `proxy`, `allow` and `rate` are each answered with a line of the
    /// relay's, in any order and split anywhere; registration waits for all
    /// of them, and a line that grants something else answers nothing.
    #[test]
    fn requests_that_need_answers_register_only_once_all_are_answered() {
        let limit = |text: &str, burst| RateLimit::new(text.parse().expect("a rate"), burst);
        let list: AllowList = "10.0.0.0/8,::1".parse().expect("a list");
        let asked = Registration {
            proxy: Some(ProxyVersion::V2),
            allow: Some(list.clone()),
            rate: Some(limit("10/s", None)),
            ..Registration::default()
        };
        let mut c = Client::new(asked.clone());
        let events = c.feed(established_line(8081).as_bytes());
        let requests = "proxy v2\nallow 10.0.0.0/8,::1/128\nrate 10/s 10\n";
        assert_eq!(events, [send(requests)], "one write, every request");
        // A looser rate than we asked is no answer; nor another list.
        let wrong =
            rate_line(limit("20/s", None)) + &allow_line(&"0.0.0.0/0".parse().expect("list"));
        let events = c.feed(wrong.as_bytes());
        assert!(
            matches!(events[..], [Event::Unparsable(_), Event::Unparsable(_)]),
            "{events:?}"
        );
        let first = c.phase();
        assert_eq!(
            first,
            Phase::Registering {
                seen: 1,
                unanswered: Unanswered {
                    proxy: true,
                    allow: true,
                    rate: true
                }
            }
        );
        // The relay's own, stricter limit answers ours.
        let answers = rate_line(limit("1/s", Some(std::num::NonZeroU32::MIN)))
            + &allow_line(&list)
            + &proxy_line(ProxyVersion::V2);
        let events = feed_bytewise(&mut c, answers.as_bytes());
        assert_eq!(events, [Event::Registered(8081)]);

        // Without the answers (an old relay), no registration.
        let mut c = Client::new(asked);
        c.feed(established_line(8081).as_bytes());
        let events = c.feed((allow_line(&list) + &proxy_line(ProxyVersion::V2)).as_bytes());
        assert_eq!(events, []);
        let Phase::Registering { unanswered, .. } = c.phase() else {
            panic!("still registering: {:?}", c.phase());
        };
        assert_eq!(unanswered.first(), Some("rate"));
    }

    #[test]
    fn a_challenge_without_a_secret_fails_for_good() {
        let mut c = client(None, false, 0);
        let wire = challenge_line(&[1; 32]) + &established_line(8081);
        let events = c.feed(wire.as_bytes());
        assert_eq!(events, [Event::Failed(Failure::NoSecret)]);
        assert!(Failure::NoSecret.is_final());
        assert_eq!(c.phase(), Phase::Failed);
        assert_eq!(c.feed(established_line(8081).as_bytes()), []);
    }

    #[test]
    fn refusals_end_the_registration_with_their_code() {
        for (refusal, is_final) in [
            (Refusal::SecretRefused, true),
            (Refusal::PortTaken(9000), true),
            (Refusal::TooManyApps, false),
            (Refusal::Other("rate limited".into()), false),
        ] {
            let mut c = client(Some(9000), false, 0);
            let wire = established_line(8081) + &error_line(&refusal) + &dial_line(4000, None);
            let events = c.feed(wire.as_bytes());
            let failure = Failure::Refused(refusal);
            assert_eq!(failure.is_final(), is_final, "{failure}");
            assert_eq!(events, [send("port 9000\n"), Event::Failed(failure)]);
            assert_eq!(
                c.feed(dial_line(4000, None).as_bytes()),
                [],
                "nothing after"
            );
        }
    }

    #[test]
    fn a_refusal_before_any_greeting_sends_nothing() {
        let mut c = client(Some(9000), true, 0);
        let events = feed_bytewise(&mut c, error_line(&Refusal::TooManyApps).as_bytes());
        assert_eq!(
            events,
            [Event::Failed(Failure::Refused(Refusal::TooManyApps))]
        );
    }

    #[test]
    fn unparsable_lines_are_reported_and_skipped() {
        let mut c = client(None, false, 0);
        let wire = format!("hello\n{}garbage\n", established_line(8081));
        let events = c.feed(wire.as_bytes());
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(events[0], Event::Unparsable(_)));
        assert_eq!(events[1], Event::Registered(8081));
        assert!(matches!(events[2], Event::Unparsable(_)));
        assert_eq!(c.phase(), Phase::Registered(8081));
    }

    #[test]
    fn an_overlong_line_fails_after_the_lines_before_it() {
        let mut c = client(None, false, 0);
        let mut wire = established_line(8081).into_bytes();
        wire.extend(vec![b'9'; MAX_LINE]);
        let events = c.feed(&wire);
        assert_eq!(
            events,
            [Event::Registered(8081), Event::Failed(Failure::LineTooLong)]
        );
        assert!(!Failure::LineTooLong.is_final());
        assert_eq!(c.feed(b"\n"), []);
    }

    #[test]
    fn an_overlong_line_fed_bytewise_fails_once() {
        let mut c = client(None, false, 0);
        let events = feed_bytewise(&mut c, &vec![b'x'; 2 * MAX_LINE]);
        assert_eq!(events, [Event::Failed(Failure::LineTooLong)]);
    }

    #[test]
    fn the_ready_count_is_capped() {
        let mut c = client(None, false, MAX_READY + 100);
        let events = c.feed(established_line(8081).as_bytes());
        let ready = ready_line(MAX_READY);
        assert_eq!(events, [send(&ready), Event::Registered(8081)]);
    }

    #[test]
    fn failures_read_as_sentences() {
        let refused = Failure::Refused(Refusal::PortTaken(80));
        assert_eq!(refused.to_string(), "port 80 is taken");
        assert_eq!(
            Failure::NoSecret.to_string(),
            "the relay requires a secret and we have none"
        );
        assert!(Failure::LineTooLong.to_string().contains("longer than"));
    }
}
