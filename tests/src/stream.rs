//! A steady UDP stream between two pods (one datagram every 2 ms, numbered),
//! for tests that must show no datagram is lost across a daemon restart.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use flannel_net::netns::NetNs;
use netns_fixtures::{wait_until, Netns};

/// A running stream. Dropped without [`UdpStream::stop_and_check_none_lost`]
/// (a test that failed first), it stops sending, so that its thread does not
/// fail on the namespaces going away.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    sender: Option<JoinHandle<u32>>,
    receiver: Option<JoinHandle<BTreeSet<u32>>>,
}

impl UdpStream {
    /// Sends from `from` to `target` (an address in `to`, IPv4 or IPv6) and waits until
    /// datagrams arrive.
    pub fn start(from: &Netns, to: &Netns, target: SocketAddr) -> UdpStream {
        let rx = NetNs::open(to.path()).unwrap().run(move || UdpSocket::bind(target)).unwrap().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
        let tx = NetNs::open(from.path()).unwrap().run(move || UdpSocket::bind(any)).unwrap().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seq: u32 = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = tx.send_to(&seq.to_be_bytes(), target) {
                        // Only while the test is being torn down after a failure.
                        assert!(stop.load(Ordering::Relaxed), "send datagram {seq}: {e}");
                        break;
                    }
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                seq
            })
        };
        let receiver = {
            let received = received.clone();
            std::thread::spawn(move || {
                let mut got = BTreeSet::new();
                let mut buf = [0u8; 4];
                let mut idle = 0;
                while idle < 5 {
                    match rx.recv(&mut buf) {
                        Ok(4) => {
                            got.insert(u32::from_be_bytes(buf));
                            received.fetch_add(1, Ordering::Relaxed);
                            idle = 0;
                        }
                        _ => idle += 1,
                    }
                }
                got
            })
        };
        let s = UdpStream { stop, received, sender: Some(sender), receiver: Some(receiver) };
        s.wait_flowing("traffic to flow");
        s
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until 50 more datagrams have arrived.
    pub fn wait_flowing(&self, what: &str) {
        let before = self.received();
        wait_until(Duration::from_secs(5), what, || self.received() > before + 50);
    }

    /// Stops; returns how many datagrams were sent and the sequence numbers
    /// of those that never arrived.
    pub fn stop_and_count(mut self) -> (u32, Vec<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.take().unwrap().join().unwrap();
        let got = self.receiver.take().unwrap().join().unwrap();
        assert!(sent > 100, "only {sent} datagrams sent");
        (sent, (0..sent).filter(|s| !got.contains(s)).collect())
    }

    /// Stops; panics unless every datagram sent arrived.
    pub fn stop_and_check_none_lost(self, what: &str) {
        let (sent, missing) = self.stop_and_count();
        assert!(
            missing.is_empty(),
            "{} of {sent} datagrams lost {what}: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
