//! `--print-config`: the effective configuration written back as a config
//! file, from the very structs the relay or the agent would run with, so
//! that what it shows is what would run. A secret is never printed.

use std::fmt::Write;
use std::path::PathBuf;

use log::LevelFilter;
use tcp_relay::{AgentConfig, AllowList, Config, RateLimit};

use super::values::format_duration;

/// Where the secret came from: printed instead of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecretSource {
    None,
    Given,         // --secret, TCP_RELAY_SECRET or a file's `secret`
    File(PathBuf), // --secret-file or `secret_file`
    Credential,    // the systemd credential
}

/// What `expose` prints of a service beyond its [`tcp_relay::ServiceConfig`]:
/// the address as the user wrote it (the config holds it resolved), and
/// whether the user named it (a name made from the address is not printed).
#[derive(Debug, Clone)]
pub(crate) struct ServiceShown {
    pub local: String, // HOST:PORT as written
    pub named: bool,   // the name was given
}

/// The relay's configuration as a `serve` config file.
pub(crate) fn serve(config: &Config, secret: &SecretSource, level: LevelFilter) -> String {
    let mut out = Toml::new("serve");
    out.text("bind", config.bind);
    out.line("reg_port", config.reg_port);
    out.text("relay_style", config.relay_style);
    out.text("dial_in_timeout", format_duration(config.dial_in_timeout));
    out.secret(secret);
    match config.port_range {
        Some((min, max)) => out.text("port_range", format!("{min}-{max}")),
        None => out.unset("port_range", "any relayed port"),
    }
    out.line("max_apps", config.max_apps);
    out.line("max_waiting", config.max_waiting_per_app);
    out.line("max_connections", config.max_connections);
    out.line("backlog", config.backlog);
    out.allow(
        "accept_proxy_from",
        config.accept_proxy_from.as_ref(),
        "no source trusted",
    );
    match config.metrics {
        Some(addr) => out.text("metrics", addr),
        None => out.unset("metrics", "no status endpoint"),
    }
    out.line("max_line", config.max_line);
    out.text("register_timeout", format_duration(config.register_timeout));
    out.text(
        "half_close_timeout",
        format_duration(config.half_close_timeout),
    );
    out.text("grace", format_duration(config.grace));
    out.line("no_splice", !config.splice);
    out.allow(
        "allow_apps",
        config.allow_apps.as_ref(),
        "apps from anywhere",
    );
    out.allow(
        "allow_clients",
        config.allow_clients.as_ref(),
        "clients from anywhere",
    );
    out.rate(config.client_rate);
    out.level(level);
    out.0
}

/// The agent's configuration as an `expose` config file: top-level keys,
/// then one `[[service]]` table per service.
pub(crate) fn expose(
    config: &AgentConfig,
    shown: &[ServiceShown],
    secret: &SecretSource,
    level: LevelFilter,
) -> String {
    let mut out = Toml::new("expose");
    out.line("relays", array(config.relays.iter().map(quote)));
    out.secret(secret);
    out.line("no_reconnect", !config.reconnect);
    out.text("connect_timeout", format_duration(config.connect_timeout));
    match config.max_clients {
        Some(n) => out.line("max_clients", n),
        None => out.unset("max_clients", "sized from the descriptor limit"),
    }
    match config.metrics {
        Some(addr) => out.text("metrics", addr),
        None => out.unset("metrics", "no status endpoint"),
    }
    out.line("no_splice", !config.splice);
    out.level(level);
    for (service, shown) in config.services.iter().zip(shown) {
        out.0.push_str("\n[[service]]\n");
        if shown.named {
            out.text("name", &service.name);
        }
        out.text("local", &shown.local);
        match service.port {
            Some(port) => out.line("port", port),
            None => out.unset("port", "the relay picks"),
        }
        out.line("ready", service.ready);
        match service.proxy_protocol {
            Some(version) => out.text("proxy_protocol", version),
            None => out.unset("proxy_protocol", "no header"),
        }
        let allowed = service.allow_clients.as_ref();
        out.allow("allow_clients", allowed, "any client the relay admits");
        out.rate(service.client_rate);
    }
    out.0
}

/// A config file being written.
struct Toml(String);

impl Toml {
    fn new(command: &str) -> Toml {
        Toml(format!(
            "# tcp-relay {command}: the effective configuration (file, flags and defaults merged)\n"
        ))
    }

    /// `key = value`, the value already in TOML.
    fn line(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{key} = {value}");
    }

    /// `key = "text"`.
    fn text(&mut self, key: &str, text: impl std::fmt::Display) {
        self.line(key, quote(text));
    }

    /// A comment saying the key is not set and what that means.
    fn unset(&mut self, key: &str, meaning: &str) {
        let _ = writeln!(self.0, "# {key}: not set ({meaning})");
    }

    fn secret(&mut self, source: &SecretSource) {
        let _ = match source {
            SecretSource::None => writeln!(self.0, "# secret: none"),
            SecretSource::Given => writeln!(
                self.0,
                "# secret: set by --secret, TCP_RELAY_SECRET or the file's secret (not printed)"
            ),
            SecretSource::File(path) => {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                writeln!(self.0, "secret_file = {}", quote(path.display()))
            }
            SecretSource::Credential => writeln!(
                self.0,
                "# secret: the systemd credential tcp-relay-secret (not printed)"
            ),
        };
    }

    fn allow(&mut self, key: &str, list: Option<&AllowList>, meaning: &str) {
        match list {
            Some(list) => self.line(key, array(list.entries().iter().map(quote))),
            None => self.unset(key, meaning),
        }
    }

    fn rate(&mut self, limit: Option<RateLimit>) {
        match limit {
            Some(limit) => {
                self.text("client_rate", limit.rate);
                self.line("client_burst", limit.burst);
            }
            None => self.unset("client_rate", "no limit"),
        }
    }

    fn level(&mut self, level: LevelFilter) {
        self.text("log_level", level.as_str().to_ascii_lowercase());
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn quote(text: impl std::fmt::Display) -> String {
    let mut out = String::from('"');
    for c in text.to_string().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `["a", "b"]` from items already in TOML.
fn array(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_toml_reads_them() {
        for text in [
            "plain",
            "a \"quoted\" word",
            "back\\slash",
            "tab\there",
            "nul\0",
            "é",
        ] {
            let printed = format!("k = {}", quote(text));
            let file = super::super::file::parse(std::path::Path::new("t"), &printed)
                .expect("the printed string parses");
            let value = &file.settings[0].value;
            let super::super::file::Value::One(scalar) = value else {
                panic!("one value: {value:?}");
            };
            assert_eq!(scalar.kind, super::super::file::Kind::Str(text.into()));
        }
    }

    #[test]
    fn every_setting_of_the_defaults_is_printed() {
        let printed = serve(&Config::default(), &SecretSource::None, LevelFilter::Info);
        for key in [
            "bind = \"0.0.0.0\"",
            "reg_port = 8080",
            "dial_in_timeout = \"10s\"",
            "half_close_timeout = \"10m\"",
            "# secret: none",
            "# port_range: not set",
            "# allow_clients: not set",
            "# client_rate: not set",
            "log_level = \"info\"",
        ] {
            assert!(printed.contains(key), "{key} in:\n{printed}");
        }
    }
}
