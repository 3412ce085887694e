//! Keeping the workers evenly loaded: which bucket of flows each worker
//! receives ([`steer::Table`]) follows the bytes the flows move.
//!
//! A hash alone spreads flows by luck: four flows over two workers all
//! land on one worker in one case out of eight, and that node then runs on
//! one CPU. So every worker counts the bytes it moves per bucket, in both
//! directions ([`Load`]), and a balancer thread looks at the counts ten
//! times a second, smoothed over the last second or so. While the busiest
//! worker's load exceeds the least busy one's by more than an eighth of its
//! own, it moves to the latter the bucket that evens the two best, provided
//! that lowers the busiest's load by more than a sixteenth; a moved bucket
//! then stays put for two seconds (the kernel swaps the reuseport program
//! at once). This is what `ethtool -X` does to a NIC's RSS table, done by
//! the data path itself.
//!
//! Moving a bucket moves its flows both ways: the worker that receives a
//! flow writes its packets to its own TUN queue, and a multi-queue TUN
//! sends a flow's packets out of the queue that last wrote it, so the
//! node's side of the flow follows on its next packet in. A flow this
//! node only sends (nothing comes back) has no such lever: the TUN places
//! it by its own hash. What a worker sends in a bucket the table gives to
//! another worker, or in a bucket nothing arrives in, is therefore counted
//! as that worker's fixed load; a send-only flow that shares a bucket with
//! a two-way flow is first counted with the bucket, and once a move shows
//! it did not follow, as fixed. A bucket's packets in flight when it moves
//! can arrive out of order, once: that is why a move must be worth it, why
//! a moved flow is held, and why nothing moves while every worker is quiet.

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

/// A moved bucket stays where it went for this many ticks (2 s): whatever
/// the noise in the counts, a flow moves at most once in that time.
pub const HOLD: u8 = 20;

/// For this many ticks after a move, what the bucket's old worker still
/// sends counts as the bucket's (the TUN follows on the flow's next packet
/// in, within the tick; the tick's counts hold the bytes sent before).
const GRACE: u8 = 2;

/// The balancing itself: counts in, table out.
pub struct Balancer {
    table: Table,
    /// Per bucket, flows that also arrive here (the table places them):
    /// bytes per tick both ways, smoothed.
    movable: [u64; BUCKETS],
    /// Per worker, what it sends that the table does not place (flows
    /// nothing answers; the TUN places them): bytes per tick, smoothed.
    fixed: Vec<u64>,
    /// Each worker's counts at the last tick: (received, sent) per bucket.
    last: Vec<[(u64, u64); BUCKETS]>,
    /// Per bucket, ticks until it may move again.
    held: [u8; BUCKETS],
}

/// One more sample into a smoothed value: a quarter of the new, three
/// quarters of the old (the old's share rounded down, so that a value with
/// no more samples decays to 0).
fn smooth(old: u64, sample: u64) -> u64 {
    old - old.div_ceil(4) + sample / 4
}

impl Balancer {
    /// Starts from `table`, whose sockets are the workers.
    pub fn new(table: Table) -> Balancer {
        let n = table.sockets() as usize;
        Balancer {
            table,
            movable: [0; BUCKETS],
            fixed: vec![0; n],
            last: vec![[(0, 0); BUCKETS]; n],
            held: [0; BUCKETS],
        }
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
            // What the bucket's own worker sends follows the table; what
            // another sends (once a move has settled) does not, and stays
            // with that worker. A bucket nothing arrives in is all fixed.
            let owner = self.table.get(b) as usize;
            let settled = self.held[b] <= HOLD - GRACE;
            let mut sample = 0;
            for (w, &s) in sent.iter().enumerate() {
                if rx > 0 && (w == owner || !settled) {
                    sample += s;
                } else {
                    fixed[w] += s;
                }
            }
            if rx > 0 {
                sample += rx;
            }
            self.movable[b] = smooth(self.movable[b], sample);
        }
        for (f, now) in self.fixed.iter_mut().zip(fixed) {
            *f = smooth(*f, now);
        }
        self.rebalance()
    }

    /// While the busiest worker's load exceeds the least busy one's by more
    /// than an eighth of its own, moves to the latter the bucket of the
    /// busiest that leaves the larger of the two lowest, if that lowers the
    /// busiest's load by more than a sixteenth (noise does not).
    fn rebalance(&mut self) -> usize {
        self.held.iter_mut().for_each(|h| *h = h.saturating_sub(1));
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
                .filter(|&b| self.table.get(b) as usize == busiest && self.movable[b] > 0 && self.held[b] == 0)
                .min_by_key(|&b| peak(b));
            let Some(b) = best.filter(|&b| peak(b) < hi - hi / 16) else { break };
            self.table.set(b, idlest as u32);
            self.held[b] = HOLD;
            load[busiest] -= self.movable[b];
            load[idlest] += self.movable[b];
            moved += 1;
        }
        moved
    }
}

/// After the kernel refuses a table, ticks before the next try (10 s).
const PAUSE: u32 = 100;

