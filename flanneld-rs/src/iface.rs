//! Choosing the underlay interface: `--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the default route's interface.
//! Dual-stack (`EnableIPv6`), the interface must also have a global IPv6
//! address (`--public-ipv6`, `--iface` with an IPv6 address and an IPv6
//! `--iface-can-reach` choose it as flannel does).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    /// Its IPv4 address that we use, with prefix; `None` in an IPv6-only
    /// cluster.
    pub addr: Option<ipnet::Ipv4Net>,
    /// The address peers use to reach us (`--public-ip`, else `addr`);
    /// `None` in an IPv6-only cluster.
    pub public_ip: Option<Ipv4Addr>,
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
    /// A flag's value that flanneld-rs cannot use (IPv6 in an IPv4-only network).
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

fn all_v6(addrs: &[(u32, IpNet)], index: u32) -> Vec<ipnet::Ipv6Net> {
    addrs
        .iter()
        .filter(|(i, _)| *i == index)
        .filter_map(|(_, a)| match a {
            IpNet::V6(v6) => Some(*v6),
            _ => None,
        })
        .collect()
}

/// An IPv6 address peers can reach: not link-local (flannel would fall
/// back to one; a peer cannot use it without a zone, so we do not), not
/// loopback, multicast, unspecified or IPv4-mapped. ULAs (fc00::/7) count,
/// as in Go's `IsGlobalUnicast`.
fn global_v6(a: Ipv6Addr) -> bool {
    crate::lease::unusable_public_ipv6(a).is_none()
}

/// Every interface with its addresses of one family (`v6`), for errors
/// that say what there was to choose from: `eth0 [192.0.2.10/24], lo [...]`.
fn inventory(links: &[Link], addrs: &[(u32, IpNet)], v6: bool) -> String {
    let mut v: Vec<String> = links
        .iter()
        .map(|l| {
            let a: Vec<String> = if v6 {
                all_v6(addrs, l.index).iter().map(|a| a.to_string()).collect()
            } else {
                all_v4(addrs, l.index).iter().map(|a| a.to_string()).collect()
            };
            format!("{} [{}]", l.name, a.join(" "))
        })
        .collect();
    v.sort();
    v.join(", ")
}

