//! Choosing the underlay interface: `--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the default route's interface.

use std::net::{IpAddr, Ipv4Addr};

use flannel_net::netlink::{Link, Netlink, NlError};
use ipnet::IpNet;

use crate::flags::Opts;

/// The chosen underlay interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtIface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Its IPv4 address that we use, with prefix.
    pub addr: ipnet::Ipv4Net,
    /// The address peers use to reach us (`--public-ip`, else `addr`).
    pub public_ip: Ipv4Addr,
    /// Its MTU.
    pub mtu: u32,
    /// Dual-stack: its IPv6 address that we use, and the one we advertise.
    pub v6: Option<ExtIface6>,
}

/// The IPv6 side of the underlay interface (dual-stack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtIface6 {
    /// Its global IPv6 address that we use, with prefix.
    pub addr: ipnet::Ipv6Net,
    /// The IPv6 address peers use to reach us (`--public-ipv6`, the Node's
    /// `public-ipv6-overwrite`, else `addr`).
    pub public_ip: std::net::Ipv6Addr,
}

/// Why no interface could be chosen; names what was tried.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// A netlink dump failed.
    #[error(transparent)]
    Netlink(#[from] NlError),
    /// Nothing matched.
    #[error("{0}")]
    NotFound(String),
    /// A flag's value that flanneld-rs cannot use (IPv6, until dual-stack).
    #[error("{0}")]
    Unsupported(String),
}

/// The addresses flannel would use on interface `index`, in its order of
/// preference: global unicast IPv4 addresses first, then link-local ones
/// (loopback and others never), each group in the kernel's order.
fn usable_v4(addrs: &[(u32, IpNet)], index: u32) -> Vec<ipnet::Ipv4Net> {
    let mine: Vec<ipnet::Ipv4Net> = addrs
        .iter()
        .filter(|(i, _)| *i == index)
        .filter_map(|(_, a)| match a {
            IpNet::V4(v4) => Some(*v4),
            _ => None,
        })
        .collect();
    let global = |a: &Ipv4Addr| {
        !(a.is_loopback() || a.is_link_local() || a.is_multicast() || a.is_unspecified() || a.is_broadcast())
    };
    let mut out: Vec<_> = mine.iter().copied().filter(|a| global(&a.addr())).collect();
    out.extend(mine.iter().copied().filter(|a| a.addr().is_link_local()));
    out
}

fn all_v4(addrs: &[(u32, IpNet)], index: u32) -> Vec<ipnet::Ipv4Net> {
    addrs
        .iter()
        .filter(|(i, _)| *i == index)
        .filter_map(|(_, a)| match a {
            IpNet::V4(v4) => Some(*v4),
            _ => None,
        })
        .collect()
}

/// The interface with `addr` (one of its addresses) or, without one, its
/// first usable address; `Err` says why not.
fn ext(link: &Link, addrs: &[(u32, IpNet)], want: Option<Ipv4Addr>) -> Result<ExtIface, String> {
    let addr = match want {
        Some(ip) => all_v4(addrs, link.index)
            .into_iter()
            .find(|a| a.addr() == ip)
            .ok_or_else(|| format!("{} has no address {ip}", link.name))?,
        None => {
            *usable_v4(addrs, link.index).first().ok_or_else(|| format!("{} has no usable IPv4 address", link.name))?
        }
    };
    let v6 = usable_v6(addrs, link.index).map(|a| ExtIface6 { addr: a, public_ip: a.addr() });
    Ok(ExtIface { name: link.name.clone(), index: link.index, addr, public_ip: addr.addr(), mtu: link.mtu, v6 })
}

/// The interface's first global unicast IPv6 address (flannel's
/// `GetInterfaceIP6Addr`): not link-local, loopback, multicast or
/// unspecified. Stop-gap of the fixtures' helper until interface selection
/// handles IPv6 (`--public-ipv6`, IPv6 `--iface` values are not applied).
fn usable_v6(addrs: &[(u32, IpNet)], index: u32) -> Option<ipnet::Ipv6Net> {
    addrs.iter().filter(|(i, _)| *i == index).find_map(|(_, a)| match a {
        IpNet::V6(v6)
            if !(v6.addr().is_loopback()
                || v6.addr().is_multicast()
                || v6.addr().is_unspecified()
                || v6.addr().segments()[0] & 0xffc0 == 0xfe80) =>
        {
            Some(*v6)
        }
        _ => None,
    })
}

