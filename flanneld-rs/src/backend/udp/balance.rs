//! Keeping the workers evenly loaded: which bucket of flows each worker
//! receives ([`steer::Table`]) follows the bytes the flows move.
//!
//! A hash alone spreads flows by luck: four flows over two workers all
//! land on one worker in one case out of eight, and that node then runs on
//! one CPU. So every worker counts the bytes it moves per bucket, in both
//! directions ([`Load`]), and a balancer thread looks at the counts ten
//! times a second: while the busiest worker carries more than an eighth
//! above the least busy one, it moves to the latter the bucket that evens
//! the two best, as long as that lowers the busier side (the kernel swaps
//! the reuseport program at once). This is what `ethtool -X` does
//! to a NIC's RSS table, done by the data path itself.
//!
//! Moving a bucket moves its flows both ways: the worker that receives a
//! flow writes its packets to its own TUN queue, and a multi-queue TUN
//! sends a flow's packets out of the queue that last wrote it, so the
//! node's side of the flow follows on its next packet in. A flow this
//! node only sends (nothing comes back) has no such lever: the TUN places
//! it by its own hash, so its bytes count as a fixed load on the worker
//! that moved them. A bucket's packets in flight when it moves can arrive
//! out of order, once; that is why a move must be worth it, and why
//! nothing moves while every worker is quiet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::steer::{self, Table, BUCKETS};

/// How often the balancer looks.
pub const TICK: Duration = Duration::from_millis(100);

/// A busiest worker below this many bytes per tick (smoothed; about 84
/// Mbit/s) is left alone: one worker copes, and a move only risks
/// reordering.
pub const QUIET: u64 = 1 << 20;

/// Bytes a worker moved per bucket, in and out, since it started. Written
/// by its worker only (a plain load and store: no atomic read-modify-write
/// on the packet path), read by the balancer.
pub struct Load {
    rx: [AtomicU64; BUCKETS],
    tx: [AtomicU64; BUCKETS],
}

impl Default for Load {
    fn default() -> Self {
        Load { rx: std::array::from_fn(|_| AtomicU64::new(0)), tx: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl Load {
    /// `bytes` of flow `key` received from a peer. Only the worker that
    /// owns this `Load` may call it.
    pub fn received(&self, key: u32, bytes: usize) {
        bump(&self.rx[steer::bucket(key)], bytes);
    }

    /// `bytes` of flow `key` read from the TUN for a peer. Only the worker
    /// that owns this `Load` may call it.
    pub fn sent(&self, key: u32, bytes: usize) {
        bump(&self.tx[steer::bucket(key)], bytes);
    }
}

fn bump(c: &AtomicU64, bytes: usize) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(bytes as u64), Ordering::Relaxed);
}

/// The balancing itself: counts in, table out.
pub struct Balancer {
    table: Table,
    /// Per bucket, flows that also arrive here (the table places them):
    /// bytes per tick both ways, smoothed.
    movable: [u64; BUCKETS],
    /// Per worker, flows it only sends (the TUN places them): bytes per
    /// tick, smoothed.
    fixed: Vec<u64>,
    /// Each worker's counts at the last tick: (received, sent) per bucket.
    last: Vec<[(u64, u64); BUCKETS]>,
}

impl Balancer {
    /// Starts from `table`, whose sockets are the workers.
    pub fn new(table: Table) -> Balancer {
        let n = table.sockets() as usize;
        Balancer { table, movable: [0; BUCKETS], fixed: vec![0; n], last: vec![[(0, 0); BUCKETS]; n] }
    }

    /// The table in force.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Puts `table` back in force (the kernel refused the new one); the
    /// counts go on.
    pub fn restore(&mut self, table: Table) {
        assert_eq!(table.sockets(), self.table.sockets());
        self.table = table;
    }

