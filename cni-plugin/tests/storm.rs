//! A CNI storm on one node: ADD/DEL calls at 20-way concurrency, a random
//! subset of the plugin processes SIGKILLed at random moments (mid-ADD and
//! mid-DEL), pods abandoned the way a crashed runtime abandons them, then the
//! GC verb with the attachments the test still holds. Afterwards the node
//! must hold exactly the live pods: no duplicate address, no leaked address
//! in the IPAM store (records or index), no leaked host veth, no leaked
//! member of the masquerade set.
//!
//! `CNI_STORM_CALLS` sets the number of plugin calls (default 1000),
//! `CNI_STORM_SEED` replays a run (the seed is printed).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Node, Outcome};
use netns_fixtures::Netns;
use serde_json::{json, Value};

/// Concurrent plugin calls.
const WORKERS: usize = 20;
/// Share of plugin processes that get a SIGKILL.
const KILL_PERCENT: u64 = 30;
/// The kill lands uniformly within the median duration of the verb's calls
/// so far (this long until there is one), so that kills hit every phase of
/// ADD and DEL however fast or busy the machine is.
const FIRST_KILL_WINDOW: Duration = Duration::from_millis(50);

/// A /22: room for the live pods plus every address abandoned pods hold
/// until GC, so no ADD fails for lack of addresses.
const LEASE: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.4.1/22\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

/// xorshift64*: enough randomness for a test, and replayable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

/// How one plugin call ended.
enum Fate {
    Done(Outcome),
    Killed,
}

#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    killed_add: AtomicUsize,
    killed_del: AtomicUsize,
    kill_too_late: AtomicUsize,
    abandoned: AtomicUsize,
    /// How long calls that were not killed took, per verb (for the report,
    /// and to see that the kill window spans a whole call).
    durations: Mutex<BTreeMap<&'static str, Vec<Duration>>>,
}

impl Tally {
    fn median(&self, verb: &str) -> Option<Duration> {
        let mut d = self.durations.lock().unwrap().get(verb).cloned().unwrap_or_default();
        d.sort();
        d.get(d.len() / 2).copied()
    }
}

/// One pod the test still holds.
#[derive(Debug, Clone)]
struct Live {
    worker: usize,
    ifname: String,
    address: String,
    host_veth: String,
}

struct Storm<'a> {
    node: &'a Node,
    pods: &'a [Netns],
    conf: String,
    budget: AtomicUsize,
    tally: Tally,
    live: Mutex<BTreeMap<String, Live>>,
    /// Every address a completed ADD handed out, in order.
    handed_out: Mutex<Vec<String>>,
    /// What happened to each pod, for the failure messages.
    history: Mutex<Vec<String>>,
    /// Failures of calls that were not killed: there must be none.
    errors: Mutex<Vec<String>>,
}

