//! `cni-bench`: CNI ADD/DEL latency of flannel-rs's plugin against two
//! references, in one run, on identical fresh nodes: Debian's `bridge` +
//! `host-local` called directly, and what a flannel user runs today,
//! upstream flannel's own plugin delegating to them (flannel -> bridge ->
//! host-local). With `--floor`, a fourth row: the kernel's floor, a program
//! that only sends the netlink requests our ADD sends (cni-plugin's
//! `netlink-floor` example), and how far above it the plugin is.
//!
//! Each plugin call is timed from fork to exit, and its peak RSS is read from
//! the kernel's rusage of that very process (wait4), so both sides pay the
//! same process start-up costs and are measured the same way.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use netns_fixtures::Netns;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "CNI ADD/DEL latency: flannel-rs against the reference bridge + host-local")]
struct Args {
    /// Our plugin binary.
    #[arg(long)]
    plugin: PathBuf,
    /// Directory holding the reference plugins (bridge, host-local).
    #[arg(long, default_value = "/usr/lib/cni")]
    reference_dir: PathBuf,
    /// Upstream flannel's CNI plugin binary (the flannel -> bridge ->
    /// host-local row); that row is left out when not given.
    #[arg(long)]
    upstream: Option<PathBuf>,
    /// Sequential ADDs (then as many DELs).
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Concurrent ADDs.
    #[arg(long, default_value_t = 20)]
    concurrent: usize,
    /// Rounds: each measures every plugin once, starting with a different
    /// one each round and, every other cycle of rounds, in the opposite
    /// order (so that a machine getting busier or quieter during the run
    /// does not favour whoever runs first, nor a plugin whoever runs before
    /// it); the figures pool all rounds' calls, the concurrent wall time is
    /// the median round's.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// A dual-stack lease (FLANNEL_IPV6_NETWORK/FLANNEL_IPV6_SUBNET too):
    /// every pod gets an IPv4 and an IPv6 address; the reference bridge +
    /// host-local gets both range sets, as flannel's plugin hands them over.
    #[arg(long)]
    dual_stack: bool,
    /// The kernel's floor (cni-plugin's `netlink-floor` example): a program
    /// started the same way that sends only the netlink requests our ADD
    /// sends; its row shows what the plugin adds on top (IPv4 only).
    #[arg(long)]
    floor: Option<PathBuf>,
    /// Another build of our plugin (say, from before a change): a row of
    /// its own with the same configuration and its own data directory,
    /// measured in the same rounds, so an A/B is not two runs apart.
    #[arg(long)]
    compare: Option<PathBuf>,
}

const LEASE: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
/// The IPv6 half of the dual-stack lease (2001:db8::/32, documentation).
const LEASE_V6: &str = "FLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\n";

struct Impl {
    label: &'static str,
    binary: PathBuf,
    conf: Value,
    env: Vec<(String, String)>,
}

struct Call {
    elapsed: Duration,
    max_rss_kib: i64,
}

/// Spawns the plugin in `node` and waits for it with wait4 to get its rusage.
fn spawn(node: &Netns, imp: &Impl, verb: &str, id: &str, pod: &Path) -> (Child, Instant) {
    let mut cmd = node.command(&imp.binary);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", pod)
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &imp.env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn plugin");
    // A program that does not read stdin (the baseline's /bin/true) closes
    // the pipe early; that is not an error here.
    let _ = child.stdin.take().unwrap().write_all(imp.conf.to_string().as_bytes());
    (child, start)
}

fn finish(mut child: Child, start: Instant, what: &str) -> Call {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waiting for our own child; std never reaps it since we do not call wait().
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    if std::process::ExitStatus::from_raw(status).code() != Some(0) {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out);
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        panic!("{what} failed: {out} {err}");
    }
    Call { elapsed, max_rss_kib: usage.ru_maxrss }
}

