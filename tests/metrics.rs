//! The status endpoint (issue 12), end to end: `/metrics` in the
//! Prometheus text format (checked by the Python client library's own
//! parser) with counters that move as traffic flows and never go back,
//! `/status` as JSON, `/` as the page (rendered in headless Chromium),
//! errors for anything else, and hostile peers (slowloris, 1 MB heads, a
//! thousand idle connections) that leave the relay serving its apps.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemons::TempDir;
use common::tools::tool;
use common::*;
use tcp_relay::{Agent, AgentConfig, Config, RunningRelay, Service, ServiceConfig};

/// A relay with its status endpoint on 127.0.0.1 (a port the OS picks).
fn relay_with_status() -> (RunningRelay, SocketAddr) {
    let relay = start_relay_with(|c: &mut Config| c.metrics = Some(local(0)));
    let status = relay.handle().status_addr().expect("a status address");
    (relay, status)
}

/// One HTTP/1.1 request; the status code and the body.
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = connect(addr);
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let code = response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
}

/// The samples of an exposition, `name{labels}` => value (our own reading,
/// beside the real parser's, to compare scrapes).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Runs the Prometheus Python client's parser over `text`; panics with its
/// error if it does not parse. `None` when the parser is not installed
/// (and tools are not required here).
fn prometheus_parses(text: &str) -> Option<usize> {
    let python = tool("python3", "apt-get install python3")?;
    let probe = Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .status()
        .expect("run python3");
    if !probe.success() {
        tool("prometheus_client", "pip install prometheus_client")?;
    }
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nprint(len(list(p(sys.stdin.read()))))";
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the parser");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).expect("feed the parser");
    drop(stdin);
    let out = child.wait_with_output().expect("the parser ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the exposition does not parse: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `/metrics` parses as Prometheus text with the families operators need;
/// as bytes flow, the byte and connection counters grow, and across
/// scrapes no counter goes back.
#[test]
fn metrics_parse_and_move_with_traffic() {
    let (relay, status) = relay_with_status();
    let app = TestApp::register(relay.reg_addr()).serve(echo);
    let (code, first) = get(status, "/metrics");
    assert_eq!(code, 200);
    for family in [
        "tcp_relay_apps 1",
        "# TYPE tcp_relay_bytes_total counter",
        "tcp_relay_connections_refused_total{listener=\"relayed\",reason=\"limit\"} 0",
        "# TYPE tcp_relay_pairing_seconds histogram",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(first.contains(family), "no {family:?} in:\n{first}");
    }
    if let Some(families) = prometheus_parses(&first) {
        assert!(families >= 10, "{families} families");
    }
    let mut previous = samples(&first);
    for round in 1..=3u8 {
        let payload = vec![round; 10_000];
        assert_eq!(exchange(app.relayed_addr(), &payload), payload);
        wait_for_stats(&relay, "the pipe closed", |s| s.pipes == 0);
        let text = get(status, "/metrics").1;
        let now = samples(&text);
        for (name, value) in &previous {
            let counter =
                name.contains("_total") || name.contains("_bucket") || name.ends_with("_count");
            if counter && !name.starts_with("process_") {
                assert!(
                    now[name] >= *value,
                    "{name} went back: {value} -> {}",
                    now[name]
                );
            }
        }
        let grown = |key: &str| now[key] - previous[key];
        assert!(grown("tcp_relay_bytes_total{direction=\"to_app\"}") >= 10_000.0);
        assert!(grown("tcp_relay_bytes_total{direction=\"to_client\"}") >= 10_000.0);
        assert_eq!(
            grown("tcp_relay_connections_accepted_total{listener=\"relayed\"}"),
            1.0
        );
        assert_eq!(grown("tcp_relay_pairing_seconds_count"), 1.0);
        previous = now;
    }
}

/// `/status` is JSON: the totals, and each app with its port, its
/// extensions, its pipes and its bytes.
#[test]
fn status_lists_each_app() {
    let (relay, status) = relay_with_status();
    let app = TestApp::register(relay.reg_addr());
    app.send_control(b"ready 1\n")
        .expect("ask for a ready dial-in");
    let _spare = app.dial_in();
    wait_for_stats(&relay, "a ready dial-in", |s| s.ready_dial_ins == 1);
    let (code, body) = get(status, "/status");
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["totals"]["apps"], 1);
    assert_eq!(json["totals"]["ready"], 1);
    let apps = json["apps"].as_array().expect("an array of apps");
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0]["relayed_port"], app.relayed_port);
    assert_eq!(apps[0]["extensions"], serde_json::json!(["ready 1"]));
    assert!(
        apps[0]["connected_since"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
}

/// Anything else gets its error, and the connection is closed: an unknown
/// path 404, a POST 405, garbage 400, a head over 8 KiB 431.
#[test]
fn the_endpoint_answers_everything_else_with_an_error() {
    let (_relay, status) = relay_with_status();
    assert_eq!(get(status, "/nope").0, 404);
    assert_eq!(
        http(status, "POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n").0,
        405
    );
    assert_eq!(http(status, "\x16\x03\x01 not http\r\n\r\n").0, 400);
    let long = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(http(status, &long).0, 431);
    let (code, page) = get(status, "/");
    assert_eq!(code, 200);
    assert!(page.starts_with("<!DOCTYPE html>"));
}

/// Slowloris, a 1 MB head and a thousand idle connections against the
/// status port: the relay still serves its app and clients as usual, keeps
/// at most a handful of them, and the endpoint answers again once the
/// deadline has cleared them.
#[test]
fn hostile_status_peers_leave_apps_and_clients_served() {
    let (relay, status) = relay_with_status();
    let app = TestApp::register(relay.reg_addr()).serve(echo);
    let mut slow = connect(status);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHo")
        .expect("half a request");
    let huge = std::thread::spawn(move || {
        // Racing the idle flood below, it may be one the endpoint turns
        // away (reset: it keeps a handful of connections): also a fine end.
        let Ok(mut stream) = try_connect(status) else {
            return String::new();
        };
        let _ = stream.write_all(&vec![b'a'; 1 << 20]); // cut off early
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    let idle: Vec<TcpStream> = (0..1000).filter_map(|_| try_connect(status).ok()).collect();
    for round in 0..5u8 {
        let payload = vec![round; 64 * 1024];
        assert_eq!(
            exchange(app.relayed_addr(), &payload),
            payload,
            "round {round}"
        );
    }
    let answer = huge.join().expect("the 1 MB sender");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer:?}"
    );
    let mut open = Vec::new();
    for (i, mut stream) in idle.into_iter().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        match stream.read(&mut [0u8; 1]) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => open.push((i, format!("{other:?}"))),
        }
    }
    assert!(
        open.len() <= 16,
        "{} idle connections held: {open:?}",
        open.len()
    );
    drop(slow);
    wait_until("the endpoint answers again", || {
        try_connect(status).is_ok_and(|mut s| {
            let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n");
            let mut answer = String::new();
            s.read_to_string(&mut answer).is_ok() && answer.starts_with("HTTP/1.1 200")
        })
    });
}

