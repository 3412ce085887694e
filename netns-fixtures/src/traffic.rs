//! Real traffic between namespaces, for tests: a one-shot TCP echo server
//! and a client, and a connection kept open across an event, with sockets
//! made inside the namespaces (no helper program). Addresses of either
//! family (`[2001:db8::10]:80`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::Netns;

/// Accepts one TCP connection on `addr` inside `ns`, echoes what it reads,
/// and returns the peer address it saw. The socket is bound before this
/// returns, so a client may connect at once.
pub fn echo_server(ns: &Netns, addr: SocketAddr) -> std::thread::JoinHandle<SocketAddr> {
    let listener =
        ns.in_thread(|| TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("read");
        s.write_all(&buf[..n]).expect("write");
        peer
    })
}

/// Connects from inside `ns` to `addr`, sends `ping\n` and returns the reply.
pub fn tcp_round_trip(ns: &Netns, addr: SocketAddr) -> String {
    let mut s = ns
        .in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect from {} to {addr}: {e}", ns.name()));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"ping\n").expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf
}

/// Accepts one TCP connection on `addr` inside `ns` and echoes everything
/// it reads until the client closes; returns the peer address it saw. For
/// tests that keep one connection open across an event (a daemon restart)
/// and talk over it before and after: see [`tcp_connect`]. The socket is
/// bound before this returns.
pub fn echo_server_until_closed(ns: &Netns, addr: SocketAddr) -> std::thread::JoinHandle<SocketAddr> {
    let listener =
        ns.in_thread(|| TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                return peer;
            }
            s.write_all(&buf[..n]).expect("write");
        }
    })
}

/// A TCP connection from inside `ns` to `addr` (IPv4 or IPv6), with 10-s
/// read and write timeouts; [`echo`] sends over it and reads the echo.
pub fn tcp_connect(ns: &Netns, addr: SocketAddr) -> TcpStream {
    let s = ns
        .in_thread(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect from {} to {addr}: {e}", ns.name()));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Sends `msg` over `s` (to an [`echo_server_until_closed`]) and returns
/// what came back, exactly as many bytes as were sent.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}
