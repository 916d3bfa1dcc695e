//! The command line and its config file, merged. clap parses argv alone
//! first; every file key not given there becomes the flag it names
//! (checked on its own by that flag's parser, so that the error names the
//! key and line); then argv and those flags are parsed again, together,
//! so that clap does every conversion and every default. `[[service]]`
//! tables become services here.
//!
//! Precedence: the command line (and `TCP_RELAY_SECRET`) over the file
//! over the defaults; a setting with several keys (`secret` and
//! `secret_file`, `local` and `[[service]]`) is hidden in the file as a
//! whole when the command line gives any of them.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::builder::Resettable;
use clap::error::{ContextKind, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches};
use std::num::NonZeroU32;

use tcp_relay::{AllowList, Rate};

use super::args::{Cli, Command};
use super::file::{self, ConfigFile, Setting, Table, Value, at};
use super::keys::{self, SERVICE, Token};
use super::values::{LocalSpec, ProxySetting, check_name, parse_local};

/// The keys of a `[[service]]` table.
pub(crate) const SERVICE_KEYS: [&str; 8] = [
    "name",
    "local",
    "port",
    "ready",
    "proxy_protocol",
    "allow_clients",
    "client_rate",
    "client_burst",
];

/// The command line, with its config file merged in.
pub(crate) struct Loaded {
    pub cli: Cli,              // what to run
    pub warnings: Vec<String>, // to log once logging is set up
}

/// Why the command line cannot be used.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// clap's own: help, the version, a bad flag; clap prints it and exits.
    Usage(clap::Error),
    /// One line about the config file.
    File(String),
}

/// Parses `argv`, and the config file its `--config` names.
pub(crate) fn load(argv: Vec<OsString>) -> Result<Loaded, LoadError> {
    // A flag another requires (client_burst needs client_rate) may be in
    // the file: requirements wait for the merged parse.
    let loose = |arg: Arg| arg.requires(Resettable::Reset);
    let matches = Cli::command()
        .mut_args(loose)
        .mut_subcommands(|s| s.mut_args(loose))
        .try_get_matches_from(&argv)
        .map_err(LoadError::Usage)?;
    let with_file = matches.subcommand().and_then(|(sub, sub_matches)| {
        let path = sub_matches.get_one::<PathBuf>("config")?;
        Some((sub, sub_matches, path))
    });
    let (plan, path) = match with_file {
        Some((sub, given, path)) => {
            let file = file::read(path).map_err(LoadError::File)?;
            (Merge::new(sub, given, &file).plan()?, path.clone())
        }
        None => (Plan::default(), PathBuf::new()),
    };
    let mut all = argv.clone();
    all.extend(plan.tokens.iter().map(|token| token.text.clone()));
    let merged = Cli::command().try_get_matches_from(&all).map_err(|e| {
        match blame(&argv, &plan.tokens, &e, &path) {
            Some(message) => LoadError::File(message),
            None => LoadError::Usage(e),
        }
    })?;
    finish(&merged, plan.services, plan.warnings)
}

/// The parsed command line, the file's services added to `expose`.
fn finish(
    matches: &ArgMatches,
    services: Option<Vec<LocalSpec>>,
    warnings: Vec<String>,
) -> Result<Loaded, LoadError> {
    let mut cli = Cli::from_arg_matches(matches).map_err(LoadError::Usage)?;
    if let (Command::Expose(args), Some(services)) = (&mut cli.command, services) {
        args.local.extend(services);
    }
    Ok(Loaded { cli, warnings })
}

/// What the file adds to the command line.
#[derive(Debug, Default)]
struct Plan {
    tokens: Vec<Token>, // flags for the keys not given on the command line
    services: Option<Vec<LocalSpec>>, // from [[service]] tables, unless --local replaced them
    warnings: Vec<String>,
}

/// One merge of a file into a command line.
struct Merge<'a> {
    sub: &'a str,          // the command: serve, expose, echo
    check: clap::Command,  // the command line, each flag standing alone
    args: Vec<Arg>,        // the command's flags, global ones too
    given: &'a ArgMatches, // the command's matches from argv alone
    file: &'a ConfigFile,
}