/// The agent's endpoint: its registrations (service, relay, state, relayed
/// port), one per service and relay, a relay that is down shown down, and
/// its counters.
#[test]
fn the_agents_status_shows_its_registrations() {
    let relay = start_relay();
    let down = format!("127.0.0.1:{}", common::daemons::free_port()); // nothing listens
    let named = |name: &str| ServiceConfig {
        name: name.into(),
        ..ServiceConfig::new(Service::Echo)
    };
    let up = relay.reg_addr().to_string();
    let mut agent = Agent::new(AgentConfig {
        relays: vec![up.clone(), down.clone()],
        services: vec![named("a"), named("b")],
        splice: false,
        metrics: Some(local(0)),
        ..AgentConfig::new(String::new(), Service::Echo)
    })
    .expect("an agent");
    let status = agent.status_addr().expect("a status address");
    let port = agent
        .register()
        .expect("registered on the relay that is up");
    let _running = agent.spawn().expect("spawn");
    assert_eq!(
        exchange(local(port), b"through the agent"),
        b"through the agent"
    );
    let json: serde_json::Value = serde_json::from_str(&get(status, "/status").1).expect("JSON");
    let registrations = json["registrations"].as_array().expect("registrations");
    assert_eq!(registrations.len(), 4, "{json}");
    let of = |service: &str, relay: &str| {
        let found = registrations
            .iter()
            .find(|r| r["service"] == service && r["relay"] == relay);
        found
            .unwrap_or_else(|| panic!("no {service} on {relay}: {json}"))
            .clone()
    };
    assert_eq!(of("a", &up)["state"], "registered");
    assert_eq!(of("a", &up)["relayed_port"], port);
    assert_eq!(of("b", &up)["state"], "registered");
    assert_ne!(of("b", &down)["state"], "registered");
    assert_eq!(json["totals"]["served"], 1);
    let text = get(status, "/metrics").1;
    for sample in [
        "tcp_relay_agent_registrations_up 2".to_owned(),
        "tcp_relay_agent_clients_served_total 1".to_owned(),
        format!("tcp_relay_agent_registration_up{{service=\"a\",relay=\"{up}\"}} 1"),
        format!("tcp_relay_agent_registration_up{{service=\"b\",relay=\"{down}\"}} 0"),
    ] {
        assert!(text.contains(&sample), "{sample} in {text}");
    }
    prometheus_parses(&text);
}