/// Interface `link`'s IPv6 address `want`, or its first global one (in the
/// kernel's order). Address flags are not looked at: a tentative or
/// deprecated address is used like any other (flannel's Go does the same).
fn v6_of(link: &Link, addrs: &[(u32, IpNet)], want: Option<Ipv6Addr>) -> Result<ipnet::Ipv6Net, String> {
    let mine = all_v6(addrs, link.index);
    match want {
        Some(ip) => {
            mine.into_iter().find(|a| a.addr() == ip).ok_or_else(|| format!("{} has no address {ip}", link.name))
        }
        None => mine.into_iter().find(|a| global_v6(a.addr())).ok_or_else(|| {
            format!(
                "the network has IPv6 (EnableIPv6) but interface {} has no global IPv6 address{}",
                link.name,
                if all_v6(addrs, link.index).is_empty() { "" } else { " (link-local ones only)" }
            )
        }),
    }
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
    Ok(ExtIface {
        name: link.name.clone(),
        index: link.index,
        addr: Some(addr),
        public_ip: Some(addr.addr()),
        mtu: link.mtu,
        v6: None,
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
    /// `--iface-can-reach` (IPv6 only in a dual-stack network).
    pub iface_can_reach: Option<IpAddr>,
    /// `--public-ip` (or the Node's `node-public-ip`).
    pub public_ip: Option<Ipv4Addr>,
    /// Advertised instead of the chosen address (the Node's `public-ip-overwrite`).
    pub advertise: Option<Ipv4Addr>,
    /// The network is dual-stack (`EnableIPv6`): the interface must have a
    /// global IPv6 address too. Set from the configuration.
    pub ipv6: bool,
    /// The network has IPv4 (not `EnableIPv4` false): the interface must
    /// have an IPv4 address. Set from the configuration.
    pub ipv4: bool,
    /// `--public-ipv6`: advertised as the IPv6 address (dual-stack only).
    pub public_ipv6: Option<Ipv6Addr>,
    /// Advertised instead of the chosen IPv6 address (the Node's
    /// `public-ipv6-overwrite`).
    pub advertise_ipv6: Option<Ipv6Addr>,
}

/// Why an IPv6 value cannot be used in an IPv4-only network.
const NO_IPV6: &str =
    "an IPv6 address, and the network is IPv4 only (net-conf EnableIPv6 is not set): give an IPv4 address";

impl Selection {
    /// The selection the flags ask for (the caller sets [`Selection::ipv6`]
    /// from the configuration). An IPv6 `--public-ip`, an IPv4
    /// `--public-ipv6` and a `--public-ipv6` peers cannot reach
    /// (link-local, ...) are refused by name.
    pub fn from_opts(opts: &Opts) -> Result<Selection, IfaceError> {
        let public_ip = match opts.public_ip {
            None => None,
            Some(IpAddr::V4(v4)) => Some(v4),
            Some(IpAddr::V6(v6)) => {
                return Err(IfaceError::Unsupported(format!(
                    "--public-ip {v6}: an IPv6 address; --public-ip is the IPv4 one (the IPv6 one is --public-ipv6)"
                )))
            }
        };
        let public_ipv6 = match opts.public_ipv6 {
            None => None,
            Some(IpAddr::V4(v4)) => {
                return Err(IfaceError::Unsupported(format!("--public-ipv6 {v4}: not an IPv6 address")));
            }
            Some(IpAddr::V6(v6)) => match crate::lease::unusable_public_ipv6(v6) {
                Some(why) => {
                    return Err(IfaceError::Unsupported(format!(
                        "--public-ipv6 {v6} is {why}: other nodes could not reach this one at it"
                    )))
                }
                None => Some(v6),
            },
        };
        Ok(Selection {
            iface: opts.iface.clone(),
            iface_regex: opts.iface_regex.clone(),
            iface_can_reach: opts.iface_can_reach,
            public_ip,
            advertise: None,
            ipv6: false,
            ipv4: true,
            public_ipv6,
            advertise_ipv6: None,
        })
    }

    /// No `--iface`, `--iface-regex` or `--iface-can-reach`: the interface
    /// holding `--public-ip`, else the default route's.
    fn chooses_by_default(&self) -> bool {
        self.iface.is_empty() && self.iface_regex.is_empty() && self.iface_can_reach.is_none()
    }

    /// Chooses the interface (see [`select`]), advertising `advertise` (and
    /// `advertise_ipv6`) when set.
    pub async fn select(&self, nl: &Netlink) -> Result<ExtIface, IfaceError> {
        let mut ext = select(nl, self).await?;
        if let (Some(ip), Some(_)) = (self.advertise, ext.public_ip) {
            ext.public_ip = Some(ip);
        }
        if let (Some(ip), Some(v6)) = (self.advertise_ipv6, ext.v6.as_mut()) {
            v6.public_ip = ip;
        }
        Ok(ext)
    }
}

/// Selects the interface as flannel does (see [`select_v4`]) and, in a
/// dual-stack network, its IPv6 address: the one `--iface` or
/// `--iface-can-reach` named, else `--public-ipv6` when the interface is
/// chosen by default (it must hold it, as in flannel, and so must the
/// interface `--public-ip` or the default routes of both families point
/// at), else the interface's first global IPv6 address. `--public-ipv6`,
/// when given, is what is advertised.
pub async fn select(nl: &Netlink, opts: &Selection) -> Result<ExtIface, IfaceError> {
    if !opts.ipv4 {
        return select_v6_only(nl, opts).await;
    }
    let mut ext = select_v4(nl, opts).await?;
    if !opts.ipv6 {
        ext.v6 = None;
        return Ok(ext);
    }
    let links = nl.links().await?;
    let addrs = nl.all_addrs().await?;
    let link = links
        .iter()
        .find(|l| l.index == ext.index)
        .ok_or_else(|| IfaceError::NotFound(format!("interface {} went away while it was being chosen", ext.name)))?;
    if ext.v6.is_none() {
        let by_default = opts.chooses_by_default();
        let want = match opts.public_ipv6 {
            Some(ip) if by_default => {
                if !all_v6(&addrs, link.index).iter().any(|a| a.addr() == ip) {
                    let holder = links.iter().find(|l| all_v6(&addrs, l.index).iter().any(|a| a.addr() == ip));
                    return Err(IfaceError::NotFound(match holder {
                        Some(h) => format!(
                            "--public-ipv6 {ip} is on interface {}, but the IPv4 side uses {} (flannel wants both \
                             families on one interface): give --iface",
                            h.name, ext.name
                        ),
                        None => format!(
                            "--public-ipv6 {ip} without --iface, --iface-regex or --iface-can-reach: the interface \
                             must hold it, and {} does not (give --iface to advertise an address no interface holds)",
                            ext.name
                        ),
                    }));
                }
                Some(ip)
            }
            _ => None,
        };
        if by_default && opts.public_ip.is_none() && opts.public_ipv6.is_none() {
            // flannel: the default routes of both families must leave
            // through the same interface.
            let routes = nl.routes().await?;
            let default6 = routes.iter().find(|r| matches!(r.dst, IpNet::V6(n) if n.prefix_len() == 0));
            match default6.and_then(|r| r.oif) {
                None => {
                    return Err(IfaceError::NotFound(format!(
                        "the network is dual-stack (EnableIPv6) and no interface is given, but there is no IPv6 \
                         default route to check the default interface {} against (flannel needs one): give --iface",
                        ext.name
                    )))
                }
                Some(oif) if oif != ext.index => {
                    let name = links.iter().find(|l| l.index == oif).map_or(format!("#{oif}"), |l| l.name.clone());
                    return Err(IfaceError::NotFound(format!(
                        "the IPv6 default route leaves through {name}, the IPv4 one through {} (flannel wants one \
                         interface for both): give --iface",
                        ext.name
                    )));
                }
                Some(_) => {}
            }
        }
        let addr = v6_of(link, &addrs, want).map_err(|why| {
            let have: Vec<String> = all_v6(&addrs, link.index).iter().map(|a| a.to_string()).collect();
            IfaceError::NotFound(format!(
                "{why} (its IPv6 addresses: [{}]): add one, or choose another interface with --iface",
                have.join(" ")
            ))
        })?;
        ext.v6 = Some(ExtIface6 { addr, public_ip: addr.addr() });
    }
    if let (Some(ip), Some(v6)) = (opts.public_ipv6, ext.v6.as_mut()) {
        v6.public_ip = ip;
    }
    Ok(ext)
}

/// Selects the interface (and its IPv4 address) as flannel does. With any of `--iface`,
/// `--iface-regex`, `--iface-can-reach`: each `--iface` entry in order, then
/// each regex, then the route to `--iface-can-reach`; the first that yields
/// an interface with an IPv4 address wins, and the error when none does
/// names every attempt. Without them: the interface that holds `--public-ip`
/// (an error when none does: give `--iface`), else the default route's.
/// `--public-ip`, when given, is what is advertised.
/// An IPv6-only cluster's interface (flannel's IPv6 stack): the one holding
/// `--public-ipv6`, else the IPv6 default route's, unless `--iface`,
/// `--iface-regex` or `--iface-can-reach` choose, in that order, by IPv6
/// address or by name; the interface needs no IPv4 address.
async fn select_v6_only(nl: &Netlink, opts: &Selection) -> Result<ExtIface, IfaceError> {
    if let Some(ip) = opts.public_ip {
        return Err(IfaceError::Unsupported(format!(
            "--public-ip {ip}: the network is IPv6-only (net-conf EnableIPv4 false); the address to advertise is \
             --public-ipv6"
        )));
    }
    let mut links = nl.links().await?;
    links.sort_by_key(|l| l.index);
    let addrs = nl.all_addrs().await?;
    let inventory = || inventory(&links, &addrs, true);
    let on = |link: &Link, want: Option<Ipv6Addr>| -> Result<ExtIface, String> {
        let addr = v6_of(link, &addrs, want)?;
        Ok(ExtIface {
            name: link.name.clone(),
            index: link.index,
            addr: None,
            public_ip: None,
            mtu: link.mtu,
            v6: Some(ExtIface6 { addr, public_ip: opts.public_ipv6.unwrap_or(addr.addr()) }),
        })
    };
    let holder = |ip: Ipv6Addr| links.iter().find(|l| all_v6(&addrs, l.index).iter().any(|a| a.addr() == ip));
    let by_ip = |ip: Ipv6Addr| on(holder(ip).ok_or_else(|| format!("no interface has the address {ip}"))?, Some(ip));

    if opts.chooses_by_default() {
        if let Some(ip) = opts.public_ipv6 {
            return by_ip(ip).map_err(|why| {
                IfaceError::NotFound(format!(
                    "--public-ipv6 {ip} without --iface, --iface-regex or --iface-can-reach: the interface is the \
                     one holding it, and {why} (give --iface to advertise an address no interface holds; \
                     interfaces: {})",
                    inventory()
                ))
            });
        }
        let routes = nl.routes().await?;
        let default = routes.iter().find(|r| matches!(r.dst, IpNet::V6(n) if n.prefix_len() == 0));
        let Some(oif) = default.and_then(|r| r.oif) else {
            return Err(IfaceError::NotFound(format!(
                "the network is IPv6-only, no --iface, --iface-regex or --iface-can-reach is given, and there is no \
                 IPv6 default route to pick an interface from (interfaces: {})",
                inventory()
            )));
        };
        let link = links.iter().find(|l| l.index == oif).ok_or_else(|| {
            IfaceError::NotFound(format!(
                "the IPv6 default route's interface #{oif} is gone (interfaces: {})",
                inventory()
            ))
        })?;
        return on(link, None)
            .map_err(|why| IfaceError::NotFound(format!("the IPv6 default route's interface: {why}")));
    }

    let mut tried: Vec<String> = Vec::new();
    let mut attempt = |what: String, found: Result<ExtIface, String>| match found {
        Ok(e) => Some(e),
        Err(why) => {
            log::info!("{what}: {why}");
            tried.push(format!("{what} ({why})"));
            None
        }
    };
    for entry in &opts.iface {
        let found = match crate::flags::parse_go_ip(entry) {
            Ok(IpAddr::V6(ip)) => by_ip(ip),
            Ok(IpAddr::V4(_)) => Err("an IPv4 address, and the network is IPv6-only (net-conf EnableIPv4 false): \
                 give an IPv6 address or a name"
                .to_string()),
            Err(_) => match links.iter().find(|l| &l.name == entry) {
                Some(l) => on(l, None),
                None => Err("no such interface".into()),
            },
        };
        if let Some(e) = attempt(format!("--iface {entry}"), found) {
            return Ok(e);
        }
    }
    for pattern in &opts.iface_regex {
        let found = match regex::Regex::new(pattern) {
            Err(e) => Err(format!("not a regular expression: {e}")),
            // Addresses first (interface by interface), then names.
            Ok(re) => match links.iter().find_map(|l| {
                all_v6(&addrs, l.index)
                    .into_iter()
                    .find(|a| global_v6(a.addr()) && re.is_match(&a.addr().to_string()))
                    .map(|a| (l, a))
            }) {
                Some((l, a)) => on(l, Some(a.addr())),
                None => match links.iter().find(|l| re.is_match(&l.name)) {
                    Some(l) => on(l, None),
                    None => Err("matches no interface IPv6 address or name".into()),
                },
            },
        };
        if let Some(e) = attempt(format!("--iface-regex {pattern}"), found) {
            return Ok(e);
        }
    }
    if let Some(target) = opts.iface_can_reach {
        let found = match nl.route_get(target).await {
            _ if target.is_ipv4() => Err("an IPv4 address, and the network is IPv6-only".to_string()),
            Err(e) => Err(format!("no route: {e}")),
            Ok(None) => Err("the kernel has no route to it".to_string()),
            Ok(Some((oif, src))) => match links.iter().find(|l| l.index == oif) {
                None => Err(format!("its interface #{oif} is gone")),
                Some(l) => match src {
                    Some(IpAddr::V6(v6)) if global_v6(v6) => on(l, Some(v6)),
                    _ => on(l, None),
                },
            },
        };
        if let Some(e) = attempt(format!("--iface-can-reach {target}"), found) {
            return Ok(e);
        }
    }
    Err(IfaceError::NotFound(format!("no interface matches: {} (interfaces: {})", tried.join(", "), inventory())))
}

async fn select_v4(nl: &Netlink, opts: &Selection) -> Result<ExtIface, IfaceError> {
    let mut links = nl.links().await?;
    links.sort_by_key(|l| l.index);
    let addrs = nl.all_addrs().await?;
    let public = opts.public_ip;
    let inventory = || inventory(&links, &addrs, false);
    let advertise = |mut e: ExtIface| {
        if let Some(p) = public {
            e.public_ip = Some(p);
        }
        e
    };
    let by_ip = |ip: Ipv4Addr| -> Result<ExtIface, String> {
        let holder = links.iter().find(|l| all_v4(&addrs, l.index).iter().any(|a| a.addr() == ip));
        ext(holder.ok_or_else(|| format!("no interface has the address {ip}"))?, &addrs, Some(ip))
    };

    // Dual-stack: the interface holding an IPv6 address, with its IPv4 side.
    let regex_v6 = |mut e: ExtIface, l: &Link, re: &regex::Regex| {
        if opts.ipv6 {
            if let Some(a) =
                all_v6(&addrs, l.index).into_iter().find(|a| global_v6(a.addr()) && re.is_match(&a.addr().to_string()))
            {
                e.v6 = Some(ExtIface6 { addr: a, public_ip: a.addr() });
            }
        }
        e
    };
    let by_ip6 = |ip: Ipv6Addr| -> Result<ExtIface, String> {
        let holder = links
            .iter()
            .find(|l| all_v6(&addrs, l.index).iter().any(|a| a.addr() == ip))
            .ok_or_else(|| format!("no interface has the address {ip}"))?;
        let mut e = ext(holder, &addrs, None)?;
        let addr = v6_of(holder, &addrs, Some(ip))?;
        e.v6 = Some(ExtIface6 { addr, public_ip: ip });
        Ok(e)
    };

    if opts.chooses_by_default() {
        if let (None, Some(ip6)) = (public, opts.public_ipv6) {
            if !opts.ipv6 {
                return Err(IfaceError::Unsupported(format!(
                    "--public-ipv6 {ip6} alone cannot choose the interface in an IPv4 network (flannel stops here \
                     too): give --iface, --iface-regex, --iface-can-reach or --public-ip"
                )));
            }
            // flannel: the interface holding --public-ipv6.
            return by_ip6(ip6).map_err(|why| {
                IfaceError::NotFound(format!(
                    "--public-ipv6 {ip6} without --iface, --iface-regex, --iface-can-reach or --public-ip: the \
                     interface is the one holding it, and {why} (give --iface to advertise an address no interface \
                     holds; interfaces: {})",
                    inventory()
                ))
            });
        }
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
            Ok(IpAddr::V6(ip)) if opts.ipv6 => by_ip6(ip),
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
                // Dual-stack, as flannel: an IPv6 address of the interface
                // that the regex matches is preferred.
                Some((l, a)) => ext(l, &addrs, Some(a.addr())).map(|e| regex_v6(e, l, &re)),
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
        let found = match nl.route_get(target).await {
            _ if target.is_ipv6() && !opts.ipv6 => Err(NO_IPV6.to_string()),
            Err(e) => Err(format!("no route: {e}")),
            Ok(None) => Err("the kernel has no route to it".to_string()),
            Ok(Some((oif, src))) => match links.iter().find(|l| l.index == oif) {
                None => Err(format!("its interface #{oif} is gone")),
                Some(l) => match src {
                    Some(IpAddr::V4(v4)) => ext(l, &addrs, Some(v4)).or_else(|_| ext(l, &addrs, None)),
                    // An IPv6 target: the route's IPv6 source is the IPv6
                    // address; the IPv4 one is the interface's first.
                    Some(IpAddr::V6(v6)) if global_v6(v6) => ext(l, &addrs, None).and_then(|mut e| {
                        let addr = v6_of(l, &addrs, Some(v6))?;
                        e.v6 = Some(ExtIface6 { addr, public_ip: v6 });
                        Ok(e)
                    }),
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
