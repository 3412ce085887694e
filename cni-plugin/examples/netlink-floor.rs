//! The kernel's floor under a CNI ADD, for `scripts/bench/cni-latency.sh`:
//! a program run exactly like the plugin (same environment, same exec) that
//! sends the kernel the requests our ADD sends, and nothing else: no
//! configuration or lease parsing, no IPAM files, no async runtime. It asks
//! for the bridge's index, creates the veth pair (host end on the bridge and
//! up, pod end named, addressed and moved in one request, echoed back), sets
//! hairpin on the host end, then brings the pod end up, adds its address and
//! its two routes in one write. DEL deletes the host end (the pod end goes
//! with it). On a node without the bridge (the benchmark's warm-up call), it
//! first makes the bridge with the gateway address, as the plugin does.
//!
//! ADD p50 of the plugin minus ADD p50 of this program is what the plugin
//! adds on top of the kernel's work and a static program's start. It starts
//! as the plugin does (a C `main`, `flannel_net::entry`), so that std's
//! start-up, which the plugin skips, is not counted as the kernel's.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

const BRIDGE: &str = "cni0";
const MTU: u32 = 1450;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

#[unsafe(no_mangle)]
extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    flannel_net::entry::prepare_process();
    floor_main();
    // Nothing flushes std's stdout after a C `main` returns.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    0
}

fn floor_main() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| die(&format!("{k} not set")));
    // Drain stdin as a plugin does (the benchmark writes the configuration).
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    let id = var("CNI_CONTAINERID");
    let veth = format!("fl{:x}", fnv(&id) & 0xfff_ffff);
    let host = socket();
    match var("CNI_COMMAND").as_str() {
        "ADD" => add(&host, &veth, &var("CNI_IFNAME"), &var("CNI_NETNS"), &id),
        "DEL" => {
            let msg = LinkUnspec::new_with_name(&veth).build();
            exchange(&host, vec![(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK)]);
        }
        other => die(&format!("CNI_COMMAND {other}: only ADD and DEL")),
    }
}

fn add(host: &Socket, veth: &str, ifname: &str, netns_path: &str, id: &str) {
    let netns = std::fs::File::open(netns_path).unwrap_or_else(|e| die(&format!("{netns_path}: {e}")));
    let bridge =
        match try_exchange(host, vec![(RouteNetlinkMessage::GetLink(LinkUnspec::new_with_name(BRIDGE).build()), 0)]) {
            Ok(links) => link_index(&links).unwrap_or_else(|| die("no answer for cni0")),
            // A fresh node (the benchmark's warm-up call): the bridge, up, with the gateway address.
            Err(_) => make_bridge(host),
        };
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ifname.to_string())
        .mtu(MTU)
        .address(vec![0x0a, 0x58, 10, 244, 1, 2])
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let pair = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(veth.to_string())
        .mtu(MTU)
        .controller(bridge)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    let echoed =
        exchange(host, vec![(RouteNetlinkMessage::NewLink(pair), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO)]);
    let host_index = link_index(&echoed).unwrap_or_else(|| die("no echo of the new veth"));
    let pod_index = echoed
        .iter()
        .flat_map(|m| m.attributes.iter())
        .find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })
        .unwrap_or_else(|| die("the echo names no peer"));
    // Port settings travel as link info of an RTM_NEWLINK (as `ip link set type bridge_slave`).
    exchange(
        host,
        vec![(RouteNetlinkMessage::NewLink(LinkBridgePort::new(host_index).hairpin(true).build()), NLM_F_ACK)],
    );

    // The pod's socket, made inside its namespace.
    let own = std::fs::File::open("/proc/thread-self/ns/net").unwrap_or_else(|e| die(&format!("own netns: {e}")));
    setns(&netns);
    let pod = socket();
    setns(&own);
    let ip = Ipv4Addr::new(10, 244, 1, 2 + (fnv(id) % 250) as u8);
    let mut addr = AddressMessage::default();
    addr.header.family = AddressFamily::Inet;
    addr.header.index = pod_index;
    addr.header.prefix_len = 24;
    addr.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    addr.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    let route = |dst: Ipv4Addr, len: u8| {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, len)
            .gateway(GATEWAY)
            .output_interface(pod_index)
            .build()
    };
    exchange(
        &pod,
        vec![
            (RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(pod_index).up().build()), NLM_F_ACK),
            (RouteNetlinkMessage::NewAddress(addr), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
            (
                RouteNetlinkMessage::NewRoute(route(Ipv4Addr::new(10, 244, 0, 0), 16)),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ),
            (RouteNetlinkMessage::NewRoute(route(Ipv4Addr::UNSPECIFIED, 0)), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
        ],
    );
    print!(r#"{{"cniVersion":"1.0.0","ips":[{{"address":"{ip}/24","gateway":"{GATEWAY}"}}]}}"#);
}

fn socket() -> Socket {
    let mut s = Socket::new(NETLINK_ROUTE).unwrap_or_else(|e| die(&format!("netlink socket: {e}")));
    s.bind_auto().unwrap_or_else(|e| die(&format!("netlink bind: {e}")));
    s.connect(&SocketAddr::new(0, 0)).unwrap_or_else(|e| die(&format!("netlink connect: {e}")));
    s
}

fn setns(f: &std::fs::File) {
    // SAFETY: setns on an open namespace file; this program has one thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        die(&format!("setns: {}", std::io::Error::last_os_error()));
    }
}