/// The page, loaded in headless Chromium: the rendered DOM shows the app's
/// row (by its relayed port) and a byte count that grows between two loads
/// as a client pipes bytes. `TCP_RELAY_SCREENSHOT=<path.png>` also saves a
/// screenshot, for people (not asserted on).
#[test]
fn the_page_shows_apps_and_bytes_live_in_a_browser() {
    let Some(chromium) = tool("chromium", "apt-get install chromium") else {
        return;
    };
    let (relay, status) = relay_with_status();
    let app = TestApp::register(relay.reg_addr()).serve(echo);
    let payload = vec![7u8; 50_000];
    assert_eq!(exchange(app.relayed_addr(), &payload), payload);
    let first = rendered(&chromium, status);
    assert!(
        first.contains(&format!("data-port=\"{}\"", app.relayed_port)),
        "no row for port {} in:\n{first}",
        app.relayed_port
    );
    let before = bytes_shown(&first);
    assert!(before >= 50_000, "bytes shown: {before}");
    assert_eq!(exchange(app.relayed_addr(), &payload), payload);
    let after = bytes_shown(&rendered(&chromium, status));
    assert!(after >= before + 50_000, "{before} -> {after}");
    if let Ok(path) = std::env::var("TCP_RELAY_SCREENSHOT") {
        screenshot(&chromium, status, &path);
    }
}

/// The DOM Chromium renders for the page once its scripts have run (and
/// fetched `/status`).
fn rendered(chromium: &std::path::Path, status: SocketAddr) -> String {
    let profile = TempDir::new("chromium");
    let out = Command::new(chromium)
        .args(headless_flags(&profile))
        .args(["--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("http://{status}/"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(chromium: &std::path::Path, status: SocketAddr, path: &str) {
    let profile = TempDir::new("chromium-shot");
    let _ = Command::new(chromium)
        .args(headless_flags(&profile))
        .args(["--virtual-time-budget=5000", "--window-size=1200,700"])
        .arg(format!("--screenshot={path}"))
        .arg(format!("http://{status}/"))
        .stderr(Stdio::null())
        .status();
}

/// Chromium as root in a sandbox-less CI, with nothing reaching out.
fn headless_flags(profile: &TempDir) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|flag| (*flag).to_owned())
    .chain([format!("--user-data-dir={}", profile.path().display())])
    .collect()
}

/// The raw value of the bytes-in total the page shows.
fn bytes_shown(dom: &str) -> u64 {
    let at = dom
        .find("id=\"bytes-in-total\"")
        .unwrap_or_else(|| panic!("no bytes-in total in:\n{dom}"));
    let rest = &dom[at..];
    let value = rest
        .split("data-value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or_else(|| panic!("no data-value near the total: {rest:.200}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {value:?}"))
}