impl<'a> Merge<'a> {
    fn new(sub: &'a str, given: &'a ArgMatches, file: &'a ConfigFile) -> Merge<'a> {
        let command = Cli::command();
        let mut args: Vec<Arg> = command
            .find_subcommand(sub)
            .map(|s| s.get_arguments().cloned().collect())
            .unwrap_or_default();
        args.extend(
            command
                .get_arguments()
                .filter(|a| a.is_global_set())
                .cloned(),
        );
        // Each file value is checked alone, so nothing about the other
        // flags may fail it: no environment, no requires, no conflicts
        // (the merged parse checks those).
        let alone = |arg: Arg| {
            arg.env(Resettable::Reset)
                .requires(Resettable::Reset)
                .conflicts_with(Resettable::Reset)
        };
        let check = command
            .mut_args(alone)
            .mut_subcommands(|s| s.mut_args(alone));
        Merge {
            sub,
            check,
            args,
            given,
            file,
        }
    }

    fn arg_refs(&self) -> Vec<&Arg> {
        self.args.iter().collect()
    }

    fn at(&self, line: usize, message: impl std::fmt::Display) -> String {
        at(&self.file.path, line, message)
    }

    /// Every setting of the file, checked, as flags and services.
    fn plan(&self) -> Result<Plan, LoadError> {
        let mut plan = Plan::default();
        let known = keys::known_keys(&self.arg_refs(), self.sub == "expose");
        for (i, setting) in self.file.settings.iter().enumerate() {
            if !known.contains(&setting.key) {
                let message = keys::unknown_key(&setting.key, &known);
                return Err(LoadError::File(self.at(setting.line, message)));
            }
            self.once(&self.file.settings[..i], setting)?;
            if setting.key == SERVICE {
                plan.services = Some(self.services(setting)?);
                continue;
            }
            let tokens = self.checked_tokens(setting)?;
            if !self.hidden(&setting.key) {
                plan.tokens.extend(tokens);
            }
        }
        self.adjust_services(&mut plan)?;
        plan.warnings.extend(self.secret_warning());
        Ok(plan)
    }

    /// The file's services as the command line leaves them: replaced by
    /// `--local`; their own settings given way to the flags the command
    /// line gives (`--client-rate` takes the table's burst with its rate).
    fn adjust_services(&self, plan: &mut Plan) -> Result<(), LoadError> {
        if self.hidden("local") {
            plan.services = None;
        }
        let (port, ready, proxy) = (
            self.hidden("port"),
            self.hidden("ready"),
            self.hidden("proxy_protocol"),
        );
        let (allow, rate) = (self.hidden("allow_clients"), self.hidden("client_rate"));
        let burst = rate || self.hidden("client_burst");
        for spec in plan.services.iter_mut().flatten() {
            spec.port = spec.port.filter(|_| !port);
            spec.ready = spec.ready.filter(|_| !ready);
            spec.proxy_protocol = spec.proxy_protocol.filter(|_| !proxy);
            spec.allow_clients = spec.allow_clients.take().filter(|_| !allow);
            spec.client_rate = spec.client_rate.filter(|_| !rate);
            spec.client_burst = spec.client_burst.filter(|_| !burst);
        }
        self.port_for_one(plan)
    }

    /// Refuses the file's top-level `port` with several services, as
    /// `--port` is refused with several `--local`.
    fn port_for_one(&self, plan: &Plan) -> Result<(), LoadError> {
        let port = self.file.settings.iter().find(|s| s.key == "port");
        let Some(port) = port.filter(|_| !self.hidden("port")) else {
            return Ok(());
        };
        let services = match &plan.services {
            _ if self.hidden("local") => self
                .given
                .get_many::<LocalSpec>("local")
                .map_or(0, |v| v.len()),
            Some(services) => services.len(),
            None => plan.tokens.iter().filter(|t| t.key == "local").count(),
        };
        match services > 1 {
            true => Err(LoadError::File(self.at(
                port.line,
                "port: is for one service; with several, give each [[service]] its own port",
            ))),
            false => Ok(()),
        }
    }

    /// A file that holds the secret itself should be as private as a
    /// secret file: said once logging is up, as for `--secret-file`.
    fn secret_warning(&self) -> Option<String> {
        self.file.settings.iter().find(|s| s.key == "secret")?;
        let mode = std::fs::metadata(&self.file.path)
            .ok()?
            .permissions()
            .mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "{} holds the secret and group or others may read it (mode {:03o}): \
                 chmod 600 it, or keep the secret in a secret_file",
                self.file.path.display(),
                mode & 0o777
            )
        })
    }

    /// Refuses a second key for one setting (`relay` and `relays`).
    fn once(&self, before: &[Setting], setting: &Setting) -> Result<(), LoadError> {
        let group = keys::one_setting(&setting.key);
        match before
            .iter()
            .find(|other| group.contains(&other.key.as_str()))
        {
            Some(other) => Err(LoadError::File(self.at(
                setting.line,
                format!(
                    "{}: {} (line {}) sets it already; give one of them",
                    setting.key, other.key, other.line
                ),
            ))),
            None => Ok(()),
        }
    }

    /// Whether the command line gives this setting, hiding the file's.
    fn hidden(&self, key: &str) -> bool {
        let args = self.arg_refs();
        keys::one_setting(key).iter().any(|key| {
            keys::flag(&args, key).is_some_and(|arg| {
                matches!(
                    self.given.value_source(arg.get_id().as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
        })
    }

    /// A setting's flags, each checked by the flag's own parser.
    fn checked_tokens(&self, setting: &Setting) -> Result<Vec<Token>, LoadError> {
        let args = self.arg_refs();
        let arg = keys::flag(&args, &setting.key).ok_or_else(|| {
            LoadError::File(self.at(setting.line, format!("no flag for {}", setting.key)))
        })?;
        let tokens = keys::tokens(arg, setting, &self.file.path).map_err(LoadError::File)?;
        for token in &tokens {
            self.parse_alone(token)?;
        }
        Ok(tokens)
    }

    /// The command's matches for one flag alone.
    fn parse_alone(&self, token: &Token) -> Result<ArgMatches, LoadError> {
        let argv = [OsStr::new("tcp-relay"), OsStr::new(self.sub), &token.text];
        let matches = self.check.clone().try_get_matches_from(argv);
        let sub = matches.map(|m| m.subcommand_matches(self.sub).cloned());
        match sub {
            Ok(Some(matches)) => Ok(matches),
            Ok(None) => Err(LoadError::File(self.at(token.line, "no such command"))),
            Err(e) => {
                let message = format!("{}: {}", token.key, clap_message(&e));
                Err(LoadError::File(self.at(token.line, message)))
            }
        }
    }

    /// The `[[service]]` tables as services.
    fn services(&self, setting: &Setting) -> Result<Vec<LocalSpec>, LoadError> {
        let Value::Tables(tables) = &setting.value else {
            let found = match &setting.value {
                Value::One(scalar) => scalar.kind.describe(),
                _ => "an array".into(),
            };
            let message = format!("{SERVICE}: expected [[{SERVICE}]] tables, found {found}");
            return Err(LoadError::File(self.at(setting.line, message)));
        };
        let mut specs: Vec<LocalSpec> = Vec::new();
        for table in tables {
            let spec = self.service(table)?;
            if let Some(name) = &spec.name
                && specs.iter().any(|other| other.name.as_ref() == Some(name))
            {
                let message = format!("[[{SERVICE}]] named {name:?} twice");
                return Err(LoadError::File(self.at(table.line, message)));
            }
            specs.push(spec);
        }
        Ok(specs)
    }

    /// One `[[service]]` table: `local`, and `name`, `port`, `ready`,
    /// `proxy_protocol`, `allow_clients`, `client_rate`, `client_burst`,
    /// each as its flag takes it.
    fn service(&self, table: &Table) -> Result<LocalSpec, LoadError> {
        let mut spec = LocalSpec::default();
        for setting in &table.settings {
            match setting.key.as_str() {
                "name" => spec.name = Some(self.service_name(setting)?),
                "local" => spec.local = self.service_local(setting)?,
                "port" => spec.port = self.flag_value::<u16>(setting)?,
                "ready" => spec.ready = self.flag_value::<u16>(setting)?,
                "proxy_protocol" => {
                    spec.proxy_protocol = self.flag_value::<ProxySetting>(setting)?
                }
                "allow_clients" => spec.allow_clients = self.flag_value::<AllowList>(setting)?,
                "client_rate" => spec.client_rate = self.flag_value::<Rate>(setting)?,
                "client_burst" => spec.client_burst = self.flag_value::<NonZeroU32>(setting)?,
                _ => return Err(LoadError::File(self.unknown_service_key(setting))),
            }
        }
        if spec.local.is_empty() {
            let message = format!("[[{SERVICE}]] without local (the HOST:PORT to publish)");
            return Err(LoadError::File(self.at(table.line, message)));
        }
        Ok(spec)
    }

    fn unknown_service_key(&self, setting: &Setting) -> String {
        let key = &setting.key;
        let message = if keys::known_keys(&self.arg_refs(), true).contains(key) {
            format!(
                "{key:?} is not a [[{SERVICE}]] key (top-level keys go before the first [[{SERVICE}]])"
            )
        } else {
            let known = SERVICE_KEYS.map(String::from);
            format!("{} in [[{SERVICE}]]", keys::unknown_key(key, &known))
        };
        self.at(setting.line, message)
    }

    /// A service setting that is also a flag of `expose`, parsed by it.
    fn flag_value<T: Clone + Send + Sync + 'static>(
        &self,
        setting: &Setting,
    ) -> Result<Option<T>, LoadError> {
        let tokens = self.checked_tokens(setting)?;
        let Some(token) = tokens.first() else {
            return Ok(None);
        };
        let matches = self.parse_alone(token)?;
        Ok(matches.get_one::<T>(&setting.key).cloned())
    }

    fn service_name(&self, setting: &Setting) -> Result<String, LoadError> {
        let name = self.string(setting)?;
        check_name(&name)
            .map(|()| name)
            .map_err(|e| LoadError::File(self.at(setting.line, format!("name: {e}"))))
    }

    /// A service's `local`: HOST:PORT alone, its name and port being keys
    /// of their own.
    fn service_local(&self, setting: &Setting) -> Result<String, LoadError> {
        let local = self.string(setting)?;
        let spec = parse_local(&local)
            .map_err(|e| LoadError::File(self.at(setting.line, format!("local: {e}"))))?;
        if spec.name.is_some() || spec.port.is_some() {
            let message = "local: HOST:PORT only; name and port are keys of their own";
            return Err(LoadError::File(self.at(setting.line, message)));
        }
        Ok(local)
    }

    /// A setting that must be one string.
    fn string(&self, setting: &Setting) -> Result<String, LoadError> {
        match &setting.value {
            Value::One(file::Scalar {
                kind: file::Kind::Str(text),
                ..
            }) => Ok(text.clone()),
            Value::One(scalar) => Err(self.found(setting, &scalar.kind.describe())),
            Value::List(_) => Err(self.found(setting, "an array")),
            Value::Tables(_) => Err(self.found(setting, "tables")),
        }
    }

    fn found(&self, setting: &Setting, found: &str) -> LoadError {
        let message = format!("{}: expected a string, found {found}", setting.key);
        LoadError::File(self.at(setting.line, message))
    }
}

/// The part of a clap error that a file's line needs: what was wrong with
/// the value, without the flag's name (the key names it).
fn clap_message(error: &clap::Error) -> String {
    let value = error
        .get(ContextKind::InvalidValue)
        .map(ToString::to_string);
    let source = std::error::Error::source(error).map(ToString::to_string);
    match (error.kind(), value, source) {
        (ErrorKind::ValueValidation, Some(value), Some(source)) => {
            format!("invalid value {value:?}: {source}")
        }
        (ErrorKind::MissingRequiredArgument, ..) => {
            let missing = error
                .get(ContextKind::InvalidArg)
                .map(ToString::to_string)
                .unwrap_or_default();
            format!("needs {} as well", flags_as_keys(&missing))
        }
        _ => {
            let rendered = error.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_owned()
        }
    }
}

/// `--client-rate <N/s|N/m>` as the key `client_rate`.
fn flags_as_keys(flags: &str) -> String {
    flags
        .split(", ")
        .filter_map(|flag| flag.split_whitespace().next())
        .map(|flag| flag.trim_start_matches('-').replace('-', "_"))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The complaint about a merged parse that failed on a relation between
/// flags (`client_burst` needs `client_rate`): it names the file's key
/// without which the rest parses. `None` when no key of the file is to
/// blame: the command line is, and clap says so in its own words.
fn blame(argv: &[OsString], tokens: &[Token], error: &clap::Error, path: &Path) -> Option<String> {
    let parses_without = |skip: usize| {
        let mut all = argv.to_vec();
        let others = tokens.iter().enumerate().filter(|(i, _)| *i != skip);
        all.extend(others.map(|(_, token)| token.text.clone()));
        Cli::command().try_get_matches_from(all).is_ok()
    };
    let token = &tokens[(0..tokens.len()).find(|&i| parses_without(i))?];
    let message = format!("{}: {}", token.key, clap_message(error));
    Some(at(path, token.line, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{ExposeArgs, ServeArgs};
    use crate::cli::values::parse_local;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tcp_relay::ProxyVersion;

    /// A config file holding `text`, in a fresh directory removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("tcp-relay-load-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create a temp dir");
            let path = dir.join("c.toml");
            std::fs::write(&path, text).expect("write the config file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().expect("a dir"));
        }
    }

    fn run(sub: &str, flags: &[&str], text: &str) -> Result<Cli, String> {
        let file = TempFile::new(text);
        let mut argv: Vec<OsString> = vec!["tcp-relay".into(), sub.into(), "--config".into()];
        argv.push(file.0.clone().into());
        argv.extend(flags.iter().map(OsString::from));
        match load(argv) {
            Ok(loaded) => Ok(loaded.cli),
            Err(LoadError::File(message)) => Err(message),
            Err(LoadError::Usage(e)) => Err(format!("usage: {e}")),
        }
    }

    fn serve(flags: &[&str], text: &str) -> ServeArgs {
        match run("serve", flags, text).expect("loads").command {
            Command::Serve(args) => args,
            _ => panic!("not serve"),
        }
    }

    fn expose(flags: &[&str], text: &str) -> ExposeArgs {
        match run("expose", flags, text).expect("loads").command {
            Command::Expose(args) => args,
            _ => panic!("not expose"),
        }
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let text = "reg_port = 9000\ngrace = \"1m\"\n";
        let args = serve(&["--reg-port", "9001"], text);
        assert_eq!(args.reg_port, 9001);
        assert_eq!(args.grace, std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_secret_given_hides_the_files_secret_file() {
        let args = serve(&["--secret", "s3"], "secret_file = \"/nonexistent\"\n");
        assert_eq!(args.secret.as_deref(), Some("s3"));
        assert_eq!(args.secret_file.path, None);
    }

    #[test]
    fn verbosity_given_hides_the_files_log_level() {
        let cli = run("serve", &["-v"], "log_level = \"error\"\n").expect("loads");
        assert_eq!(cli.level(), log::LevelFilter::Debug);
        let cli = run("serve", &[], "log_level = \"error\"\n").expect("loads");
        assert_eq!(cli.level(), log::LevelFilter::Error);
    }

    #[test]
    fn a_burst_given_may_take_its_rate_from_the_file() {
        let args = serve(&["--client-burst", "4"], "client_rate = \"9/s\"\n");
        assert_eq!(args.client_burst.map(|b| b.get()), Some(4));
        assert_eq!(
            args.client_rate.map(|r| r.to_string()).as_deref(),
            Some("9/s")
        );
    }

    const TWO_SERVICES: &str = "ready = 2\nproxy_protocol = \"v1\"\n\
        [[service]]\nname = \"web\"\nlocal = \"127.0.0.1:3000\"\nport = 8081\nready = 5\n\
        [[service]]\nlocal = \"127.0.0.1:22\"\nproxy_protocol = \"v2\"\n";

    #[test]
    fn service_tables_become_services() {
        let args = expose(&[], TWO_SERVICES);
        let mut web = parse_local("web=127.0.0.1:3000@8081").expect("parses");
        web.ready = Some(5);
        let mut ssh = parse_local("127.0.0.1:22").expect("parses");
        ssh.proxy_protocol = Some(ProxySetting::Header(ProxyVersion::V2));
        assert_eq!(args.local, [web, ssh]);
        assert_eq!(
            (args.ready, args.proxy_protocol),
            (2, Some(ProxySetting::Header(ProxyVersion::V1)))
        );
    }

    #[test]
    fn a_service_table_may_turn_the_files_proxy_protocol_off() {
        let file = "proxy_protocol = \"v1\"\n\
            [[service]]\nname = \"web\"\nlocal = \"127.0.0.1:3000\"\n\
            [[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\nproxy_protocol = \"none\"\n";
        let args = expose(&[], file);
        let own: Vec<_> = args.local.iter().map(|s| s.proxy_protocol).collect();
        assert_eq!(own, [None, Some(ProxySetting::None)]);
        assert_eq!(
            args.proxy_protocol,
            Some(ProxySetting::Header(ProxyVersion::V1))
        );
        assert_eq!("none".parse::<ProxySetting>(), Ok(ProxySetting::None));
        let bad = "v3".parse::<ProxySetting>().expect_err("not a version");
        assert!(bad.contains("v1, v2 or none"), "{bad}");
    }

    #[test]
    fn flags_given_override_every_services_own() {
        let args = expose(&["--ready", "1", "--proxy-protocol", "v2"], TWO_SERVICES);
        assert!(
            args.local
                .iter()
                .all(|s| s.ready.is_none() && s.proxy_protocol.is_none())
        );
        assert_eq!(
            (args.ready, args.proxy_protocol),
            (1, Some(ProxySetting::Header(ProxyVersion::V2)))
        );
    }

    #[test]
    fn local_given_replaces_the_files_services() {
        let args = expose(&["--local", "127.0.0.1:7"], TWO_SERVICES);
        assert_eq!(args.local, [parse_local("127.0.0.1:7").expect("parses")]);
    }

    #[test]
    fn bad_values_are_still_errors_when_the_flag_hides_them() {
        let error = run("serve", &["--reg-port", "1"], "\nreg_port = 70000\n")
            .err()
            .expect("refused");
        assert!(
            error.ends_with(
                "c.toml:2: reg_port: invalid value \"70000\": 70000 is not in 0..=65535"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_missing_rate_blames_the_files_burst() {
        let error = run("serve", &[], "grace = \"1s\"\nclient_burst = 3\n")
            .err()
            .expect("refused");
        assert!(
            error.ends_with("c.toml:2: client_burst: needs client_rate as well"),
            "{error}"
        );
        let error = run("serve", &["--client-burst", "3"], "grace = \"1s\"\n")
            .err()
            .expect("refused");
        assert!(
            error.starts_with("usage: "),
            "the command line's own mistake: {error}"
        );
    }

    #[test]
    fn without_a_file_the_command_line_is_parsed_as_ever() {
        let argv = ["tcp-relay", "serve", "--reg-port", "7"]
            .map(OsString::from)
            .to_vec();
        let Ok(Loaded { cli, warnings }) = load(argv) else {
            panic!("loads");
        };
        assert!(warnings.is_empty());
        assert!(matches!(cli.command, Command::Serve(args) if args.reg_port == 7));
    }
}
