//! Real traffic between namespaces, for tests: a one-shot TCP echo server
//! and a client, with sockets made inside the namespaces (no helper program).

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
