//! Who may connect, pure: address allow-lists and per-source rate limits.
//!
//! * [`AllowList`] is the value of `--allow-apps` / `--allow-clients`:
//!   comma-separated CIDR blocks ([`Cidr`]), IPv4 and IPv6.
//! * [`RateLimit`] is `--client-rate <N>/s|<N>/m` with `--client-burst <N>`;
//!   [`SourceLimiter`] applies it per source address with a bounded table.
//!
//! Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`); everything here treats such an address as the IPv4
//! address it carries, so one list entry and one bucket cover a client
//! however the listening socket saw it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, Instant};

use slab::Slab;

/// A block of addresses: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr, // host bits cleared
    prefix: u8,      // at most 32 (IPv4) or 128 (IPv6)
}

impl Cidr {
    /// The block of `addr`'s first `prefix` bits. Host bits set in `addr`
    /// are cleared (`10.1.2.3/8` is `10.0.0.0/8`), as iptables and HAProxy
    /// do. Fails if `prefix` exceeds the family's 32 or 128 bits.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, AllowError> {
        let network = match addr {
            IpAddr::V4(ip) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & mask_v4(prefix)))
            }
            IpAddr::V6(ip) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & mask_v6(prefix)))
            }
            _ => {
                return Err(AllowError::PrefixTooLong {
                    entry: format!("{addr}/{prefix}"),
                    max: max_prefix(addr),
                });
            }
        };
        Ok(Cidr { network, prefix })
    }

    /// The network address (host bits clear).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the block. An IPv4-mapped IPv6 address matches
    /// as its IPv4 address; an IPv4 address also matches an IPv6 block that
    /// holds its mapped form (`::ffff:0:0/96`, `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                ip.to_bits() & mask_v4(self.prefix) == net.to_bits()
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => self.contains_v6(net, ip.to_ipv6_mapped()),
            (IpAddr::V6(net), IpAddr::V6(ip)) => self.contains_v6(net, ip),
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }

    fn contains_v6(&self, net: Ipv6Addr, ip: Ipv6Addr) -> bool {
        ip.to_bits() & mask_v6(self.prefix) == net.to_bits()
    }
}

/// The top `prefix` bits set (`prefix` ≤ 32).
fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// The top `prefix` bits set (`prefix` ≤ 128).
fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = AllowError;

    /// `ADDR/PREFIX`, or a bare `ADDR` meaning that one address (/32 or
    /// /128). The prefix is decimal digits only.
    fn from_str(entry: &str) -> Result<Cidr, AllowError> {
        if entry.is_empty() {
            return Err(AllowError::Empty);
        }
        let (addr, prefix) = match entry.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (entry, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| AllowError::BadAddress(entry.to_owned()))?;
        let prefix = match prefix {
            None => max_prefix(addr),
            Some(text) => {
                parse_prefix(text).ok_or_else(|| AllowError::BadPrefix(entry.to_owned()))?
            }
        };
        Cidr::new(addr, prefix).map_err(|_| AllowError::PrefixTooLong {
            entry: entry.to_owned(),
            max: max_prefix(addr),
        })
    }
}

/// One to three decimal digits (no sign, no spaces): a prefix length to be
/// checked against the family.
fn parse_prefix(text: &str) -> Option<u8> {
    let digits = (1..=3).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

impl fmt::Display for Cidr {
    /// Canonical text: the network address and the prefix, always both
    /// (`10.0.0.0/8`, `192.0.2.7/32`, `2001:db8::/32`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The addresses allowed to connect: a union of CIDR blocks.
///
/// Checked once per accepted connection by a linear scan; the list comes
/// from the command line, so it is short and bounded by its operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Cidr>, // in the order given; never empty
}

impl AllowList {
    /// Whether `ip` lies in any of the blocks.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|cidr| cidr.contains(ip))
    }

    /// The blocks, in the order given.
    pub fn entries(&self) -> &[Cidr] {
        &self.entries
    }
}

impl FromStr for AllowList {
    type Err = AllowError;