fn call(node: &Netns, imp: &Impl, verb: &str, id: &str, pod: &Path) -> Call {
    let (child, start) = spawn(node, imp, verb, id, pod);
    finish(child, start, &format!("{} {verb} {id}", imp.label))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    add: Vec<Duration>,
    del: Vec<Duration>,
    concurrent_wall: Duration,
    max_rss_kib: i64,
}

fn measure(imp: &Impl, count: usize, concurrent: usize, pods: &[Netns]) -> Figures {
    let node = netns_fixtures::single_node().expect("node namespace");
    let mut max_rss = 0;
    // Warm-up: page cache, bridge creation, nft/iptables modules.
    for i in 0..3 {
        let id = format!("warm{i}");
        max_rss = max_rss.max(call(&node, imp, "ADD", &id, &pods[0].path()).max_rss_kib);
        call(&node, imp, "DEL", &id, &pods[0].path());
    }
    let mut add = Vec::with_capacity(count);
    for (i, pod) in pods.iter().take(count).enumerate() {
        let c = call(&node, imp, "ADD", &format!("seq{i}"), &pod.path());
        add.push(c.elapsed);
        max_rss = max_rss.max(c.max_rss_kib);
    }
    let mut del = Vec::with_capacity(count);
    for (i, pod) in pods.iter().take(count).enumerate() {
        let c = call(&node, imp, "DEL", &format!("seq{i}"), &pod.path());
        del.push(c.elapsed);
        max_rss = max_rss.max(c.max_rss_kib);
    }
    let wall_start = Instant::now();
    let children: Vec<(Child, Instant)> = pods
        .iter()
        .take(concurrent)
        .enumerate()
        .map(|(i, pod)| spawn(&node, imp, "ADD", &format!("par{i}"), &pod.path()))
        .collect();
    for (i, (child, start)) in children.into_iter().enumerate() {
        max_rss = max_rss.max(finish(child, start, &format!("{} concurrent ADD {i}", imp.label)).max_rss_kib);
    }
    let concurrent_wall = wall_start.elapsed();
    for (i, pod) in pods.iter().take(concurrent).enumerate() {
        call(&node, imp, "DEL", &format!("par{i}"), &pod.path());
    }
    add.sort();
    del.sort();
    Figures { add, del, concurrent_wall, max_rss_kib: max_rss }
}

