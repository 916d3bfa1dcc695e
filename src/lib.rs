//! # tcp-relay
//!
//! A TCP relay that never initiates a connection. An **app** behind NAT
//! connects out to the relay's registration port; the relay opens a public
//! **relayed port** for it. Each **client** that connects there is announced
//! to the app over its control connection, the app **dials in** a fresh
//! connection, and the relay pipes client and dial-in both ways, byte-exact.
//! The control protocol is wire-compatible with the original Go relay.
//!
//! The public API is small:
//!
//! * [`Relay`] (with [`Config`]): bind, then [`run`](Relay::run) on this
//!   thread or [`spawn`](Relay::spawn) on one of its own; a [`RelayHandle`]
//!   stops it and reads its [`Stats`].
//! * [`Agent`] (with [`AgentConfig`]): the app side that `tcp-relay expose`
//!   runs: registers, and pipes every client to a local service
//!   ([`Service::Forward`]) or echoes it ([`Service::Echo`], [`EchoApp`]).
//! * [`RelayedApp`]: a blocking, `TcpListener`-like API for custom apps:
//!   each client is an ordinary [`std::net::TcpStream`].
//!
//! ```no_run
//! use tcp_relay::{Config, Relay};
//! # fn main() -> std::io::Result<()> {
//! let relay = Relay::bind(Config { reg_port: 0, ..Config::default() })?;
//! println!("apps register on {}", relay.reg_addr());
//! let running = relay.spawn()?; // or relay.run() on this thread
//! println!("{:?}", running.stats());
//! # Ok(()) }
//! ```
//!
//! Everything else is the machinery below, private to the crate; how it
//! works is the rest of this page.
//!
#![doc = include_str!("../ARCHITECTURE.md")]
#![warn(missing_docs)]

// The library's own machinery, private: the public API is the facade
// re-exported below. With the `fuzzing` feature (the fuzz targets in
// `fuzz/` enable it) the pure parts they exercise are public, hidden from
// the docs.
pub(crate) mod access;
pub(crate) mod app;
pub(crate) mod buffer;
pub(crate) mod config;
pub(crate) mod flush;
pub(crate) mod ops;
pub(crate) mod pipe;
pub(crate) mod pool;
pub(crate) mod reactor;
pub(crate) mod relay;
pub(crate) mod relayed;
pub(crate) mod sockio;
pub(crate) mod table;

#[cfg(not(feature = "fuzzing"))]
pub(crate) mod auth;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod client;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod protocol;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod proxy_protocol;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod ring;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod auth;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod client;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod protocol;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod proxy_protocol;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod ring;

#[cfg(test)]
mod properties;

pub use access::{AllowError, AllowList, Cidr, Rate, RateLimit};
pub use app::{
    Agent, AgentConfig, AgentError, EchoApp, Registered, RunningAgent, RunningEcho, Service,
    ServiceConfig,
};
pub use config::{Config, RelayStyle, Secret};
pub use proxy_protocol::ProxyVersion;
pub use relay::{Relay, RelayHandle, RunningRelay, Stats};
pub use relayed::{Incoming, RegisterOptions, RelayedApp, RelayedStream};
