//! Who may connect: `--allow-apps` (the registration and dial-in ports),
//! `--allow-clients` and `--client-rate` (relayed ports), and an app's own
//! `allow` and `rate` requests for its port, never looser than the relay's.
//!
//! Checked on accept, before a byte is read or an entry made: a refused
//! connection is reset at once (`SO_LINGER` 0, so neither side keeps a
//! `TIME_WAIT` and its descriptor is free when the check returns), counted
//! by reason, and logged once per episode, since a scanner or a flood
//! would otherwise write a line per connection.
//!
//! The rate limit is a token bucket per source in a bounded table
//! ([`SourceLimiter`]): a flood of distinct sources evicts the least
//! recently seen bucket instead of growing memory.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::core::RelayCore;
use super::status::{Listener, Refused};
use crate::access::{AllowList, RateLimit, SourceLimiter};
use crate::table::Id;

/// Refusals closer together than this belong to one episode, logged once.
const EPISODE_GAP: Duration = Duration::from_secs(10);

/// Sources an app's own rate limit tracks. Smaller than the relay's table
/// (16,384), since every app may have one: with the default 1,024 apps,
/// all flooded from distinct sources at once, they hold about 120 MB at
/// most (some 115 bytes a source), and nothing until sources appear.
const APP_MAX_SOURCES: usize = 1024;

/// The relay's own checks, and their log episodes.
#[derive(Default)]
pub(super) struct Access {
    clients: Option<SourceLimiter>, // --client-rate, over every relayed port
    episodes: [Episode; 4],         // by `Kind`
}

impl Access {
    /// The gate `--client-rate` asks for.
    pub(super) fn new(client_rate: Option<RateLimit>) -> Access {
        Access {
            clients: client_rate.map(SourceLimiter::new),
            episodes: Default::default(),
        }
    }

    /// Sources the relay's rate limit tracks now (for the status page).
    pub(super) fn rate_sources(&self) -> usize {
        self.clients.as_ref().map_or(0, SourceLimiter::len)
    }
}

/// What an app asked for its own port (the `allow` and `rate` extensions);
/// boxed in its app, since most apps ask for neither.
#[derive(Default)]
pub(super) struct AppAccess {
    pub(super) allow: Option<AllowList>, // only clients from these sources
    pub(super) limit: Option<(RateLimit, SourceLimiter)>, // its limit (never looser than the relay's) and buckets
}

impl AppAccess {
    /// Sources its rate limit tracks now.
    pub(super) fn rate_sources(&self) -> usize {
        self.limit.as_ref().map_or(0, |(_, limiter)| limiter.len())
    }
}

/// Why a connection was refused, for its log episode.
#[derive(Clone, Copy)]
enum Kind {
    App = 0,         // a registration or dial-in not in --allow-apps
    Client = 1,      // a client not in --allow-clients
    ClientOfApp = 2, // a client not in its app's own list
    Rate = 3,        // a client over a rate limit
}

/// A run of refusals of one kind: the first is logged, the rest counted
/// and summed up when the next episode begins.
#[derive(Default)]
struct Episode {
    last: Option<Instant>, // the latest refusal
    quiet: u64,            // refusals since the logged one
}

impl Episode {
    fn note(&mut self, now: Instant, message: impl FnOnce() -> String) {
        let new = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) > EPISODE_GAP);
        if new {
            let before = match self.quiet {
                0 => String::new(),
                n => format!(" ({n} more were refused in the previous episode)"),
            };
            log::warn!(
                "{}; further refusals are counted, not logged{before}",
                message()
            );
            self.quiet = 0;
        } else {
            self.quiet += 1;
        }
        self.last = Some(now);
    }
}

impl RelayCore {
    /// Whether an app may connect from `peer`, on the registration port or
    /// an app's dial-in port (`--allow-apps`). Counted when not.
    pub(super) fn app_may_connect(
        &mut self,
        listener: Listener,
        peer: SocketAddr,
        now: Instant,
    ) -> bool {
        let Some(allowed) = &self.config.allow_apps else {
            return true;
        };
        if allowed.allows(peer.ip()) {
            return true;
        }
        self.metrics.refused(listener, Refused::Allow);
        self.access.episodes[Kind::App as usize].note(now, || {
            format!("app connection from {peer} refused: not in --allow-apps")
        });
        false
    }

    /// Whether a client at `peer` (the address a trusted PROXY header named,
    /// if any) may connect to `app`'s port: on the relay's and the app's
    /// allow-lists, then within the relay's and the app's rate limits.
    /// Counted when not. A client refused by a list takes no token.
    pub(super) fn client_may_connect(&mut self, app: Id, peer: SocketAddr, now: Instant) -> bool {
        let refused = self.client_refusal(app, peer.ip(), now);
        let Some((reason, kind)) = refused else {
            return true;
        };
        self.metrics.refused(Listener::Relayed, reason);
        let port = self.app(app).map_or(0, |app| app.relayed_port);
        let why = match kind {
            Kind::Client => "not in --allow-clients",
            Kind::ClientOfApp => "not in the app's allow-list",
            _ => "over the per-source rate limit",
        };
        self.access.episodes[kind as usize].note(now, || {
            format!("client {peer} on port {port} refused: {why}")
        });
        false
    }

    /// The reason a client from `ip` is refused, if it is.
    fn client_refusal(&mut self, app: Id, ip: IpAddr, now: Instant) -> Option<(Refused, Kind)> {
        let listed = |list: &Option<AllowList>| list.as_ref().is_none_or(|l| l.allows(ip));
        if !listed(&self.config.allow_clients) {
            return Some((Refused::Allow, Kind::Client));
        }
        let app_allow = self
            .app(app)?
            .access
            .as_ref()
            .and_then(|a| a.allow.as_ref());
        if app_allow.is_some_and(|list| !list.allows(ip)) {
            return Some((Refused::Allow, Kind::ClientOfApp));
        }
        let within_relay = (self.access.clients.as_mut()).is_none_or(|l| l.check(ip, now));
        let within_app = within_relay
            && self.app_mut(app).is_some_and(|app| {
                let limit = app.access.as_mut().and_then(|a| a.limit.as_mut());
                limit.is_none_or(|(_, limiter)| limiter.check(ip, now))
            });
        (!within_app).then_some((Refused::Rate, Kind::Rate))
    }

    /// `allow <CIDR>[,...]`: only clients from these sources for this app's
    /// port, on top of `--allow-clients`; said back as it will apply.
    pub(super) fn answer_allow_request(&mut self, id: Id, list: AllowList) {
        let Some(app) = self.app_mut(id) else {
            return;
        };
        app.control.queue(&crate::protocol::allow_line(&list));
        log::debug!("app {}: clients only from {list}", app.control.peer);
        app.access.get_or_insert_default().allow = Some(list);
    }

    /// `rate <N>/s|<N>/m [<BURST>]`: a per-source limit for this app's
    /// port, made no looser than `--client-rate`; said back as it will apply
    /// (the stricter of the two in each respect).
    pub(super) fn answer_rate_request(&mut self, id: Id, asked: RateLimit) {
        let limit = match self.config.client_rate {
            Some(relay) => asked.stricter(relay),
            None => asked,
        };
        let Some(app) = self.app_mut(id) else {
            return;
        };
        app.control.queue(&crate::protocol::rate_line(limit));
        log::debug!(
            "app {}: clients limited to {limit} per source",
            app.control.peer
        );
        let limiter = SourceLimiter::with_max_sources(limit, APP_MAX_SOURCES);
        app.access.get_or_insert_default().limit = Some((limit, limiter));
    }
}
