//! Config files (`--config`), through the built binary: every flag of
//! `serve` and `expose` means the same in a file (`--print-config` shows
//! what would run), the command line wins over the file, a malformed file
//! is one line on stderr and nothing started, and a relay and an agent
//! started from files alone carry clients to two services.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use common::daemons::{TempDir, free_port};
use common::{connect, read_exactly, read_to_eof};

/// How long one `--print-config` (or a refusal) may take.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// The samples in `contrib/`.
const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib");

/// The binary, with no secret in its environment.
fn tcp_relay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tcp-relay"));
    command
        .env_remove("TCP_RELAY_SECRET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null());
    command
}

/// How a run ended.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` to its end, its output into files in `dir`; fails the
/// test (killing it) if it runs longer than [`RUN_LIMIT`].
fn run(mut command: Command, dir: &TempDir) -> Run {
    let (out, err) = (dir.path().join("run.out"), dir.path().join("run.err"));
    let file = |path: &Path| std::fs::File::create(path).expect("create an output file");
    let mut child = command
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .expect("start tcp-relay");
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still running after {RUN_LIMIT:?}");
        }
        // A poll interval, not synchronisation: the exit is re-checked.
        thread::sleep(Duration::from_millis(5));
    };
    let read = |path: &Path| std::fs::read_to_string(path).expect("read an output file");
    Run {
        status,
        stdout: read(&out),
        stderr: read(&err),
    }
}

/// `tcp-relay <sub> <args> --print-config`'s output; it must succeed.
fn print_config(sub: &str, args: &[&str], dir: &TempDir) -> String {
    print_config_with(tcp_relay(), sub, args, dir)
}

fn print_config_with(mut command: Command, sub: &str, args: &[&str], dir: &TempDir) -> String {
    command.arg(sub).args(args).arg("--print-config");
    let shown = format!("{sub} {args:?}");
    let run = run(command, dir);
    assert!(run.status.success(), "{shown}: {}", run.stderr);
    run.stdout
}