    /// Comma-separated [`Cidr`] entries; spaces around an entry are
    /// ignored, an empty entry (a stray comma) is an error.
    fn from_str(text: &str) -> Result<AllowList, AllowError> {
        let entries = text
            .split(',')
            .map(|entry| entry.trim().parse())
            .collect::<Result<Vec<Cidr>, _>>()?;
        Ok(AllowList { entries })
    }
}

impl fmt::Display for AllowList {
    /// The canonical text of each entry, comma-separated; it parses back to
    /// the same list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cidr) in self.entries.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{cidr}")?;
        }
        Ok(())
    }
}

/// An allow-list entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowError {
    /// An empty entry: nothing between two commas, or an empty list.
    Empty,
    /// The part before `/` is not an IPv4 or IPv6 address.
    BadAddress(String),
    /// The part after `/` is not a decimal number.
    BadPrefix(String),
    /// The prefix is longer than the address family has bits.
    PrefixTooLong {
        /// The entry as given.
        entry: String,
        /// The family's bits: 32 or 128.
        max: u8,
    },
}

impl fmt::Display for AllowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowError::Empty => write!(f, "empty entry (ADDR or ADDR/PREFIX, comma-separated)"),
            AllowError::BadAddress(entry) => {
                write!(f, "entry {entry:?}: not an IPv4 or IPv6 address")
            }
            AllowError::BadPrefix(entry) => {
                write!(
                    f,
                    "entry {entry:?}: the prefix after / is not a decimal number"
                )
            }
            AllowError::PrefixTooLong { entry, max } => {
                write!(f, "entry {entry:?}: prefix longer than {max} bits")
            }
        }
    }
}

impl std::error::Error for AllowError {}

/// A sustained rate: `count` connections per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: NonZeroU32, // connections allowed per period
    per: Duration,     // the period: one second or one minute
}

impl Rate {
    /// `count` per second.
    pub fn per_second(count: NonZeroU32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    /// `count` per minute.
    pub fn per_minute(count: NonZeroU32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(60),
        }
    }

    /// Time to earn one connection: the period over the count, at least a
    /// nanosecond (an `Instant`'s resolution).
    fn interval(&self) -> Duration {
        (self.per / self.count.get()).max(Duration::from_nanos(1))
    }

    /// Whether `self` allows fewer connections over time than `other`.
    fn slower_than(&self, other: &Rate) -> bool {
        // count/per < other.count/other.per, cross-multiplied (no division).
        u128::from(self.count.get()) * other.per.as_nanos()
            < u128::from(other.count.get()) * self.per.as_nanos()
    }
}

impl FromStr for Rate {
    type Err = String;

