//! What flanneld-rs versions before flannel's own rules made, removed at
//! start: masquerade in the nftables table `ip flannel-rs`, and two accept
//! rules with the comment [`FORWARD_COMMENT`] in iptables' FORWARD chain
//! (`table ip filter`, iptables-nft's), which those versions wrote with nft.

use std::process::{Command, Stdio};

use super::Problem;

/// The old table (family `ip`).
pub const TABLE: &str = "flannel-rs";
/// The comment on the old accept rules in iptables' FORWARD chain.
pub const FORWARD_COMMENT: &str = "flannel-rs forward";

/// `nft -j list <what>` as JSON; `None` when nft says it does not exist.
fn nft_list(what: &[&str]) -> Result<Option<serde_json::Value>, String> {
    let out = Command::new(flannel_net::host::nft_binary())
        .args(["-j", "list"])
        .args(what)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("run nft: {e} (is the nftables package installed?)"))?;
    if !out.status.success() {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout).map(Some).map_err(|e| format!("nft -j output: {e}"))
}

/// The handles of the old accept rules in `nft -j list chain ip filter FORWARD`'s output.
pub fn forward_handles(v: &serde_json::Value) -> Vec<u64> {
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str() == Some(FORWARD_COMMENT))
        .filter_map(|r| r["handle"].as_u64())
        .collect()
}

fn old_forward_rules() -> Result<Vec<u64>, String> {
    Ok(nft_list(&["chain", "ip", "filter", "FORWARD"])?.map(|v| forward_handles(&v)).unwrap_or_default())
}

/// What an earlier flanneld-rs left.
pub fn find() -> Result<Vec<Problem>, String> {
    let mut out = Vec::new();
    if flannel_net::host::nft_table_exists("ip", TABLE) {
        out.push(Problem::stale(format!("nftables table ip {TABLE} (an earlier flanneld-rs's) is still there")));
    }
    let n = old_forward_rules()?.len();
    if n > 0 {
        out.push(Problem::stale(format!(
            "iptables' FORWARD chain has {n} rules with comment {FORWARD_COMMENT:?} (an earlier flanneld-rs's)"
        )));
    }
    Ok(out)
}

/// The transaction removing what an earlier flanneld-rs left: `None` when
/// nothing is left.
pub fn removal(table: bool, handles: &[u64]) -> Option<String> {
    let mut script = String::new();
    if table {
        script += &format!("delete table ip {TABLE}\n");
    }
    for h in handles {
        script += &format!("delete rule ip filter FORWARD handle {h}\n");
    }
    (!script.is_empty()).then_some(script)
}

/// Removes what an earlier flanneld-rs left, in one transaction.
pub fn remove() -> Result<(), String> {
    let table = flannel_net::host::nft_table_exists("ip", TABLE);
    match removal(table, &old_forward_rules()?) {
        Some(script) => {
            flannel_net::host::nft_apply(&script).map_err(|e| format!("remove an earlier flanneld-rs's rules: {e}"))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_old_forward_rules_by_comment() {
        // As `nft -j list chain ip filter FORWARD` prints it.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"chain":{"family":"ip","table":"filter","name":"FORWARD","policy":"drop"}},
            {"rule":{"handle":3,"comment":"flannel-rs forward","expr":[{"accept":null}]}},
            {"rule":{"handle":4,"expr":[{"accept":null}]}},
            {"rule":{"handle":7,"comment":"flannel-rs forward","expr":[{"accept":null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(forward_handles(&v), [3, 7]);
        assert_eq!(
            removal(true, &[3, 7]).unwrap(),
            "delete table ip flannel-rs\ndelete rule ip filter FORWARD handle 3\ndelete rule ip filter FORWARD handle 7\n"
        );
        assert_eq!(removal(false, &[]), None);
    }
}
