//! The agent's `status` extension (`expose --metrics <ADDR>`): its
//! registrations and clients, for an operator, on the same endpoint as the
//! relay's (`GET /metrics`, `GET /status`, `GET /`), served on the agent's
//! own loop (its connections are entries, `Observer`).

use std::time::{Instant, SystemTime};

use mio::Interest;
use mio::net::{TcpListener, TcpStream};

use super::core::AgentCore;
use super::state::{AgentConn, DIALING, Ending, LINKS_DOWN, LINKS_UP, OBSERVERS, SERVING};
use crate::ops::http::Response;
use crate::ops::json::{JsonWriter, rfc3339_utc};
use crate::ops::prometheus::{Kind, ProcessMetrics, TextWriter};
use crate::ops::server::{self, DEADLINE, MAX_CONNS, Request, StatusConn};
use crate::reactor::{self, Accepted};
use crate::sockio::reset_on_close;
use crate::table::Id;

/// Counters of what happened since the agent started: they only grow.
pub(super) struct Metrics {
    pub(super) reconnects: u64,          // registrations lost and tried again
    pub(super) served: u64,              // clients whose connects completed
    pub(super) local_failures: u64,      // connects to the local service that failed
    pub(super) dial_in_failures: u64,    // dial-ins that could not be made
    pub(super) closed_bytes: (u64, u64), // bytes of closed pipes: to the service, and back
    pub(super) started: (Instant, SystemTime), // when the agent started
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconnects: 0,
            served: 0,
            local_failures: 0,
            dial_in_failures: 0,
            closed_bytes: (0, 0),
            started: (Instant::now(), SystemTime::now()),
        }
    }
}

impl Metrics {
    /// Adds the bytes a finished pipe moved: to the service, and back.
    pub(super) fn count_closed(&mut self, (to_service, to_client): (u64, u64)) {
        self.closed_bytes.0 += to_service;
        self.closed_bytes.1 += to_client;
    }
}

impl AgentCore {
    /// Takes every connection waiting on the status listener. Its queue is
    /// short (64) and a connection beyond `MAX_CONNS` is closed as soon as
    /// it is taken, so draining it is bounded work.
    pub(super) fn accept_observers(&mut self, now: Instant) {
        loop {
            let Some(listener) = self.status.as_ref() else {
                return;
            };
            match reactor::accept(listener) {
                Accepted::Conn(stream, _) => self.admit_observer(stream, now),
                Accepted::Skip => {}
                Accepted::Empty | Accepted::Exhausted(_) => return,
            }
        }
    }

