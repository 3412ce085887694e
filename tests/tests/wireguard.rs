//! The wireguard backend end to end (user-space path: the kernels here
//! have no WireGuard module): real etcd, real daemons on three nodes, pods
//! plugged in by the real plugin, real traffic through `flannel-wg` and
//! the daemons' boringtun tunnels, and a packet capture on the underlay.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::overlay::{etcdctl_ok, Overlay};
use e2e_tests::{http_get, metric};
use netns_fixtures::{require_root, wait_until, Netns};

/// With a PSK (every handshake mixes it in) and keepalives every 5 s
/// (which also make a restarted node handshake at once).
const WG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":5,"PSK":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}}"#;
const HEALTH: &[&str] = &["--healthz-ip", "127.0.0.1", "--healthz-port", "9105"];

fn overlay(nodes: usize) -> Overlay {
    let mut o = Overlay::with_conf(nodes, WG);
    with_keys_and_metrics(&mut o);
    o
}

fn key_file(o: &Overlay, i: usize) -> std::path::PathBuf {
    o.dir.path().join(format!("node{i}/wgkey"))
}

fn sample(o: &Overlay, i: usize, name: &str) -> f64 {
    let text = http_get(&o.cluster.node(i).ns, "127.0.0.1:9105".parse().unwrap(), "/metrics");
    metric(&text, name).unwrap_or_else(|| panic!("no {name} in node{i}'s /metrics:\n{text}"))
}

fn wait_peers(o: &Overlay, n: usize) {
    for i in 0..n {
        wait_until(Duration::from_secs(10), &format!("node{i}'s wireguard peer table"), || {
            sample(o, i, "flannel_peers") == (n - 1) as f64
        });
    }
}

/// Frames seen on one interface of a namespace (an AF_PACKET socket),
/// collected by a thread until [`Capture::finish`]; the thread and its
/// socket (which holds the namespace) end on drop too, when a test panics
/// before it finishes.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    fn start(ns: &Netns, ifname: &str) -> Capture {
        let name = std::ffi::CString::new(ifname).unwrap();
        let fd = ns.in_thread(|| {
            // SAFETY: plain socket(2) call.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a valid NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index != 0, "no {ifname:?}");
            // SAFETY: zeroed sockaddr_ll is valid; bound with its size.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = index as i32;
            let rc = unsafe {
                libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            // Without it the thread would never see the stop flag.
            set_recv_timeout(&fd, libc::timeval { tv_sec: 0, tv_usec: 100_000 });
            fd
        });
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: reads at most buf.len() bytes into buf.
                let n =
                    unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&fd), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Capture { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `SO_RCVTIMEO` on `sock`: its receives (and, for a listener, accepts)
/// give up after `tv`.
fn set_recv_timeout(sock: &impl std::os::fd::AsRawFd, tv: libc::timeval) {
    // SAFETY: SO_RCVTIMEO takes a timeval, given with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// An IPv4 frame's protocol, addresses and (TCP/UDP) ports.
fn ipv4_of(frame: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, u16, u16)> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let ports = ip.get(ihl..ihl + 4).map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])));
    let (sp, dp) = ports.unwrap_or((0, 0));
    Some((ip[9], src, dst, sp, dp))
}

/// Echoes one read on every connection to `target` inside `ns` until
/// dropped (its listener, which holds the pod's namespace, closed and its
/// thread ended, also when a test panics).
#[must_use = "the server stops when dropped"]
struct EchoForever {
    stop: Arc<AtomicBool>,
    listener: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn echo_forever(ns: &Netns, target: SocketAddr) -> EchoForever {
    let listener = ns.in_thread(|| std::net::TcpListener::bind(target)).unwrap();
    let fd = OwnedFd::from(listener.try_clone().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        for c in listener.incoming() {
            if s.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut c) = c else { continue };
            use std::io::{Read, Write};
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 16];
            if let Ok(n) = c.read(&mut buf) {
                let _ = c.write_all(&buf[..n]);
            }
        }
    });
    EchoForever { stop, listener: fd, thread: Some(thread) }
}

impl Drop for EchoForever {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::Relaxed);
        // shutdown(2) wakes the thread blocked in accept.
        // SAFETY: a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until a TCP round trip from `from` to `target` (an
/// [`echo_forever`]) succeeds.
fn wait_tcp(from: &Netns, target: SocketAddr, what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        use std::io::{Read, Write};
        let Ok(mut c) = from.in_thread(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 16];
        c.write_all(b"ping\n").is_ok() && c.read(&mut buf).is_ok_and(|n| &buf[..n] == b"ping\n")
    });
}

