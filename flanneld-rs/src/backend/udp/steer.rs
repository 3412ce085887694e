//! Spreading received datagrams over the workers by the inner packet's flow.
//!
//! Every worker has its own `SO_REUSEPORT` socket on the flannel port, but
//! the kernel picks among them by the outer addresses and ports, and a peer
//! always sends from its one port to ours: all of one peer's traffic lands
//! on one worker. The TUN then keeps the node's side of every flow on that
//! worker too, because a multi-queue TUN sends a flow out of the queue that
//! last wrote it. So with any number of flows between two nodes, one worker
//! on each node did all the work, and the other CPUs could not help.
//!
//! A classic BPF program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`)
//! picks the socket instead. The kernel runs it on the UDP payload, which in
//! flannel's wire format is the inner IPv4 packet: it hashes the inner
//! addresses and, for TCP and UDP packets that are not fragments, the ports,
//! in a way that gives both directions of a flow the same worker, and looks
//! the hash's bucket up in a [`Table`] of 256 entries, as a NIC's RSS
//! does. Each flow then stays on one worker on each node (its packets keep
//! their order) and different flows spread over the workers; the table
//! starts even, and [`super::balance`] moves buckets from a busy worker to
//! an idle one. Nothing on the wire changes. A payload too short for an
//! IPv4 header, or not IPv4, returns an index the kernel does not have, and
//! it falls back to its own choice; a packet cut short before its ports is
//! hashed by its addresses.
//!
//! The kernel runs the program once per received message, on its first
//! packet: a UDP GRO train is one message. So a sender must not put packets
//! of flows with different [`flow_key`]s in one GSO train (the worker keys
//! its trains by it); trains a NIC's GRO merges from a per-packet sender
//! (flannel itself) may still mix flows, which then share a worker.

use std::io;
use std::os::fd::RawFd;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const MSH: u16 = 0xa0;
const SUB: u16 = 0x10;
const MUL: u16 = 0x20;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const JEQ: u16 = 0x10;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;
const IMM: u16 = 0x00;
const JA: u16 = 0x00;

/// Knuth's multiplicative hash constant: the product's top bits depend on
/// every bit of the key.
const GOLDEN: u32 = 0x9e37_79b1;

/// Flows are placed by bucket: the top 8 bits of the mixed [`flow_key`].
pub const BUCKETS: usize = 256;

fn op(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// What the program hashes for the inner IPv4 packet `p`: the source and
/// destination addresses XORed, and for TCP and UDP outside a fragment the
/// two ports XORed into the low half (the same both ways). `None` when the
/// kernel chooses (too short for an IPv4 header, or not IPv4).
pub fn flow_key(p: &[u8]) -> Option<u32> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let mut key = word(12) ^ word(16);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let transport = p[9] == libc::IPPROTO_TCP as u8 || p[9] == libc::IPPROTO_UDP as u8;
    let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
    if transport && !fragment && ihl + 4 <= p.len() {
        let ports = word(ihl);
        key ^= (ports ^ (ports >> 16)) & 0xffff;
    }
    Some(key)
}

/// The bucket of `key`: the top bits of the mixed key.
pub fn bucket(key: u32) -> usize {
    (key.wrapping_mul(GOLDEN) >> 24) as usize
}

/// Which socket of the group each bucket's flows go to: the group's
/// indirection table, as a NIC's RSS has one.
#[derive(Clone, PartialEq, Eq)]
pub struct Table {
    sockets: u32,
    to: [u16; BUCKETS],
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut per = vec![0usize; self.sockets as usize];
        for &s in &self.to {
            per[usize::from(s)] += 1;
        }
        write!(f, "Table {{ sockets: {}, buckets per socket: {per:?} }}", self.sockets)
    }
}

impl Table {
    /// Most sockets a table can hold.
    pub const MAX_SOCKETS: u32 = 1 << 16;

    /// The buckets spread evenly, in runs: socket `s` gets buckets
    /// `s * 256 / sockets` onwards (a stateless hash spread).
    pub fn spread(sockets: u32) -> Table {
        let sockets = sockets.clamp(1, Self::MAX_SOCKETS);
        let mut to = [0u16; BUCKETS];
        for (b, t) in to.iter_mut().enumerate() {
            *t = (b as u64 * u64::from(sockets) / BUCKETS as u64) as u16;
        }
        Table { sockets, to }
    }

    /// Sockets in the group.
    pub fn sockets(&self) -> u32 {
        self.sockets
    }

    /// The socket of bucket `b`.
    pub fn get(&self, b: usize) -> u32 {
        u32::from(self.to[b])
    }

    /// Sends bucket `b`'s flows to `socket`.
    pub fn set(&mut self, b: usize, socket: u32) {
        assert!(socket < self.sockets, "socket {socket} of {}", self.sockets);
        self.to[b] = socket as u16;
    }

