//! The IPAM store on a full or read-only file system: a tiny tmpfs mounted on
//! the dataDir inside a private mount namespace (the root namespace never
//! sees it), with the plugin run inside that namespace. ADD must fail with a
//! CNI I/O error that names the path, and leave no link and no partial IPAM
//! file behind; once the file system recovers, ADD works again.

mod common;

use std::collections::BTreeMap;
use std::io::Write;

use common::{net_state, Node, Outcome, PrivateTmpfs};
use netns_fixtures::Netns;
use serde_json::Value;

fn path(ns: &Netns) -> String {
    ns.path().to_string_lossy().into_owned()
}

/// A node whose dataDir is a private tmpfs of `size`, and two pod namespaces.
/// The namespaces come first: the private mount namespace is a copy of the
/// root one at its creation, and later `/run/netns` mounts do not reach it.
fn setup(size: &str) -> Option<(Node, PrivateTmpfs, Netns, Netns)> {
    let node = Node::new()?;
    let pod = Netns::new("pod").expect("pod namespace");
    let other = Netns::new("pod2").expect("pod namespace");
    std::fs::create_dir_all(node.data_dir()).unwrap();
    let fs = PrivateTmpfs::new(&node.data_dir(), size)?;
    Some((node, fs, pod, other))
}

/// Runs `verb` for container `id` with the plugin inside the tmpfs's mount namespace.
fn verb(node: &Node, fs: &PrivateTmpfs, verb: &str, id: &str, pod: &Netns) -> Outcome {
    let wrapper = fs.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let netns = path(pod);
    let env = [("CNI_COMMAND", verb), ("CNI_CONTAINERID", id), ("CNI_NETNS", &netns), ("CNI_IFNAME", "eth0")];
    let conf = node.conf("1.0.0").to_string();
    Outcome::from_output(node.spawn(&wrapper, &env, conf.as_bytes()).wait_with_output().unwrap())
}

fn must(out: Outcome, what: &str) -> Value {
    assert!(out.ok, "{what}: {} {}", out.stdout, out.stderr);
    out.stdout
}

/// An ADD and a DEL, so that the store's skeleton (directories, lock, hint)
/// and the bridge exist before the file system gets into trouble. The
/// record DEL kept for reuse goes, so that the next ADD creates a file, as
/// on a node that never released one.
fn warm_up(node: &Node, fs: &PrivateTmpfs, pod: &Netns) {
    must(verb(node, fs, "ADD", "warm-up", pod), "warm-up ADD");
    must(verb(node, fs, "DEL", "warm-up", pod), "warm-up DEL");
    node.assert_clean();
    common::wait_pod_empty(pod);
    std::fs::remove_dir_all(fs.path("networks/cbr0/spare")).unwrap();
}

/// Fills the tmpfs with data until it is full.
fn fill_blocks(fs: &PrivateTmpfs) {
    let mut f = std::fs::File::create(fs.path("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("fill the tmpfs: {e}"),
        }
    }
}

/// What the failed ADD must not change, seen from outside: links, addresses
/// and routes of node and pod, and every file of the store with its size.
fn snapshot(node: &Node, fs: &PrivateTmpfs, pod: &Netns) -> (Vec<String>, Vec<String>, BTreeMap<String, String>) {
    (net_state(&node.ns).into_iter().collect(), net_state(pod).into_iter().collect(), fs.tree())
}

/// The failed ADD's error: I/O (code 5), naming the path and the cause.
fn expect_io_error(out: &Outcome, path: &std::path::Path, cause: &str) {
    out.expect_error(5, &path.display().to_string());
    let msg = out.stdout["msg"].as_str().unwrap();
    assert!(msg.contains(cause), "{msg:?} lacks {cause:?}");
}

