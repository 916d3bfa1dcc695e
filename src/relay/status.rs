//! The `status` extension (`serve --metrics <ADDR>`): what the relay is
//! doing, for an operator. Counters kept as things happen ([`Metrics`]),
//! and an HTTP endpoint on the relay's own loop (its connections are
//! entries, `Observer`) that answers `GET /metrics` (Prometheus text),
//! `GET /status` (JSON) and `GET /` (a page that shows `/status` live).
//! With `--metrics` off, no socket is opened and the counters are a few
//! additions per event.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use mio::Interest;
use mio::net::TcpStream;

use super::core::RelayCore;
use super::state::{APPS, App, Ending, PIPES, RelayConn, SPARES, WAITING};
use crate::ops::http::Response;
use crate::ops::json::{JsonWriter, rfc3339_utc};
use crate::ops::prometheus::{Histogram, Kind, LATENCY_BUCKETS, ProcessMetrics, TextWriter};
use crate::ops::server::{self, DEADLINE, MAX_CONNS, Request, StatusConn};
use crate::reactor;
use crate::sockio::reset_on_close;
use crate::table::Id;

/// The status listener's token.
pub(super) const STATUS_TOKEN: mio::Token = super::core::STATUS_LISTENER;

/// The relay's listeners, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listener {
    Registration = 0,
    Relayed = 1,
    DialIn = 2,
}

const LISTENERS: [(&str, Listener); 3] = [
    ("registration", Listener::Registration),
    ("relayed", Listener::Relayed),
    ("dial_in", Listener::DialIn),
];

/// Why a connection was refused, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Limit = 0,       // --max-connections
    Apps = 1,        // --max-apps
    Waiting = 2,     // --max-waiting, or the app's outbox is full
    Auth = 3,        // a wrong or missing answer to the challenge
    Token = 4,       // a wrong, used or missing dial-in token
    Address = 5,     // a dial-in from another address than its app's
    ProxyHeader = 6, // a trusted client without a valid PROXY header
    Allow = 7,       // not on an allow-list
    Rate = 8,        // over a per-source rate
}

const REASONS: [(&str, Refused); 9] = [
    ("limit", Refused::Limit),
    ("apps", Refused::Apps),
    ("waiting", Refused::Waiting),
    ("auth", Refused::Auth),
    ("token", Refused::Token),
    ("address", Refused::Address),
    ("proxy_header", Refused::ProxyHeader),
    ("allow_list", Refused::Allow),
    ("rate", Refused::Rate),
];

/// Counters of what happened, since the relay started: they only grow.
pub(super) struct Metrics {
    accepted: [u64; 3],                        // connections accepted, by listener
    refused: [[u64; 9]; 3],                    // connections refused, by listener and reason
    pub(super) to_apps: u64,                   // bytes relayed from clients to apps
    pub(super) to_clients: u64,                // bytes relayed from apps to clients
    pub(super) dial_in_timeouts: u64,          // clients closed without a dial-in
    pub(super) auth_failures: u64,             // apps that failed the challenge
    pub(super) descriptor_exhaustions: u64, // episodes of accepting failing for want of descriptors
    pub(super) pairing: Histogram,          // seconds from a client's arrival to its pairing
    pub(super) started: (Instant, SystemTime), // when the relay started
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            accepted: [0; 3],
            refused: [[0; 9]; 3],
            to_apps: 0,
            to_clients: 0,
            dial_in_timeouts: 0,
            auth_failures: 0,
            descriptor_exhaustions: 0,
            pairing: Histogram::new(LATENCY_BUCKETS),
            started: (Instant::now(), SystemTime::now()),
        }
    }
}

impl Metrics {
    /// A connection was accepted on `listener`.
    pub(super) fn accepted(&mut self, listener: Listener) {
        self.accepted[listener as usize] += 1;
    }

    /// A connection on `listener` was refused for `reason`.
    pub(super) fn refused(&mut self, listener: Listener, reason: Refused) {
        self.refused[listener as usize][reason as usize] += 1;
    }

