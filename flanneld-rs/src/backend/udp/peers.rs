//! The peer table (subnet -> peer's public IP) and how workers read it
//! without ever waiting for a writer.
//!
//! A table is immutable once built. [`PeerCell`] holds the current one in an
//! `Arc` behind a lock that is taken only to swap it (writers) or clone it
//! (a worker that sees the generation number move). Workers check the
//! generation, one relaxed atomic load, once per batch, and otherwise use
//! their own `Arc`: an update never pauses traffic, and a packet is always
//! routed by one whole table, old or new.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;

/// A hasher for `u32` keys: one multiplication (Fibonacci hashing). The
/// keys are addresses we chose to trust (our peers'), so flooding is not a
/// concern, and SipHash would cost more than the rest of a lookup.
#[derive(Default)]
pub struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Fast = BuildHasherDefault<U32Hasher>;

/// One immutable peer table.
#[derive(Debug, Default)]
pub struct PeerTable {
    /// Per prefix length present, longest first: network address -> peer IP.
    by_len: Vec<(u8, HashMap<u32, u32, Fast>)>,
    /// Every peer's public IP, for checking where datagrams come from.
    sources: HashSet<u32, Fast>,
}

impl PeerTable {
    /// Builds a table; for a subnet listed twice, the last entry wins.
    pub fn new(peers: &[(Ipv4Net, Ipv4Addr)]) -> PeerTable {
        let mut t = PeerTable::default();
        for (net, ip) in peers {
            let len = net.prefix_len();
            let map = match t.by_len.iter().position(|(l, _)| *l == len) {
                Some(i) => &mut t.by_len[i].1,
                None => {
                    t.by_len.push((len, HashMap::default()));
                    &mut t.by_len.last_mut().expect("just pushed").1
                }
            };
            map.insert(u32::from(net.network()), u32::from(*ip));
        }
        t.by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        t.sources = t.by_len.iter().flat_map(|(_, m)| m.values().copied()).collect();
        t
    }

    /// The public IP of the peer whose subnet holds `dst`.
    pub fn lookup(&self, dst: u32) -> Option<u32> {
        self.by_len.iter().find_map(|(len, map)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - u32::from(*len)) };
            map.get(&(dst & mask)).copied()
        })
    }

    /// Whether `ip` is a peer's public IP.
    pub fn is_peer(&self, ip: u32) -> bool {
        self.sources.contains(&ip)
    }

    /// How many subnets it routes.
    pub fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }

    /// Whether it routes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The current table, shared by the workers and replaced by `set_peers`.
#[derive(Default)]
pub struct PeerCell {
    generation: AtomicU64,
    table: RwLock<Arc<PeerTable>>,
}

impl PeerCell {
    /// Replaces the table in one step.
    pub fn store(&self, table: PeerTable) {
        let table = Arc::new(table);
        let mut slot = self.table.write().unwrap_or_else(|p| p.into_inner());
        *slot = table;
        // Bumped while the lock is held, so a reader that sees the new
        // generation and then takes the lock gets the new table (or newer).
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The generation and the table of that generation (or a newer one).
    pub fn load(&self) -> (u64, Arc<PeerTable>) {
        let slot = self.table.read().unwrap_or_else(|p| p.into_inner());
        (self.generation.load(Ordering::Acquire), Arc::clone(&slot))
    }

    /// The current generation: cheap enough to check once per batch.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A worker's view: its own `Arc` of the table, refreshed when stale.
pub struct PeerView {
    generation: u64,
    table: Arc<PeerTable>,
}

impl PeerView {
    /// The current table of `cell`.
    pub fn new(cell: &PeerCell) -> PeerView {
        let (generation, table) = cell.load();
        PeerView { generation, table }
    }

    /// Takes the newer table if there is one.
    pub fn refresh(&mut self, cell: &PeerCell) {
        if cell.generation() != self.generation {
            (self.generation, self.table) = cell.load();
        }
    }

    /// The table in use.
    pub fn table(&self) -> &PeerTable {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn longest_prefix_wins() {
        let t = PeerTable::new(&[
            ("10.244.2.0/24".parse().unwrap(), "192.0.2.11".parse().unwrap()),
            ("10.244.0.0/16".parse().unwrap(), "192.0.2.99".parse().unwrap()),
            ("10.244.3.0/24".parse().unwrap(), "192.0.2.12".parse().unwrap()),
        ]);
        assert_eq!(t.lookup(ip("10.244.2.7")), Some(ip("192.0.2.11")));
        assert_eq!(t.lookup(ip("10.244.3.255")), Some(ip("192.0.2.12")));
        assert_eq!(t.lookup(ip("10.244.9.1")), Some(ip("192.0.2.99")));
        assert_eq!(t.lookup(ip("10.245.0.1")), None);
        assert!(t.is_peer(ip("192.0.2.12")));
        assert!(!t.is_peer(ip("192.0.2.13")));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn views_see_a_swap_at_their_next_refresh() {
        let cell = PeerCell::default();
        let mut view = PeerView::new(&cell);
        assert!(view.table().is_empty());
        cell.store(PeerTable::new(&[("10.244.2.0/24".parse().unwrap(), "192.0.2.11".parse().unwrap())]));
        assert!(view.table().is_empty(), "a batch in flight keeps its table");
        view.refresh(&cell);
        assert_eq!(view.table().len(), 1);
    }
}