    /// Takes the workers' counts (one [`Load`] per socket of the table, in
    /// its order) and moves buckets where that evens the load. Returns how
    /// many moved: when any did, the table must be attached again.
    pub fn tick(&mut self, loads: &[Load]) -> usize {
        let n = self.fixed.len();
        assert_eq!(loads.len(), n, "one Load per worker");
        let mut fixed = vec![0u64; n];
        let mut sent = vec![0u64; n];
        for b in 0..BUCKETS {
            let mut rx = 0u64;
            for (w, l) in loads.iter().enumerate() {
                let now = (l.rx[b].load(Ordering::Relaxed), l.tx[b].load(Ordering::Relaxed));
                let was = std::mem::replace(&mut self.last[w][b], now);
                rx += now.0.wrapping_sub(was.0);
                sent[w] = now.1.wrapping_sub(was.1);
            }
            let sample = if rx > 0 {
                rx + sent.iter().sum::<u64>()
            } else {
                fixed.iter_mut().zip(&sent).for_each(|(f, s)| *f += s);
                0
            };
            self.movable[b] = (self.movable[b] + sample) / 2;
        }
        for (f, now) in self.fixed.iter_mut().zip(fixed) {
            *f = (*f + now) / 2;
        }
        self.rebalance()
    }

    /// While the busiest worker carries more than an eighth above the least
    /// busy one, moves to the latter the bucket of the busiest that leaves
    /// the larger of the two lowest, if that is lower than before.
    fn rebalance(&mut self) -> usize {
        let mut load = self.fixed.clone();
        for b in 0..BUCKETS {
            load[self.table.get(b) as usize] += self.movable[b];
        }
        let mut moved = 0;
        while moved < BUCKETS {
            let busiest = (0..load.len()).max_by_key(|&w| load[w]).unwrap_or(0);
            let idlest = (0..load.len()).min_by_key(|&w| load[w]).unwrap_or(0);
            let (hi, lo) = (load[busiest], load[idlest]);
            if hi < QUIET || hi - lo <= hi / 8 {
                break;
            }
            let peak = |b: usize| (hi - self.movable[b]).max(lo + self.movable[b]);
            let best = (0..BUCKETS)
                .filter(|&b| self.table.get(b) as usize == busiest && self.movable[b] > 0)
                .min_by_key(|&b| peak(b));
            let Some(b) = best.filter(|&b| peak(b) < hi) else { break };
            self.table.set(b, idlest as u32);
            load[busiest] -= self.movable[b];
            load[idlest] += self.movable[b];
            moved += 1;
        }
        moved
    }
}

/// Runs a reuseport group's balancing: `fd` is any member of the group,
/// `at` where the inner packet starts in the payload, `loads` the workers'
/// counts (one per socket of `table`, which is attached already). `wait`
/// sleeps for the time it is given and says whether to go on. Each move
/// counts in `moves`. A program the kernel refuses keeps the old table in
/// force; it is logged once.
pub fn run(
    fd: std::os::fd::RawFd,
    at: u32,
    table: Table,
    loads: &[Load],
    moves: &AtomicU64,
    mut wait: impl FnMut(Duration) -> bool,
) {
    let mut balancer = Balancer::new(table);
    let mut attached = balancer.table().clone();
    let mut warned = false;
    while wait(TICK) {
        let moved = balancer.tick(loads);
        if moved == 0 {
            continue;
        }
        match steer::attach(fd, balancer.table(), at) {
            Ok(()) => {
                moves.fetch_add(moved as u64, Ordering::Relaxed);
                attached = balancer.table().clone();
            }
            Err(e) => {
                if !warned {
                    log::warn!("udp: cannot move flows between the workers ({e}); the spread stays as it was");
                    warned = true;
                }
                balancer.restore(attached.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key in each bucket.
    fn keys() -> Vec<u32> {
        let mut keys = vec![None; BUCKETS];
        for k in 0u32.. {
            keys[steer::bucket(k)].get_or_insert(k);
            if keys.iter().all(Option::is_some) {
                return keys.into_iter().map(Option::unwrap).collect();
            }
        }
        unreachable!()
    }

    /// Each flow's bytes per tick (bucket, received, sent) put through
    /// the worker the table gives it, for `ticks` ticks.
    fn drive(bal: &mut Balancer, loads: &[Load], flows: &[(usize, u64, u64)], ticks: usize) -> usize {
        let keys = keys();
        let mut moved = 0;
        for _ in 0..ticks {
            for &(b, rx, tx) in flows {
                let w = bal.table().get(b) as usize;
                loads[w].received(keys[b], rx as usize);
                loads[w].sent(keys[b], tx as usize);
            }
            moved += bal.tick(loads);
        }
        moved
    }

    /// Per worker, the bytes per tick the table gives it.
    fn per_worker(bal: &Balancer, flows: &[(usize, u64, u64)]) -> Vec<u64> {
        let mut per = vec![0; bal.table().sockets() as usize];
        for &(b, rx, tx) in flows {
            per[bal.table().get(b) as usize] += rx + tx;
        }
        per
    }

    #[test]
    fn four_flows_on_one_of_two_workers_end_two_and_two() {
        // Buckets 0-3 all belong to worker 0 in the spread table.
        let mut bal = Balancer::new(Table::spread(2));
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let flows: Vec<_> = (0..4).map(|b| (b, 100 << 20, 2 << 20)).collect();
        assert_eq!(per_worker(&bal, &flows)[1], 0);
        let moved = drive(&mut bal, &loads, &flows, 1);
        assert_eq!(moved, 2);
        let per = per_worker(&bal, &flows);
        assert_eq!(per[0], per[1], "{per:?}");
        // Once even, nothing moves again.
        assert_eq!(drive(&mut bal, &loads, &flows, 20), 0);
    }

    #[test]
    fn one_flow_or_an_odd_split_that_cannot_improve_stays() {
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        // One flow: moving it only moves the problem.
        let mut bal = Balancer::new(Table::spread(2));
        assert_eq!(drive(&mut bal, &loads, &[(5, 500 << 20, 1 << 20)], 10), 0);
        // Three equal flows two to one: a move would make it one to two.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let flows = [(1, 100 << 20, 0), (2, 100 << 20, 0), (200, 100 << 20, 0)];
        assert_eq!(drive(&mut bal, &loads, &flows, 10), 0);
    }

    #[test]
    fn quiet_workers_are_left_alone() {
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let flows: Vec<_> = (0..4).map(|b| (b, QUIET / 8, QUIET / 16)).collect();
        assert_eq!(drive(&mut bal, &loads, &flows, 20), 0);
    }

    #[test]
    fn flows_only_sent_weigh_where_they_run_and_never_move() {
        // Worker 1 sends a flow nothing answers (the TUN put it there);
        // worker 0 has two flows that arrive here. Even without moving
        // anything: worker 1 already carries what worker 0 does.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let keys = keys();
        for _ in 0..10 {
            loads[1].sent(keys[3], 200 << 20);
            for b in [0, 1] {
                loads[0].received(keys[b], 100 << 20);
            }
            assert_eq!(bal.tick(&loads), 0);
        }
        // With worker 1 idle instead, one of the two moves, and the
        // sent-only bucket (one of worker 0's) never does.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let mut moved = 0;
        for _ in 0..10 {
            loads[0].sent(keys[2], 10 << 20);
            for b in [0, 1] {
                loads[0].received(keys[b], 100 << 20);
            }
            moved += bal.tick(&loads);
        }
        assert_eq!(moved, 1);
        assert_eq!(bal.table().get(2), 0);
        assert_eq!([0, 1].map(|b| bal.table().get(b)).iter().sum::<u32>(), 1);
    }

    #[test]
    fn many_flows_over_four_workers_even_out() {
        let n = 4;
        let loads: Vec<Load> = (0..n).map(|_| Load::default()).collect();
        // 24 flows of sizes 1..24 MB per tick, all in worker 0's buckets.
        let mut bal = Balancer::new(Table::spread(n as u32));
        let flows: Vec<_> = (0..24).map(|i| (i * 2, (i as u64 + 1) << 20, 0)).collect();
        drive(&mut bal, &loads, &flows, 30);
        let per = per_worker(&bal, &flows);
        let total: u64 = per.iter().sum();
        let max = *per.iter().max().unwrap();
        let min = *per.iter().min().unwrap();
        // Within an eighth of each other, with an even share at most an
        // eighth above the mean.
        assert!(max - min <= max / 8, "{per:?}");
        assert!(max <= total / n as u64 + total / n as u64 / 8, "{per:?}");
        // And settled: no more moves.
        assert_eq!(drive(&mut bal, &loads, &flows, 10), 0);
    }
}
