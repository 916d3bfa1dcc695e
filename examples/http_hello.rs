//! A tiny HTTP responder published through a relay with the blocking
//! [`RelayedApp`] API: every client gets a fixed page. Run a relay first:
//!
//! ```sh
//! cargo run --release -- serve &
//! cargo run --example http_hello -- 127.0.0.1:8080
//! curl http://127.0.0.1:8081/        # the address the example printed
//! ```
//!
//! Arguments: the relay's registration address (default `127.0.0.1:8080`)
//! and, optionally, how many requests to serve before exiting (default: no
//! limit), which lets a test run it to completion.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;

use tcp_relay::RelayedApp;

/// Longest request head we read; the rest is ignored.
const MAX_HEAD: usize = 8 * 1024;

const BODY: &str = "hello from behind the relay\n";

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let relay = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let limit = match args.next() {
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    let app = RelayedApp::register(relay.as_str())?;
    println!("http://{}/", app.public_addr());
    let mut workers = Vec::new();
    for stream in app.incoming().take(limit.unwrap_or(usize::MAX)) {
        match stream {
            // Thread per client: this is the user's code, plain std I/O.
            Ok(stream) => workers.push(thread::spawn(move || serve(stream))),
            Err(e) => eprintln!("client lost: {e}"),
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// Reads the request head (up to the blank line), answers with the page.
fn serve(mut stream: TcpStream) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)
}