    /// `<N>/s` or `<N>/m`, N a positive decimal integer.
    fn from_str(text: &str) -> Result<Rate, String> {
        let bad =
            || format!("--client-rate wants <N>/s or <N>/m, N a positive integer, not {text:?}");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count = parse_positive(count).ok_or_else(bad)?;
        match unit {
            "s" => Ok(Rate::per_second(count)),
            "m" => Ok(Rate::per_minute(count)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per == Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parses `--client-burst <N>`: a positive decimal integer.
pub fn parse_burst(text: &str) -> Result<NonZeroU32, String> {
    parse_positive(text)
        .ok_or_else(|| format!("--client-burst wants a positive integer, not {text:?}"))
}

/// Decimal digits only (no sign or spaces, which `u32::from_str` would
/// partly take), worth 1..=u32::MAX.
fn parse_positive(text: &str) -> Option<NonZeroU32> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// How many connections one source may open: `burst` at once, then
/// `rate` sustained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// The sustained rate.
    pub rate: Rate,
    /// Connections allowed at once from a full bucket.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// `rate` with `burst`, or by default one period's worth (`10/s` gives
    /// a burst of 10, `30/m` of 30).
    pub fn new(rate: Rate, burst: Option<NonZeroU32>) -> RateLimit {
        RateLimit {
            rate,
            burst: burst.unwrap_or(rate.count),
        }
    }

    /// The tighter of two limits in each respect: the slower rate and the
    /// smaller burst. An app's own limit combined with the relay's this way
    /// is never looser than the relay's.
    pub fn stricter(self, other: RateLimit) -> RateLimit {
        RateLimit {
            rate: if other.rate.slower_than(&self.rate) {
                other.rate
            } else {
                self.rate
            },
            burst: self.burst.min(other.burst),
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} burst {}", self.rate, self.burst)
    }
}

/// Sources a [`SourceLimiter`] tracks by default. When full the table holds
/// about 1.9 MB (measured: some 115 bytes per source for its bucket and
/// recency links in the slab and its hash index entry), allocated only as
/// sources appear. A relay that sees more distinct sources than this
/// within one refill time is under a flood, and then forgetting the least
/// recently seen bucket is the cheaper loss.
pub const DEFAULT_MAX_SOURCES: usize = 16_384;

/// Idle buckets dropped per [`SourceLimiter::check`]: more than the one a
/// check may add, so idle entries drain while traffic flows.
const SWEEP_PER_CHECK: usize = 2;

/// A token bucket per source address, in a bounded table.
///
/// **The bucket** holds up to `burst` tokens, earns one every `interval`
/// (the rate's period over its count), and a connection takes one. It is
/// kept as a single instant, `due`: when the bucket will be full again
/// (the "theoretical arrival time" of GCRA, the same algorithm written
/// without a token count). A bucket holds `burst - (due - now) / interval`
/// tokens; taking one moves `due` one interval later; it has a token iff
/// `due - now ≤ (burst - 1) × interval`. No division, no float, no timer.
///
/// **Forgetting.** A bucket with `due ≤ now` is full, which is exactly how
/// an unknown source is treated, so such entries are dropped: each check
/// first drops up to two from the least recently seen end. An entry left
/// idle elsewhere in the table is harmless (it behaves as a full bucket)
/// and goes when it reaches that end.
///
/// **Bound.** The table holds at most `max_sources` entries. When it is
/// full of live buckets, a new source evicts the least recently seen one.
/// Memory stays bounded under a flood of distinct sources; the cost is
/// that the evicted source, if it returns, gets a full bucket again. The
/// least recently seen is the best one to lose: a source that keeps
/// connecting stays at the recent end, so a flood of one-shot sources
/// cannot push an active abuser out. Every operation is O(1): a hash index
/// into a slab of buckets threaded on a recency list.
///
/// **Keys.** IPv4 sources are keyed by address (an IPv4-mapped IPv6
/// address by the IPv4 address it carries); IPv6 sources by their /64. A
/// single host usually owns a whole /64 (SLAAC, and ISPs delegate a /64 or
/// more per customer), and privacy addresses (RFC 8981) let it rotate
/// through it at will, so a per-address limit on IPv6 limits nothing.
pub struct SourceLimiter {
    interval: Duration,               // time to earn one token
    tolerance: Duration,              // how far past now `due` may be: (burst - 1) intervals
    max_sources: usize,               // most entries in the table
    index: HashMap<SourceKey, usize>, // source → its slot in `buckets`
    buckets: Slab<Bucket>,            // the live entries
    newest: Option<usize>,            // most recently seen slot
    oldest: Option<usize>,            // least recently seen slot
}

/// What a source is limited as: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32), // the address
    V6(u64), // the top 64 bits
}

impl SourceKey {
    fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(ip) => SourceKey::V4(ip.to_bits()),
            IpAddr::V6(ip) => SourceKey::V6((ip.to_bits() >> 64) as u64),
        }
    }
}

/// One source's bucket and its place in the recency list.
struct Bucket {
    key: SourceKey,       // whose bucket
    due: Instant,         // when the bucket is full again
    newer: Option<usize>, // next slot towards the most recently seen
    older: Option<usize>, // next slot towards the least recently seen
}

impl SourceLimiter {
    /// A limiter applying `limit` to each source, tracking at most
    /// [`DEFAULT_MAX_SOURCES`].
    pub fn new(limit: RateLimit) -> SourceLimiter {
        SourceLimiter::with_max_sources(limit, DEFAULT_MAX_SOURCES)
    }

    /// A limiter applying `limit` to each source, tracking at most
    /// `max_sources` (at least 1).
    pub fn with_max_sources(limit: RateLimit, max_sources: usize) -> SourceLimiter {
        let interval = limit.rate.interval();
        let tolerance = interval
            .checked_mul(limit.burst.get() - 1)
            .unwrap_or(Duration::MAX);
        SourceLimiter {
            interval,
            tolerance,
            max_sources: max_sources.max(1),
            index: HashMap::new(),
            buckets: Slab::new(),
            newest: None,
            oldest: None,
        }
    }

