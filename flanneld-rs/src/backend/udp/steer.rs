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
//! in a way that gives both directions of a flow the same worker. Each flow
//! then stays on one worker on each node (its packets keep their order) and
//! different flows spread over the workers. Nothing on the wire changes; a
//! payload that is not IPv4 (or too short) returns an index the kernel does
//! not have, and it falls back to its own choice.

use std::io;
use std::mem;
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
const MSH: u16 = 0xa0;
const MUL: u16 = 0x20;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JEQ: u16 = 0x10;
const JSET: u16 = 0x40;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;

/// A multiplier that spreads every input bit into the high half (Knuth's
/// multiplicative hash).
const GOLDEN: u32 = 0x9e37_79b1;

fn op(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The program for a group of `sockets` sockets: the index of the socket
/// for the inner packet that starts `at` bytes into the payload (0 in
/// flannel's wire format).
pub fn program(sockets: u32, at: u32) -> Vec<libc::sock_filter> {
    let sockets = sockets.max(1);
    vec![
        // 0: IPv4? Else hand the choice back to the kernel.
        op(LD | B | ABS, at),
        op(ALU | RSH | K, 4),
        jump(JMP | JEQ | K, 4, 0, 27), // -> 30
        // 3: M[0] = source ^ destination address (the same both ways).
        op(LD | W | ABS, at + 12),
        op(MISC | TAX, 0),
        op(LD | W | ABS, at + 16),
        op(ALU | XOR | X, 0),
        op(ST, 0),
        // 8: the ports only for TCP and UDP, and not in a fragment (later
        // fragments have none, and all of a packet's go to one worker).
        op(LD | B | ABS, at + 9),
        jump(JMP | JEQ | K, libc::IPPROTO_TCP as u32, 1, 0),
        jump(JMP | JEQ | K, libc::IPPROTO_UDP as u32, 0, 14), // -> 25
        op(LD | H | ABS, at + 6),
        jump(JMP | JSET | K, 0x3fff, 12, 0), // MF or an offset -> 25
        // 13: X = the IP header's length; A = source port << 16 | dest port.
        // (`ld [x + k]` adds the header's start; MSH reads the byte at k.)
        op(LDX | B | MSH, at),
        op(LD | W | IND, at),
        // 15: M[0] ^= (sport ^ dport) & 0xffff (the same both ways).
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
        // 25: mix M[0] so that every bit counts, then pick.
        op(LD | MEM, 0),
        op(ALU | MUL | K, GOLDEN),
        op(ALU | RSH | K, 16),
        op(ALU | MOD | K, sockets),
        op(RET | A, 0),
        // 30: not IPv4.
        op(RET | K, u32::MAX),
    ]
}

/// Attaches [`program`] to the reuseport group of `fd` (any member).
pub fn attach(fd: RawFd, sockets: u32, at: u32) -> io::Result<()> {
    let mut prog = program(sockets, at);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: passes a valid sock_fprog whose filter outlives the call (the
    // kernel copies it).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
