//! Property tests of flanneld-rs's parsers of outside input: `net-conf.json`
//! and the udp data path's packet handling (bytes from peers and from the
//! TUN). Each property runs [`support::cases`] cases: 256 in a plain
//! `cargo test`, `PROPTEST_CASES` when set (`scripts/fuzz.sh` sets it high).
//!
//! One test binary, so that the allocation-counting allocator below sees
//! every parser: what a parser allocates is part of what is tested.

mod alloc;
mod net_conf;
mod support;
mod udp;