#[test]
fn add_on_a_full_disk_fails_naming_the_file_and_leaves_no_partial_record() {
    let Some((node, fs, pod, _)) = setup("64k") else { return };
    warm_up(&node, &fs, &pod);
    fill_blocks(&fs);
    let before = snapshot(&node, &fs, &pod);

    let out = verb(&node, &fs, "ADD", "ctr", &pod);
    // The record file can be created (an inode) but not written (a block).
    expect_io_error(&out, &node.data_dir().join("networks/cbr0/10.244.1.3"), "No space left on device");
    assert_eq!(snapshot(&node, &fs, &pod), before, "the failed ADD left something behind");

    // Room again: the same ADD succeeds.
    std::fs::remove_file(fs.path("filler")).unwrap();
    let result = must(verb(&node, &fs, "ADD", "ctr", &pod), "ADD after freeing space");
    assert_eq!(result["ips"][0]["address"], "10.244.1.3/24");
    must(verb(&node, &fs, "DEL", "ctr", &pod), "DEL");
    node.assert_clean();
}

#[test]
fn a_released_record_lets_add_through_a_full_disk() {
    // DEL keeps the record's file (spare/), and the next ADD rewrites it in
    // place: no block and no inode, so ADD works on a full file system.
    use std::os::unix::fs::MetadataExt;
    let Some((node, fs, pod, other)) = setup("64k") else { return };
    must(verb(&node, &fs, "ADD", "first", &pod), "ADD");
    let ino = std::fs::metadata(fs.path("networks/cbr0/10.244.1.2")).unwrap().ino();
    must(verb(&node, &fs, "DEL", "first", &pod), "DEL");
    let spares: Vec<String> = fs.tree().into_keys().filter(|k| k.contains("/spare/") && !k.ends_with('/')).collect();
    assert_eq!(spares, ["networks/cbr0/spare/10.244.1.2"]);
    fill_blocks(&fs);
    let result = must(verb(&node, &fs, "ADD", "second-with-a-longer-id", &other), "ADD on a full disk");
    assert_eq!(result["ips"][0]["address"], "10.244.1.3/24");
    let record = fs.path("networks/cbr0/10.244.1.3");
    assert_eq!(std::fs::metadata(&record).unwrap().ino(), ino, "the spare was not reused");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "second-with-a-longer-id\r\neth0");
    assert!(!fs.tree().keys().any(|k| k.contains("/spare/") && !k.ends_with('/')), "{:?}", fs.tree());
    must(verb(&node, &fs, "DEL", "second-with-a-longer-id", &other), "DEL");
    node.assert_clean();
}

#[test]
fn add_without_a_free_inode_for_the_index_fails_and_leaves_no_record() {
    // Few inodes and plenty of room: the record (one inode) fits, the
    // attachment's index entry does not (its address list, an extended
    // attribute, is counted against tmpfs's inode space; a symlink where
    // there are no extended attributes would be one more inode).
    let Some((node, fs, pod, _)) = setup("1m,nr_inodes=16") else { return };
    warm_up(&node, &fs, &pod);
    let mut n = 0;
    loop {
        match std::fs::File::create(fs.path(&format!("f{n}"))) {
            Ok(_) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("use up the inodes: {e}"),
        }
    }
    assert!(n > 0, "the warm-up already used every inode");
    std::fs::remove_file(fs.path(&format!("f{}", n - 1))).unwrap();
    let before = snapshot(&node, &fs, &pod);

    let out = verb(&node, &fs, "ADD", "ctr", &pod);
    expect_io_error(&out, &node.data_dir().join("networks/cbr0/attachments/ctr:eth0"), "No space left on device");
    assert_eq!(snapshot(&node, &fs, &pod), before, "the failed ADD left something behind");

    for i in 0..n - 1 {
        std::fs::remove_file(fs.path(&format!("f{i}"))).unwrap();
    }
    must(verb(&node, &fs, "ADD", "ctr", &pod), "ADD after freeing inodes");
    must(verb(&node, &fs, "DEL", "ctr", &pod), "DEL");
    node.assert_clean();
}