    /// Whether a connection from `ip` at `now` is within the limit; if so it
    /// takes one token.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.forget_full(now);
        let key = SourceKey::of(ip);
        let slot = match self.index.get(&key) {
            Some(&slot) => {
                self.unlink(slot);
                slot
            }
            None => self.insert(key, now),
        };
        self.link_newest(slot);
        self.take_token(slot, now)
    }

    /// Sources currently tracked (at most the table's bound).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    #[cfg(test)] // only the tests read it
    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes a token from `slot`'s bucket if it has one.
    fn take_token(&mut self, slot: usize, now: Instant) -> bool {
        let Some(bucket) = self.buckets.get_mut(slot) else {
            return false;
        };
        let due = bucket.due.max(now);
        if due.duration_since(now) > self.tolerance {
            return false;
        }
        match due.checked_add(self.interval) {
            Some(next) => {
                bucket.due = next;
                true
            }
            None => false,
        }
    }

    /// Drops up to [`SWEEP_PER_CHECK`] full buckets from the least recently
    /// seen end.
    fn forget_full(&mut self, now: Instant) {
        for _ in 0..SWEEP_PER_CHECK {
            match self.oldest {
                Some(slot) if self.buckets[slot].due <= now => self.remove(slot),
                _ => return,
            }
        }
    }

    /// A new entry for `key`, full, evicting the least recently seen entry
    /// if the table is at its bound. Not yet on the recency list.
    fn insert(&mut self, key: SourceKey, now: Instant) -> usize {
        if self.buckets.len() >= self.max_sources
            && let Some(oldest) = self.oldest
        {
            self.remove(oldest);
        }
        let slot = self.buckets.insert(Bucket {
            key,
            due: now,
            newer: None,
            older: None,
        });
        self.index.insert(key, slot);
        slot
    }

    fn remove(&mut self, slot: usize) {
        self.unlink(slot);
        let bucket = self.buckets.remove(slot);
        self.index.remove(&bucket.key);
    }

    /// Takes `slot` off the recency list.
    fn unlink(&mut self, slot: usize) {
        let (newer, older) = {
            let bucket = &mut self.buckets[slot];
            (bucket.newer.take(), bucket.older.take())
        };
        match newer {
            Some(n) => self.buckets[n].older = older,
            None => self.newest = older,
        }
        match older {
            Some(o) => self.buckets[o].newer = newer,
            None => self.oldest = newer,
        }
    }

    /// Puts an unlinked `slot` at the most recently seen end.
    fn link_newest(&mut self, slot: usize) {
        self.buckets[slot].older = self.newest;
        match self.newest {
            Some(previous) => self.buckets[previous].newer = Some(slot),
            None => self.oldest = Some(slot),
        }
        self.newest = Some(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn list(text: &str) -> AllowList {
        text.parse().expect("test allow-list")
    }

    fn n(count: u32) -> NonZeroU32 {
        NonZeroU32::new(count).expect("positive")
    }

    fn limit(rate: &str, burst: u32) -> RateLimit {
        RateLimit::new(rate.parse().expect("test rate"), Some(n(burst)))
    }

    // --- allow-lists ---

    #[test]
    fn entries_match_their_blocks_and_nothing_else() {
        let allow = list("10.0.0.0/8, 192.168.1.7,2001:db8::/32");
        for inside in [
            "10.0.0.0",
            "10.255.255.255",
            "192.168.1.7",
            "2001:db8:ffff::1",
        ] {
            assert!(allow.allows(ip(inside)), "{inside}");
        }
        for outside in [
            "11.0.0.0",
            "9.255.255.255",
            "192.168.1.8",
            "2001:db9::1",
            "::1",
        ] {
            assert!(!allow.allows(ip(outside)), "{outside}");
        }
    }

    #[test]
    fn ipv4_mapped_sources_match_ipv4_entries() {
        let allow = list("10.0.0.0/8");
        assert!(allow.allows(ip("::ffff:10.1.2.3")));
        assert!(!allow.allows(ip("::ffff:11.1.2.3")));
        // And an IPv6 block holding the mapped range admits plain IPv4.
        assert!(list("::ffff:0:0/96").allows(ip("203.0.113.5")));
        assert!(list("::/0").allows(ip("203.0.113.5")));
        assert!(!list("2001:db8::/32").allows(ip("203.0.113.5")));
    }

    #[test]
    fn host_bits_are_masked_and_display_is_canonical() {
        assert_eq!(list("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(list("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(
            list(" 192.0.2.7 , ::1 ").to_string(),
            "192.0.2.7/32,::1/128"
        );
        assert_eq!(list("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert!(list("1.2.3.4/0").allows(ip("255.255.255.255")));
        let text = "10.0.0.0/8,2001:db8::/32,192.0.2.7/32";
        assert_eq!(list(text).to_string().parse::<AllowList>(), Ok(list(text)));
    }

    #[test]
    fn bad_entries_are_named_with_the_reason() {
        let cases = [
            ("", AllowError::Empty),
            ("10.0.0.1,,10.0.0.2", AllowError::Empty),
            ("10.0.0.1,", AllowError::Empty),
            ("10.0.0.300", AllowError::BadAddress("10.0.0.300".into())),
            ("example.com", AllowError::BadAddress("example.com".into())),
            ("10.0.0.0 /8", AllowError::BadAddress("10.0.0.0 /8".into())),
            ("10.0.0.0/", AllowError::BadPrefix("10.0.0.0/".into())),
            ("10.0.0.0/+8", AllowError::BadPrefix("10.0.0.0/+8".into())),
            ("10.0.0.0/8/8", AllowError::BadPrefix("10.0.0.0/8/8".into())),
            ("::/1280", AllowError::BadPrefix("::/1280".into())),
            (
                "10.0.0.0/33",
                AllowError::PrefixTooLong {
                    entry: "10.0.0.0/33".into(),
                    max: 32,
                },
            ),
            (
                "::/129",
                AllowError::PrefixTooLong {
                    entry: "::/129".into(),
                    max: 128,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<AllowList>(), Err(want), "{text:?}");
        }
        let message = "1.2.3.4,10.0.0.0/33"
            .parse::<AllowList>()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("10.0.0.0/33") && message.contains("32"),
            "{message}"
        );
    }

    // --- rates ---

    #[test]
    fn rates_and_bursts_parse_strictly() {
        assert_eq!("10/s".parse(), Ok(Rate::per_second(n(10))));
        assert_eq!("60/m".parse(), Ok(Rate::per_minute(n(60))));
        assert_eq!(Rate::per_minute(n(60)).to_string(), "60/m");
        for bad in [
            "0/s",
            "10",
            "10/h",
            "10/S",
            "-1/s",
            "+5/s",
            "/s",
            "1.5/s",
            " 5/s",
            "99999999999/s",
        ] {
            let e = bad.parse::<Rate>().expect_err(bad);
            assert!(e.contains("--client-rate") && e.contains("<N>/s"), "{e}");
        }
        assert_eq!(parse_burst("20"), Ok(n(20)));
        for bad in ["0", "", "-1", "+2", "2 ", "x"] {
            let e = parse_burst(bad).expect_err(bad);
            assert!(
                e.contains("--client-burst") && e.contains("positive integer"),
                "{e}"
            );
        }
    }

    #[test]
    fn burst_defaults_to_one_periods_worth() {
        assert_eq!(
            RateLimit::new("10/s".parse().expect("rate"), None).burst,
            n(10)
        );
        assert_eq!(
            RateLimit::new("30/m".parse().expect("rate"), None).burst,
            n(30)
        );
    }

    #[test]
    fn combined_limits_are_never_looser_than_either() {
        let relay = limit("10/s", 20);
        let app = limit("100/m", 50);
        let both = relay.stricter(app);
        assert_eq!(both, limit("100/m", 20));
        assert_eq!(app.stricter(relay), both);
        assert_eq!(relay.stricter(relay), relay);
        assert_eq!(both.to_string(), "100/m burst 20");
    }

    // --- the limiter ---

    #[test]
    fn a_burst_is_allowed_at_once_then_the_rate() {
        let mut limiter = SourceLimiter::new(limit("10/s", 5));
        let (t0, source) = (Instant::now(), ip("192.0.2.1"));
        let allowed = (0..8).filter(|_| limiter.check(source, t0)).count();
        assert_eq!(allowed, 5);
        let tick = Duration::from_millis(100);
        assert!(!limiter.check(source, t0 + tick - Duration::from_nanos(1)));
        assert!(limiter.check(source, t0 + tick));
        assert!(!limiter.check(source, t0 + tick));
        // Ten intervals later the bucket holds five again, not ten.
        let later = t0 + 11 * tick;
        assert_eq!((0..8).filter(|_| limiter.check(source, later)).count(), 5);
    }

    #[test]
    fn buckets_refill_at_the_rate() {
        let mut limiter = SourceLimiter::new(limit("60/m", 1));
        let (t0, source) = (Instant::now(), ip("192.0.2.1"));
        assert!(limiter.check(source, t0));
        assert!(!limiter.check(source, t0 + Duration::from_millis(999)));
        assert!(limiter.check(source, t0 + Duration::from_secs(1)));
        assert!(!limiter.check(source, t0 + Duration::from_millis(1500)));
        assert!(limiter.check(source, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn sources_have_their_own_buckets() {
        let mut limiter = SourceLimiter::new(limit("1/m", 1));
        let t0 = Instant::now();
        assert!(limiter.check(ip("192.0.2.1"), t0));
        assert!(!limiter.check(ip("192.0.2.1"), t0));
        assert!(limiter.check(ip("192.0.2.2"), t0));
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let mut limiter = SourceLimiter::new(limit("1/m", 1));
        let t0 = Instant::now();
        assert!(limiter.check(ip("2001:db8:1:2::1"), t0));
        assert!(!limiter.check(ip("2001:db8:1:2:ffff:ffff:ffff:9"), t0));
        assert!(limiter.check(ip("2001:db8:1:3::1"), t0));
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn ipv4_mapped_sources_share_the_ipv4_bucket() {
        let mut limiter = SourceLimiter::new(limit("1/m", 1));
        let t0 = Instant::now();
        assert!(limiter.check(ip("192.0.2.1"), t0));
        assert!(!limiter.check(ip("::ffff:192.0.2.1"), t0));
    }

    #[test]
    fn the_table_stays_bounded_under_100000_distinct_sources() {
        let t0 = Instant::now();
        for max in [1, 1000, DEFAULT_MAX_SOURCES] {
            let mut limiter = SourceLimiter::with_max_sources(limit("1/m", 1), max);
            for i in 0..100_000u32 {
                let source = if i % 2 == 0 {
                    IpAddr::V4(Ipv4Addr::from_bits(i))
                } else {
                    IpAddr::V6(Ipv6Addr::from_bits(u128::from(i) << 64))
                };
                // Every new source starts with a full bucket.
                assert!(limiter.check(source, t0));
                assert!(limiter.len() <= max, "{} > {max}", limiter.len());
            }
            assert_eq!(limiter.len(), max);
        }
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen() {
        let mut limiter = SourceLimiter::with_max_sources(limit("1/m", 1), 2);
        let t0 = Instant::now();
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        assert!(limiter.check(a, t0));
        assert!(limiter.check(b, t0));
        assert!(
            !limiter.check(a, t0),
            "a is seen again, and is now the newest"
        );
        assert!(limiter.check(c, t0), "c evicts b, the least recently seen");
        assert!(!limiter.check(a, t0), "a kept its empty bucket");
        assert!(limiter.check(b, t0), "b was forgotten: a full bucket again");
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let mut limiter = SourceLimiter::new(limit("10/s", 2));
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(limiter.check(IpAddr::V4(Ipv4Addr::from_bits(i)), t0));
        }
        assert_eq!(limiter.len(), 100);
        // One second on, every bucket is full (each took one 100 ms token):
        // each check drops two, so the table drains to the one live source.
        let later = t0 + Duration::from_secs(1);
        let live = ip("198.51.100.1");
        for _ in 0..60 {
            limiter.check(live, later);
        }
        assert_eq!(limiter.len(), 1);
        assert!(!limiter.is_empty());
    }

    /// The textbook token bucket, for comparison: credit in nanoseconds of
    /// rate, capped at `burst` tokens' worth, a token costs one interval.
    struct Model {
        interval: u128,                           // nanoseconds per token
        capacity: u128,                           // burst × interval
        credit: HashMap<SourceKey, (u128, u128)>, // key → (credit, at time)
    }

    impl Model {
        fn check(&mut self, key: SourceKey, now: u128) -> bool {
            let (credit, at) = self
                .credit
                .get(&key)
                .copied()
                .unwrap_or((self.capacity, now));
            let credit = (credit + (now - at)).min(self.capacity);
            let allowed = credit >= self.interval;
            let left = if allowed {
                credit - self.interval
            } else {
                credit
            };
            self.credit.insert(key, (left, now));
            allowed
        }
    }

    fn any_cidr_v4() -> impl Strategy<Value = (u32, u8)> {
        (any::<u32>(), 0u8..=32)
    }

    proptest! {
        #[test]
        fn ipv4_blocks_hold_exactly_their_addresses(
            (base, prefix) in any_cidr_v4(),
            host in any::<u32>(),
            flip in 0u32..32,
        ) {
            let cidr = Cidr::new(IpAddr::V4(Ipv4Addr::from_bits(base)), prefix).expect("cidr");
            let mask = mask_v4(prefix);
            let inside = (base & mask) | (host & !mask);
            prop_assert!(cidr.contains(IpAddr::V4(Ipv4Addr::from_bits(inside))));
            prop_assert!(cidr.contains(IpAddr::V6(Ipv4Addr::from_bits(inside).to_ipv6_mapped())));
            if flip < u32::from(prefix) {
                let outside = inside ^ (1 << (31 - flip));
                prop_assert!(!cidr.contains(IpAddr::V4(Ipv4Addr::from_bits(outside))));
            }
            let text = cidr.to_string();
            prop_assert_eq!(text.parse::<Cidr>(), Ok(cidr));
        }

        #[test]
        fn ipv6_blocks_hold_exactly_their_addresses(
            base in any::<u128>(),
            prefix in 0u8..=128,
            host in any::<u128>(),
            flip in 0u32..128,
        ) {
            let cidr = Cidr::new(IpAddr::V6(Ipv6Addr::from_bits(base)), prefix).expect("cidr");
            let mask = mask_v6(prefix);
            let inside = (base & mask) | (host & !mask);
            prop_assert!(cidr.contains(IpAddr::V6(Ipv6Addr::from_bits(inside))));
            if flip < u32::from(prefix) {
                let outside = inside ^ (1 << (127 - flip));
                prop_assert!(!cidr.contains(IpAddr::V6(Ipv6Addr::from_bits(outside))));
            }
            prop_assert_eq!(cidr.to_string().parse::<Cidr>(), Ok(cidr));
        }

        #[test]
        fn the_limiter_is_a_token_bucket_per_source(
            count in 1u32..50,
            per_minute in any::<bool>(),
            burst in 1u32..8,
            steps in prop::collection::vec((0usize..6, 0u64..400), 1..200),
        ) {
            let rate = if per_minute { Rate::per_minute(n(count)) } else { Rate::per_second(n(count)) };
            let mut limiter = SourceLimiter::new(RateLimit::new(rate, Some(n(burst))));
            let interval = rate.interval().as_nanos();
            let mut model = Model { interval, capacity: interval * u128::from(burst), credit: HashMap::new() };
            // Six sources, two pairs of which share a key (IPv6 /64, mapped IPv4).
            let sources = ["192.0.2.1", "::ffff:192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"];
            let (t0, mut elapsed) = (Instant::now(), 0u64);
            for (source, advance_ms) in steps {
                elapsed += advance_ms;
                let now = t0 + Duration::from_millis(elapsed);
                let source = ip(sources[source]);
                let want = model.check(SourceKey::of(source), u128::from(elapsed) * 1_000_000);
                prop_assert_eq!(limiter.check(source, now), want, "at {} ms", elapsed);
                prop_assert!(limiter.len() <= 4);
            }
        }
    }
}
