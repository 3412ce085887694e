//! [`Cluster`]: nodes on an underlay L2 segment, and [`single_node`].

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::netns::{check_part, check_user_tag, unique_tag, Netns};
use crate::{
    OUTSIDE_IP, OUTSIDE_IPV6, PREFIX, UNDERLAY_GATEWAY, UNDERLAY_GATEWAY_V6, UNDERLAY_PREFIX_LEN,
    UNDERLAY_V6_PREFIX_LEN,
};

/// Most nodes a cluster can have: node addresses run from .10 to .199, below
/// the outside host's .200.
pub const MAX_NODES: usize = 190;

/// How long links may take to come up before building a cluster fails.
/// Normally milliseconds; generous because parallel tests load the machine.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The underlay interface's name inside every node and the outside host.
/// Each namespace has its own interface names, so all can use the same one.
const UNDERLAY_IF: &str = "eth0";

/// One node of a [`Cluster`]: a namespace with `eth0` on the underlay, a
/// default route via [`UNDERLAY_GATEWAY`] and IPv4 forwarding on; in a
/// dual-stack cluster also an IPv6 address, an IPv6 default route via
/// [`UNDERLAY_GATEWAY_V6`] and IPv6 forwarding on.
#[derive(Debug)]
pub struct Node {
    /// The node's namespace: run the CNI plugin or the daemon in it.
    pub ns: Netns,
    /// Position in the cluster, from 0.
    pub index: usize,
    /// Address on the underlay: `192.0.2.(10 + index)`.
    pub underlay_ip: Ipv4Addr,
    /// IPv6 address on the underlay in a dual-stack cluster
    /// ([`Cluster::dual_stack`]): `2001:db8::<10 + index>` (the index in
    /// decimal digits, read as hex, like the IPv4 address's last byte:
    /// node 0 is `2001:db8::10`). `None` in an IPv4-only cluster.
    pub underlay_ipv6: Option<Ipv6Addr>,
    /// Name of the underlay interface inside the node (`eth0`).
    pub underlay_if: String,
    /// The cluster's tag, so that pod namespaces share the cluster's prefix
    /// and `down`/`cleanup_leftovers` find them along with it.
    tag: String,
}

impl Node {
    /// Creates an empty namespace for a pod of this node, named
    /// `flt-<tag>-n<index>-<name>` (so `name` must be unique per node). The
    /// CNI plugin under test plugs it in; the fixture only creates it and, on
    /// drop, deletes it, which also destroys the veth ends inside it.
    pub fn add_pod_netns(&self, name: &str) -> io::Result<Netns> {
        check_part("pod name", name)?;
        Netns::named(&format!("{PREFIX}{}-n{}-{name}", self.tag, self.index))
    }
}