#[test]
fn wireguard_pods_talk_encrypted_across_three_nodes_and_survive_a_restart() {
    if !require_root() {
        return;
    }
    let mut o = overlay(3);
    o.start_all();
    wait_peers(&o, 3);
    let node_ips: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(192, 0, 2, 10 + i as u8)).collect();

    // Keys: one file per node, mode 0400, its public key in the lease as
    // current flannel writes it (with the port).
    let mut keys = Vec::new();
    for (i, node_ip) in node_ips.iter().enumerate() {
        let path = key_file(&o, i);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400, "node{i}'s key file");
        let text = std::fs::read_to_string(&path).unwrap();
        let public = public_of(&text);
        let lease = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(i)]);
        assert_eq!(
            lease.trim(),
            format!(
                r#"{{"PublicIP":"{node_ip}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{public}","Port":51820}}}}"#
            ),
            "node{i}'s lease"
        );
        keys.push(text);
    }
    assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);

    // flannel's device: <subnet>.0/32, MTU underlay - 80, the Network
    // routed into it with scope link; the pods get that MTU.
    for i in 0..3 {
        let ns = &o.cluster.node(i).ns;
        let link = ns.ip_json(&["-4", "addr", "show", "dev", "flannel-wg"]);
        assert_eq!(link[0]["mtu"].as_u64(), Some(1420), "{link}");
        let addr = &link[0]["addr_info"][0];
        assert_eq!(
            format!("{}/{}", addr["local"].as_str().unwrap(), addr["prefixlen"]),
            format!("{}/32", o.subnet(i).network())
        );
        let routes = ns.ip_json(&["-4", "route", "show", "dev", "flannel-wg"]);
        let routes: Vec<String> = routes
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r["dst"].as_str().unwrap(), r["scope"].as_str().unwrap_or("global")))
            .collect();
        assert_eq!(routes, ["10.244.0.0/16 link"], "node{i}");
        let env = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1420\n"), "{env}");
    }

    // Every pod reaches every pod over TCP, while node 1's underlay is
    // captured: only WireGuard datagrams between nodes, no pod address and
    // no payload in clear.
    let capture = Capture::start(&o.cluster.node(1).ns, "eth0");
    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("w{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7400);
    let frames = capture.finish();
    let wg = only_wireguard(&frames, &pods, &node_ips);
    assert!(wg > 0, "no WireGuard datagram seen in {} frames", frames.len());
    assert!(sample(&o, 0, "flannel_wireguard_rx_packets_total") > 0.0);

    // Datagrams of no peer are dropped and counted: a data message with an
    // index no tunnel has, and a handshake initiation not made with our key.
    let rogue = o.outside().in_thread(|| UdpSocket::bind("192.0.2.200:0")).unwrap();
    let node0 = SocketAddr::from(([192, 0, 2, 10], 51820));
    let unknown = sample(&o, 0, "flannel_wireguard_dropped_unknown_peer_total");
    let mut data = vec![4u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
    data.resize(64, 0x55);
    rogue.send_to(&data, node0).unwrap();
    wait_until(Duration::from_secs(5), "the unknown-index datagram to be counted", || {
        sample(&o, 0, "flannel_wireguard_dropped_unknown_peer_total") == unknown + 1.0
    });
    let invalid = sample(&o, 0, "flannel_wireguard_dropped_invalid_total");
    let mut init = vec![1u8, 0, 0, 0];
    init.resize(148, 0x33);
    rogue.send_to(&init, node0).unwrap();
    wait_until(Duration::from_secs(5), "the forged initiation to be counted", || {
        sample(&o, 0, "flannel_wireguard_dropped_invalid_total") == invalid + 1.0
    });

    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
    assert!(report.to_string().contains("user-space data path runs"), "{report}");
    assert!(report.to_string().contains("this kernel has no WireGuard"), "{report}");
    assert!(!report.to_string().contains("handshake"), "diagnose read /metrics and found no failing peer: {report}");
    // The kernel path was tried first (this kernel has no WireGuard: the
    // link of kind wireguard cannot be made) and the fallback said why.
    assert!(
        o.log(0).contains("no kernel WireGuard (ip link add flannel-wg type wireguard: Operation not supported"),
        "{}",
        o.log(0)
    );

    // A restart keeps the key (and so what peers know) and traffic resumes.
    o.stop(1);
    o.start(1);
    assert_eq!(std::fs::read_to_string(key_file(&o, 1)).unwrap(), keys[1], "node1's key changed across a restart");
    assert_eq!(std::fs::metadata(key_file(&o, 1)).unwrap().permissions().mode() & 0o777, 0o400);
    wait_peers(&o, 3);
    let target = SocketAddr::new(pods[1].1.into(), 7500);
    let _echo = echo_forever(&pods[1].0, target);
    wait_tcp(&pods[0].0, target, "TCP from node0's pod to node1's pod after node1's restart");
    e2e_tests::all_pods_talk(&pods, 7600);
}

#[test]
fn wireguard_bad_lease_rekey_device_loss_roaming_and_peer_removal() {
    if !require_root() {
        return;
    }
    let mut o = overlay(3);
    o.start_all();
    wait_peers(&o, 3);
    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("r{i}"))).collect();
    let targets: Vec<SocketAddr> = pods.iter().map(|(_, a)| SocketAddr::new((*a).into(), 7700)).collect();
    let _echoes: Vec<EchoForever> = pods.iter().zip(&targets).map(|((ns, _), t)| echo_forever(ns, *t)).collect();
    wait_tcp(&pods[0].0, targets[2], "node0's pod -> node2's pod");

    // A lease whose PublicKey is not a key: skipped by name, the others
    // unaffected.
    let bad = "/coreos.com/network/subnets/10.244.200.0-24";
    etcdctl_ok(
        o.outside(),
        &[
            "put",
            bad,
            r#"{"PublicIP":"192.0.2.99","BackendType":"wireguard","BackendData":{"PublicKey":"c2VjcmV0","Port":51820}}"#,
        ],
    );
    wait_until(Duration::from_secs(10), "node0 to name the bad lease", || {
        o.log(0)
            .lines()
            .any(|l| l.contains(bad) && l.contains("BackendData.PublicKey \"c2VjcmV0\" is 6 bytes of base64, not 32"))
    });
    assert_eq!(sample(&o, 0, "flannel_peers"), 2.0);
    wait_tcp(&pods[0].0, targets[1], "node0's pod -> node1's pod with a bad lease around");
    etcdctl_ok(o.outside(), &["del", bad]);

    // Node 2 gets a new key (its key file deleted, as an operator would to
    // rotate it): the others re-key to its new lease data, traffic flows.
    let old2 = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(2)]);
    o.stop(2);
    std::fs::remove_file(key_file(&o, 2)).unwrap();
    o.start(2);
    let new2 = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(2)]);
    assert_ne!(old2, new2, "node2's lease keeps its old key");
    let key2: serde_json::Value = serde_json::from_str(new2.trim()).unwrap();
    let key2 = key2["BackendData"]["PublicKey"].as_str().unwrap().to_string();
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i} to take node2's new key"), || {
            o.log(i).lines().any(|l| l.contains(&format!("key {key2}")))
        });
    }
    wait_tcp(&pods[0].0, targets[2], "node0's pod -> node2's pod after node2's new key");
    wait_tcp(&pods[2].0, targets[1], "node2's pod -> node1's pod after node2's new key");

    // flannel-wg deleted under a running daemon: the data path starts
    // anew with its device, address and route.
    o.cluster.node(1).ns.run_ok("ip", &["link", "del", "flannel-wg"]);
    wait_tcp(&pods[0].0, targets[1], "node0's pod -> node1's pod after flannel-wg was deleted on node1");
    let routes = o.cluster.node(1).ns.run_ok("ip", &["-4", "route", "show", "dev", "flannel-wg"]);
    assert!(routes.contains("10.244.0.0/16 scope link"), "{routes}");
    // The kernel path was tried again with the restart, the fallback
    // logged once per process.
    assert_eq!(o.log(1).matches("no kernel WireGuard").count(), 1, "{}", o.log(1));

    // Roaming: node 2 behind a (stateless) port translation, its datagrams
    // leave from port 40000 and only those to port 40000 come in. The
    // others move node 2's endpoint to where its authenticated datagrams
    // come from, as WireGuard specifies, and traffic goes on.
    let nft = "table ip flt_roam {
        chain out { type filter hook output priority 0; udp sport 51820 udp sport set 40000; }
        chain pre { type filter hook prerouting priority -300; udp dport 51820 drop; udp dport 40000 udp dport set 51820; }
    }";
    let ns2 = &o.cluster.node(2).ns;
    let mut child = ns2.command("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), nft.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft -f");
    for i in 0..2 {
        wait_until(Duration::from_secs(15), &format!("node{i} to follow node2 to port 40000"), || {
            o.log(i).contains(&format!("peer {} roamed: 192.0.2.12:51820 -> 192.0.2.12:40000", o.subnet(2)))
        });
    }
    wait_tcp(&pods[0].0, targets[2], "node0's pod -> node2's pod with node2 roamed");
    wait_tcp(&pods[2].0, targets[1], "node2's pod -> node1's pod with node2 roamed");

    // Node 2 leaves: its peer is removed from the others' tables.
    o.stop(2);
    etcdctl_ok(o.outside(), &["del", &o.lease_key(2)]);
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i} to remove node2"), || {
            sample(&o, i, "flannel_peers") == 1.0 && o.log(i).contains(&format!("peer {} (", o.subnet(2)))
        });
    }
    wait_tcp(&pods[1].0, targets[0], "node1's pod -> node0's pod after node2 left");
}

/// No pod address, no payload in clear, and only WireGuard datagrams (UDP
/// 51820) between the nodes in `frames` ([`only_wireguard_ips`] for IPv4
/// pods and nodes); returns how many of those there were.
fn only_wireguard(frames: &[Vec<u8>], pods: &[(Netns, Ipv4Addr)], node_ips: &[Ipv4Addr]) -> usize {
    let pod_addrs: Vec<std::net::IpAddr> = pods.iter().map(|(_, a)| (*a).into()).collect();
    let node_ips: Vec<std::net::IpAddr> = node_ips.iter().map(|a| (*a).into()).collect();
    only_wireguard_ips(frames, &pod_addrs, &node_ips, 51820, 0).0
}

