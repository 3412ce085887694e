//! `netns-fixture`: builds and removes the throw-away topologies of
//! `netns-fixtures` from shell scripts (the demo, benchmarks, test.sh).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "netns-fixture", about = "Throw-away multi-node topologies in network namespaces")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds an underlay (192.0.2.0/24, with --ipv6 also 2001:db8::/64) with N nodes, and optionally an
    /// outside host, and leaves it up. Prints one `<role> <namespace>` line
    /// per namespace (`switch`, `node0`..., `outside`).
    Up {
        /// Number of nodes: node i gets eth0 = 192.0.2.(10+i)/24.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Also an outside host at 192.0.2.200/24 (and 2001:db8::200/64 with
        /// --ipv6).
        #[arg(long)]
        outside: bool,
        /// Dual-stack underlay: node i's eth0 also gets 2001:db8::<10+i>/64,
        /// an IPv6 default route via 2001:db8::1 and IPv6 forwarding.
        #[arg(long)]
        ipv6: bool,
        /// Tag in the namespace names (`flt-<TAG>-node0`): a letter, then
        /// letters, digits or `_`. `down --name TAG` removes them.
        #[arg(long)]
        name: String,
    },
    /// Removes every namespace of a tag (`flt-<TAG>-*`), pods included.
    Down {
        /// The tag given to `up`.
        #[arg(long)]
        name: String,
    },
    /// Removes namespaces left by processes that no longer run.
    Cleanup {
        /// Removes every `flt-` namespace, also those of running tests and
        /// of clusters kept by `up`.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Up { nodes, outside, ipv6, name } => {
            let built = if ipv6 {
                netns_fixtures::Cluster::new_named_dual_stack(&name, nodes, outside)
            } else {
                netns_fixtures::Cluster::new_named(&name, nodes, outside)
            };
            let cluster = match built {
                Ok(c) => c,
                Err(e) => {
                    // Whatever was built before the error is already gone
                    // (dropped), so a failed `up` leaves nothing behind.
                    eprintln!("netns-fixture up: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("switch {}", cluster.switch().name());
            for node in cluster.nodes() {
                println!("node{} {}", node.index, node.ns.name());
            }
            if let Some(outside) = cluster.outside() {
                println!("outside {}", outside.name());
            }
            cluster.keep();
        }
        Cmd::Down { name } => match netns_fixtures::cleanup_tag(&name) {
            Ok(n) => eprintln!("netns-fixture: removed {n} namespace(s) of {name}"),
            Err(e) => {
                eprintln!("netns-fixture down: {e}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Cleanup { all } => {
            let n = if all { netns_fixtures::cleanup_all() } else { netns_fixtures::cleanup_leftovers() };
            eprintln!("netns-fixture: removed {n} leftover namespace(s)");
        }
    }
    ExitCode::SUCCESS
}