/// How the underlay interface is chosen: the flags, with what the lease
/// store says about this node. Kept by the reconcile loop, which chooses
/// again when the interface goes, comes back or changes its address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `--iface`.
    pub iface: Vec<String>,
    /// `--iface-regex`.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`.
    pub iface_can_reach: Option<Ipv4Addr>,
    /// `--public-ip` (or the Node's `node-public-ip`).
    pub public_ip: Option<Ipv4Addr>,
    /// Advertised instead of the chosen address (the Node's `public-ip-overwrite`).
    pub advertise: Option<Ipv4Addr>,
}

/// Why an IPv6 value cannot be used yet.
const NO_IPV6: &str = "IPv6 is not supported yet (dual-stack is issue 14): give an IPv4 address";

impl Selection {
    /// The selection the flags ask for. IPv6 values are refused by name
    /// (flannel would advertise or bind an IPv6 address in an IPv4 network),
    /// and so is `--public-ipv6` alone: flannel then looks for an interface
    /// holding it among IPv4 addresses, finds none and stops.
    pub fn from_opts(opts: &Opts) -> Result<Selection, IfaceError> {
        let v4 = |flag: &str, ip: Option<IpAddr>| match ip {
            None => Ok(None),
            Some(IpAddr::V4(v4)) => Ok(Some(v4)),
            Some(IpAddr::V6(v6)) => Err(IfaceError::Unsupported(format!("{flag} {v6}: {NO_IPV6}"))),
        };
        let sel = Selection {
            iface: opts.iface.clone(),
            iface_regex: opts.iface_regex.clone(),
            iface_can_reach: v4("--iface-can-reach", opts.iface_can_reach)?,
            public_ip: v4("--public-ip", opts.public_ip)?,
            advertise: None,
        };
        if let (Some(v6), true, None) = (opts.public_ipv6, sel.chooses_by_default(), sel.public_ip) {
            return Err(IfaceError::Unsupported(format!(
                "--public-ipv6 {v6} alone cannot choose the interface in an IPv4 network (flannel stops here too): \
                 give --iface, --iface-regex, --iface-can-reach or --public-ip"
            )));
        }
        Ok(sel)
    }

    /// No `--iface`, `--iface-regex` or `--iface-can-reach`: the interface
    /// holding `--public-ip`, else the default route's.
    fn chooses_by_default(&self) -> bool {
        self.iface.is_empty() && self.iface_regex.is_empty() && self.iface_can_reach.is_none()
    }

    /// Chooses the interface (see [`select`]), advertising `advertise` when set.
    pub async fn select(&self, nl: &Netlink) -> Result<ExtIface, IfaceError> {
        let mut ext = select(nl, self).await?;
        if let Some(ip) = self.advertise {
            ext.public_ip = ip;
        }
        Ok(ext)
    }
}