#[test]
fn wireguard_in_kubernetes_mode_annotations_and_encrypted_pod_traffic() {
    if !(require_root() && e2e_tests::kube::require_kube()) {
        return;
    }
    let mut ko = e2e_tests::kube::KubeOverlay::with_conf(3, WG);
    with_keys_and_metrics(&mut ko.o);
    for i in 0..3 {
        ko.create_node(i);
    }
    ko.o.start_all();
    wait_peers(&ko.o, 3);
    let node_ips: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(192, 0, 2, 10 + i as u8)).collect();
    for (i, ip) in node_ips.iter().enumerate() {
        let n = ko.api.get_json(&["node", &e2e_tests::kube::KubeOverlay::node_name(i)]);
        let a = &n["metadata"]["annotations"];
        let get = |k: &str| a[format!("{}/{k}", e2e_tests::kube::PREFIX)].as_str().unwrap_or_default().to_string();
        let public = public_key(&ko.o, i);
        assert_eq!(get("backend-type"), "wireguard", "node{i}: {a}");
        assert_eq!(get("backend-data"), format!(r#"{{"PublicKey":"{public}","Port":51820}}"#), "node{i}");
        assert_eq!(get("public-ip"), ip.to_string(), "node{i}");
    }
    let capture = Capture::start(&ko.o.cluster.node(2).ns, "eth0");
    let pods: Vec<_> = (0..3).map(|i| ko.o.add_pod(i, &format!("k{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 7800);
    let frames = capture.finish();
    assert!(only_wireguard(&frames, &pods, &node_ips) > 0, "no WireGuard datagram in {} frames", frames.len());

    // Node 2 restarted with another PSK (its own net-conf.json): its
    // handshakes fail (counted), no pod traffic passes, nothing in clear.
    let other =
        WG.replace("AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=", "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=");
    assert_ne!(other, WG);
    let other_path = ko.o.dir.path().join("net-conf-other-psk.json");
    std::fs::write(&other_path, other).unwrap();
    let flags: Vec<String> =
        ko.o.flags(2)
            .into_iter()
            .map(|f| if f == ko.net_conf.display().to_string() { other_path.display().to_string() } else { f })
            .collect();
    assert!(flags.contains(&other_path.display().to_string()), "{flags:?}");
    ko.o.stop(2);
    ko.o.set_flags(2, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    ko.o.start(2);
    let before = sample(&ko.o, 2, "flannel_wireguard_dropped_invalid_total");
    let capture = Capture::start(&ko.o.cluster.node(2).ns, "eth0");
    let target = SocketAddr::new(pods[2].1.into(), 7900);
    let _echo = echo_forever(&pods[2].0, target);
    // Node 2 starts handshakes (keepalives every 5 s); the responses, made
    // with the others' PSK, fail authentication there. (Node 0 and 1 only
    // find out when their own re-handshake fails, up to WireGuard's 15 s
    // later, as they keep the session of node 2's first run until then.)
    wait_until(Duration::from_secs(20), "node2 to count the failed handshake responses", || {
        sample(&ko.o, 2, "flannel_wireguard_dropped_invalid_total") > before
    });
    // diagnose on node 2 names both peers (from the daemon's /metrics).
    let names = |t: &str| (0..2).all(|i| t.contains(&format!("handshake responses from peer {} (", ko.o.subnet(i))));
    wait_until(Duration::from_secs(20), "diagnose on node2 to name the PSK mismatch with node0 and node1", || {
        let (ok, report) = ko.o.diagnose(2, &[]);
        !ok && names(&report.to_string())
    });
    let tried = pods[0].0.in_thread(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)));
    assert!(tried.is_err(), "a TCP connection across a PSK mismatch");
    let frames = capture.finish();
    // Node 2's handshake initiations (every 5 s) and the answers to them
    // crossed its underlay during the waits above: a capture that saw none
    // would prove nothing.
    assert!(only_wireguard(&frames, &pods, &node_ips) > 0, "no WireGuard datagram in {} frames", frames.len());
}

/// A node whose tunnel is an independent WireGuard implementation:
/// Debian's `wireguard-go` (user space, Go) running `flannel-wg`, set up
/// with `wg` and `ip` the way flannel v0.20.2 sets up its kernel device.
/// Its process is killed on drop; its control socket lives on a tmpfs of
/// its own mount namespace, which goes with it.
struct WireguardGo {
    proc: e2e_tests::overlay::Proc,
    pid: String,
}

impl WireguardGo {
    /// `wireguard-go flannel-wg` in `ns`, under `unshare -m` with a private
    /// tmpfs on /run (= /var/run, where its control sockets go: namespaces
    /// share the host's /run, and other nodes may run one too).
    fn start(ns: &Netns, log: &std::path::Path) -> WireguardGo {
        Self::start_named(ns, log, "flannel-wg")
    }

    /// [`WireguardGo::start`] for device `name` (`flannel-wg-v6`).
    fn start_named(ns: &Netns, log: &std::path::Path, name: &str) -> WireguardGo {
        let log_file = std::fs::File::create(log).unwrap();
        let child = ns
            .command("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &format!("mount -t tmpfs -o mode=0755 flt-wg-run /run && exec wireguard-go --foreground {name}"),
            ])
            // It refuses to start where the kernel could have the module
            // unless told.
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            // One open file for both streams (two opens would each write
            // from offset 0 over the other).
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn wireguard-go (apt-get install wireguard-go wireguard-tools)");
        // unshare(1) execs sh, which execs wireguard-go: one process.
        let pid = child.id().to_string();
        let wg = WireguardGo { proc: e2e_tests::overlay::Proc(Some(child)), pid };
        wait_until(Duration::from_secs(10), &format!("wireguard-go's {name} and control socket"), || {
            wg.try_wg(&["show", name]).is_ok()
        });
        wg
    }

    /// `wg args` in wireguard-go's mount namespace (where its socket is)
    /// and network namespace.
    fn try_wg(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &self.pid, "-m", "-n", "wg"])
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("wg {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn wg(&self, args: &[&str]) -> String {
        self.try_wg(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        self.proc.stop();
    }
}

/// Whether the tools the `wireguard-go` tests run are installed (else the
/// test is skipped, or fails under CI).
fn require_wireguard_go() -> bool {
    for tool in ["wireguard-go", "wg", "unshare", "nsenter"] {
        let found = std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
        if !found.status.success() {
            netns_fixtures::skip_or_fail(&format!(
                "{tool} not installed (apt-get install wireguard-go wireguard-tools)"
            ));
            return false;
        }
    }
    true
}

/// A `wireguard-go` node's key file in `dir` as flannel writes it (a key
/// from `wg genkey` in `ns`: base64, no newline, mode 0400) and the PSK of
/// net-conf `conf` in a file for `wg`: the key file, its public key, the
/// PSK file.
fn wg_go_key_files(ns: &Netns, dir: &std::path::Path, conf: &str) -> (std::path::PathBuf, String, std::path::PathBuf) {
    let genkey = ns.run_ok("wg", &["genkey"]);
    let private = genkey.trim();
    let key_path = dir.join("wgkey");
    std::fs::write(&key_path, private).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o400)).unwrap();
    let conf: serde_json::Value = serde_json::from_str(conf).unwrap();
    let psk_path = dir.join("psk");
    std::fs::write(&psk_path, conf["Backend"]["PSK"].as_str().unwrap()).unwrap();
    (key_path, public_of(private), psk_path)
}

/// The public key of a private key in the key file's format (base64).
fn public_of(private: &str) -> String {
    let private = flanneld_rs::config::decode_key(private).unwrap();
    flanneld_rs::config::encode_key(&flanneld_rs::backend::wireguard::keys::public_of(&private))
}

#[test]
fn wireguard_interoperates_with_wireguard_go_configured_as_flannel_does() {
    if !(require_root() && require_wireguard_go()) {
        return;
    }
    let mut o = overlay(3);
    let dir = o.dir.path().join("node2");
    std::fs::create_dir_all(&dir).unwrap();

    // Node 2's key file as flannel writes it, its PSK from the same net-conf.
    let (key_path, public, psk_path) = wg_go_key_files(&o.cluster.node(2).ns, &dir, WG);

    // Its lease as flannel v0.20.2 writes it (PublicKey only, no Port),
    // with flannel's 24 h TTL, before the other nodes take subnets.
    let subnet2: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
    let grant = etcdctl_ok(o.outside(), &["lease", "grant", "86400"]);
    let lease_id = grant.split_whitespace().nth(1).unwrap().to_string();
    let lease2 = format!(
        r#"{{"PublicIP":"192.0.2.12","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{public}"}}}}"#
    );
    etcdctl_ok(o.outside(), &["put", "--lease", &lease_id, "/coreos.com/network/subnets/10.244.200.0-24", &lease2]);

    // The device as flannel makes it: ListenPort, the key file, MTU
    // underlay - 80, <subnet>.0/32, up, the Network routed in, scope link.
    let wg = WireguardGo::start(&o.cluster.node(2).ns, &dir.join("wireguard-go.log"));
    let ns2 = &o.cluster.node(2).ns;
    wg.wg(&["set", "flannel-wg", "listen-port", "51820", "private-key", key_path.to_str().unwrap()]);
    ns2.run_ok("ip", &["link", "set", "flannel-wg", "mtu", "1420"]);
    ns2.run_ok("ip", &["addr", "add", "10.244.200.0/32", "dev", "flannel-wg"]);
    ns2.run_ok("ip", &["link", "set", "flannel-wg", "up"]);
    ns2.run_ok("ip", &["route", "add", "10.244.0.0/16", "dev", "flannel-wg", "scope", "link"]);
    assert_eq!(
        wg.wg(&["show", "flannel-wg", "public-key"]).trim(),
        public,
        "wg and flanneld-rs derive different public keys"
    );
    // The subnet.env flannel would write, for the CNI plugin on node 2.
    std::fs::write(
        &o.daemons[2].subnet_file,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.200.1/24\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();

    o.start(0);
    o.start(1);
    let ns2 = &o.cluster.node(2).ns;
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i}'s peer table with both others"), || {
            sample(&o, i, "flannel_peers") == 2.0
        });
    }

    // One peer per other lease, as flannel's addPeer: the lease's key, the
    // PSK, endpoint PublicIP:ListenPort, keepalive, allowed-ips its subnet.
    for i in 0..2 {
        let lease = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(i)]);
        let lease: serde_json::Value = serde_json::from_str(lease.trim()).unwrap();
        let endpoint = format!("{}:51820", lease["PublicIP"].as_str().unwrap());
        let subnet = o.subnet(i).to_string();
        wg.wg(&[
            "set",
            "flannel-wg",
            "peer",
            lease["BackendData"]["PublicKey"].as_str().unwrap(),
            "preshared-key",
            psk_path.to_str().unwrap(),
            "endpoint",
            &endpoint,
            "persistent-keepalive",
            "5",
            "allowed-ips",
            &subnet,
        ]);
    }

    // Pods on all three nodes talk over TCP both ways; node 2's underlay
    // carries WireGuard datagrams only.
    let node_ips: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(192, 0, 2, 10 + i as u8)).collect();
    let capture = Capture::start(ns2, "eth0");
    let pods: Vec<_> = (0..3).map(|i| o.add_pod(i, &format!("g{i}"))).collect();
    assert!(subnet2.contains(&pods[2].1), "node 2's pod got {} outside {subnet2}", pods[2].1);
    e2e_tests::all_pods_talk(&pods, 8100);
    let frames = capture.finish();
    assert!(only_wireguard(&frames, &pods, &node_ips) > 0, "no WireGuard datagram on node 2's underlay");

    // wireguard-go's own view: a handshake with each flanneld-rs node and
    // bytes both ways.
    let handshakes = wg.wg(&["show", "flannel-wg", "latest-handshakes"]);
    let transfer = wg.wg(&["show", "flannel-wg", "transfer"]);
    assert_eq!(handshakes.lines().count(), 2, "{handshakes}");
    for line in handshakes.lines() {
        let t: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(t > 0, "no handshake with a peer: {handshakes}");
    }
    for line in transfer.lines() {
        let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        assert!(f[0] > 0 && f[1] > 0, "no traffic both ways with a peer: {transfer}");
    }
    // And the host-network side: node 2 itself (source flannel-wg's
    // <subnet>.0, as on a flannel node) reaches a pod on node 0.
    let target = SocketAddr::new(pods[0].1.into(), 8200);
    let _echo = echo_forever(&pods[0].0, target);
    wait_tcp(ns2, target, "node 2 (wireguard-go) -> node0's pod");
    drop(wg);
}

