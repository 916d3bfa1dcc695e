//! Operational pieces around the relay: systemd notification, secrets from
//! files, and the text of a small status endpoint (Prometheus metrics, JSON,
//! one HTML page), each pure or self-contained so the reactor can serve it.
//!
//! * [`notify`]: `READY=1`, `STOPPING=1`, `WATCHDOG=1` and `STATUS=` to
//!   systemd over `$NOTIFY_SOCKET`; nothing at all when it is unset.
//! * [`secret`]: the shared secret from `--secret-file` or from a systemd
//!   credential, so it appears in neither argv nor the environment.
//! * [`prometheus`]: a writer for the Prometheus text format 0.0.4, a
//!   fixed-bucket histogram, and the standard `process_*` metrics.
//! * [`http`]: a bounded HTTP/1.1 request-head parser and response builder,
//!   enough for a read-only status endpoint.
//! * [`json`]: JSON string escaping, a tiny writer, and RFC 3339 timestamps.
//! * [`page`]: one self-contained HTML page that polls `status` and renders it.
//! * [`server`]: a status endpoint connection: one bounded request, one answer.

pub mod http;
pub mod json;
pub mod notify;
pub mod page;
pub mod prometheus;
pub mod secret;
pub mod server;

#[cfg(test)]
pub(crate) mod testdir;