    /// The socket the program picks for `key`.
    pub fn socket(&self, key: u32) -> u32 {
        self.get(bucket(key))
    }

    /// Bits per entry in the program's constants: a power of two, so that
    /// a 32-bit word holds a whole number of entries.
    fn entry_bits(&self) -> u32 {
        match self.sockets {
            0..=2 => 1,
            3..=4 => 2,
            5..=16 => 4,
            17..=256 => 8,
            _ => 16,
        }
    }
}

/// The program for a group: the [`Table`] entry of the [`flow_key`] of the
/// inner packet that starts `at` bytes into the payload (0 in flannel's
/// wire format), or `u32::MAX` where that is `None`.
///
/// Classic BPF cannot index memory, so the table lives in the program as
/// 32-bit constants of 1 to 16 bits per entry (8 to 128 of them), one of
/// which a binary tree of jumps on the bucket picks.
pub fn program(table: &Table, at: u32) -> Vec<libc::sock_filter> {
    let mut p = vec![
        // 0: too short for an IPv4 header, or not IPv4: the kernel's choice.
        op(LD | W | LEN, 0),
        jump(JMP | JGE | K, at + 20, 1, 0),
        op(RET | K, u32::MAX),
        op(LD | B | ABS, at),
        op(ALU | RSH | K, 4),
        jump(JMP | JEQ | K, 4, 1, 0),
        op(RET | K, u32::MAX),
        // 7: M[0] = source ^ destination address (the same both ways).
        op(LD | W | ABS, at + 12),
        op(MISC | TAX, 0),
        op(LD | W | ABS, at + 16),
        op(ALU | XOR | X, 0),
        op(ST, 0),
        // 12: the ports only for TCP and UDP, and not in a fragment (later
        // fragments have none, and all of a packet's go to one worker).
        op(LD | B | ABS, at + 9),
        jump(JMP | JEQ | K, libc::IPPROTO_TCP as u32, 1, 0),
        jump(JMP | JEQ | K, libc::IPPROTO_UDP as u32, 0, 17), // -> 32
        op(LD | H | ABS, at + 6),
        jump(JMP | JSET | K, 0x3fff, 15, 0), // MF or an offset -> 32
        // 17: X = the IP header's length (MSH reads the byte at k); the
        // ports must lie within the payload: len - at - 4 >= X.
        op(LDX | B | MSH, at),
        op(LD | W | LEN, 0),
        op(ALU | SUB | K, at + 4),
        jump(JMP | JGE | X, 0, 0, 11), // -> 32
        // 21: A = source port << 16 | destination port (`ld [x + k]`);
        // M[0] ^= (sport ^ dport) & 0xffff (the same both ways).
        op(LD | W | IND, at),
        op(ST, 1),
        op(ALU | RSH | K, 16),
        op(MISC | TAX, 0),
        op(LD | MEM, 1),
        op(ALU | XOR | X, 0),
        op(ALU | AND | K, 0xffff),
        op(MISC | TAX, 0),
        op(LD | MEM, 0),
        op(ALU | XOR | X, 0),
        op(ST, 0),
    ];
    // 32: the bucket; M[1] = where its entry sits in its word, A = which
    // word holds it.
    let bits = table.entry_bits();
    let per_word = 32 / bits;
    let words = BUCKETS as u32 / per_word;
    p.extend([
        op(LD | MEM, 0),
        op(ALU | MUL | K, GOLDEN),
        op(ALU | RSH | K, 24),
        op(MISC | TAX, 0),
        op(ALU | AND | K, per_word - 1),
        op(ALU | MUL | K, bits),
        op(ST, 1),
        op(MISC | TXA, 0),
        op(ALU | RSH | K, per_word.trailing_zeros()),
    ]);
    // The tree: A holds the word's index; each leaf loads its word and
    // jumps to the tail, which shifts the entry out.
    let word = |w: u32| -> u32 {
        (0..per_word).fold(0, |acc, i| acc | (table.get((w * per_word + i) as usize) << (i * bits)))
    };
    fn size(lo: u32, hi: u32) -> u32 {
        if hi - lo == 1 {
            2
        } else {
            let mid = (lo + hi) / 2;
            1 + size(lo, mid) + size(mid, hi)
        }
    }
    let tail = p.len() as u32 + size(0, words);
    fn tree(p: &mut Vec<libc::sock_filter>, lo: u32, hi: u32, tail: u32, word: &dyn Fn(u32) -> u32) {
        if hi - lo == 1 {
            p.push(op(LD | IMM, word(lo)));
            let from = p.len() as u32 + 1;
            p.push(op(JMP | JA, tail - from));
            return;
        }
        let mid = (lo + hi) / 2;
        // At most 64 leaves on a side: 191 instructions, within a jump.
        let over = u8::try_from(size(lo, mid)).expect("a table's left half fits a jump");
        p.push(jump(JMP | JGE | K, mid, over, 0));
        tree(p, lo, mid, tail, word);
        tree(p, mid, hi, tail, word);
    }
    tree(&mut p, 0, words, tail, &word);
    debug_assert_eq!(p.len() as u32, tail);
    p.extend([op(LDX | W | MEM, 1), op(ALU | RSH | X, 0), op(ALU | AND | K, (1 << bits) - 1), op(RET | A, 0)]);
    p
}