/// Node `i`'s links whose name starts with `flannel`.
fn flannel_links(o: &Overlay, i: usize) -> Vec<String> {
    let links = o.cluster.node(i).ns.ip_json(&["link", "show"]);
    links
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().filter(|n| n.starts_with("flannel")).map(str::to_string))
        .collect()
}

/// Node `i`'s IPv4 routes into the Network, as `dst dev`.
fn overlay_routes(o: &Overlay, i: usize) -> Vec<String> {
    let routes = o.cluster.node(i).ns.ip_json(&["-4", "route", "show"]);
    let mut r: Vec<String> = routes
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dst"].as_str().is_some_and(|d| d.starts_with("10.244.")))
        .map(|r| format!("{} {}", r["dst"].as_str().unwrap(), r["dev"].as_str().unwrap_or("-")))
        .collect();
    r.sort();
    r
}

#[test]
fn wireguard_switched_to_vxlan_and_back_leaves_nothing_behind_but_the_key() {
    if !require_root() {
        return;
    }
    let mut o = overlay(2);
    o.start_all();
    wait_peers(&o, 2);
    let pods: Vec<_> = (0..2).map(|i| o.add_pod(i, &format!("s{i}"))).collect();
    e2e_tests::all_pods_talk(&pods, 8300);
    let keys: Vec<String> = (0..2).map(|i| std::fs::read_to_string(key_file(&o, i)).unwrap()).collect();
    for i in 0..2 {
        assert_eq!(flannel_links(&o, i), ["flannel-wg"], "node{i}");
    }

    // To vxlan: both daemons stopped (flannel-wg, a persistent TUN, stays
    // until then), the configuration changed, both started.
    let vxlan = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    for i in 0..2 {
        o.stop(i);
    }
    etcdctl_ok(o.outside(), &["put", "/coreos.com/network/config", vxlan]);
    for i in 0..2 {
        o.start(i);
    }
    for (i, key) in keys.iter().enumerate() {
        o.wait_converged(i);
        assert_eq!(flannel_links(&o, i), ["flannel.1"], "node{i}: flannel-wg left behind");
        let other = o.subnet(1 - i);
        let mut want = vec![format!("{other} flannel.1"), format!("{} cni0", o.subnet(i))];
        want.sort();
        assert_eq!(overlay_routes(&o, i), want, "node{i}: a route of flannel-wg left behind");
        assert!(o.log(i).contains("deleting flannel-wg: an earlier backend's or family's device"), "{}", o.log(i));
        assert_eq!(&std::fs::read_to_string(key_file(&o, i)).unwrap(), key, "node{i}'s key file");
    }
    e2e_tests::all_pods_talk(&pods, 8400);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");

    // And back: flannel.1 gone, flannel-wg back with the same key (so the
    // same public key in the lease), traffic encrypted again.
    for i in 0..2 {
        o.stop(i);
    }
    etcdctl_ok(o.outside(), &["put", "/coreos.com/network/config", WG]);
    for i in 0..2 {
        o.start(i);
    }
    wait_peers(&o, 2);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(flannel_links(&o, i), ["flannel-wg"], "node{i}: flannel.1 left behind");
        let mut want = vec!["10.244.0.0/16 flannel-wg".to_string(), format!("{} cni0", o.subnet(i))];
        want.sort();
        assert_eq!(overlay_routes(&o, i), want, "node{i}: a route of flannel.1 left behind");
        assert_eq!(&std::fs::read_to_string(key_file(&o, i)).unwrap(), key, "node{i}'s key file");
        let public = public_of(key);
        let lease = etcdctl_ok(o.outside(), &["get", "--print-value-only", &o.lease_key(i)]);
        assert!(lease.contains(&format!(r#""PublicKey":"{public}""#)), "node{i}'s lease: {lease}");
    }
    e2e_tests::all_pods_talk(&pods, 8500);
}

// ---- IPv6: flannel-wg-v6 (Mode separate), dual-stack and IPv6-only ----

/// [`WG`] dual-stack: the IPv6 network beside the IPv4 one, Mode separate
/// (the default).
const WG_DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":5,"PSK":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}}"#;

/// [`WG`] IPv6-only, with a port of its own for the IPv6 device.
const WG_V6ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:10::/56","Backend":{"Type":"wireguard","ListenPortV6":51900,"PersistentKeepaliveInterval":5}}"#;

/// Each node its key file (the nodes share this machine's /run) and
/// `/metrics`, in etcd or Kubernetes mode (the flags and environment the
/// overlay already has are kept).
fn with_keys_and_metrics(o: &mut Overlay) {
    for i in 0..o.daemons.len() {
        let mut flags = o.flags(i);
        flags.extend(HEALTH.iter().map(|s| s.to_string()));
        o.set_flags(i, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        let key = key_file(o, i);
        let mut env: Vec<(String, String)> = o.env(i);
        env.push(("WIREGUARD_KEY_FILE".into(), key.display().to_string()));
        o.set_env(i, &env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
    }
}

fn wait_peers6(o: &Overlay, n: usize) {
    for i in 0..n {
        wait_until(Duration::from_secs(10), &format!("node{i}'s IPv6 wireguard peer table"), || {
            sample(o, i, "flannel_peers_ipv6") == (n - 1) as f64
        });
    }
}

/// Node `i`'s public key, from its key file.
fn public_key(o: &Overlay, i: usize) -> String {
    public_of(&std::fs::read_to_string(key_file(o, i)).unwrap())
}

/// A frame's IP protocol, addresses and (TCP/UDP) ports, IPv4 or IPv6 (an
/// IPv6 header without extension headers, as our datagrams have).
fn ip_of(frame: &[u8]) -> Option<(u8, std::net::IpAddr, std::net::IpAddr, u16, u16)> {
    if let Some((proto, src, dst, sp, dp)) = ipv4_of(frame) {
        return Some((proto, src.into(), dst.into(), sp, dp));
    }
    if frame.len() < 14 + 40 || frame[12..14] != [0x86, 0xdd] {
        return None;
    }
    let ip = &frame[14..];
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let ports = ip.get(40..44).map(|p| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])));
    let (sp, dp) = ports.unwrap_or((0, 0));
    Some((ip[6], std::net::Ipv6Addr::from(src).into(), std::net::Ipv6Addr::from(dst).into(), sp, dp))
}

/// Checks captured frames: no pod address and no payload in clear, and
/// every packet between nodes a UDP datagram between WireGuard ports of
/// its family (`port4`, `port6`). How many of each family were seen.
fn only_wireguard_ips(
    frames: &[Vec<u8>],
    pod_addrs: &[std::net::IpAddr],
    node_ips: &[std::net::IpAddr],
    port4: u16,
    port6: u16,
) -> (usize, usize) {
    let (mut v4, mut v6) = (0, 0);
    for f in frames {
        let Some((proto, src, dst, sp, dp)) = ip_of(f) else { continue };
        for addr in pod_addrs {
            let octets = match addr {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            };
            assert!(!f.windows(octets.len()).any(|w| w == octets), "pod address {addr} in clear: {src} -> {dst}");
        }
        assert!(!f.windows(5).any(|w| w == b"ping\n"), "payload in clear: {src} -> {dst}");
        // The underlay's own neighbour discovery (ICMPv6 133..=137, the
        // type is the first byte where ports would be).
        let ndp = proto == 58 && (133..=137).contains(&(sp >> 8));
        if node_ips.contains(&src) && node_ips.contains(&dst) && !ndp {
            let port = if src.is_ipv4() { port4 } else { port6 };
            assert!(proto == 17 && sp == port && dp == port, "not WireGuard: proto {proto} {src}:{sp} -> {dst}:{dp}");
            if src.is_ipv4() {
                v4 += 1;
            } else {
                v6 += 1;
            }
        }
    }
    (v4, v6)
}

/// Node `i`'s routes through `dev` of `family` (`-4`/`-6`) but the
/// kernel's own, as `dst scope`.
fn dev_routes(o: &Overlay, i: usize, family: &str, dev: &str) -> Vec<String> {
    let routes = o.cluster.node(i).ns.ip_json(&[family, "route", "show", "dev", dev]);
    routes
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["protocol"] != "kernel")
        .map(|r| format!("{} {}", r["dst"].as_str().unwrap(), r["scope"].as_str().unwrap_or("global")))
        .collect()
}