/// Writes `text` to `name` in `dir`; returns the path as a string.
fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.write(name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

/// One flag: arguments that set it, and a file that says the same. Values
/// are never the default, so a flag ignored on either side shows.
struct Case {
    flag: &'static str, // its long name
    args: Vec<String>,  // on the command line
    file: String,       // the same in a file
    fixed_point: bool,  // its print loads back to the same print
}

fn case(flag: &'static str, args: &[&str], file: &str) -> Case {
    Case {
        flag,
        args: args.iter().map(|a| a.to_string()).collect(),
        file: format!("{file}\n"),
        fixed_point: true,
    }
}

/// Every `serve` flag (a test below checks that none is missing).
fn serve_cases(secret_file: &str) -> Vec<Case> {
    let secret_line = format!("secret_file = {secret_file:?}");
    vec![
        case("bind", &["--bind", "127.0.0.2"], "bind = \"127.0.0.2\""),
        case("reg-port", &["--reg-port", "9000"], "reg_port = 9000"),
        case(
            "relay-style",
            &["--relay-style", "random"],
            "relay_style = \"random\"",
        ),
        case(
            "dial-in-timeout",
            &["--dial-in-timeout", "1500ms"],
            "dial_in_timeout = \"1500ms\"",
        ),
        Case {
            fixed_point: false, // never printed
            ..case("secret", &["--secret", "hunter2"], "secret = \"hunter2\"")
        },
        case("secret-file", &["--secret-file", secret_file], &secret_line),
        case(
            "port-range",
            &["--port-range", "20000-20999"],
            "port_range = \"20000-20999\"",
        ),
        case("max-apps", &["--max-apps", "7"], "max_apps = 7"),
        case("max-waiting", &["--max-waiting", "8"], "max_waiting = 8"),
        case(
            "max-connections",
            &["--max-connections", "99"],
            "max_connections = 99",
        ),
        case("backlog", &["--backlog", "16"], "backlog = 16"),
        case(
            "accept-proxy-from",
            &["--accept-proxy-from", "10.0.0.0/8,192.0.2.7"],
            "accept_proxy_from = [\"10.0.0.0/8\", \"192.0.2.7\"]",
        ),
        case(
            "metrics",
            &["--metrics", "127.0.0.1:9090"],
            "metrics = \"127.0.0.1:9090\"",
        ),
        case("max-line", &["--max-line", "512"], "max_line = 512"),
        case(
            "register-timeout",
            &["--register-timeout", "3s"],
            "register_timeout = \"3s\"",
        ),
        case(
            "half-close-timeout",
            &["--half-close-timeout", "2m"],
            "half_close_timeout = \"2m\"",
        ),
        case("grace", &["--grace", "1h"], "grace = \"1h\""),
        case("no-splice", &["--no-splice"], "no_splice = true"),
        case(
            "allow-apps",
            &["--allow-apps", "10.1.0.0/16"],
            "allow_apps = \"10.1.0.0/16\"",
        ),
        case(
            "allow-clients",
            &["--allow-clients", "192.0.2.0/24,::1"],
            "allow_clients = [\"192.0.2.0/24\", \"::1\"]",
        ),
        case(
            "client-rate",
            &["--client-rate", "30/m"],
            "client_rate = \"30/m\"",
        ),
        case(
            "client-burst",
            &["--client-rate", "5/s", "--client-burst", "9"],
            "client_rate = \"5/s\"\nclient_burst = 9",
        ),
        case(
            "log-level",
            &["--log-level", "trace"],
            "log_level = \"trace\"",
        ),
        case("verbose", &["-v"], "log_level = \"debug\""),
        case("quiet", &["-qq"], "log_level = \"error\""),
    ]
}

/// The service every `expose` case publishes, unless it is about services.
const LOCAL: &str = "127.0.0.1:3000";

/// Every `expose` flag, each with [`LOCAL`] (a test below checks that none
/// is missing).
fn expose_cases(secret_file: &str) -> Vec<Case> {
    let with_local = |flag, args: &[&str], file: &str| {
        let mut args = args.to_vec();
        args.extend(["--local", LOCAL]);
        case(flag, &args, &format!("local = {LOCAL:?}\n{file}"))
    };
    let secret_line = format!("secret_file = {secret_file:?}");
    vec![
        with_local(
            "relay",
            &["--relay", "a.example:1", "--relay", "b.example:2"],
            "relays = [\"a.example:1\", \"b.example:2\"]",
        ),
        case(
            "local",
            &[
                "--local",
                "web=127.0.0.1:3000@8081",
                "--local",
                "127.0.0.1:22",
            ],
            "local = [\"web=127.0.0.1:3000@8081\", \"127.0.0.1:22\"]",
        ),
        with_local("port", &["--port", "8443"], "port = 8443"),
        with_local("no-reconnect", &["--no-reconnect"], "no_reconnect = true"),
        with_local("ready", &["--ready", "3"], "ready = 3"),
        with_local(
            "connect-timeout",
            &["--connect-timeout", "250ms"],
            "connect_timeout = \"250ms\"",
        ),
        with_local("max-clients", &["--max-clients", "50"], "max_clients = 50"),
        with_local(
            "proxy-protocol",
            &["--proxy-protocol", "v2"],
            "proxy_protocol = \"v2\"",
        ),
        with_local(
            "allow-clients",
            &["--allow-clients", "192.0.2.0/24,::1"],
            "allow_clients = [\"192.0.2.0/24\", \"::1\"]",
        ),
        with_local(
            "client-rate",
            &["--client-rate", "30/m"],
            "client_rate = \"30/m\"",
        ),
        with_local(
            "client-burst",
            &["--client-rate", "5/s", "--client-burst", "9"],
            "client_rate = \"5/s\"\nclient_burst = 9",
        ),
        with_local(
            "metrics",
            &["--metrics", "127.0.0.1:9091"],
            "metrics = \"127.0.0.1:9091\"",
        ),
        with_local("no-splice", &["--no-splice"], "no_splice = true"),
        Case {
            fixed_point: false, // never printed
            ..with_local("secret", &["--secret", "hunter2"], "secret = \"hunter2\"")
        },
        with_local("secret-file", &["--secret-file", secret_file], &secret_line),
        with_local(
            "log-level",
            &["--log-level", "warn"],
            "log_level = \"warn\"",
        ),
        with_local("verbose", &["-vv"], "log_level = \"trace\""),
        with_local("quiet", &["-q"], "log_level = \"warn\""),
    ]
}

/// The long flags `sub --help` lists, but those about the file itself.
fn listed_flags(sub: &str, dir: &TempDir) -> Vec<String> {
    let mut command = tcp_relay();
    command.args([sub, "--help"]);
    let help = run(command, dir).stdout;
    let mut flags: Vec<String> = help
        .lines()
        .filter(|line| line.trim_start().starts_with('-'))
        .filter_map(|line| line.split_whitespace().find(|w| w.starts_with("--")))
        .map(|flag| {
            flag.trim_start_matches("--")
                .trim_end_matches("...")
                .to_owned()
        })
        .filter(|flag| {
            !matches!(
                flag.as_str(),
                "help" | "version" | "config" | "print-config"
            )
        })
        .collect();
    flags.sort();
    flags
}

/// The cases cover exactly the flags `--help` lists: a new flag without a
/// case (and so without file support checked) fails here.
fn assert_covers(sub: &str, cases: &[Case], dir: &TempDir) {
    let mut covered: Vec<String> = cases.iter().map(|c| c.flag.to_owned()).collect();
    covered.sort();
    assert_eq!(covered, listed_flags(sub, dir), "{sub}: a case per flag");
}

/// `--flag V` and a file saying `key = V` print the same configuration,
/// which differs from the default; that print, loaded as a file, prints
/// itself again.
fn assert_round_trip(sub: &str, case: &Case, base: &[&str], dir: &TempDir) {
    let default = print_config(sub, base, dir);
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let by_flags = print_config(sub, &args, dir);
    assert_ne!(
        by_flags, default,
        "{sub} --{}: the value must show",
        case.flag
    );
    let file = write(dir, "case.toml", &case.file);
    let by_file = print_config(sub, &["--config", &file], dir);
    assert_eq!(
        by_flags, by_file,
        "{sub} --{}: flag and file differ",
        case.flag
    );
    assert!(!by_flags.contains("hunter2"), "{sub}: a secret was printed");
    if case.fixed_point {
        let printed = write(dir, "printed.toml", &by_flags);
        let again = print_config(sub, &["--config", &printed], dir);
        assert_eq!(again, by_flags, "{sub} --{}: not a fixed point", case.flag);
    }
}

#[test]
fn every_serve_flag_round_trips_through_a_file() {
    let dir = TempDir::new("config-serve");
    let secret = write(&dir, "secret", "s3cret\n");
    let cases = serve_cases(&secret);
    assert_covers("serve", &cases, &dir);
    for case in &cases {
        assert_round_trip("serve", case, &[], &dir);
    }
}

#[test]
fn every_expose_flag_round_trips_through_a_file() {
    let dir = TempDir::new("config-expose");
    let secret = write(&dir, "secret", "s3cret\n");
    let cases = expose_cases(&secret);
    assert_covers("expose", &cases, &dir);
    for case in &cases {
        assert_round_trip("expose", case, &["--local", LOCAL], &dir);
    }
}

/// Service tables, each with every key, print as they were written and
/// load back to the same print.
#[test]
fn service_tables_round_trip() {
    let dir = TempDir::new("config-services");
    let text = "relays = [\"127.0.0.1:8080\"]\n\n[[service]]\nname = \"web\"\n\
                local = \"127.0.0.1:3000\"\nport = 8081\nready = 2\nproxy_protocol = \"v1\"\n\
                allow_clients = \"10.0.0.0/8\"\nclient_rate = \"7/m\"\nclient_burst = 3\n\n\
                [[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\n";
    let file = write(&dir, "services.toml", text);
    let printed = print_config("expose", &["--config", &file], &dir);
    for line in [
        "name = \"web\"",
        "port = 8081",
        "ready = 2",
        "proxy_protocol = \"v1\"",
        "allow_clients = [\"10.0.0.0/8\"]",
        "client_rate = \"7/m\"",
        "client_burst = 3",
        "name = \"ssh\"",
    ] {
        assert!(printed.contains(line), "{line} in:\n{printed}");
    }
    assert_eq!(printed.matches("[[service]]").count(), 2, "{printed}");
    assert_eq!(
        value_of(&printed, "client_rate"),
        ["\"7/m\""],
        "ssh has none"
    );
    let again = write(&dir, "printed.toml", &printed);
    assert_eq!(print_config("expose", &["--config", &again], &dir), printed);
    // The command line's rate replaces every service's, burst included.
    let flagged = print_config("expose", &["--config", &file, "--client-rate", "2/s"], &dir);
    assert_eq!(value_of(&flagged, "client_rate"), ["\"2/s\"", "\"2/s\""]);
    assert_eq!(value_of(&flagged, "client_burst"), ["2", "2"]);
}

/// A service table turns off the file's top-level `proxy_protocol` for
/// itself with `none`; the others keep it.
#[test]
fn a_service_may_turn_the_proxy_protocol_off() {
    let dir = TempDir::new("config-proxy-none");
    let text = "relays = [\"127.0.0.1:8080\"]\nproxy_protocol = \"v2\"\n\n\
                [[service]]\nname = \"web\"\nlocal = \"127.0.0.1:3000\"\n\n\
                [[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\nproxy_protocol = \"none\"\n";
    let file = write(&dir, "proxy.toml", text);
    let printed = print_config("expose", &["--config", &file], &dir);
    assert_eq!(
        value_of(&printed, "proxy_protocol"),
        ["\"v2\""],
        "{printed}"
    );
    assert!(printed.contains("# proxy_protocol: not set"), "{printed}");
    let flagged = print_config(
        "expose",
        &["--config", &file, "--proxy-protocol", "none"],
        &dir,
    );
    assert!(value_of(&flagged, "proxy_protocol").is_empty(), "{flagged}");
}

/// The values of `key` in `print`, top-level and in services, in order.
fn value_of(print: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key} = ");
    print
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn flags_win_over_the_file() {
    let dir = TempDir::new("config-precedence");
    let file = write(&dir, "relay.toml", "reg_port = 9000\ngrace = \"1m\"\n");
    let print = print_config("serve", &["--config", &file, "--reg-port", "9001"], &dir);
    assert_eq!(value_of(&print, "reg_port"), ["9001"]);
    assert_eq!(
        value_of(&print, "grace"),
        ["\"1m\""],
        "the file still counts"
    );
}

const TWO_SERVICES: &str = "ready = 1\n[[service]]\nname = \"web\"\nlocal = \"127.0.0.1:3000\"\n\
                            ready = 4\n[[service]]\nname = \"ssh\"\nlocal = \"127.0.0.1:22\"\n";

#[test]
fn local_on_the_command_line_replaces_the_files_services() {
    let dir = TempDir::new("config-local");
    let file = write(&dir, "expose.toml", TWO_SERVICES);
    let print = print_config(
        "expose",
        &["--config", &file, "--local", "127.0.0.1:7"],
        &dir,
    );
    assert_eq!(value_of(&print, "local"), ["\"127.0.0.1:7\""]);
    assert!(value_of(&print, "name").is_empty(), "{print}");
}

/// A service's own `ready` wins over the file's top-level one, and
/// `--ready` over both.
#[test]
fn ready_comes_from_the_flag_the_service_then_the_file() {
    let dir = TempDir::new("config-ready");
    let file = write(&dir, "expose.toml", TWO_SERVICES);
    let print = print_config("expose", &["--config", &file], &dir);
    assert_eq!(value_of(&print, "ready"), ["4", "1"]);
    let print = print_config("expose", &["--config", &file, "--ready", "2"], &dir);
    assert_eq!(value_of(&print, "ready"), ["2", "2"]);
}

/// The environment's secret is the command line's: the file's
/// `secret_file` is not even read (it does not exist).
#[test]
fn the_environments_secret_hides_the_files_secret_file() {
    let dir = TempDir::new("config-env-secret");
    let file = write(&dir, "relay.toml", "secret_file = \"missing\"\n");
    let mut command = tcp_relay();
    command.env("TCP_RELAY_SECRET", "from-env");
    let print = print_config_with(command, "serve", &["--config", &file], &dir);
    assert!(value_of(&print, "secret_file").is_empty(), "{print}");
    assert!(print.contains("# secret: set"), "{print}");
    assert!(!print.contains("from-env"), "{print}");
    let run = run_with_file("serve", "secret_file = \"missing\"\n", &dir);
    assert!(
        run.stderr.contains("missing"),
        "without it the file is read: {}",
        run.stderr
    );
}

/// A relative `secret_file` is taken from the config file's directory.
#[test]
fn secret_files_are_found_beside_the_config() {
    let dir = TempDir::new("config-relative");
    write(&dir, "secret", "s3cret\n");
    let file = write(&dir, "relay.toml", "secret_file = \"secret\"\n");
    let print = print_config("serve", &["--config", &file], &dir);
    let expected = format!("{:?}", dir.path().join("secret").display().to_string());
    assert_eq!(value_of(&print, "secret_file"), [expected]);
}

/// Runs `sub --config FILE` with `text` in FILE, which must fail.
fn run_with_file(sub: &str, text: &str, dir: &TempDir) -> Run {
    let file = write(dir, "bad.toml", text);
    let mut command = tcp_relay();
    command.args([sub, "--config", &file]);
    run(command, dir)
}

/// Each malformed file: one line on stderr naming the file, the line and
/// the key; a failed exit; nothing started (no log line, no address).
#[test]
fn malformed_files_give_one_clear_line() {
    let dir = TempDir::new("config-malformed");
    let port = free_port();
    let cases: &[(&str, String, usize, &str)] = &[
        (
            "serve",
            format!("reg_port = {port}\nreg_prot = 1\n"),
            2,
            "unknown key \"reg_prot\" (did you mean \"reg_port\"?)",
        ),
        (
            "serve",
            format!("reg_port = {port}\nbind = \n"),
            2,
            ":2:8: string values must be quoted",
        ),
        (
            "serve",
            format!("reg_port = {port}\nreg_port = 2\n"),
            2,
            "duplicate key reg_port",
        ),
        (
            "serve",
            format!("reg_port = {port}\nallow_apps = [\n"),
            2,
            ":2:15: unclosed array",
        ),
        (
            "serve",
            format!("reg_port = {port}\ngrace = \"10x\"\n"),
            2,
            "grace: invalid value \"10x\"",
        ),
        (
            "serve",
            format!("reg_port = {port}\nmax_apps = \"5\"\n"),
            2,
            "max_apps: expected an integer, found a string",
        ),
        (
            "serve",
            format!("reg_port = {port}\nno_splice = 1\n"),
            2,
            "no_splice: expected true or false",
        ),
        (
            "serve",
            format!("reg_port = {port}\ngrace = 1.5\n"),
            2,
            "grace: expected a string, found a float",
        ),
        (
            "serve",
            format!("reg_port = {port}\nallow_clients = [\n\"::1\",\n\"nope\"]\n"),
            2,
            "allow_clients: invalid value",
        ),
        (
            "serve",
            format!("reg_port = {port}\nclient_burst = 3\n"),
            2,
            "client_burst: needs client_rate",
        ),
        (
            "serve",
            format!("reg_port = {port}\nsecret = \"a\"\nsecret_file = \"b\"\n"),
            3,
            "secret_file: secret (line 2)",
        ),
        (
            "serve",
            format!("reg_port = {port}\nverbose = true\n"),
            2,
            "\"verbose\" cannot be set in a config file (use log_level)",
        ),
        (
            "serve",
            format!("reg_port = {port}\n[[service]]\nlocal = \"127.0.0.1:1\"\n"),
            2,
            "unknown key \"service\"",
        ),
        (
            "expose",
            "relay = \"a:1\"\nrelays = [\"b:1\"]\n".into(),
            2,
            "relays: relay (line 1)",
        ),
        (
            "expose",
            "[[service]]\nname = \"web\"\n".into(),
            1,
            "[[service]] without local",
        ),
        (
            "expose",
            "[[service]]\nlocal = \"127.0.0.1:1\"\nlocale = 1\n".into(),
            3,
            "unknown key \"locale\" (did you mean \"local\"?) in [[service]]",
        ),
        (
            "expose",
            "[[service]]\nlocal = \"127.0.0.1:1\"\nrelay = \"x:1\"\n".into(),
            3,
            "top-level keys go before",
        ),
        (
            "expose",
            "[service]\nlocal = \"127.0.0.1:1\"\n".into(),
            1,
            "service: expected [[service]] tables",
        ),
        (
            "expose",
            "[[service]]\nlocal = \"127.0.0.1:1\"\nready = 65\n".into(),
            3,
            "ready: invalid value \"65\"",
        ),
        (
            "expose",
            "[[service]]\nlocal = \"web=127.0.0.1:1\"\n".into(),
            2,
            "local: HOST:PORT only",
        ),
        (
            "expose",
            "port = 1\nlocal = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n".into(),
            1,
            "port: is for one service",
        ),
        (
            "echo",
            "relays = [\"127.0.0.1:1\"]\nsecrt = \"x\"\n".into(),
            2,
            "unknown key \"secrt\" (did you mean \"secret\"?)",
        ),
    ];
    for (sub, text, line, says) in cases {
        let run = run_with_file(sub, text, &dir);
        let place = format!(
            "tcp-relay: error: {}:{line}",
            dir.path().join("bad.toml").display()
        );
        assert!(!run.status.success(), "{sub} {text:?} must fail");
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "{text:?}: one line, not {:?}",
            run.stderr
        );
        assert!(
            run.stderr.starts_with(&place),
            "{text:?}: {} at {place}",
            run.stderr
        );
        assert!(
            run.stderr.contains(says),
            "{text:?}: {:?} in {}",
            says,
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{text:?}: printed {:?}", run.stdout);
    }
}

#[test]
fn a_missing_file_is_one_line() {
    let dir = TempDir::new("config-missing");
    let missing = dir.path().join("nope.toml");
    let mut command = tcp_relay();
    command.arg("serve").arg("--config").arg(&missing);
    let run = run(command, &dir);
    assert!(!run.status.success());
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "tcp-relay: error: cannot read {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

/// Each key of `contrib/` samples is a key a flag has, and each flag's key
/// is in its sample (commented or not); both load.
#[test]
fn the_samples_load_and_show_every_key() {
    let dir = TempDir::new("config-samples");
    for (sub, sample, cases) in [
        ("serve", "relay.toml", serve_cases("")),
        ("expose", "expose.toml", expose_cases("")),
    ] {
        let path = format!("{SAMPLES}/{sample}");
        let text = std::fs::read_to_string(&path).expect("read a sample");
        let printed = print_config(sub, &["--config", &path], &dir);
        assert!(!printed.is_empty());
        let keys = cases.iter().map(|c| c.flag.replace('-', "_"));
        let keys = keys.filter(|k| !matches!(k.as_str(), "verbose" | "quiet"));
        let services = [
            "name",
            "local",
            "port",
            "ready",
            "proxy_protocol",
            "allow_clients",
            "client_rate",
            "client_burst",
            "relays",
        ];
        for key in keys.chain(
            services
                .iter()
                .filter(|_| sub == "expose")
                .map(|k| k.to_string()),
        ) {
            let shown = text.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ']);
                line.starts_with(&format!("{key} ="))
            });
            assert!(shown, "{sample} shows {key}");
        }
    }
}