/// Selects the interface as flannel does. With any of `--iface`,
/// `--iface-regex`, `--iface-can-reach`: each `--iface` entry in order, then
/// each regex, then the route to `--iface-can-reach`; the first that yields
/// an interface with an IPv4 address wins, and the error when none does
/// names every attempt. Without them: the interface that holds `--public-ip`
/// (an error when none does: give `--iface`), else the default route's.
/// `--public-ip`, when given, is what is advertised.
pub async fn select(nl: &Netlink, opts: &Selection) -> Result<ExtIface, IfaceError> {
    let mut links = nl.links().await?;
    links.sort_by_key(|l| l.index);
    let addrs = nl.all_addrs().await?;
    let public = opts.public_ip;
    let inventory = || {
        let mut v: Vec<String> = links
            .iter()
            .map(|l| {
                let a: Vec<String> = all_v4(&addrs, l.index).iter().map(|a| a.to_string()).collect();
                format!("{} [{}]", l.name, a.join(" "))
            })
            .collect();
        v.sort();
        v.join(", ")
    };
    let advertise = |mut e: ExtIface| {
        if let Some(p) = public {
            e.public_ip = p;
        }
        e
    };
    let by_ip = |ip: Ipv4Addr| -> Result<ExtIface, String> {
        let holder = links.iter().find(|l| all_v4(&addrs, l.index).iter().any(|a| a.addr() == ip));
        ext(holder.ok_or_else(|| format!("no interface has the address {ip}"))?, &addrs, Some(ip))
    };

    if opts.chooses_by_default() {
        if let Some(ip) = public {
            return by_ip(ip).map(advertise).map_err(|why| {
                IfaceError::NotFound(format!(
                    "--public-ip {ip} without --iface, --iface-regex or --iface-can-reach: the interface is the one \
                     holding it, and {why} (give --iface to advertise an address no interface holds; interfaces: {})",
                    inventory()
                ))
            });
        }
        let default = nl.routes_v4().await?.into_iter().find(|r| matches!(r.dst, IpNet::V4(n) if n.prefix_len() == 0));
        let Some(oif) = default.and_then(|r| r.oif) else {
            return Err(IfaceError::NotFound(format!(
                "no --iface, --iface-regex or --iface-can-reach given, and no default route to pick an interface from (interfaces: {})",
                inventory()
            )));
        };
        let link = links.iter().find(|l| l.index == oif).ok_or_else(|| {
            IfaceError::NotFound(format!("the default route's interface #{oif} is gone (interfaces: {})", inventory()))
        })?;
        return ext(link, &addrs, None)
            .map(advertise)
            .map_err(|why| IfaceError::NotFound(format!("the default route's interface: {why}")));
    }

    let mut tried: Vec<String> = Vec::new();
    for entry in &opts.iface {
        let found = match crate::flags::parse_go_ip(entry) {
            Ok(IpAddr::V4(ip)) => by_ip(ip),
            Ok(IpAddr::V6(_)) => Err(NO_IPV6.to_string()),
            Err(_) => match links.iter().find(|l| &l.name == entry) {
                Some(l) => ext(l, &addrs, None),
                None if entry.contains(',') => {
                    Err("no such interface (a value is not split on commas: repeat --iface for several)".into())
                }
                None => Err("no such interface".into()),
            },
        };
        match found {
            Ok(e) => return Ok(advertise(e)),
            Err(why) => {
                log::info!("--iface {entry}: {why}");
                tried.push(format!("--iface {entry} ({why})"));
            }
        }
    }
    for pattern in &opts.iface_regex {
        let found = match regex::Regex::new(pattern) {
            Err(e) => Err(format!("not a regular expression: {e}")),
            // Addresses first (interface by interface), then names; a name
            // match takes that interface's first usable address.
            Ok(re) => match links.iter().find_map(|l| {
                usable_v4(&addrs, l.index).into_iter().find(|a| re.is_match(&a.addr().to_string())).map(|a| (l, a))
            }) {
                Some((l, a)) => ext(l, &addrs, Some(a.addr())),
                None => match links.iter().find(|l| re.is_match(&l.name)) {
                    Some(l) => ext(l, &addrs, None),
                    None => Err("matches no interface address or name".into()),
                },
            },
        };
        match found {
            Ok(e) => return Ok(advertise(e)),
            Err(why) => {
                log::info!("--iface-regex {pattern}: {why}");
                tried.push(format!("--iface-regex {pattern} ({why})"));
            }
        }
    }
    if let Some(target) = opts.iface_can_reach {
        let found = match nl.route_get(IpAddr::V4(target)).await {
            Err(e) => Err(format!("no route: {e}")),
            Ok(None) => Err("the kernel has no route to it".to_string()),
            Ok(Some((oif, src))) => match links.iter().find(|l| l.index == oif) {
                None => Err(format!("its interface #{oif} is gone")),
                Some(l) => match src {
                    Some(IpAddr::V4(v4)) => ext(l, &addrs, Some(v4)).or_else(|_| ext(l, &addrs, None)),
                    _ => ext(l, &addrs, None),
                },
            },
        };
        match found {
            Ok(e) => return Ok(advertise(e)),
            Err(why) => {
                log::info!("--iface-can-reach {target}: {why}");
                tried.push(format!("--iface-can-reach {target} ({why})"));
            }
        }
    }
    Err(IfaceError::NotFound(format!("no interface matches: {} (interfaces: {})", tried.join(", "), inventory())))
}