    /// Connections refused, all listeners and reasons together.
    /// Connections refused on `listener` for `reason` so far.
    #[cfg(test)]
    pub(super) fn refused_count(&self, listener: Listener, reason: Refused) -> u64 {
        self.refused[listener as usize][reason as usize]
    }

    fn refused_total(&self) -> u64 {
        self.refused.iter().flatten().sum()
    }
}

impl RelayCore {
    /// A connection on the status port: served if fewer than `MAX_CONNS`
    /// are, under a deadline; otherwise closed at once.
    pub(super) fn admit_observer(&mut self, mut stream: TcpStream, now: Instant) {
        if self.table.census().count(super::state::OBSERVERS) >= MAX_CONNS {
            return reset_on_close(&stream);
        }
        let inserted = self.table.insert(|id, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut stream, id.token(0), interest)?;
            Ok(RelayConn::Observer(StatusConn::new(stream)))
        });
        if let Ok(id) = inserted {
            self.table.arm(id, now + DEADLINE);
            self.serve_observer(id);
        }
    }

    /// Reads a status request and answers it; the connection closes once
    /// the answer is out.
    pub(super) fn serve_observer(&mut self, id: Id) {
        let Some(RelayConn::Observer(conn)) = self.table.get_mut(id) else {
            return;
        };
        let (method, path) = match conn.read() {
            Request::Pending => return,
            Request::Done => return self.table.close(id, Ending::Done),
            Request::Route { method, path } => (method, path),
        };
        let response = self.route(&path);
        if let Some(RelayConn::Observer(conn)) = self.table.get_mut(id)
            && let Request::Done = conn.answer(&response, method)
        {
            self.table.close(id, Ending::Done);
        }
    }

    /// A status connection closed.
    pub(super) fn retire_observer(&mut self, mut conn: StatusConn) {
        reactor::forget(self.table.registry(), &mut conn.stream);
    }

    /// The answer for `path`.
    fn route(&self, path: &str) -> Response {
        server::route(path, || self.prometheus(), || self.status_json())
    }

    /// `/metrics`: the Prometheus text format 0.0.4.
    fn prometheus(&self) -> String {
        let mut w = TextWriter::new();
        self.prometheus_gauges(&mut w);
        self.prometheus_counters(&mut w);
        w.histogram(
            "tcp_relay_pairing_seconds",
            "Time from a client's arrival to its pairing with a dial-in.",
            &self.metrics.pairing,
        );
        w.process(&ProcessMetrics::read());
        w.finish()
    }

    fn prometheus_gauges(&self, w: &mut TextWriter) {
        let census = self.table.census();
        w.gauge(
            "tcp_relay_apps",
            "Apps registered.",
            census.count(APPS) as u64,
        );
        w.gauge(
            "tcp_relay_clients_waiting",
            "Clients waiting for a dial-in.",
            census.count(WAITING) as u64,
        );
        w.gauge(
            "tcp_relay_pipes",
            "Clients piped to their dial-ins.",
            census.count(PIPES) as u64,
        );
        w.gauge(
            "tcp_relay_ready_dial_ins",
            "Dial-ins kept ready (the ready extension).",
            census.count(SPARES) as u64,
        );
        w.gauge(
            "tcp_relay_buffers_lent",
            "Buffers lent to pipes with bytes in flight.",
            self.pool.lent() as u64,
        );
        w.gauge(
            "tcp_relay_rate_limited_sources",
            "Source addresses the per-source rate limits track (bounded).",
            self.rate_sources() as u64,
        );
    }

    /// Sources tracked by the relay's rate limit and every app's.
    fn rate_sources(&self) -> usize {
        let apps = self.table.iter().filter_map(|(_, conn)| conn.app());
        self.access.rate_sources()
            + apps
                .filter_map(|app| app.access.as_ref())
                .map(|a| a.rate_sources())
                .sum::<usize>()
    }

    fn prometheus_counters(&self, w: &mut TextWriter) {
        let m = &self.metrics;
        let bytes = [("to_app", m.to_apps), ("to_client", m.to_clients)];
        let help = "Bytes relayed, by direction.";
        w.by_label(
            "tcp_relay_bytes_total",
            help,
            Kind::Counter,
            "direction",
            &bytes,
        );
        let accepted = LISTENERS.map(|(name, listener)| (name, m.accepted[listener as usize]));
        let help = "Connections accepted, by listener.";
        let name = "tcp_relay_connections_accepted_total";
        w.by_label(name, help, Kind::Counter, "listener", &accepted);
        self.prometheus_refusals(w);
        w.counters(&[
            (
                "tcp_relay_dial_in_timeouts_total",
                "Clients closed because no dial-in came in time.",
                m.dial_in_timeouts,
            ),
            (
                "tcp_relay_auth_failures_total",
                "Apps that failed (or never answered) the challenge.",
                m.auth_failures,
            ),
            (
                "tcp_relay_descriptor_exhaustions_total",
                "Episodes of accepting failing for want of descriptors.",
                m.descriptor_exhaustions,
            ),
        ]);
    }

    /// Refusals, by listener and reason (every pair, zeros included, so a
    /// rate over them needs no `absent()`).
    fn prometheus_refusals(&self, w: &mut TextWriter) {
        let name = "tcp_relay_connections_refused_total";
        let help = "Connections refused, by listener and reason.";
        w.family(name, help, Kind::Counter);
        for (listener_name, listener) in LISTENERS {
            for (reason, code) in REASONS {
                let count = self.metrics.refused[listener as usize][code as usize];
                let labels = [("listener", listener_name), ("reason", reason)];
                w.sample(name, &labels, count);
            }
        }
    }

    /// `/status`: the totals and one object per app, as JSON (the shape
    /// the page renders, see `ops::page`).
    fn status_json(&self) -> String {
        let census = self.table.census();
        let mut w = JsonWriter::new();
        w.begin_object();
        w.key("title").string("tcp-relay");
        w.key("version").string(env!("CARGO_PKG_VERSION"));
        w.key("uptime_secs")
            .uint(self.metrics.started.0.elapsed().as_secs());
        w.key("totals").begin_object();
        w.key("apps").uint(census.count(APPS) as u64);
        w.key("waiting").uint(census.count(WAITING) as u64);
        w.key("pipes").uint(census.count(PIPES) as u64);
        w.key("ready").uint(census.count(SPARES) as u64);
        w.key("bytes_in").uint(self.metrics.to_apps);
        w.key("bytes_out").uint(self.metrics.to_clients);
        w.key("refused").uint(self.metrics.refused_total());
        w.end_object();
        w.key("apps").begin_array();
        for (_, conn) in self.table.iter() {
            if let Some(app) = conn.app() {
                self.app_json(&mut w, app);
            }
        }
        w.end_array();
        w.end_object();
        w.finish()
    }

    fn app_json(&self, w: &mut JsonWriter, app: &App) {
        let extensions = extensions(app, self.config.secret.is_some());
        w.begin_object();
        w.key("addr").string(&app.control.peer.to_string());
        w.key("relayed_port").uint(u64::from(app.relayed_port));
        w.key("extensions")
            .strings(extensions.iter().map(String::as_str));
        w.key("waiting").uint(app.waiting.len() as u64);
        w.key("pipes").uint(app.pipes as u64);
        w.key("bytes_in").uint(app.bytes.0);
        w.key("bytes_out").uint(app.bytes.1);
        w.key("connected_since").string(&rfc3339_utc(app.since));
        w.end_object();
    }

    /// Where the status endpoint listens, if it does.
    pub(super) fn status_addr(&self) -> Option<SocketAddr> {
        self.status.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// The extensions an app uses, as the status page lists them.
fn extensions(app: &App, secret: bool) -> Vec<String> {
    let mut used = Vec::new();
    if secret {
        used.push("secret".to_owned());
    }
    if app.ready.wanted > 0 {
        used.push(format!("ready {}", app.ready.wanted));
    }
    if let Some(version) = app.proxy {
        used.push(format!("proxy {version}"));
    }
    let access = app.access.as_deref();
    if let Some(list) = access.and_then(|a| a.allow.as_ref()) {
        used.push(format!("allow {list}"));
    }
    if let Some((limit, _)) = access.and_then(|a| a.limit.as_ref()) {
        used.push(format!("rate {limit}"));
    }
    used
}