// ---------------------------------------------------------------------------
// End to end

/// A process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay started from `relay.toml` alone, on a port the test chose (the
/// config cannot say port 0 and learn it): retried on the rare race of
/// another process taking the port first.
fn start_relay(dir: &TempDir) -> (Process, u16) {
    for _ in 0..5 {
        let port = free_port();
        let text = format!(
            "bind = \"127.0.0.1\"\nreg_port = {port}\nrelay_style = \"random\"\nsecret_file = \"secret\"\n"
        );
        let config = write(dir, "relay.toml", &text);
        let err = std::fs::File::create(dir.path().join("relay.err")).expect("stderr file");
        let child = tcp_relay()
            .args(["serve", "--config", &config])
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start the relay");
        let mut relay = Process(child);
        if wait_for_port(&mut relay, port) {
            return (relay, port);
        }
        let errors = std::fs::read_to_string(dir.path().join("relay.err")).unwrap_or_default();
        assert!(errors.contains("in use"), "the relay failed: {errors}");
    }
    panic!("no free port for the relay in five tries");
}

/// Whether `port` accepts before the process exits.
fn wait_for_port(process: &mut Process, port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + RUN_LIMIT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = process.0.try_wait() {
            return false;
        }
        // A poll interval, not synchronisation: the port is re-checked.
        thread::sleep(Duration::from_millis(10));
    }
    panic!("the relay did not listen on {port} within {RUN_LIMIT:?}");
}

