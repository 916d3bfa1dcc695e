//! Running out of file descriptors: the relay binary under
//! `prlimit --nofile=64:64` (it raises its soft limit to the hard one, so 64
//! it is), flooded with clients of an echo app until `accept` fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tcp_relay::EchoApp;

use super::common::*;
use super::*;

/// Clients opened in the flood: at two descriptors per relayed client, far
/// more than 64 descriptors hold.
const FLOOD: usize = 80;

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The command name (field 2) may hold spaces; fields after it do not.
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15; `after_name` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).expect("clock ticks per second");
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Sends `bytes` on `stream` and expects them echoed back.
fn echoes(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("send through the pipe");
    assert_eq!(read_exactly(stream, bytes.len()), bytes, "the echo");
}

/// Whether a fresh client at `addr` gets `bytes` echoed back; `false` if
/// the relay closes or resets it instead.
fn served(addr: SocketAddr, bytes: &[u8]) -> bool {
    let Ok(mut client) = try_connect(addr) else {
        return false;
    };
    let mut echoed = vec![0; bytes.len()];
    client.write_all(bytes).is_ok() && client.read_exact(&mut echoed).is_ok() && echoed == bytes
}

/// Out of descriptors, the relay backs off instead of spinning: over a
/// second of exhaustion it uses well under a CPU-second (0.25 s). An
/// established pipe keeps flowing throughout. Once the flood's clients
/// close, accepting resumes: within a few dial-in timeouts a new client
/// is served, and a new app can still register (no listener was lost).
#[test]
fn out_of_descriptors_the_relay_backs_off_and_recovers() {
    let (mut relay, reg) = serve_process(
        &["prlimit", "--nofile=64:64"],
        &["--dial-in-timeout", "1s"],
        &[],
    );
    let comm = fs::read_to_string(format!("/proc/{}/comm", relay.pid())).expect("read comm");
    assert_eq!(
        comm.trim(),
        "tcp-relay",
        "measuring the relay, not its wrapper"
    );

    let echo = EchoApp::connect(reg).expect("register the echo app");
    let public = local(echo.relayed_port());
    let _echo = echo.spawn().expect("run the echo app");
    let mut steady = connect(public);
    echoes(&mut steady, b"before the flood");

    let flood: Vec<TcpStream> = (0..FLOOD)
        .filter_map(|_| try_connect(public).ok())
        .collect();
    assert!(
        relay.find_in_log("pausing accepts", WAIT).is_some(),
        "the relay never ran out of descriptors: {:?}",
        relay.log()
    );

    let before = cpu_time(relay.pid());
    let window = Instant::now();
    // Measuring over a window, not synchronising: the flood stays open.
    thread::sleep(Duration::from_secs(1));
    let used = cpu_time(relay.pid()) - before;
    let wall = window.elapsed();
    assert!(
        used < Duration::from_millis(250),
        "the relay used {used:?} of CPU in {wall:?} while out of descriptors"
    );
    eprintln!("relay CPU while out of descriptors: {used:?} in {wall:?}");
    echoes(&mut steady, b"during the flood");
    assert!(relay.is_running(), "the relay died: {:?}", relay.log());

    drop(flood);
    // The flood's closed connections still queue in the kernel's backlogs;
    // clients caught behind them may time out, so a few tries are allowed.
    let recovered = Instant::now();
    let mut tries = 1;
    while !served(public, b"after the flood") {
        assert!(
            recovered.elapsed() < WAIT,
            "no client served in {WAIT:?} after the flood closed ({tries} tries)"
        );
        tries += 1;
    }
    eprintln!(
        "served again after {:?} ({tries} tries)",
        recovered.elapsed()
    );
    let again = EchoApp::connect(reg).expect("a new app registers after the flood");
    let again_public = local(again.relayed_port());
    let _again = again.spawn().expect("run the second echo app");
    assert_eq!(exchange(again_public, b"new app"), b"new app");
    echoes(&mut steady, b"still flowing");
}

/// Out of descriptors because clients waiting for dial-ins hold them all,
/// the relay must still take the app's dial-in for the oldest of them, or
/// no client is ever served again until they time out: the descriptors are
/// spent on clients, none is left for the dial-ins that would complete
/// them. With a 5 s dial-in timeout, the oldest client must get the bytes
/// its app sends within 3 s.
#[test]
fn out_of_descriptors_a_waiting_client_still_gets_its_dial_in() {
    let (mut relay, reg) = serve_process(
        &["prlimit", "--nofile=64:64"],
        &["--dial-in-timeout", "5s"],
        &[],
    );
    let app = TestApp::register(reg);
    let mut clients: Vec<TcpStream> = (0..FLOOD)
        .filter_map(|_| try_connect(app.relayed_addr()).ok())
        .collect();
    assert!(
        relay.find_in_log("pausing accepts", WAIT).is_some(),
        "the relay never ran out of descriptors: {:?}",
        relay.log()
    );

    let started = Instant::now();
    let mut dial_in = app.dial_in();
    dial_in
        .write_all(b"for the oldest")
        .expect("the app writes");
    let oldest = &mut clients[0];
    oldest
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("set a read timeout");
    let mut got = [0u8; 14];
    let read = oldest.read_exact(&mut got);
    assert!(
        read.is_ok() && &got == b"for the oldest",
        "the oldest waiting client was not served ({read:?} after {:?}): \
         its dial-in waits in the backlog while waiting clients hold every descriptor",
        started.elapsed()
    );
}

/// A local echo service on 127.0.0.1:0, a thread per connection.
fn echo_service() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the service");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The agent out of descriptors: `expose` under `prlimit --nofile=32`
/// (room for about a dozen clients at two sockets each) with more clients
/// than that at once, and `--max-clients` above what the descriptors hold.
/// A client whose sockets cannot be made waits (dialing pauses and
/// retries) instead of being lost: every client is served, in order, as
/// the ones before it leave.
#[test]
fn out_of_descriptors_the_agent_makes_clients_wait_and_serves_them() {
    const CLIENTS: usize = 24;
    let relay = start_relay_with(|c| c.dial_in_timeout = Duration::from_secs(30));
    let (reg, local) = (relay.reg_addr().to_string(), echo_service().to_string());
    let binary = env!("CARGO_BIN_EXE_tcp-relay");
    let args = [
        "--nofile=32:32",
        binary,
        "expose",
        "--relay",
        &reg,
        "--local",
        &local,
        "--max-clients",
        "100",
        "--no-splice",
    ];
    let mut agent = Process::spawn("prlimit", &args, &[]);
    let public: SocketAddr = agent
        .stdout_line("the address")
        .parse()
        .expect("an address");
    let mut clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(public)).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.write_all(&[i as u8]).expect("a client writes");
    }
    assert!(
        agent
            .find_in_log("dial requests wait until descriptors free up", WAIT)
            .is_some(),
        "the agent never ran out of descriptors: {:?}",
        agent.log()
    );
    for (i, mut client) in clients.into_iter().enumerate() {
        client
            .set_read_timeout(Some(Duration::from_secs(25)))
            .expect("set a read timeout");
        let mut byte = [0u8; 1];
        let read = client.read_exact(&mut byte);
        assert!(
            read.is_ok() && byte[0] == i as u8,
            "client {i} was not served ({read:?}); log: {:?}",
            agent.log()
        );
        // Leaving frees the descriptors the next waiting client needs.
    }
}