/// Runs a reuseport group's balancing: `fd` is any member of the group,
/// `at` where the inner packet starts in the payload, `loads` the workers'
/// counts (one per socket of `table`, which is attached already). `wait`
/// sleeps for the time it is given and says whether to go on. Each move
/// counts in `moves`. A table the kernel refuses leaves the old one in
/// force and balancing paused for a while; it is logged once.
pub fn run(
    fd: std::os::fd::RawFd,
    at: u32,
    table: Table,
    loads: &[Load],
    moves: &AtomicU64,
    mut wait: impl FnMut(Duration) -> bool,
) {
    if loads.len() != table.sockets() as usize {
        log::warn!(
            "udp: {} worker loads for {} sockets; flows stay where the hash puts them",
            loads.len(),
            table.sockets()
        );
        while wait(TICK) {}
        return;
    }
    let mut balancer = Balancer::new(table);
    let mut attached = balancer.table().clone();
    let (mut warned, mut paused) = (false, 0);
    while wait(TICK) {
        let moved = balancer.tick(loads);
        if paused > 0 {
            paused -= 1;
            balancer.restore(attached.clone());
            continue;
        }
        if moved == 0 {
            continue;
        }
        match steer::attach(fd, balancer.table(), at) {
            Ok(()) => {
                log::debug!("udp: moved {moved} bucket(s) of flows: {:?}", balancer.table());
                moves.fetch_add(moved as u64, Ordering::Relaxed);
                attached = balancer.table().clone();
            }
            Err(e) => {
                if !warned {
                    log::warn!("udp: cannot move flows between the workers ({e}); the spread stays as it was");
                    warned = true;
                }
                balancer.restore(attached.clone());
                paused = PAUSE;
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

    /// `base` varied by up to `pct` per cent either way, pseudo-randomly.
    fn noisy(base: u64, pct: u64, seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let r = (*seed >> 33) % (2 * pct + 1);
        base * (100 - pct + r) / 100
    }

    /// [`drive`] with every flow's bytes varied by up to `pct` per cent.
    fn drive_noisy(bal: &mut Balancer, loads: &[Load], flows: &[(usize, u64, u64)], ticks: usize, pct: u64) -> usize {
        let mut seed = 42;
        let mut moved = 0;
        for _ in 0..ticks {
            let f: Vec<_> =
                flows.iter().map(|&(b, rx, tx)| (b, noisy(rx, pct, &mut seed), noisy(tx, pct, &mut seed))).collect();
            moved += drive(bal, loads, &f, 1);
        }
        moved
    }

    #[test]
    fn noise_moves_nothing_that_is_as_even_as_it_gets() {
        // Three like flows two to one, each tick's bytes 10 % either way:
        // swapping which two share a worker gains only noise.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let flows = [(1, 100 << 20, 4 << 20), (2, 100 << 20, 4 << 20), (200, 100 << 20, 4 << 20)];
        assert_eq!(drive_noisy(&mut bal, &loads, &flows, 300, 10), 0);
        // Two elephants apart and a hundred mice beside them.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let mut flows = vec![(0, 200 << 20, 1 << 20), (255, 200 << 20, 1 << 20)];
        flows.extend((0..100).map(|i| (1 + i * 2, 64 << 10, 4 << 10)));
        assert_eq!(drive_noisy(&mut bal, &loads, &flows, 300, 10), 0);
        // Four flows on one worker of two: two moves, then none.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let flows: Vec<_> = (0..4).map(|b| (b, 100 << 20, 2 << 20)).collect();
        assert_eq!(drive_noisy(&mut bal, &loads, &flows, 300, 10), 2);
    }

    #[test]
    fn a_moved_bucket_is_held() {
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let keys = keys();
        // Two flows on worker 0: one moves to worker 1.
        assert_eq!(drive(&mut bal, &loads, &[(0, 100 << 20, 0), (1, 100 << 20, 0)], 1), 1);
        let moved = if bal.table().get(0) == 1 { 0 } else { 1 };
        // Worker 0's flow ends, and worker 1 starts sending a flow nothing
        // answers (it cannot move): the moved flow would even things out
        // by going back, but stays until its hold is over.
        let send_only = 128;
        for t in 1..=u32::from(HOLD) + 1 {
            loads[1].received(keys[moved], 100 << 20);
            loads[1].sent(keys[send_only], 100 << 20);
            let m = bal.tick(&loads);
            if t < u32::from(HOLD) {
                assert_eq!((m, bal.table().get(moved)), (0, 1), "tick {t}");
            }
        }
        assert_eq!(bal.table().get(moved), 0, "back once the hold is over");
    }

    #[test]
    fn a_send_only_flow_in_a_moved_bucket_counts_where_it_stayed() {
        // Worker 0 sends an elephant nothing answers, which the TUN keeps
        // on worker 0 whatever the table says; a two-way mouse shares its
        // bucket, and two two-way flows sit in other buckets of worker 0.
        let loads: Vec<Load> = (0..2).map(|_| Load::default()).collect();
        let mut bal = Balancer::new(Table::spread(2));
        let keys = keys();
        let (elephant, f1, f2) = (3, 4, 5);
        let mut real = [0u64; 2];
        for _ in 0..60 {
            real = [0, 0];
            loads[0].sent(keys[elephant], 200 << 20);
            real[0] += 200;
            let w = bal.table().get(elephant) as usize;
            loads[w].received(keys[elephant], 1 << 20);
            real[w] += 1;
            for b in [f1, f2] {
                let w = bal.table().get(b) as usize;
                loads[w].received(keys[b], 100 << 20);
                real[w] += 100;
            }
            bal.tick(&loads);
        }
        // The best there is: the elephant alone on worker 0.
        assert_eq!(bal.table().get(f1) + bal.table().get(f2), 2, "{:?}", bal.table());
        assert!(real[0].abs_diff(real[1]) <= 1, "{real:?}");
    }
}