/// A service on 127.0.0.1:0 serving each connection with `serve`.
fn local_service(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local service");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || serve(stream));
        }
    });
    addr
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn greet(mut stream: TcpStream) {
    let _ = stream.write_all(b"hello from greet\n");
}

/// Lines of `expose`'s stdout, read on a thread so waiting has a deadline.
fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A relay and an agent started from config files alone, the secret in a
/// file beside each: both services answer on their relayed ports.
#[test]
fn a_relay_and_an_agent_run_from_files_alone() {
    let dir = TempDir::new("config-e2e");
    write(&dir, "secret", "shared-by-both\n");
    let (_relay, port) = start_relay(&dir);
    let (echoer, greeter) = (local_service(echo), local_service(greet));
    let text = format!(
        "relay = \"127.0.0.1:{port}\"\nsecret_file = \"secret\"\n\n\
         [[service]]\nname = \"echo\"\nlocal = \"{echoer}\"\n\n\
         [[service]]\nname = \"greet\"\nlocal = \"{greeter}\"\n"
    );
    let config = write(&dir, "expose.toml", &text);
    let child = tcp_relay()
        .args(["expose", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start expose");
    let mut expose = Process(child);
    let lines = stdout_lines(&mut expose.0);
    let mut addresses = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = lines.recv_timeout(RUN_LIMIT).expect("an address line");
        let (name, addr) = line.split_once(' ').expect("<name> <host>:<port>");
        let addr: SocketAddr = addr.parse().expect("an address");
        addresses.insert(name.to_owned(), addr);
    }
    let mut through_echo = connect(addresses["echo"]);
    through_echo.write_all(b"ping").expect("write");
    assert_eq!(read_exactly(&mut through_echo, 4), b"ping");
    let mut through_greet = connect(addresses["greet"]);
    assert_eq!(read_to_eof(&mut through_greet), b"hello from greet\n");
}

/// A file holding the secret itself is warned about when others may read
/// it, as a secret file is; not when it is private.
#[test]
fn a_readable_file_with_the_secret_is_warned_about() {
    let dir = TempDir::new("config-secret-mode");
    let file = write(&dir, "relay.toml", "secret = \"hunter2\"\n");
    let warned = |dir: &TempDir| {
        let mut command = tcp_relay();
        command.args(["serve", "--config", &file, "--print-config"]);
        let run = run(command, dir);
        assert!(run.status.success(), "{}", run.stderr);
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
        run.stderr.contains("holds the secret")
    };
    assert!(!warned(&dir), "mode 0600 is private");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    assert!(warned(&dir), "mode 0644 is not");
}