/// Calls `check` every 10 ms until it finds nothing wrong (`Ok(None)`); past
/// `deadline`, what it last found (`Ok(Some(why))`) is the error.
fn poll_until(deadline: Instant, mut check: impl FnMut() -> io::Result<Option<String>>) -> io::Result<()> {
    loop {
        let Some(why) = check()? else { return Ok(()) };
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An underlay L2 segment, N nodes on it and optionally an outside host.
///
/// The segment is a bridge `br0` in a "switch" namespace that also holds
/// [`UNDERLAY_GATEWAY`], so the nodes' default routes resolve; it forwards
/// nothing anywhere else (it has no other link and forwarding is off). Every
/// veth is created with both ends directly inside their namespaces: no link
/// ever exists in the root namespace, even briefly.
///
/// Dropping it deletes the nodes, the outside host and then the switch (the
/// fields' declaration order). Pod namespaces are separate [`Netns`] values
/// owned by the caller.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: nodes first, switch last.
    nodes: Vec<Node>,
    outside: Option<Netns>,
    switch: Netns,
    tag: String,
    /// Built by [`Cluster::dual_stack`].
    ipv6: bool,
}

impl Cluster {
    /// A cluster of `nodes` nodes (at most [`MAX_NODES`]) with a unique tag.
    pub fn new(nodes: usize) -> io::Result<Cluster> {
        Self::build(&unique_tag(), nodes, false, false)
    }

    /// Like [`Cluster::new`], plus an outside host at [`OUTSIDE_IP`] on the
    /// same segment, without a default route: it sees the nodes' addresses as
    /// sources, and cannot answer pod addresses, which is what masquerade
    /// tests need.
    pub fn with_outside(nodes: usize) -> io::Result<Cluster> {
        Self::build(&unique_tag(), nodes, true, false)
    }

    /// A dual-stack cluster: as [`Cluster::new`] (or
    /// [`Cluster::with_outside`] when `outside`), and besides IPv4 the
    /// underlay carries 2001:db8::/64 (the documentation prefix): node `i`'s
    /// `eth0` has [`ipv6_of_node`]`(i)`/64, the switch's `br0` has
    /// [`UNDERLAY_GATEWAY_V6`], which is every node's IPv6 default route,
    /// the outside host has [`OUTSIDE_IPV6`] (and no IPv6 default route),
    /// and nodes forward IPv6 (`net.ipv6.conf.all.forwarding=1`).
    ///
    /// Everything IPv6 needs is set inside the cluster's namespaces, never
    /// in the root one: IPv6 is enabled there explicitly (a new namespace's
    /// IPv6 settings are the kernel's defaults, not the root's) and
    /// duplicate address detection is off, so addresses, link-local ones
    /// included, are usable at once. When this returns, every node and the
    /// outside host have answered a neighbour solicitation from the switch.
    /// Fails with a clear error when the kernel has no IPv6.
    pub fn dual_stack(nodes: usize, outside: bool) -> io::Result<Cluster> {
        Self::build(&unique_tag(), nodes, outside, true)
    }

    /// A cluster whose namespaces are named after `tag` instead of the pid:
    /// `flt-<tag>-switch`, `flt-<tag>-node<i>`, `flt-<tag>-outside`, for
    /// scripts (`netns-fixture up --name <tag>`). `tag` is a letter followed
    /// by up to 23 of `[A-Za-z0-9_]`; it fails if the tag is in use.
    /// [`cleanup_leftovers`](crate::cleanup_leftovers) leaves such clusters
    /// alone; remove them with [`cleanup_tag`](crate::cleanup_tag).
    pub fn new_named(tag: &str, nodes: usize, outside: bool) -> io::Result<Cluster> {
        check_user_tag(tag)?;
        Self::build(tag, nodes, outside, false)
    }

    /// [`Cluster::new_named`], dual-stack as [`Cluster::dual_stack`]
    /// (`netns-fixture up --ipv6`).
    pub fn new_named_dual_stack(tag: &str, nodes: usize, outside: bool) -> io::Result<Cluster> {
        check_user_tag(tag)?;
        Self::build(tag, nodes, outside, true)
    }

    /// Whether this cluster's underlay carries IPv6 ([`Cluster::dual_stack`]).
    pub fn is_dual_stack(&self) -> bool {
        self.ipv6
    }

    fn build(tag: &str, nodes: usize, outside: bool, ipv6: bool) -> io::Result<Cluster> {
        if nodes > MAX_NODES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{nodes} nodes: at most {MAX_NODES}")));
        }
        if ipv6 && !std::path::Path::new("/proc/sys/net/ipv6").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a dual-stack cluster needs IPv6, and this kernel has none (/proc/sys/net/ipv6 is missing: \
                 booted with ipv6.disable=1?)",
            ));
        }
        let switch = Netns::named(&format!("{PREFIX}{tag}-switch"))?;
        if ipv6 {
            enable_ipv6(&switch)?;
        }
        // A fixed MAC: a bridge without one takes the lowest of its ports',
        // which would change as ports are added and leave stale ARP entries
        // for the gateway in nodes that already resolved it.
        switch.ip_batch(&[
            "link add br0 address 02:00:c0:00:02:01 type bridge".into(),
            format!("addr add {UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN} dev br0"),
            "link set br0 up".into(),
        ])?;
        if ipv6 {
            switch.ip(&[
                "addr",
                "add",
                &format!("{UNDERLAY_GATEWAY_V6}/{UNDERLAY_V6_PREFIX_LEN}"),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        // Every error below drops `cluster`, which deletes what exists so far.
        let mut cluster =
            Cluster { nodes: Vec::with_capacity(nodes), outside: None, switch, tag: tag.to_string(), ipv6 };
        for index in 0..nodes {
            let ns = Netns::named(&format!("{PREFIX}{tag}-node{index}"))?;
            let underlay_ip = Ipv4Addr::new(192, 0, 2, 10 + index as u8);
            let underlay_ipv6 = ipv6.then(|| ipv6_of_node(index));
            if ipv6 {
                // Before the veth exists: a new link takes its settings
                // from the namespace's `default`.
                enable_ipv6(&ns)?;
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            cluster.attach(&ns, &format!("p-n{index}"), underlay_ip, underlay_ipv6, true)?;
            // Nodes route pod traffic; /proc/sys/net is per namespace.
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            cluster.nodes.push(Node {
                ns,
                index,
                underlay_ip,
                underlay_ipv6,
                underlay_if: UNDERLAY_IF.into(),
                tag: tag.into(),
            });
        }
        if outside {
            let ns = Netns::named(&format!("{PREFIX}{tag}-outside"))?;
            if ipv6 {
                enable_ipv6(&ns)?;
            }
            cluster.attach(&ns, "p-out", OUTSIDE_IP, ipv6.then_some(OUTSIDE_IPV6), false)?;
            cluster.outside = Some(ns);
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Plugs `host` into the switch: a veth with `eth0` (MTU 1500, `addr`)
    /// inside `host` and `port` on br0. The `ip` that creates it runs inside
    /// the switch and puts the peer straight into `host`.
    /// With `addr6`, `eth0` also gets `addr6`/64 (`nodad`: usable at once)
    /// and, with `default_route`, an IPv6 default route via
    /// [`UNDERLAY_GATEWAY_V6`].
    fn attach(
        &self,
        host: &Netns,
        port: &str,
        addr: Ipv4Addr,
        addr6: Option<Ipv6Addr>,
        default_route: bool,
    ) -> io::Result<()> {
        self.switch.ip_batch(&[
            format!("link add {port} mtu 1500 type veth peer name {UNDERLAY_IF} mtu 1500 netns {}", host.name()),
            format!("link set {port} master br0 up"),
        ])?;
        let mut lines = vec![
            format!("addr add {addr}/{UNDERLAY_PREFIX_LEN} dev {UNDERLAY_IF}"),
            format!("link set {UNDERLAY_IF} up"),
        ];
        if default_route {
            lines.push(format!("route add default via {UNDERLAY_GATEWAY} dev {UNDERLAY_IF}"));
        }
        if let Some(addr6) = addr6 {
            lines.push(format!("addr add {addr6}/{UNDERLAY_V6_PREFIX_LEN} dev {UNDERLAY_IF} nodad"));
            if default_route {
                lines.push(format!("route add ::/0 via {UNDERLAY_GATEWAY_V6} dev {UNDERLAY_IF}"));
            }
        }
        host.ip_batch(&lines)
    }

    /// Waits until every underlay link is operationally up, so that the
    /// first packet a test sends is not dropped (see [`Netns::wait_oper_up`]).
    fn wait_ready(&self) -> io::Result<()> {
        let mut ports: Vec<String> = (0..self.nodes.len()).map(|i| format!("p-n{i}")).collect();
        if self.outside.is_some() {
            ports.push("p-out".into());
        }
        ports.push("br0".into());
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        self.switch.wait_oper_up(&ports, READY_TIMEOUT)?;
        for host in self.nodes.iter().map(|n| &n.ns).chain(self.outside.as_ref()) {
            host.wait_oper_up(&[UNDERLAY_IF], READY_TIMEOUT)?;
        }
        if self.ipv6 {
            self.wait_ipv6_ready()?;
        }
        Ok(())
    }

    /// Waits until IPv6 works on the segment: no address in the cluster is
    /// still tentative, and every host's IPv6 address answers the switch
    /// (an echo request, which needs a neighbour solicitation answered
    /// first). Until then a test's first IPv6 packet could be dropped.
    fn wait_ipv6_ready(&self) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let hosts = self
            .nodes
            .iter()
            .map(|n| (&n.ns, n.underlay_ipv6.expect("dual-stack node")))
            .chain(self.outside.as_ref().map(|o| (o, OUTSIDE_IPV6)));
        for (host, addr) in hosts {
            for (ns, dev) in [(host, UNDERLAY_IF), (&self.switch, "br0")] {
                poll_until(deadline, || {
                    let addrs = ns.ip_json(&["-6", "addr", "show", "dev", dev]);
                    let tentative: Vec<&serde_json::Value> = addrs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|l| l["addr_info"].as_array())
                        .flatten()
                        .filter(|a| a["tentative"] == true)
                        .collect();
                    match tentative.is_empty() {
                        true => Ok(None),
                        false => Ok(Some(format!(
                            "{dev} in {} still has tentative IPv6 addresses: {tentative:?}",
                            ns.name()
                        ))),
                    }
                })?;
            }
            let target = addr.to_string();
            poll_until(deadline, || {
                let out = self.switch.run("ping", &["-6", "-n", "-c1", "-W1", &target])?;
                match out.status.success() {
                    true => Ok(None),
                    false => Ok(Some(format!(
                        "{target} ({}) does not answer the switch over IPv6 after {READY_TIMEOUT:?}: {}{}",
                        host.name(),
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))),
                }
            })?;
        }
        Ok(())
    }

    /// Node `i` (0-based); panics if there is no such node.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The switch namespace, holding `br0` and [`UNDERLAY_GATEWAY`]
    /// (`bridge_json(&["fdb", "show", "br", "br0"])` shows who talked).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The outside host, if the cluster was built with one.
    pub fn outside(&self) -> Option<&Netns> {
        self.outside.as_ref()
    }

    /// The tag in every namespace name of this cluster.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Gives up ownership of every namespace: they stay after this value is
    /// gone (the CLI's `up`). [`cleanup_tag`](crate::cleanup_tag) removes them.
    pub fn keep(self) {
        for node in self.nodes {
            node.ns.keep();
        }
        if let Some(outside) = self.outside {
            outside.keep();
        }
        self.switch.keep();
    }
}

/// Node `i`'s IPv6 underlay address in a dual-stack cluster:
/// `2001:db8::<10 + i>`, the number's decimal digits read as hex, so that it
/// reads like the IPv4 one (node 0: `192.0.2.10` and `2001:db8::10`).
/// Panics beyond [`MAX_NODES`].
pub fn ipv6_of_node(i: usize) -> Ipv6Addr {
    assert!(i < MAX_NODES, "node {i}: at most {MAX_NODES} nodes");
    let last = u16::from_str_radix(&(10 + i).to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

/// Turns IPv6 on in `ns` for what exists and what is made later (`all` and
/// `default`), and duplicate address detection off, so that addresses,
/// link-local ones included, are usable as soon as they are added. Only
/// this namespace's /proc/sys/net changes.
fn enable_ipv6(ns: &Netns) -> io::Result<()> {
    for conf in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{conf}.disable_ipv6"), "0")?;
        ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
    }
    Ok(())
}

/// A lone node namespace (`lo` up, IPv4 forwarding on) without underlay, for
/// CNI tests that need just one node.
pub fn single_node() -> io::Result<Netns> {
    let ns = Netns::new("node")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}