fn main() {
    let args = Args::parse();
    if !netns_fixtures::require_root() {
        std::process::exit(1);
    }
    let dir = tempfile_dir();
    let lease = if args.dual_stack { format!("{LEASE}{LEASE_V6}") } else { LEASE.to_string() };
    std::fs::write(dir.join("subnet.env"), lease).unwrap();
    let ours = Impl {
        label: "flannel-rs",
        binary: args.plugin.clone(),
        conf: json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("ours"),
            "delegate": { "hairpinMode": true, "isDefaultGateway": true }
        }),
        env: vec![],
    };
    // The configuration flannel's plugin would hand to the bridge plugin.
    let reference = Impl {
        label: "bridge+host-local",
        binary: args.reference_dir.join("bridge"),
        conf: json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge",
            "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "hairpinMode": true,
            "ipMasq": false, "mtu": 1450,
            "ipam": if args.dual_stack {
                json!({
                    "type": "host-local", "dataDir": dir.join("reference"),
                    "ranges": [[{ "subnet": "10.244.1.0/24" }], [{ "subnet": "2001:db8:10:1::/64" }]],
                    "routes": [{ "dst": "10.244.0.0/16" }, { "dst": "2001:db8:10::/56" }]
                })
            } else {
                json!({
                    "type": "host-local", "dataDir": dir.join("reference"),
                    "ranges": [[{ "subnet": "10.244.1.0/24" }]],
                    "routes": [{ "dst": "10.244.0.0/16" }]
                })
            }
        }),
        env: vec![("CNI_PATH".into(), args.reference_dir.display().to_string())],
    };
    // flannel's plugin with the same configuration as ours: it builds the
    // bridge configuration above from subnet.env and executes bridge from
    // CNI_PATH, which executes host-local.
    let upstream = args.upstream.as_ref().map(|binary| Impl {
        label: "flannel>bridge>h-local",
        binary: binary.clone(),
        conf: json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("upstream"),
            "delegate": { "hairpinMode": true, "isDefaultGateway": true },
            "ipam": { "dataDir": dir.join("upstream-host-local") }
        }),
        env: vec![("CNI_PATH".into(), args.reference_dir.display().to_string())],
    });
    let n = args.count.max(args.concurrent);
    eprintln!("creating {n} pod namespaces...");
    let pods: Vec<Netns> = (0..n).map(|i| Netns::new(&format!("bp{i}")).expect("pod namespace")).collect();

    // What starting any process costs here, measured the same way (fork,
    // setns into the node, exec, wait4): both plugins pay it on every call.
    // Measured in slices before each plugin's turn in every round, so that
    // it is subtracted from figures of the same moments (it moves by 0.2 ms
    // from one run to the next on this VM, as the plugins' figures do).
    let truth_node = netns_fixtures::single_node().expect("node namespace");
    let truth = Impl { label: "true", binary: "/bin/true".into(), conf: json!({}), env: vec![] };
    let mut baseline: Vec<Duration> = Vec::new();
    let floor = args.floor.as_ref().map(|binary| Impl {
        label: "kernel floor (netlink-floor)",
        binary: binary.clone(),
        conf: json!({}),
        env: vec![],
    });
    if floor.is_some() && args.dual_stack {
        eprintln!("cni-bench: --floor sends IPv4 requests only; leave it out with --dual-stack");
        std::process::exit(2);
    }
    let compare = args.compare.as_ref().map(|binary| {
        let mut conf = ours.conf.clone();
        // A tree of its own: host-local's store, which our IPAM mirrors
        // into, is found beside dataDir (`<dataDir>/../networks`), and
        // would otherwise be ours' too (hints and mirror records shared).
        conf["dataDir"] = json!(dir.join("compare").join("flannel"));
        Impl { label: "flannel-rs (--compare)", binary: binary.clone(), conf, env: vec![] }
    });
    let mut imps = vec![&ours, &reference];
    imps.extend(compare.as_ref());
    imps.extend(upstream.as_ref());
    imps.extend(floor.as_ref());
    let mut rounds: Vec<Vec<Figures>> = imps.iter().map(|_| Vec::new()).collect();
    let slice = (args.count / imps.len()).max(20);
    for round in 0..args.rounds.max(1) {
        // Each round starts with a different plugin, and every other cycle
        // of rounds runs them in the opposite order, so that no plugin
        // always follows the same one (what runs before a turn, such as
        // our DEL's detached veth deletions, weighs on it).
        let reversed = (round / imps.len()) % 2 == 1;
        for k in 0..imps.len() {
            let k = if reversed { imps.len() - 1 - k } else { k };
            let i = (round + k) % imps.len();
            baseline.extend(
                (0..slice).map(|j| {
                    call(&truth_node, &truth, "VERSION", &format!("t{round}-{k}-{j}"), &pods[0].path()).elapsed
                }),
            );
            rounds[i].push(measure(imps[i], args.count, args.concurrent, &pods));
        }
    }
    baseline.sort();
    let mut pooled = rounds.into_iter().map(pool);
    let a = pooled.next().expect("ours measured");
    let refs: Vec<(&Impl, Figures)> = imps[1..].iter().copied().zip(pooled).collect();

    println!(
        "CNI latency{}, {} sequential ADDs then DELs, {} concurrent ADDs, {} round(s) (same run, same machine)",
        if args.dual_stack { " (dual-stack: an IPv4 and an IPv6 address per pod)" } else { "" },
        args.count,
        args.concurrent,
        args.rounds.max(1)
    );
    println!("{:<36} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "p99 ms");
    for verb in ["ADD", "DEL"] {
        let pick = |f: &Figures| if verb == "ADD" { f.add.clone() } else { f.del.clone() };
        let ours_v = pick(&a);
        let row = |label: &str, v: &[Duration]| {
            println!(
                "{:<36} {:>9.3} {:>9.3} {:>9.3}",
                format!("{verb} {label}"),
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.95)),
                ms(percentile(v, 0.99))
            )
        };
        row(ours.label, &ours_v);
        for (imp, f) in &refs {
            let is_floor = floor.as_ref().is_some_and(|f| f.label == imp.label);
            // Our DEL leaves the veth's deletion (the kernel's slow part, an
            // RCU grace period) to a detached child; the floor's DEL waits
            // for it. No floor row there: it would not measure the same work.
            if is_floor && verb == "DEL" {
                continue;
            }
            let v = pick(f);
            row(imp.label, &v);
            if is_floor {
                println!(
                    "{:<36} {:>9.3} {:>9.3} {:>9.3}",
                    "  flannel-rs above the floor",
                    ms(percentile(&ours_v, 0.5)) - ms(percentile(&v, 0.5)),
                    ms(percentile(&ours_v, 0.95)) - ms(percentile(&v, 0.95)),
                    ms(percentile(&ours_v, 0.99)) - ms(percentile(&v, 0.99)),
                );
                continue;
            }
            println!(
                "{:<36} {:>8.1}x {:>8.1}x {:>8.1}x",
                format!("  speed-up vs {}", imp.label),
                ms(percentile(&v, 0.5)) / ms(percentile(&ours_v, 0.5)),
                ms(percentile(&v, 0.95)) / ms(percentile(&ours_v, 0.95)),
                ms(percentile(&v, 0.99)) / ms(percentile(&ours_v, 0.99)),
            );
        }
    }
    println!(
        "{:<36} {:>9.3} {:>9.3} {:>9.3}   (process start: /bin/true spawned the same way, before each turn of each round)",
        "baseline",
        ms(percentile(&baseline, 0.5)),
        ms(percentile(&baseline, 0.95)),
        ms(percentile(&baseline, 0.99))
    );
    // The plugin's own time: its ADD less starting a process (the measure).
    let own = |f: &Figures| ms(percentile(&f.add, 0.5)) - ms(percentile(&baseline, 0.5));
    let mut line = format!("own time (ADD p50 less /bin/true's): flannel-rs {:.3} ms", own(&a));
    for (imp, f) in refs.iter().filter(|(imp, _)| compare.as_ref().is_some_and(|c| c.label == imp.label)) {
        line += &format!(", {} {:.3} ms", imp.label, own(f));
    }
    println!("{line}");
    let mut wall = format!("{} concurrent ADDs wall: flannel-rs {:.1} ms", args.concurrent, ms(a.concurrent_wall));
    let mut rss = format!("peak RSS of one plugin process: flannel-rs {:.1} MB", a.max_rss_kib as f64 / 1024.0);
    for (imp, f) in &refs {
        wall += &format!(
            ", {} {:.1} ms ({:.1}x)",
            imp.label,
            ms(f.concurrent_wall),
            ms(f.concurrent_wall) / ms(a.concurrent_wall)
        );
        rss += &format!(", {} {:.1} MB", imp.label, f.max_rss_kib as f64 / 1024.0);
    }
    println!("{wall}");
    println!("{rss} (wait4's figure: the largest of the process and the children it waited for)");
    drop(pods);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One plugin's rounds as one set of figures.
fn pool(rounds: Vec<Figures>) -> Figures {
    let mut walls: Vec<Duration> = rounds.iter().map(|f| f.concurrent_wall).collect();
    walls.sort();
    let mut out = Figures {
        add: Vec::new(),
        del: Vec::new(),
        concurrent_wall: walls[walls.len() / 2],
        max_rss_kib: rounds.iter().map(|f| f.max_rss_kib).max().unwrap_or(0),
    };
    for f in rounds {
        out.add.extend(f.add);
        out.del.extend(f.del);
    }
    out.add.sort();
    out.del.sort();
    out
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
