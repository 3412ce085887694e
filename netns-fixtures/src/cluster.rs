//! [`Cluster`]: nodes on an underlay L2 segment, and [`single_node`].

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::netns::{check_part, check_user_tag, unique_tag, Netns};
use crate::{OUTSIDE_IP, PREFIX, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN};

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
/// default route via [`UNDERLAY_GATEWAY`] and IPv4 forwarding on.
#[derive(Debug)]
pub struct Node {
    /// The node's namespace: run the CNI plugin or the daemon in it.
    pub ns: Netns,
    /// Position in the cluster, from 0.
    pub index: usize,
    /// Address on the underlay: `192.0.2.(10 + index)`.
    pub underlay_ip: Ipv4Addr,
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
}

impl Cluster {
    /// A cluster of `nodes` nodes (at most [`MAX_NODES`]) with a unique tag.
    pub fn new(nodes: usize) -> io::Result<Cluster> {
        Self::build(&unique_tag(), nodes, false)
    }

    /// Like [`Cluster::new`], plus an outside host at [`OUTSIDE_IP`] on the
    /// same segment, without a default route: it sees the nodes' addresses as
    /// sources, and cannot answer pod addresses, which is what masquerade
    /// tests need.
    pub fn with_outside(nodes: usize) -> io::Result<Cluster> {
        Self::build(&unique_tag(), nodes, true)
    }

    /// A cluster whose namespaces are named after `tag` instead of the pid:
    /// `flt-<tag>-switch`, `flt-<tag>-node<i>`, `flt-<tag>-outside`, for
    /// scripts (`netns-fixture up --name <tag>`). `tag` is a letter followed
    /// by up to 23 of `[A-Za-z0-9_]`; it fails if the tag is in use.
    /// [`cleanup_leftovers`](crate::cleanup_leftovers) leaves such clusters
    /// alone; remove them with [`cleanup_tag`](crate::cleanup_tag).
    pub fn new_named(tag: &str, nodes: usize, outside: bool) -> io::Result<Cluster> {
        check_user_tag(tag)?;
        Self::build(tag, nodes, outside)
    }

    fn build(tag: &str, nodes: usize, outside: bool) -> io::Result<Cluster> {
        if nodes > MAX_NODES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{nodes} nodes: at most {MAX_NODES}")));
        }
        let switch = Netns::named(&format!("{PREFIX}{tag}-switch"))?;
        // A fixed MAC: a bridge without one takes the lowest of its ports',
        // which would change as ports are added and leave stale ARP entries
        // for the gateway in nodes that already resolved it.
        switch.ip_batch(&[
            "link add br0 address 02:00:c0:00:02:01 type bridge".into(),
            format!("addr add {UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN} dev br0"),
            "link set br0 up".into(),
        ])?;
        // Every error below drops `cluster`, which deletes what exists so far.
        let mut cluster = Cluster { nodes: Vec::with_capacity(nodes), outside: None, switch, tag: tag.to_string() };
        for index in 0..nodes {
            let ns = Netns::named(&format!("{PREFIX}{tag}-node{index}"))?;
            let underlay_ip = Ipv4Addr::new(192, 0, 2, 10 + index as u8);
            cluster.attach(&ns, &format!("p-n{index}"), underlay_ip, true)?;
            // Nodes route pod traffic; /proc/sys/net is per namespace.
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            cluster.nodes.push(Node { ns, index, underlay_ip, underlay_if: UNDERLAY_IF.into(), tag: tag.into() });
        }
        if outside {
            let ns = Netns::named(&format!("{PREFIX}{tag}-outside"))?;
            cluster.attach(&ns, "p-out", OUTSIDE_IP, false)?;
            cluster.outside = Some(ns);
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Plugs `host` into the switch: a veth with `eth0` (MTU 1500, `addr`)
    /// inside `host` and `port` on br0. The `ip` that creates it runs inside
    /// the switch and puts the peer straight into `host`.
    fn attach(&self, host: &Netns, port: &str, addr: Ipv4Addr, default_route: bool) -> io::Result<()> {
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

/// A lone node namespace (`lo` up, IPv4 forwarding on) without underlay, for
/// CNI tests that need just one node.
pub fn single_node() -> io::Result<Netns> {
    let ns = Netns::new("node")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}
