//! Clients' real addresses (issue 11), end to end with real servers:
//! nginx behind `expose --proxy-protocol v1|v2` names the client it was
//! told about, and HAProxy in front of the relay (`send-proxy-v2`, trusted
//! with `--accept-proxy-from`) passes the client's address through the
//! relay to the app. The client connects from 127.0.0.2, so its address
//! differs from every proxy's and relay's (127.0.0.1).
//!
//! nginx and HAProxy run on ports the OS picked, with configurations the
//! tests write into a temp dir, and stop when the test ends. Without them
//! installed these tests say SKIPPED (and fail under CI, which installs
//! them: `tests/common/tools.rs`).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::daemons::{Daemon, TempDir, free_port};
use common::procs::ExposeProcess;
use common::tools::tool;
use common::*;
use tcp_relay::{Config, ProxyVersion, RegisterOptions, RelayedApp};

/// nginx serving one answer on `port`: the client the PROXY header named.
fn nginx(dir: &TempDir, port: u16) -> Option<Daemon> {
    let program = tool("nginx", "apt-get install nginx-light")?;
    let root = dir.path().display();
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {root}/nginx.pid;\n\
         error_log {root}/error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n\
           server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
             location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n\
           }}\n}}\n"
    );
    let path = dir.write("nginx.conf", &config);
    let (prefix, conf) = (dir.path().display().to_string(), path.display().to_string());
    let error_log = format!("{prefix}/error.log");
    let args = ["-p", &prefix, "-e", &error_log, "-c", &conf];
    Some(Daemon::start("nginx", &program, &args, dir, port))
}

/// HAProxy on `front`, forwarding every connection to `to` with a PROXY v2
/// header naming the client.
fn haproxy(dir: &TempDir, front: u16, to: SocketAddr) -> Option<Daemon> {
    let program = tool("haproxy", "apt-get install haproxy")?;
    let config = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend front\n  bind 127.0.0.1:{front}\n  default_backend relay\n\
         backend relay\n  server relay {to} send-proxy-v2\n"
    );
    let path = dir.write("haproxy.cfg", &config);
    let args = ["-db", "-f", &path.display().to_string()];
    Some(Daemon::start("haproxy", &program, &args, dir, front))
}

/// An HTTP/1.0 GET from 127.0.0.2 to `addr`; the response's body.
fn get_from_other_loopback(addr: SocketAddr) -> (SocketAddr, String) {
    let mut stream = connect_from(OTHER_LOOPBACK, addr).expect("connect from 127.0.0.2");
    let me = stream.local_addr().expect("our address");
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "response: {response:?}"
    );
    (me, body)
}

/// nginx behind `expose --proxy-protocol v1` and `v2` answers with the
/// client's own address and port: the header the relay wrote reached it
/// untouched through the agent.
#[test]
fn nginx_behind_expose_sees_the_clients_real_address() {
    for version in ["v1", "v2"] {
        let dir = TempDir::new("nginx");
        let port = free_port();
        let Some(_nginx) = nginx(&dir, port) else {
            return;
        };
        let relay = start_relay();
        let (relay_arg, local_arg) = (relay.reg_addr().to_string(), format!("127.0.0.1:{port}"));
        let args = [
            "--relay",
            &relay_arg,
            "--local",
            &local_arg,
            "--proxy-protocol",
            version,
            "--no-reconnect",
        ];
        let expose = ExposeProcess::start(&args);
        let public = expose.line();
        let public: SocketAddr = public.parse().expect("the public address");
        let (me, body) = get_from_other_loopback(public);
        assert_eq!(body, me.to_string(), "PROXY {version}");
        assert_eq!(me.ip(), OTHER_LOOPBACK);
    }
}

/// HAProxy in front of the relay (`send-proxy-v2`), trusted with
/// `--accept-proxy-from 127.0.0.1`: the app (`RelayedApp` asking for v2
/// headers) is told the client's address, not HAProxy's, and the client's
/// bytes arrive untouched after it.
#[test]
fn haproxy_in_front_passes_the_clients_address_to_the_app() {
    let relay = start_relay_with(|c: &mut Config| {
        c.accept_proxy_from = Some("127.0.0.1".parse().expect("cidr"));
    });
    let options = RegisterOptions {
        proxy_protocol: Some(ProxyVersion::V2),
        ..RegisterOptions::default()
    };
    let app = RelayedApp::register_with(relay.reg_addr(), &options).expect("register");
    let dir = TempDir::new("haproxy");
    let front = free_port();
    let Some(_haproxy) = haproxy(&dir, front, local(app.relayed_port())) else {
        return;
    };
    let client = std::thread::spawn(move || {
        let mut stream = connect_from(OTHER_LOOPBACK, local(front)).expect("connect");
        stream.write_all(b"through haproxy").expect("write");
        let mut answer = [0u8; 2];
        stream.read_exact(&mut answer).expect("read the answer");
        (stream.local_addr().expect("addr"), answer)
    });
    // The first may be the start-up probe's connection (from 127.0.0.1,
    // made to see HAProxy listen): the client is the one from 127.0.0.2.
    let mut incoming = loop {
        let incoming = app.accept_client().expect("a client");
        let told = incoming.client_addr().expect("the client's address");
        if told.ip() == OTHER_LOOPBACK {
            break incoming;
        }
    };
    let told = incoming.client_addr().expect("the client's address");
    assert_eq!(read_exactly(&mut incoming, 15), b"through haproxy");
    incoming.write_all(b"ok").expect("answer");
    let (client_addr, answer) = client.join().expect("the client");
    assert_eq!(&answer, b"ok");
    assert_eq!(told, client_addr, "the app sees the client, not HAProxy");
}

/// The original protocol is untouched by the extension: an app that does
/// not ask gets no header, and a client's bytes (even header-like ones)
/// reach it byte-exact.
#[test]
fn apps_that_do_not_ask_get_exactly_the_clients_bytes() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let bytes = b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\r\nand the rest";
    client.write_all(bytes).expect("client writes");
    let mut dial_in = app.dial_in();
    assert_eq!(read_exactly(&mut dial_in, bytes.len()), bytes);
    drop((client, dial_in));
    assert_no_leftovers(&relay);
}