/// Attaches the [`program`] of `table` to the reuseport group of `fd` (any
/// member), in place of the one it has: the kernel swaps them at once.
pub fn attach(fd: RawFd, table: &Table, at: u32) -> io::Result<()> {
    let mut prog = program(table, at);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // The kernel copies the program before the call returns.
    super::sock::setsockopt(fd, libc::SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program on `pkt` as the kernel does for the
    /// instructions [`program`] uses: an out-of-range load ends it with 0.
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let load = |at: usize, size: usize| -> Option<u32> {
            let b = pkt.get(at..at.checked_add(size)?)?;
            Some(b.iter().fold(0u32, |v, &byte| (v << 8) | u32::from(byte)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let size = |code: u16| match code & 0x18 {
                W => 4,
                H => 2,
                _ => 1,
            };
            match i.code {
                c if c & 0x07 == LD && c & 0xe0 == ABS => match load(i.k as usize, size(c)) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c & 0x07 == LD && c & 0xe0 == IND => match load((x + i.k) as usize, size(c)) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == LD | W | LEN => a = pkt.len() as u32,
                c if c == LD | IMM => a = i.k,
                c if c == LD | MEM => a = mem[i.k as usize],
                c if c == LDX | W | MEM => x = mem[i.k as usize],
                c if c == LDX | B | MSH => match load(i.k as usize, 1) {
                    Some(v) => x = (v & 0x0f) * 4,
                    None => return 0,
                },
                ST => mem[i.k as usize] = a,
                c if c == MISC | TAX => x = a,
                c if c == MISC | TXA => a = x,
                c if c == JMP | JA => pc += i.k as usize,
                c if c & 0x07 == ALU => {
                    let v = if c & X != 0 { x } else { i.k };
                    a = match c & 0xf0 {
                        SUB => a.wrapping_sub(v),
                        MUL => a.wrapping_mul(v),
                        AND => a & v,
                        RSH => a >> v,
                        XOR => a ^ v,
                        other => panic!("ALU op {other:#x}"),
                    };
                }
                c if c & 0x07 == JMP => {
                    let v = if c & X != 0 { x } else { i.k };
                    let taken = match c & 0xf0 {
                        JEQ => a == v,
                        JGE => a >= v,
                        JSET => a & v != 0,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == RET | A => return a,
                c if c == RET | K => return i.k,
                other => panic!("instruction {other:#x}"),
            }
        }
    }

    /// An IPv4 packet: header of `ihl` words, protocol, fragment field,
    /// addresses, then the ports and some payload.
    fn packet(ihl: u8, proto: u8, frag: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let hl = usize::from(ihl) * 4;
        let mut p = vec![0u8; hl + 24];
        p[0] = 0x40 | ihl;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[hl..hl + 2].copy_from_slice(&sport.to_be_bytes());
        p[hl + 2..hl + 4].copy_from_slice(&dport.to_be_bytes());
        for (i, b) in p[hl + 4..].iter_mut().enumerate() {
            *b = (i * 29 + 3) as u8;
        }
        p
    }

    /// The pick of `table`'s program for `p` placed `at` bytes into a
    /// payload.
    fn pick_with(table: &Table, at: usize, p: &[u8]) -> u32 {
        let mut payload = vec![0xa5u8; at];
        payload.extend_from_slice(p);
        run(&program(table, at as u32), &payload)
    }

    fn pick(sockets: u32, at: usize, p: &[u8]) -> u32 {
        pick_with(&Table::spread(sockets), at, p)
    }

    /// Every size of entry, spread and shuffled tables.
    fn tables() -> Vec<Table> {
        let mut n = 7u32;
        let mut all = Vec::new();
        for sockets in [1, 2, 3, 4, 5, 8, 16, 17, 256, 300, 65_536] {
            let spread = Table::spread(sockets);
            let mut shuffled = spread.clone();
            for b in 0..BUCKETS {
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                shuffled.set(b, (n >> 8) % sockets);
            }
            all.extend([spread, shuffled]);
        }
        all
    }

    #[test]
    fn the_program_picks_what_the_table_says() {
        let mut n = 0u32;
        for table in tables() {
            let prog = program(&table, 0);
            assert!(prog.len() <= 4096, "{} instructions", prog.len());
            for at in [0, 10] {
                for proto in [6u8, 17, 1, 132] {
                    for (ihl, frag) in [(5, 0x4000), (6, 0), (5, 0x2000), (5, 0x00b9), (15, 0x4000)] {
                        for k in 0..16u16 {
                            n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                            let src = (0x0af4_0000 | (n >> 16)).to_be_bytes();
                            let dst = [10, 244, (k % 7) as u8, 2];
                            let p = packet(ihl, proto, frag, src, dst, 30_000 + 2 * k, 5201);
                            let want = table.socket(flow_key(&p).unwrap());
                            assert!(want < table.sockets());
                            assert_eq!(pick_with(&table, at, &p), want, "at {at} {table:?} {p:?}");
                            // Both directions of a flow pick the same socket.
                            let back = packet(ihl, proto, frag, dst, src, 5201, 30_000 + 2 * k);
                            assert_eq!(pick_with(&table, at, &back), want, "reverse of {p:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_bucket_reads_its_own_entry() {
        // A key for each bucket, then each table's every entry through the
        // program (the tree's every leaf and every shift).
        let mut keys = vec![None; BUCKETS];
        for k in 0u32.. {
            keys[bucket(k)].get_or_insert(k);
            if keys.iter().all(Option::is_some) {
                break;
            }
        }
        for table in tables() {
            for (b, key) in keys.iter().enumerate() {
                // Addresses whose XOR is the key; ICMP, so no ports.
                let src = key.unwrap().to_be_bytes();
                let p = packet(5, 1, 0, src, [0; 4], 0, 0);
                assert_eq!(flow_key(&p), *key);
                assert_eq!(pick_with(&table, 0, &p), table.get(b), "bucket {b} of {table:?}");
            }
        }
    }

    #[test]
    fn spread_gives_each_socket_its_share() {
        for sockets in [1, 2, 3, 4, 7, 256] {
            let t = Table::spread(sockets);
            let mut per = vec![0usize; sockets as usize];
            (0..BUCKETS).for_each(|b| per[t.get(b) as usize] += 1);
            let (lo, hi) = (BUCKETS / sockets as usize, BUCKETS.div_ceil(sockets as usize));
            assert!(per.iter().all(|&c| (lo..=hi).contains(&c)), "{sockets}: {per:?}");
        }
    }

    #[test]
    fn ports_count_only_for_tcp_and_udp_outside_fragments() {
        let (src, dst) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        let addresses_only = flow_key(&packet(5, 1, 0, src, dst, 0, 0)).unwrap();
        for (proto, frag, counts) in
            [(6, 0x4000, true), (17, 0, true), (1, 0, false), (6, 0x2000, false), (17, 0x0010, false)]
        {
            let a = flow_key(&packet(5, proto, frag, src, dst, 40_000, 5201)).unwrap();
            let b = flow_key(&packet(5, proto, frag, src, dst, 40_002, 5201)).unwrap();
            assert_eq!(a != b, counts, "proto {proto} frag {frag:#x}");
            if !counts {
                assert_eq!(a, addresses_only);
            }
        }
    }

    #[test]
    fn short_or_foreign_payloads_go_to_the_kernel_or_hash_by_address() {
        let p = packet(5, 6, 0x4000, [10, 244, 1, 2], [10, 244, 2, 2], 40_000, 5201);
        for at in [0, 10] {
            // Too short for an IPv4 header, or not IPv4: the kernel's choice.
            assert_eq!(pick(4, at, &p[..19]), u32::MAX);
            assert_eq!(pick(4, at, &[]), u32::MAX);
            let mut v6 = p.clone();
            v6[0] = 0x60;
            assert_eq!(pick(4, at, &v6), u32::MAX);
            assert_eq!(flow_key(&v6), None);
            // Cut before the ports: hashed by the addresses.
            let cut = &p[..22];
            let by_address =
                Table::spread(4).socket(flow_key(&packet(5, 1, 0, [10, 244, 1, 2], [10, 244, 2, 2], 0, 0)).unwrap());
            assert_eq!(flow_key(cut), flow_key(&packet(5, 1, 0, [10, 244, 1, 2], [10, 244, 2, 2], 0, 0)));
            assert_eq!(pick(4, at, cut), by_address);
        }
    }

    #[test]
    fn every_key_bit_can_move_a_flow() {
        // The top bits of the mixed key choose: a key differing in any one
        // bit must be able to land in another bucket.
        for bit in 0..32 {
            let moved = (0..64u32).any(|k| bucket(k) != bucket(k ^ (1 << bit)));
            assert!(moved, "bit {bit} never changes the bucket");
        }
    }
}