#[test]
fn add_on_a_read_only_data_dir_fails_naming_it_and_changes_nothing() {
    let Some((node, fs, pod, other)) = setup("64k") else { return };
    // Nothing there yet: the store's directory cannot even be made.
    fs.remount_ro();
    let out = verb(&node, &fs, "ADD", "first", &pod);
    expect_io_error(&out, &node.data_dir().join("networks/cbr0"), "Read-only file system");
    assert!(fs.tree().is_empty(), "{:?}", fs.tree());
    assert!(node.veths().is_empty() && common::pod_links(&pod).is_empty());

    // A store in use when the file system turns read-only: ADD of another
    // pod fails on the lock file and changes nothing.
    fs.remount_rw();
    must(verb(&node, &fs, "ADD", "first", &pod), "ADD first");
    fs.remount_ro();
    let before = snapshot(&node, &fs, &other);
    let out = verb(&node, &fs, "ADD", "second", &other);
    expect_io_error(&out, &node.data_dir().join("networks/cbr0/lock"), "Read-only file system");
    assert_eq!(snapshot(&node, &fs, &other), before, "the failed ADD left something behind");

    // DEL cannot release on a read-only store either: it says so, and once
    // the file system is writable again a retried DEL finishes the job.
    let out = verb(&node, &fs, "DEL", "first", &pod);
    expect_io_error(&out, &node.data_dir().join("networks/cbr0/lock"), "Read-only file system");
    fs.remount_rw();
    must(verb(&node, &fs, "DEL", "first", &pod), "retried DEL");
    let left: Vec<String> = fs
        .tree()
        .into_keys()
        .filter(|k| {
            let index_entry = k.starts_with("networks/cbr0/attachments/") && !k.ends_with('/');
            let record = !k.contains("/spare/") && k.rsplit('/').next().unwrap().parse::<std::net::IpAddr>().is_ok();
            index_entry || record
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
    node.assert_clean();
}

#[test]
fn without_extended_attributes_the_index_is_made_of_symlinks() {
    // ramfs keeps no user extended attributes: the index entry is a
    // symlink whose target lists the addresses (what earlier versions
    // always wrote), and ADD, a retried ADD and DEL work as anywhere.
    symlinked_index_on_ramfs(common::LEASE, &["10.244.1.2"]);
}

#[test]
fn without_extended_attributes_a_dual_stack_entry_is_one_symlink_listing_both() {
    // The second family's address replaces the entry the first one made
    // (a symlink swapped in by a rename, no temporary name left behind).
    let lease = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=2001:db8:10::/56\nFLANNEL_IPV6_SUBNET=2001:db8:10:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    symlinked_index_on_ramfs(lease, &["10.244.1.2", "2001:db8:10:1::2"]);
}

/// ADD, a retried ADD and DEL of one pod on a node with `lease` whose
/// dataDir is a ramfs: the pod gets `addresses`, its index entry (the only
/// one) is a symlink listing them, and DEL leaves neither entry nor record.
fn symlinked_index_on_ramfs(lease: &str, addresses: &[&str]) {
    let Some(node) = Node::with_lease(lease) else { return };
    let pod = Netns::new("pod").expect("pod namespace");
    std::fs::create_dir_all(node.data_dir()).unwrap();
    let Some(fs) = PrivateTmpfs::ramfs(&node.data_dir()) else { return };
    let first = must(verb(&node, &fs, "ADD", "ctr", &pod), "ADD");
    let got: Vec<&str> = first["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().split('/').next().unwrap())
        .collect();
    assert_eq!(got, addresses);
    let index = |k: &String| k.starts_with("networks/cbr0/attachments/") && !k.ends_with('/');
    let entries: Vec<(String, String)> = fs.tree().into_iter().filter(|(k, _)| index(k)).collect();
    let want = format!("-> {}", addresses.join(","));
    assert_eq!(entries, [("networks/cbr0/attachments/ctr:eth0".to_string(), want)]);
    let again = must(verb(&node, &fs, "ADD", "ctr", &pod), "retried ADD");
    assert_eq!(again["ips"], first["ips"]);
    must(verb(&node, &fs, "DEL", "ctr", &pod), "DEL");
    let records: Vec<String> = addresses.iter().map(|a| format!("networks/cbr0/{a}")).collect();
    let left: Vec<String> = fs.tree().into_keys().filter(|k| index(k) || records.contains(k)).collect();
    assert!(left.is_empty(), "{left:?}");
    node.assert_clean();
}