/// [`try_exchange`], where an error answer ends the program.
fn exchange(sock: &Socket, requests: Vec<(RouteNetlinkMessage, u16)>) -> Vec<LinkMessage> {
    try_exchange(sock, requests).unwrap_or_else(|e| die(&format!("netlink: {e}")))
}

fn make_bridge(host: &Socket) -> u32 {
    let bridge =
        LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Bridge).name(BRIDGE).mtu(MTU).up().build();
    exchange(host, vec![(RouteNetlinkMessage::NewLink(bridge), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)]);
    let links = exchange(host, vec![(RouteNetlinkMessage::GetLink(LinkUnspec::new_with_name(BRIDGE).build()), 0)]);
    let index = link_index(&links).unwrap_or_else(|| die("no answer for cni0"));
    let mut addr = AddressMessage::default();
    addr.header.family = AddressFamily::Inet;
    addr.header.index = index;
    addr.header.prefix_len = 24;
    addr.attributes.push(AddressAttribute::Local(IpAddr::V4(GATEWAY)));
    addr.attributes.push(AddressAttribute::Address(IpAddr::V4(GATEWAY)));
    exchange(host, vec![(RouteNetlinkMessage::NewAddress(addr), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)]);
    index
}

/// Sends the requests in one write, then reads until each has its answer
/// (an acknowledgement, or the reply to a request without `NLM_F_ACK`).
/// Returns the link messages among the answers, or the first error answer.
fn try_exchange(sock: &Socket, requests: Vec<(RouteNetlinkMessage, u16)>) -> Result<Vec<LinkMessage>, String> {
    let mut out = Vec::new();
    let mut acked = Vec::new();
    for (seq, (msg, flags)) in requests.into_iter().enumerate() {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = seq as u32 + 1;
        req.finalize();
        let start = out.len();
        out.resize(start + req.buffer_len(), 0);
        req.serialize(&mut out[start..]);
        acked.push(flags & NLM_F_ACK != 0);
    }
    sock.send(&out, 0).unwrap_or_else(|e| die(&format!("netlink send: {e}")));
    let mut links = Vec::new();
    let mut answered = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while answered < acked.len() {
        let n = sock.recv(&mut &mut buf[..], 0).unwrap_or_else(|e| die(&format!("netlink recv: {e}")));
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                .unwrap_or_else(|e| die(&format!("netlink answer: {e}")));
            off += msg.header.length as usize;
            let wants_ack = acked.get(msg.header.sequence_number as usize - 1).copied().unwrap_or(true);
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_string()),
                NetlinkPayload::Error(_) => answered += 1,
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    // A request without NLM_F_ACK is answered by its reply.
                    answered += usize::from(!wants_ack);
                    links.push(l);
                }
                _ => {}
            }
        }
    }
    Ok(links)
}

fn link_index(links: &[LinkMessage]) -> Option<u32> {
    links.first().map(|l| l.header.index)
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

fn die(msg: &str) -> ! {
    eprintln!("netlink-floor: {msg}");
    std::process::exit(1)
}
