//! placeholder
pub mod app;
pub mod config;
pub mod pipe;
pub mod pool;
pub mod protocol;
pub mod reactor;
pub mod relay;
pub mod ring;
pub mod sockio;
pub mod state;

pub use app::{EchoApp, RunningEcho};
pub use config::{Config, RelayStyle};
pub use relay::{Relay, RelayHandle, RunningRelay, Stats};