/// Node `i`'s global addresses on `dev` of `family`, as `addr/len`, and
/// the device's MTU.
fn dev_addrs(o: &Overlay, i: usize, family: &str, dev: &str) -> (Vec<String>, u64) {
    let ns = &o.cluster.node(i).ns;
    let mtu = ns.ip_json(&["link", "show", "dev", dev])[0]["mtu"].as_u64().unwrap();
    // `ip -j` lists an address a filter drops as `{}`.
    let link = ns.ip_json(&[family, "addr", "show", "dev", dev, "scope", "global"]);
    let addrs = link
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect();
    (addrs, mtu)
}

/// flannel's IPv6 device on node `i`: its subnet's first address as a
/// /128, MTU underlay - 80, the IPv6 network routed into it
/// (`ConfigureV6` in flannel's device.go; flannel asks for scope link,
/// which the kernel does not keep for IPv6 routes: `ip` shows global).
fn check_v6_device(o: &Overlay, i: usize) {
    let s6 = o.subnet6(i).unwrap();
    let (addrs, mtu) = dev_addrs(o, i, "-6", "flannel-wg-v6");
    assert_eq!(addrs, [format!("{}/128", s6.network())], "node{i}");
    assert_eq!(mtu, 1420, "node{i}");
    assert_eq!(dev_routes(o, i, "-6", "flannel-wg-v6"), ["2001:db8:10::/56 global"], "node{i}");
    assert_eq!(dev_addrs(o, i, "-4", "flannel-wg-v6").0, Vec::<String>::new(), "node{i}");
}

fn check_v4_device(o: &Overlay, i: usize) {
    let (addrs, mtu) = dev_addrs(o, i, "-4", "flannel-wg");
    assert_eq!(addrs, [format!("{}/32", o.subnet(i).network())], "node{i}");
    assert_eq!(mtu, 1420, "node{i}");
    assert_eq!(dev_routes(o, i, "-4", "flannel-wg"), ["10.244.0.0/16 link"], "node{i}");
    assert_eq!(dev_addrs(o, i, "-6", "flannel-wg").0, Vec::<String>::new(), "node{i}");
}

/// Dual-stack pods on every node, every pod reaching every pod over both
/// families while node 1's underlay is captured: only WireGuard datagrams
/// of each family (ports 51820 and 51821), none of the pods' addresses in
/// clear.
fn dual_stack_pods_talk_encrypted(o: &Overlay, prefix: &str, port_base: u16) {
    let capture = Capture::start(&o.cluster.node(1).ns, "eth0");
    let pods = dual_pods(o, prefix);
    // The IPv6 traffic goes through flannel-wg-v6, the IPv4 through flannel-wg.
    let node0 = &o.cluster.node(0).ns;
    let to6 = node0.run_ok("ip", &["-6", "route", "get", &pods[1].1[1].to_string()]);
    assert!(to6.contains("dev flannel-wg-v6"), "{to6}");
    let to4 = node0.run_ok("ip", &["route", "get", &pods[1].1[0].to_string()]);
    assert!(to4.contains("dev flannel-wg "), "{to4}");
    let (v4, v6, frames) = talk_captured(capture, &pods, port_base, &dual_node_ips(o), (51820, 51821));
    assert!(v4 > 0 && v6 > 0, "WireGuard datagrams seen: {v4} over IPv4, {v6} over IPv6 in {frames} frames");
}

/// A dual-stack pod `<prefix><i>` on each of the three nodes, with its IPv4
/// and IPv6 address.
fn dual_pods(o: &Overlay, prefix: &str) -> Vec<(Netns, Vec<std::net::IpAddr>)> {
    (0..3)
        .map(|i| {
            let (ns, v4, v6) = o.add_dual_pod(i, &format!("{prefix}{i}"));
            (ns, vec![v4.into(), v6.into()])
        })
        .collect()
}

/// The three nodes' underlay addresses, IPv4 and IPv6.
fn dual_node_ips(o: &Overlay) -> Vec<std::net::IpAddr> {
    (0..3)
        .flat_map(|i| [std::net::IpAddr::from(o.cluster.node(i).underlay_ip), e2e_tests::mixed::node_ipv6(i).into()])
        .collect()
}

/// Every pod reaches every other at each of its addresses over TCP (ports
/// from `port_base`) while `capture` runs; then the capture is checked
/// with [`only_wireguard_ips`] (WireGuard ports `ports`, IPv4 and IPv6).
/// Returns how many WireGuard datagrams it saw over each family, and how
/// many frames in all.
fn talk_captured(
    capture: Capture,
    pods: &[(Netns, Vec<std::net::IpAddr>)],
    port_base: u16,
    node_ips: &[std::net::IpAddr],
    ports: (u16, u16),
) -> (usize, usize, usize) {
    let refs: Vec<(&Netns, Vec<std::net::IpAddr>)> = pods.iter().map(|(ns, a)| (ns, a.clone())).collect();
    e2e_tests::all_pods_talk_ips(&refs, port_base);
    let frames = capture.finish();
    let pod_addrs: Vec<std::net::IpAddr> = pods.iter().flat_map(|(_, a)| a.clone()).collect();
    let (v4, v6) = only_wireguard_ips(&frames, &pod_addrs, node_ips, ports.0, ports.1);
    (v4, v6, frames.len())
}

/// Sends `len` bytes of a pattern over one TCP connection from `from` to
/// `target` in `to`; returns what the receiver counted and whether every
/// byte matched.
fn bulk_tcp(from: &Netns, to: &Netns, target: SocketAddr, len: usize) -> (usize, bool) {
    use std::io::{Read, Write};
    let listener = to.in_thread(|| std::net::TcpListener::bind(target)).unwrap();
    // accept(2) waits at most 30 s (Linux applies SO_RCVTIMEO to it): when
    // the client side panics before it connects, the thread and its socket,
    // which holds the pod's namespace, do not stay behind.
    set_recv_timeout(&listener, libc::timeval { tv_sec: 30, tv_usec: 0 });
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("the client connects within 30 s");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (mut n, mut same) = (0usize, true);
        let mut buf = vec![0u8; 65536];
        loop {
            let k = c.read(&mut buf).unwrap();
            if k == 0 {
                return (n, same);
            }
            same &= buf[..k].iter().enumerate().all(|(j, b)| *b == ((n + j) % 251) as u8);
            n += k;
        }
    });
    let mut c = from.in_thread(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    server.join().unwrap()
}

