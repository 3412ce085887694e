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
}

fn v4_addrs_of(addrs: &[(u32, IpNet)], index: u32) -> Vec<ipnet::Ipv4Net> {
    addrs
        .iter()
        .filter(|(i, _)| *i == index)
        .filter_map(|(_, a)| match a {
            IpNet::V4(v4) => Some(*v4),
            _ => None,
        })
        .collect()
}

fn pick(link: &Link, addrs: &[(u32, IpNet)], want: Option<Ipv4Addr>, public: Option<Ipv4Addr>) -> Option<ExtIface> {
    let mine = v4_addrs_of(addrs, link.index);
    let addr = match want {
        Some(ip) => *mine.iter().find(|a| a.addr() == ip)?,
        None => *mine.iter().find(|a| !a.addr().is_loopback() && !a.addr().is_link_local())?,
    };
    Some(ExtIface {
        name: link.name.clone(),
        index: link.index,
        addr,
        public_ip: public.unwrap_or(addr.addr()),
        mtu: link.mtu,
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

impl Selection {
    /// The selection the flags ask for.
    pub fn from_opts(opts: &Opts) -> Selection {
        Selection {
            iface: opts.iface.clone(),
            iface_regex: opts.iface_regex.clone(),
            iface_can_reach: opts.iface_can_reach,
            public_ip: opts.public_ip,
            advertise: None,
        }
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

/// Selects the interface as flannel does.
pub async fn select(nl: &Netlink, opts: &Selection) -> Result<ExtIface, IfaceError> {
    let links = nl.links().await?;
    let addrs = nl.all_addrs().await?;
    let public = opts.public_ip;
    let inventory = || {
        let mut v: Vec<String> = links
            .iter()
            .map(|l| {
                let a: Vec<String> = v4_addrs_of(&addrs, l.index).iter().map(|a| a.to_string()).collect();
                format!("{} [{}]", l.name, a.join(" "))
            })
            .collect();
        v.sort();
        v.join(", ")
    };

    if !opts.iface.is_empty() {
        for entry in &opts.iface {
            let found = match entry.parse::<Ipv4Addr>() {
                Ok(ip) => addrs
                    .iter()
                    .find(|(_, a)| a.addr() == IpAddr::V4(ip))
                    .and_then(|(i, _)| links.iter().find(|l| l.index == *i))
                    .and_then(|l| pick(l, &addrs, Some(ip), public)),
                Err(_) => links.iter().find(|l| &l.name == entry).and_then(|l| pick(l, &addrs, None, public)),
            };
            if let Some(f) = found {
                return Ok(f);
            }
        }
        return Err(IfaceError::NotFound(format!(
            "--iface {}: no interface with an IPv4 address matches (interfaces: {})",
            opts.iface.join(", "),
            inventory()
        )));
    }

    if !opts.iface_regex.is_empty() {
        for pattern in &opts.iface_regex {
            let re = regex::Regex::new(pattern).map_err(|e| {
                IfaceError::NotFound(format!("--iface-regex {pattern:?} is not a regular expression: {e}"))
            })?;
            // Addresses first, then names, as flannel does.
            for (i, a) in &addrs {
                if let IpNet::V4(v4) = a {
                    if re.is_match(&v4.addr().to_string()) {
                        if let Some(f) =
                            links.iter().find(|l| l.index == *i).and_then(|l| pick(l, &addrs, Some(v4.addr()), public))
                        {
                            return Ok(f);
                        }
                    }
                }
            }
            for l in &links {
                if re.is_match(&l.name) {
                    if let Some(f) = pick(l, &addrs, None, public) {
                        return Ok(f);
                    }
                }
            }
        }
        return Err(IfaceError::NotFound(format!(
            "--iface-regex {}: no interface address or name with an IPv4 address matches (interfaces: {})",
            opts.iface_regex.join(", "),
            inventory()
        )));
    }

    if let Some(target) = opts.iface_can_reach {
        let (oif, src) = nl.route_get(IpAddr::V4(target)).await?.ok_or_else(|| {
            IfaceError::NotFound(format!("--iface-can-reach {target}: the kernel has no route to it"))
        })?;
        let want = match src {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        };
        return links
            .iter()
            .find(|l| l.index == oif)
            .and_then(|l| pick(l, &addrs, want, public).or_else(|| pick(l, &addrs, None, public)))
            .ok_or_else(|| {
                IfaceError::NotFound(format!("--iface-can-reach {target}: its interface #{oif} has no IPv4 address"))
            });
    }

    if let Some(ip) = public {
        let holder = addrs.iter().find(|(_, a)| a.addr() == IpAddr::V4(ip)).map(|(i, _)| *i);
        if let Some(f) =
            holder.and_then(|i| links.iter().find(|l| l.index == i)).and_then(|l| pick(l, &addrs, Some(ip), public))
        {
            return Ok(f);
        }
    }

    let default = nl.routes_v4().await?.into_iter().find(|r| matches!(r.dst, IpNet::V4(n) if n.prefix_len() == 0));
    let Some(oif) = default.and_then(|r| r.oif) else {
        return Err(IfaceError::NotFound(format!(
            "no --iface, --iface-regex or --iface-can-reach given, {}and no default route to pick an interface from (interfaces: {})",
            if public.is_some() { "no interface holds --public-ip, " } else { "" },
            inventory()
        )));
    };
    links
        .iter()
        .find(|l| l.index == oif)
        .and_then(|l| pick(l, &addrs, None, public))
        .ok_or_else(|| IfaceError::NotFound(format!("the default route's interface #{oif} has no IPv4 address")))
}
