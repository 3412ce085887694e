//! `netns-fixture`: build and remove the throw-away topologies of
//! `netns-fixtures` from shell scripts (the demo, benchmarks).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Throw-away multi-node topologies in network namespaces")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds an underlay with N nodes (and an outside host) and leaves it up;
    /// prints `<role> <namespace>` lines.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Also an outside host at 192.0.2.200.
        #[arg(long)]
        outside: bool,
        /// Tag in the namespace names (`flt-<TAG>-node0`); `down` takes it.
        #[arg(long)]
        name: String,
    },
    /// Removes every namespace of a tag, including pods made under it.
    Down {
        /// The tag given to `up`.
        #[arg(long)]
        name: String,
    },
    /// Removes namespaces left by processes that died (`--all`: every `flt-` one).
    Cleanup {
        /// Remove every flt- namespace, not only those of dead processes.
        #[arg(long)]
        all: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up { nodes, outside, name } => {
            if name.is_empty() || name.contains(['/', ' ']) {
                eprintln!("netns-fixture: --name {name:?}: want a short word");
                std::process::exit(2);
            }
            let cluster = match netns_fixtures::Cluster::new_named(&name, nodes, outside) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("netns-fixture: up: {e}");
                    std::process::exit(1);
                }
            };
            println!("switch {}", cluster.switch().name());
            for n in cluster.nodes() {
                println!("node{} {} {}", n.index, n.ns.name(), n.underlay_ip);
            }
            if let Some(o) = cluster.outside() {
                println!("outside {} {}", o.name(), netns_fixtures::OUTSIDE_IP);
            }
            cluster.keep();
        }
        Cmd::Down { name } => {
            let n = netns_fixtures::cleanup_tag(&name);
            eprintln!("netns-fixture: removed {n} namespace(s) of {name}");
        }
        Cmd::Cleanup { all } => {
            let n = if all { netns_fixtures::cleanup_all() } else { netns_fixtures::cleanup_leftovers() };
            if n > 0 {
                eprintln!("netns-fixture: removed {n} leftover namespace(s)");
            }
        }
    }
}