impl Storm<'_> {
    /// Takes one call from the budget; false when it is spent.
    fn claim(&self) -> bool {
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
    }

    fn call(&self, rng: &mut Rng, verb: &'static str, id: &str, worker: usize, ifname: &str) -> Fate {
        self.tally.calls.fetch_add(1, Ordering::Relaxed);
        let netns = self.pods[worker].path().to_string_lossy().into_owned();
        let env =
            [("CNI_COMMAND", verb), ("CNI_CONTAINERID", id), ("CNI_NETNS", netns.as_str()), ("CNI_IFNAME", ifname)];
        let started = Instant::now();
        let mut child = self.node.spawn(&[], &env, self.conf.as_bytes());
        let kill = rng.percent(KILL_PERCENT);
        if kill {
            // A deliberate random delay, not a wait for a condition: the
            // point is to kill at an arbitrary moment of the call.
            let window = self.tally.median(verb).unwrap_or(FIRST_KILL_WINDOW).as_micros() as u64;
            let delay = Duration::from_micros(rng.next() % window.max(1));
            std::thread::sleep(delay);
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let took = started.elapsed();
        if out.status.signal() == Some(libc::SIGKILL) {
            self.history.lock().unwrap().push(format!("{id} {verb} killed after {took:.1?}"));
            return Fate::Killed;
        }
        if kill {
            self.tally.kill_too_late.fetch_add(1, Ordering::Relaxed);
        } else {
            self.tally.durations.lock().unwrap().entry(verb).or_default().push(took);
        }
        let status = out.status;
        let outcome = Outcome::from_output(out);
        let addr = outcome.stdout["ips"][0]["address"].as_str().and_then(|a| a.split('/').next()).unwrap_or("");
        self.history.lock().unwrap().push(format!("{id} {verb} {status} after {took:.1?} {addr}"));
        Fate::Done(outcome)
    }

    fn worker(&self, worker: usize, seed: u64) {
        let mut rng = Rng(seed | 1);
        let mut n = 0;
        while self.claim() {
            let id = format!("storm-{worker}-{n}");
            let ifname = format!("s{worker}x{n}");
            n += 1;
            let added = match self.call(&mut rng, "ADD", &id, worker, &ifname) {
                Fate::Done(out) if out.ok => {
                    let address = out.stdout["ips"][0]["address"].as_str().unwrap().to_string();
                    let host_veth = out.stdout["interfaces"][1]["name"].as_str().unwrap().to_string();
                    self.handed_out.lock().unwrap().push(address.clone());
                    let pod = Live { worker, ifname: ifname.clone(), address, host_veth };
                    let mut live = self.live.lock().unwrap();
                    if let Some((other, _)) = live.iter().find(|(_, l)| l.address == pod.address) {
                        self.errors.lock().unwrap().push(format!("{id} got {} which {other} holds", pod.address));
                    }
                    live.insert(id.clone(), pod);
                    true
                }
                Fate::Done(out) => {
                    self.errors.lock().unwrap().push(format!("ADD {id}: {} {}", out.stdout, out.stderr));
                    false
                }
                Fate::Killed => {
                    self.tally.killed_add.fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            // A runtime keeps some pods, cleans up after most failed ADDs
            // with a DEL, and, having crashed, forgets the rest (GC's job).
            let del = if added { !rng.percent(20) } else { rng.percent(50) };
            if !del || !self.claim() {
                if !added {
                    self.tally.abandoned.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            // The runtime no longer counts on the pod once it sends DEL.
            self.live.lock().unwrap().remove(&id);
            match self.call(&mut rng, "DEL", &id, worker, &ifname) {
                Fate::Done(out) if out.ok => {}
                Fate::Done(out) => self.errors.lock().unwrap().push(format!("DEL {id}: {} {}", out.stdout, out.stderr)),
                Fate::Killed => {
                    self.tally.killed_del.fetch_add(1, Ordering::Relaxed);
                    self.tally.abandoned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Interfaces (other than `lo`) and their IPv4 addresses in a namespace.
fn addresses(ns: &Netns) -> BTreeMap<String, Vec<String>> {
    ns.ip_json(&["-4", "addr", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .map(|l| {
            let addrs = l["addr_info"].as_array().unwrap();
            let addrs = addrs.iter().map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"])).collect();
            (l["ifname"].as_str().unwrap().to_string(), addrs)
        })
        .collect()
}

fn link_names(ns: &Netns, args: &[&str]) -> BTreeSet<String> {
    ns.ip_json(args).as_array().unwrap().iter().map(|l| l["ifname"].as_str().unwrap().to_string()).collect()
}

#[test]
fn storm_of_adds_and_dels_with_random_kills_then_gc_leaves_exactly_the_live_pods() {
    let Some(node) = Node::with_lease(LEASE) else { return };
    if !common::have_nft(&node.ns) {
        return;
    }
    let total: usize = std::env::var("CNI_STORM_CALLS").map(|v| v.parse().expect("CNI_STORM_CALLS")).unwrap_or(1000);
    let seed: u64 = match std::env::var("CNI_STORM_SEED") {
        Ok(v) => v.parse().expect("CNI_STORM_SEED"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    eprintln!("storm: {total} calls, {WORKERS} at a time, CNI_STORM_SEED={seed}");
    let pods: Vec<Netns> = (0..WORKERS).map(|i| Netns::new(&format!("storm{i}")).expect("pod namespace")).collect();
    let mut conf = node.conf("1.1.0");
    // The plugin's own masquerade, so that its nftables set is in play.
    conf["delegate"]["ipMasq"] = json!(true);
    let storm = Storm {
        node: &node,
        pods: &pods,
        conf: conf.to_string(),
        budget: AtomicUsize::new(total),
        tally: Tally::default(),
        live: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
        history: Mutex::new(Vec::new()),
        handed_out: Mutex::new(Vec::new()),
    };

    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let storm = &storm;
            let seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(w as u64 + 1));
            s.spawn(move || storm.worker(w, seed));
        }
    });
    let storm_time = started.elapsed();
    let errors = storm.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} calls that were not killed failed:\n{}", errors.len(), errors.join("\n"));

    // Killed plugins leave children behind (nft, DEL's teardown), which
    // finish on their own; GC runs once they have, as a runtime's GC would.
    netns_fixtures::wait_until(Duration::from_secs(30), "orphaned plugin children to finish", || {
        common::processes_in(&node.ns).is_empty()
    });

    let live = storm.live.lock().unwrap().clone();
    let valid: Vec<Value> = live.iter().map(|(id, l)| json!({"containerID": id, "ifname": l.ifname})).collect();
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!(valid);
    let gc_started = Instant::now();
    let out = node.call(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], gc_conf.to_string().as_bytes());
    let gc_time = gc_started.elapsed();
    assert!(out.ok, "GC failed: {} {}", out.stdout, out.stderr);
    let gc_released = out.stderr.lines().filter(|l| l.contains("GC released")).count();

    let t = &storm.tally;
    eprintln!(
        "storm: {} calls in {storm_time:.1?} (median ADD {:.1?}, DEL {:.1?}; {} ADDs and {} DELs SIGKILLed mid-call, {} kills after the exit), {} pods abandoned, {} live; GC released {gc_released} in {gc_time:.1?}",
        t.calls.load(Ordering::Relaxed),
        t.median("ADD").unwrap_or_default(),
        t.median("DEL").unwrap_or_default(),
        t.killed_add.load(Ordering::Relaxed),
        t.killed_del.load(Ordering::Relaxed),
        t.kill_too_late.load(Ordering::Relaxed),
        t.abandoned.load(Ordering::Relaxed),
        live.len(),
    );

    // Rotation: with fewer ADDs than the /22 has addresses, the walk never
    // wraps, so no address was handed out twice, kills or not.
    if total < 1021 {
        let handed_out = storm.handed_out.lock().unwrap();
        let mut seen = BTreeSet::new();
        let again: Vec<&String> = handed_out.iter().filter(|a| !seen.insert(*a)).collect();
        assert!(again.is_empty(), "addresses handed out twice without the range being walked: {again:?}");
    }
    // No duplicate address among live pods, and each has the one it was given.
    let addrs: Vec<&str> = live.values().map(|l| l.address.as_str()).collect();
    let distinct: BTreeSet<&str> = addrs.iter().copied().collect();
    assert_eq!(distinct.len(), addrs.len(), "duplicate addresses among live pods");
    // The pods' namespaces hold exactly the live pods' interfaces (the
    // deletions DEL and GC leave to the kernel may still be under way).
    let want_in_pods: Vec<BTreeMap<String, Vec<String>>> = (0..WORKERS)
        .map(|w| live.values().filter(|l| l.worker == w).map(|l| (l.ifname.clone(), vec![l.address.clone()])).collect())
        .collect();
    netns_fixtures::wait_until(Duration::from_secs(30), "the pods' namespaces to hold only live pods", || {
        pods.iter().zip(&want_in_pods).all(|(p, want)| addresses(p) == *want)
    });
    for (p, want) in pods.iter().zip(&want_in_pods) {
        assert_eq!(addresses(p), *want, "interfaces in {}", p.name());
    }
    // No leaked host veth, and every live one on the bridge.
    let want_veths: BTreeSet<String> = live.values().map(|l| l.host_veth.clone()).collect();
    netns_fixtures::wait_until(Duration::from_secs(30), "the node to hold only live pods' veths", || {
        link_names(&node.ns, &["link", "show", "type", "veth"]) == want_veths
    });
    assert_eq!(link_names(&node.ns, &["link", "show", "master", "cni0"]), want_veths);
    // No leaked address in the IPAM store: records and index are exactly the live pods'.
    let ips = |a: &str| a.split('/').next().unwrap().to_string();
    let want_records: Vec<String> = {
        let mut v: Vec<String> = live.values().map(|l| ips(&l.address)).collect();
        v.sort();
        v
    };
    assert_eq!(node.allocations(), want_records, "IPAM records");
    let want_index: BTreeMap<String, String> =
        live.iter().map(|(id, l)| (format!("{id}:{}", l.ifname), ips(&l.address))).collect();
    assert_eq!(common::index_entries(&node), want_index, "IPAM attachments/ index");
    for (id, l) in &live {
        let record = std::fs::read_to_string(common::store_dir(&node).join(ips(&l.address))).unwrap();
        assert_eq!(record, format!("{id}\r\n{}\r\nmasq", l.ifname));
    }
    // No leaked member of the masquerade set.
    let want_masq: BTreeSet<String> = live.values().map(|l| ips(&l.address)).collect();
    let masq = common::masq_members(&node.ns);
    let leaked: Vec<&String> = masq.difference(&want_masq).collect();
    if !leaked.is_empty() {
        let history = storm.history.lock().unwrap();
        let pods: BTreeSet<&str> = history
            .iter()
            .filter(|l| leaked.iter().any(|ip| l.ends_with(&format!(" {ip}"))))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for l in history.iter().filter(|l| pods.contains(l.split(' ').next().unwrap())) {
            eprintln!("history: {l}");
        }
    }
    assert_eq!(masq, want_masq, "masquerade set");

    // And the live pods still go away cleanly.
    let by_id: HashMap<&String, &Live> = live.iter().collect();
    for (id, l) in by_id {
        let netns = pods[l.worker].path().to_string_lossy().into_owned();
        let out = node.verb("DEL", id, &netns, &l.ifname, &conf);
        assert!(out.ok, "DEL {id}: {} {}", out.stdout, out.stderr);
    }
    node.assert_clean();
    assert_eq!(common::masq_members(&node.ns), BTreeSet::new());
    assert!(common::index_entries(&node).is_empty(), "index entries left");
}