    /// A status connection: served if fewer than `MAX_CONNS` are, under a
    /// deadline; otherwise closed at once.
    fn admit_observer(&mut self, mut stream: TcpStream, now: Instant) {
        if self.table.census().count(OBSERVERS) >= MAX_CONNS {
            return reset_on_close(&stream);
        }
        let inserted = self.table.insert(|id, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut stream, id.token(0), interest)?;
            Ok(AgentConn::Observer(StatusConn::new(stream)))
        });
        if let Ok(id) = inserted {
            self.table.arm(id, now + DEADLINE);
            self.serve_observer(id);
        }
    }

    /// Reads a status request and answers it; the connection closes once
    /// the answer is out.
    pub(super) fn serve_observer(&mut self, id: Id) {
        let Some(AgentConn::Observer(conn)) = self.table.get_mut(id) else {
            return;
        };
        let (method, path) = match conn.read() {
            Request::Pending => return,
            Request::Done => return self.table.close(id, Ending::Done),
            Request::Route { method, path } => (method, path),
        };
        let response = self.route(&path);
        if let Some(AgentConn::Observer(conn)) = self.table.get_mut(id)
            && let Request::Done = conn.answer(&response, method)
        {
            self.table.close(id, Ending::Done);
        }
    }

    fn route(&self, path: &str) -> Response {
        server::route(path, || self.prometheus(), || self.status_json())
    }

    /// Bytes moved to the local service and back: closed pipes' and the
    /// open ones' so far (counted when asked, so the hot path pays nothing).
    fn bytes(&self) -> (u64, u64) {
        let open = self.table.iter().filter_map(|(_, conn)| match conn {
            AgentConn::Piping(pipe) => Some(pipe.moved_each_way()),
            _ => None,
        });
        open.fold(self.metrics.closed_bytes, |(a, b), (x, y)| (a + x, b + y))
    }

    /// `/metrics`: the Prometheus text format 0.0.4.
    fn prometheus(&self) -> String {
        let mut w = TextWriter::new();
        self.prometheus_gauges(&mut w);
        self.prometheus_links(&mut w);
        self.prometheus_counters(&mut w);
        w.process(&ProcessMetrics::read());
        w.finish()
    }

    fn prometheus_gauges(&self, w: &mut TextWriter) {
        let census = self.table.census();
        w.gauges(&[
            (
                "tcp_relay_agent_registrations_up",
                "Registrations with a relay that are up.",
                census.count(LINKS_UP) as u64,
            ),
            (
                "tcp_relay_agent_registrations_down",
                "Registrations connecting or waiting to reconnect.",
                census.count(LINKS_DOWN) as u64,
            ),
            (
                "tcp_relay_agent_clients",
                "Clients being connected or served.",
                (census.count(DIALING) + census.count(SERVING)) as u64,
            ),
            (
                "tcp_relay_agent_dial_requests_queued",
                "Dial requests waiting for room under --max-clients.",
                self.queued.len() as u64,
            ),
        ]);
    }

    /// One sample per registration (service and relay): 1 when up, so an
    /// alert can name the link that is down.
    fn prometheus_links(&self, w: &mut TextWriter) {
        let name = "tcp_relay_agent_registration_up";
        let help = "Whether a service's registration with a relay is up, by service and relay.";
        w.family(name, help, Kind::Gauge);
        for (_, conn) in self.table.iter() {
            let (link, up) = match conn {
                AgentConn::Registered(link, _) => (link, 1u64),
                AgentConn::Reconnecting(link)
                | AgentConn::Connecting(link, _)
                | AgentConn::Registering(link, _) => (link, 0),
                _ => continue,
            };
            let service = self.config.services[link.service].name.as_str();
            w.sample(name, &[("service", service), ("relay", &link.relay)], up);
        }
    }

    fn prometheus_counters(&self, w: &mut TextWriter) {
        let m = &self.metrics;
        w.counters(&[
            (
                "tcp_relay_agent_reconnects_total",
                "Times a registration was lost and tried again.",
                m.reconnects,
            ),
            (
                "tcp_relay_agent_clients_served_total",
                "Clients whose connects completed.",
                m.served,
            ),
            (
                "tcp_relay_agent_local_connect_failures_total",
                "Connects to the local service that failed or timed out.",
                m.local_failures,
            ),
            (
                "tcp_relay_agent_dial_in_failures_total",
                "Dial-ins to the relay that could not be made.",
                m.dial_in_failures,
            ),
        ]);
        let (to_service, to_client) = self.bytes();
        let bytes = [("to_service", to_service), ("to_client", to_client)];
        let help = "Bytes piped, by direction.";
        w.by_label(
            "tcp_relay_agent_bytes_total",
            help,
            Kind::Counter,
            "direction",
            &bytes,
        );
    }

    /// `/status`: totals, and one object per registration.
    fn status_json(&self) -> String {
        let census = self.table.census();
        let (to_service, to_client) = self.bytes();
        let mut w = JsonWriter::new();
        w.begin_object();
        w.key("title").string("tcp-relay expose");
        w.key("version").string(env!("CARGO_PKG_VERSION"));
        w.key("uptime_secs")
            .uint(self.metrics.started.0.elapsed().as_secs());
        w.key("totals").begin_object();
        w.key("clients")
            .uint((census.count(DIALING) + census.count(SERVING)) as u64);
        w.key("queued").uint(self.queued.len() as u64);
        w.key("served").uint(self.metrics.served);
        w.key("bytes_in").uint(to_service);
        w.key("bytes_out").uint(to_client);
        w.key("reconnects").uint(self.metrics.reconnects);
        w.key("local_failures").uint(self.metrics.local_failures);
        w.end_object();
        w.key("registrations").begin_array();
        for (_, conn) in self.table.iter() {
            self.registration_json(&mut w, conn);
        }
        w.end_array();
        w.end_object();
        w.finish()
    }

    fn registration_json(&self, w: &mut JsonWriter, conn: &AgentConn) {
        let (link, state, port) = match conn {
            AgentConn::Reconnecting(link) => (link, "reconnecting", None),
            AgentConn::Connecting(link, _) => (link, "connecting", None),
            AgentConn::Registering(link, _) => (link, "registering", None),
            AgentConn::Registered(link, conn) => (link, "registered", conn.port()),
            _ => return,
        };
        w.begin_object();
        w.key("service")
            .string(&self.config.services[link.service].name);
        w.key("relay").string(&link.relay);
        w.key("state").string(state);
        match port {
            Some(port) => w.key("relayed_port").uint(u64::from(port)),
            None => w.key("relayed_port").null(),
        };
        w.key("since").string(&rfc3339_utc(link.since));
        w.end_object();
    }
}

/// The status endpoint's listener (`expose --metrics`).
pub(super) fn open_status(
    registry: &mio::Registry,
    addr: std::net::SocketAddr,
) -> std::io::Result<TcpListener> {
    let mut listener = crate::sockio::listen(addr, 64).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for --metrics: {e}"),
        )
    })?;
    registry.register(&mut listener, crate::reactor::STATUS, Interest::READABLE)?;
    Ok(listener)
}