/// A link's received packets, as the kernel counts them (for a TUN: those
/// its program wrote).
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    ns.ip_json(&["-s", "link", "show", "dev", dev])[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// A link's transmitted packets, as the kernel counts them.
fn tx_packets(ns: &Netns, dev: &str) -> u64 {
    ns.ip_json(&["-s", "link", "show", "dev", dev])[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

#[test]
fn wireguard_dual_stack_separate_devices_carry_each_family_encrypted() {
    if !require_root() {
        return;
    }
    let mut o = Overlay::dual_stack(3, WG_DUAL);
    with_keys_and_metrics(&mut o);
    o.start_all();
    wait_peers(&o, 3);
    wait_peers6(&o, 3);
    let all = e2e_tests::overlay::leases(o.outside());
    for i in 0..3 {
        // One key for both devices, each family's port in its data, as
        // current flannel writes them.
        let public = public_key(&o, i);
        let v = &all[&o.lease_key(i)];
        let node = o.cluster.node(i);
        assert_eq!(v["PublicIP"], node.underlay_ip.to_string(), "{v}");
        assert_eq!(v["PublicIPv6"], e2e_tests::mixed::node_ipv6(i).to_string(), "{v}");
        assert_eq!(v["BackendType"], "wireguard", "{v}");
        assert_eq!(v["BackendData"], serde_json::json!({"PublicKey": public, "Port": 51820}), "{v}");
        assert_eq!(v["BackendV6Data"], serde_json::json!({"PublicKey": public, "Port": 51821}), "{v}");
        check_v4_device(&o, i);
        check_v6_device(&o, i);
        let env = std::fs::read_to_string(&o.daemons[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1420\n"), "{env}");
    }
    dual_stack_pods_talk_encrypted(&o, "d", 8100);

    // TSO over IPv6: flannel-wg-v6 takes TCP super-packets from the kernel
    // (tx-tcp6-segmentation on), which the data path cuts into segments
    // before it encrypts them: 8 MB over IPv6 arrive intact, and node 0's
    // kernel hands the device far fewer packets than the data path sends.
    let ns0 = &o.cluster.node(0).ns;
    let k = ns0.run_ok("ethtool", &["-k", "flannel-wg-v6"]);
    assert!(k.lines().any(|l| l.trim() == "tx-tcp6-segmentation: on"), "{k}");
    let (b0, _, _) = o.add_dual_pod(0, "b0");
    let (b1, _, b1v6) = o.add_dual_pod(1, "b1");
    let ns1 = &o.cluster.node(1).ns;
    let (dev_before, sent_before) =
        (tx_packets(ns0, "flannel-wg-v6"), sample(&o, 0, "flannel_wireguard_tx_packets_total"));
    let (written_before, got_before) =
        (rx_packets(ns1, "flannel-wg-v6"), sample(&o, 1, "flannel_wireguard_rx_packets_total"));
    let len = 8 << 20;
    assert_eq!(bulk_tcp(&b0, &b1, SocketAddr::new(b1v6.into(), 8150), len), (len, true));
    let dev = tx_packets(ns0, "flannel-wg-v6") - dev_before;
    let sent = sample(&o, 0, "flannel_wireguard_tx_packets_total") - sent_before;
    assert!(sent as u64 >= (len / 1400) as u64, "{sent} packets sent for {len} bytes");
    assert!(dev * 3 < sent as u64, "the device got {dev} packets from the kernel, the data path sent {sent}");
    // And the receive side merges them back: node 1's data path writes far
    // fewer (super-)packets to flannel-wg-v6 than it decrypts.
    let written = rx_packets(ns1, "flannel-wg-v6") - written_before;
    let got = sample(&o, 1, "flannel_wireguard_rx_packets_total") - got_before;
    assert!(written * 3 < got as u64, "node 1 wrote {written} packets to the device for {got} decrypted");

    // A datagram to the IPv6 port from no peer is dropped and counted.
    let rogue = o.outside().in_thread(|| UdpSocket::bind("[2001:db8::200]:0")).unwrap();
    let unknown = sample(&o, 0, "flannel_wireguard_dropped_unknown_peer_total");
    let mut data = vec![4u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
    data.resize(64, 0x55);
    let node0 = SocketAddr::new(e2e_tests::mixed::node_ipv6(0).into(), 51821);
    rogue.send_to(&data, node0).unwrap();
    wait_until(Duration::from_secs(5), "the unknown-index datagram over IPv6 to be counted", || {
        sample(&o, 0, "flannel_wireguard_dropped_unknown_peer_total") == unknown + 1.0
    });

    // flannel-wg-v6 deleted under a running daemon: its data path starts
    // anew with device, address and route; IPv4 carries on.
    o.cluster.node(1).ns.run_ok("ip", &["link", "del", "flannel-wg-v6"]);
    wait_until(Duration::from_secs(15), "node1's flannel-wg-v6 to come back", || {
        o.cluster.node(1).ns.run("ip", &["link", "show", "flannel-wg-v6"]).is_ok_and(|out| out.status.success())
            && dev_routes(&o, 1, "-6", "flannel-wg-v6") == ["2001:db8:10::/56 global"]
    });
    check_v6_device(&o, 1);
    // Node 0 keeps sending on its session with node 1's first data path
    // until node 1's new tunnels handshake (its keepalive, every 5 s).
    let (pod0, _, _) = o.add_dual_pod(0, "f0");
    let (pod1, _, v6) = o.add_dual_pod(1, "f1");
    let target = SocketAddr::new(v6.into(), 8300);
    let _echo = echo_forever(&pod1, target);
    wait_tcp(&pod0, target, "TCP over IPv6 from node0's pod to node1's after flannel-wg-v6 came back");
    dual_stack_pods_talk_encrypted(&o, "e", 8200);
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn wireguard_dual_stack_in_kubernetes_mode_annotations_and_encrypted_pod_traffic() {
    if !(require_root() && e2e_tests::kube::require_kube()) {
        return;
    }
    let mut ko = e2e_tests::mixed::kube_dual_stack_overlay(3, WG_DUAL);
    with_keys_and_metrics(&mut ko.o);
    ko.o.start_all();
    wait_peers(&ko.o, 3);
    wait_peers6(&ko.o, 3);
    for i in 0..3 {
        let n = ko.api.get_json(&["node", &e2e_tests::kube::KubeOverlay::node_name(i)]);
        let a = &n["metadata"]["annotations"];
        let get = |k: &str| a[format!("{}/{k}", e2e_tests::kube::PREFIX)].as_str().unwrap_or_default().to_string();
        let public = public_key(&ko.o, i);
        let node = ko.o.cluster.node(i);
        assert_eq!(get("backend-type"), "wireguard", "node{i}: {a}");
        assert_eq!(get("backend-data"), format!(r#"{{"PublicKey":"{public}","Port":51820}}"#), "node{i}");
        assert_eq!(get("backend-v6-data"), format!(r#"{{"PublicKey":"{public}","Port":51821}}"#), "node{i}");
        assert_eq!(get("public-ip"), node.underlay_ip.to_string(), "node{i}");
        assert_eq!(get("public-ipv6"), e2e_tests::mixed::node_ipv6(i).to_string(), "node{i}");
        check_v4_device(&ko.o, i);
        check_v6_device(&ko.o, i);
    }
    dual_stack_pods_talk_encrypted(&ko.o, "k", 8400);
    let (ok, report) = ko.o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

#[test]
fn wireguard_ipv6_only_cluster_runs_flannel_wg_v6_alone() {
    if !(require_root() && e2e_tests::kube::require_kube()) {
        return;
    }
    let mut ko = e2e_tests::mixed::kube_ipv6_only_overlay(3, WG_V6ONLY);
    with_keys_and_metrics(&mut ko.o);
    ko.o.start_all();
    wait_peers6(&ko.o, 3);
    for i in 0..3 {
        let n = ko.api.get_json(&["node", &e2e_tests::kube::KubeOverlay::node_name(i)]);
        let a = &n["metadata"]["annotations"];
        let get = |k: &str| a[format!("{}/{k}", e2e_tests::kube::PREFIX)].as_str().map(str::to_string);
        let public = public_key(&ko.o, i);
        assert_eq!(get("backend-v6-data"), Some(format!(r#"{{"PublicKey":"{public}","Port":51900}}"#)), "{a}");
        assert_eq!(get("public-ipv6"), Some(e2e_tests::mixed::node_ipv6(i).to_string()), "{a}");
        assert!(get("backend-data").is_none_or(|d| d.is_empty() || d == "null"), "node{i}: {a}");
        check_v6_device(&ko.o, i);
        // No IPv4 device: the cluster runs no IPv4.
        let links = ko.o.cluster.node(i).ns.run_ok("ip", &["-o", "link", "show"]);
        assert!(!links.contains("flannel-wg:"), "node{i}: {links}");
        // The peers' endpoints are their IPv6 addresses at their port.
        let log = ko.o.log(i);
        for p in (0..3).filter(|p| *p != i) {
            let at = format!("at [{}]:51900", e2e_tests::mixed::node_ipv6(p));
            assert!(log.contains(&at), "node{i} has no peer {at}:\n{log}");
        }
    }
    let capture = Capture::start(&ko.o.cluster.node(1).ns, "eth0");
    let pods: Vec<(Netns, Vec<std::net::IpAddr>)> = (0..3).map(|i| ko.o.add_pod_ips(i, &format!("s{i}"))).collect();
    assert!(
        pods.iter().all(|(_, a)| a.len() == 1 && a[0].is_ipv6()),
        "{:?}",
        pods.iter().map(|p| &p.1).collect::<Vec<_>>()
    );
    let node_ips: Vec<std::net::IpAddr> =
        ko.o.cluster.nodes().iter().map(|n| std::net::IpAddr::from(e2e_tests::mixed::node_ipv6(n.index))).collect();
    let (v4, v6, frames) = talk_captured(capture, &pods, 8500, &node_ips, (0, 51900));
    assert!(v4 == 0 && v6 > 0, "WireGuard datagrams seen: {v4} over IPv4, {v6} over IPv6 in {frames} frames");
    let (ok, report) = ko.o.diagnose(0, &[]);
    assert!(ok, "{report}");
    assert!(report.to_string().contains("flannel-wg-v6 is a TUN device, UDP port 51900 is bound"), "{report}");
}

/// Runs node `i`'s daemon (etcd mode) until it exits, at most 30 s: its
/// success and what it wrote to stderr.
fn run_to_exit(o: &Overlay, i: usize) -> (bool, String) {
    let mut cmd = o.daemon_command(i);
    cmd.envs(o.env(i));
    let (status, text) = e2e_tests::overlay::run_to_exit(cmd, Duration::from_secs(30));
    (status.success(), text)
}

#[test]
fn wireguard_ipv6_options_out_of_range_or_unusable_are_refused_by_name() {
    if !require_root() {
        return;
    }
    let o = Overlay::dual_stack(1, WG_DUAL);
    let ns = &o.cluster.node(0).ns;
    let cases = [
        (
            WG_DUAL.replace(r#""Type":"wireguard""#, r#""Type":"wireguard","Mode":"both""#),
            r#"Backend.Mode "both" is not one of separate, auto, ipv4, ipv6"#,
        ),
        (
            WG_DUAL.replace(r#""Type":"wireguard""#, r#""Type":"wireguard","ListenPortV6":70000"#),
            "Backend.ListenPortV6 70000 is not an integer in 0..=65535",
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}"#.to_string(),
            r#"Backend.Mode "ipv6" (peers over IPv6) needs EnableIPv6 true"#,
        ),
        (
            WG_DUAL.replace(r#""Type":"wireguard""#, r#""Type":"wireguard","ListenPortV6":51820"#),
            "Backend.ListenPortV6 51820 is Backend.ListenPort's too",
        ),
    ];
    for (conf, want) in cases {
        assert_ne!(conf, WG_DUAL);
        etcdctl_ok(o.outside(), &["put", "/coreos.com/network/config", &conf]);
        let (ok, err) = run_to_exit(&o, 0);
        assert!(!ok, "{conf}: the daemon succeeded");
        assert!(err.contains(want), "{conf}: no {want:?} in:\n{err}");
        // Nothing made.
        let links = ns.run_ok("ip", &["-o", "link", "show"]);
        assert!(!links.contains("flannel-wg"), "{conf}: {links}");
        assert!(!o.dir.path().join("subnet0.env").exists(), "{conf}");
    }
}

/// The IPv6 device's interoperability: a dual-stack node 2 whose two
/// devices are Debian's `wireguard-go` (`flannel-wg` and `flannel-wg-v6`,
/// each its own process), set up with `wg` and `ip` as flannel v0.20.2
/// sets up its kernel devices (Mode separate: `ListenPortV6` 51821 for
/// the IPv6 one, `<IPv6 subnet>::/128`, the IPv6 network routed in, peers
/// at `[PublicIPv6]:51821` with allowed-ips their IPv6 subnet), its lease as
/// v0.20.2 writes it (no `Port` in either data: flanneld-rs nodes take
/// their own ports). Pods talk TCP both ways over IPv4 and IPv6; node 2's
/// underlay carries WireGuard only; `wg show flannel-wg-v6` reports a
/// handshake and bytes both ways with each flanneld-rs node.
#[test]
fn wireguard_v6_interoperates_with_wireguard_go_configured_as_flannel_does() {
    if !(require_root() && require_wireguard_go()) {
        return;
    }
    let mut o = Overlay::dual_stack(3, WG_DUAL);
    with_keys_and_metrics(&mut o);
    let dir = o.dir.path().join("node2");
    std::fs::create_dir_all(&dir).unwrap();
    let ns2 = &o.cluster.node(2).ns;
    ns2.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();

    // Node 2's key file (one for both devices, as flannel), the PSK.
    let (key_path, public, psk_path) = wg_go_key_files(ns2, &dir, WG_DUAL);

    // Its dual-stack lease as flannel v0.20.2 writes it.
    let (subnet2, subnet2_6) = ("10.244.200.0/24", "2001:db8:10:c8::/64");
    let node2_ip6 = e2e_tests::mixed::node_ipv6(2);
    let grant = etcdctl_ok(o.outside(), &["lease", "grant", "86400"]);
    let lease_id = grant.split_whitespace().nth(1).unwrap().to_string();
    let lease2 = format!(
        r#"{{"PublicIP":"192.0.2.12","PublicIPv6":"{node2_ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public}"}},"BackendV6Data":{{"PublicKey":"{public}"}}}}"#
    );
    let key2 = "/coreos.com/network/subnets/10.244.200.0-24&2001:db8:10:c8::-64";
    etcdctl_ok(o.outside(), &["put", "--lease", &lease_id, key2, &lease2]);

    // Both devices as flannel makes them.
    let wg4 = WireguardGo::start_named(ns2, &dir.join("wireguard-go.log"), "flannel-wg");
    let wg6 = WireguardGo::start_named(ns2, &dir.join("wireguard-go-v6.log"), "flannel-wg-v6");
    wg4.wg(&["set", "flannel-wg", "listen-port", "51820", "private-key", key_path.to_str().unwrap()]);
    wg6.wg(&["set", "flannel-wg-v6", "listen-port", "51821", "private-key", key_path.to_str().unwrap()]);
    for (dev, addr, network) in [
        ("flannel-wg", "10.244.200.0/32", "10.244.0.0/16"),
        ("flannel-wg-v6", "2001:db8:10:c8::/128", "2001:db8:10::/56"),
    ] {
        ns2.run_ok("ip", &["link", "set", dev, "mtu", "1420"]);
        ns2.run_ok("ip", &["addr", "add", addr, "dev", dev]);
        ns2.run_ok("ip", &["link", "set", dev, "up"]);
        ns2.run_ok("ip", &["route", "add", network, "dev", dev, "scope", "link"]);
    }
    std::fs::write(
        &o.daemons[2].subnet_file,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.200.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\n\
         FLANNEL_IPV6_SUBNET=2001:db8:10:c8::1/64\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();

    o.start(0);
    o.start(1);
    let ns2 = &o.cluster.node(2).ns;
    for i in 0..2 {
        wait_until(Duration::from_secs(10), &format!("node{i}'s peer tables with both others"), || {
            sample(&o, i, "flannel_peers") == 2.0 && sample(&o, i, "flannel_peers_ipv6") == 2.0
        });
        // A v0.20.2 lease gives no port: our own of each family.
        let log = o.log(i);
        assert!(log.contains(&format!("peer {subnet2} at 192.0.2.12:51820")), "node{i}:\n{log}");
        assert!(log.contains(&format!("peer {subnet2_6} at [{node2_ip6}]:51821")), "node{i}:\n{log}");
    }
    // One peer per other lease and device, as flannel's addPeer.
    let all = e2e_tests::overlay::leases(o.outside());
    for i in 0..2 {
        let lease = &all[&o.lease_key(i)];
        let s6 = o.subnet6(i).unwrap().to_string();
        let s4 = o.subnet(i).to_string();
        for (wg, dev, data, endpoint, allowed) in [
            (&wg4, "flannel-wg", "BackendData", format!("{}:51820", lease["PublicIP"].as_str().unwrap()), &s4),
            (&wg6, "flannel-wg-v6", "BackendV6Data", format!("[{}]:51821", lease["PublicIPv6"].as_str().unwrap()), &s6),
        ] {
            wg.wg(&[
                "set",
                dev,
                "peer",
                lease[data]["PublicKey"].as_str().unwrap(),
                "preshared-key",
                psk_path.to_str().unwrap(),
                "endpoint",
                &endpoint,
                "persistent-keepalive",
                "5",
                "allowed-ips",
                allowed,
            ]);
        }
    }

    let capture = Capture::start(ns2, "eth0");
    let pods = dual_pods(&o, "h");
    let s26: ipnet::IpNet = subnet2_6.parse().unwrap();
    assert!(pods[2].1[1].is_ipv6() && s26.contains(&pods[2].1[1]), "node 2's pod got {:?}", pods[2].1);
    let (v4, v6, _) = talk_captured(capture, &pods, 8600, &dual_node_ips(&o), (51820, 51821));
    assert!(v4 > 0 && v6 > 0, "WireGuard datagrams on node 2's underlay: {v4} over IPv4, {v6} over IPv6");

    // wireguard-go's view of its IPv6 device: a handshake with each
    // flanneld-rs node and bytes both ways.
    let handshakes = wg6.wg(&["show", "flannel-wg-v6", "latest-handshakes"]);
    let transfer = wg6.wg(&["show", "flannel-wg-v6", "transfer"]);
    assert_eq!(handshakes.lines().count(), 2, "{handshakes}");
    for line in handshakes.lines() {
        let t: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(t > 0, "no handshake with a peer: {handshakes}");
    }
    for line in transfer.lines() {
        let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        assert!(f[0] > 0 && f[1] > 0, "no traffic both ways with a peer: {transfer}");
    }
    drop(wg6);
    drop(wg4);
}

/// `diagnose` on a node that never ran the daemon: it names the missing
/// key file and does not create it (a key made there would be one no peer
/// knows, and the daemon would then advertise it).
#[test]
fn diagnose_reports_a_missing_key_file_without_creating_it() {
    if !require_root() {
        return;
    }
    let o = overlay(1);
    let key = key_file(&o, 0);
    assert!(!key.exists());
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok, "{report}");
    let text = report.to_string();
    assert!(text.contains(&format!("the WireGuard key file {} does not exist", key.display())), "{report}");
    assert!(!key.exists(), "diagnose created {}", key.display());
    assert!(!key.parent().unwrap().exists(), "diagnose created {}", key.parent().unwrap().display());
}

/// `EnableIPv6` turned off: the `flannel-wg-v6` of an earlier dual-stack
/// run (here a TUN of that name with its address) is named by `diagnose`
/// and deleted at start; `flannel-wg` stays.
#[test]
fn wireguard_v6_device_of_an_earlier_dual_stack_run_goes_when_ipv6_is_off() {
    if !require_root() {
        return;
    }
    let mut o = overlay(2);
    o.start_all();
    wait_peers(&o, 2);
    o.stop(0);
    let ns = &o.cluster.node(0).ns;
    for cmd in [
        "tuntap add dev flannel-wg-v6 mode tun",
        "-6 addr add 2001:db8:10:7::/128 dev flannel-wg-v6 nodad",
        "link set flannel-wg-v6 up",
    ] {
        ns.run_ok("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    let (ok, report) = o.diagnose(0, &[]);
    assert!(!ok, "{report}");
    assert!(report.to_string().contains("device flannel-wg-v6 is an earlier backend's"), "{report}");
    o.start(0);
    wait_peers(&o, 2);
    let links = o.cluster.node(0).ns.run_ok("ip", &["-o", "link", "show"]);
    assert!(!links.contains("flannel-wg-v6") && links.contains("flannel-wg:"), "{links}");
    assert!(o.log(0).contains("deleting flannel-wg-v6"), "{}", o.log(0));
    let (ok, report) = o.diagnose(0, &[]);
    assert!(ok, "{report}");
}

/// Mode `auto` and `ipv6` in a dual-stack cluster (etcd mode), as flannel:
/// one device `flannel-wg` on `ListenPort` with both families' addresses
/// and networks routed into it, no `flannel-wg-v6`, one WireGuard peer per
/// node whose allowed IPs are both its subnets, reached over IPv4 (`auto`,
/// our TEST-NET addresses not being private) or over IPv6 (`ipv6`). TCP
/// between every pair of pods over both families; the underlay carries
/// only WireGuard on port 51820, over the chosen family only.
#[test]
fn wireguard_mode_auto_and_ipv6_run_one_device_for_both_families() {
    if !require_root() {
        return;
    }
    for (mode, over_v6) in [("auto", false), ("ipv6", true)] {
        let conf = WG_DUAL.replace(r#""Type":"wireguard""#, &format!(r#""Type":"wireguard","Mode":"{mode}""#));
        let mut o = Overlay::dual_stack(3, &conf);
        with_keys_and_metrics(&mut o);
        o.start_all();
        wait_peers(&o, 3);
        wait_peers6(&o, 3);
        let all = e2e_tests::overlay::leases(o.outside());
        for i in 0..3 {
            let public = public_key(&o, i);
            let v = &all[&o.lease_key(i)];
            assert_eq!(v["BackendData"], serde_json::json!({"PublicKey": public, "Port": 51820}), "{mode}: {v}");
            // The port the one device listens on (see the README).
            assert_eq!(v["BackendV6Data"], serde_json::json!({"PublicKey": public, "Port": 51820}), "{mode}: {v}");
            let links = o.cluster.node(i).ns.run_ok("ip", &["-o", "link", "show"]);
            assert!(!links.contains("flannel-wg-v6"), "{mode}: node{i}: {links}");
            let s6 = o.subnet6(i).unwrap();
            assert_eq!(dev_addrs(&o, i, "-4", "flannel-wg"), (vec![format!("{}/32", o.subnet(i).network())], 1420));
            assert_eq!(dev_addrs(&o, i, "-6", "flannel-wg"), (vec![format!("{}/128", s6.network())], 1420));
            assert_eq!(dev_routes(&o, i, "-4", "flannel-wg"), ["10.244.0.0/16 link"], "{mode}: node{i}");
            assert_eq!(dev_routes(&o, i, "-6", "flannel-wg"), ["2001:db8:10::/56 global"], "{mode}: node{i}");
            // One peer per node, both subnets, at the chosen address.
            let log = o.log(i);
            for p in (0..3).filter(|p| *p != i) {
                let at = if over_v6 {
                    format!("[{}]:51820", e2e_tests::mixed::node_ipv6(p))
                } else {
                    format!("{}:51820", o.cluster.node(p).underlay_ip)
                };
                let want = format!("peer {},{} at {at}", o.subnet(p), o.subnet6(p).unwrap());
                wait_until(Duration::from_secs(10), &format!("{mode}: node{i}'s log to say {want}"), || {
                    o.log(i).contains(&want)
                });
            }
            drop(log);
        }
        let capture = Capture::start(&o.cluster.node(1).ns, "eth0");
        let pods = dual_pods(&o, "m");
        let (v4, v6, _) = talk_captured(capture, &pods, 8700, &dual_node_ips(&o), (51820, 51820));
        if over_v6 {
            assert!(v4 == 0 && v6 > 0, "{mode}: WireGuard datagrams: {v4} over IPv4, {v6} over IPv6");
        } else {
            assert!(v4 > 0 && v6 == 0, "{mode}: WireGuard datagrams: {v4} over IPv4, {v6} over IPv6");
        }
        let (ok, report) = o.diagnose(0, &[]);
        assert!(ok, "{mode}: {report}");
        // The one device is looked at once.
        let runs = "flannel-wg is a TUN device, UDP port 51820 is bound";
        assert_eq!(report.to_string().matches(runs).count(), 1, "{mode}: {report}");
    }
}
