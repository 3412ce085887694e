//! CNI specification versions: which we accept and what each allows.

use crate::error::{code, CniError};

/// Versions we accept, oldest first. We answer in the version the
/// configuration asks for: runtimes reject results newer than they sent.
pub const SUPPORTED: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used for errors when the configuration gives none.
pub const LATEST: &str = "1.1.0";

/// What the binary says when run without `CNI_COMMAND`, in the words of
/// flannel's plugin (`CNI Plugin flannel version v1.9.1-flannel1
/// (linux/amd64) commit ...`), naming flannel-rs.
pub fn about() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("CNI Plugin flannel version v{} (flannel-rs) (linux/{arch})", env!("CARGO_PKG_VERSION"))
}

/// A parsed `major.minor.patch`.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let out = (it.next()??, it.next()??, it.next()??);
    if it.next().is_some() {
        return None;
    }
    Some(out)
}

/// Rejects a version we do not support, with code 1.
pub fn check_supported(v: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {v:?} is not supported; supported: {}", SUPPORTED.join(", ")),
        ))
    }
}

/// Whether `v` is at least `min`.
pub fn at_least(v: &str, min: &str) -> bool {
    match (parse(v), parse(min)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// Rejects `verb` when the configuration's version predates it (CHECK came in
/// 0.4.0, STATUS and GC in 1.1.0), with code 1.
pub fn require(v: &str, verb: &str, min: &str) -> Result<(), CniError> {
    if at_least(v, min) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{verb} needs cniVersion {min} or later; the configuration says {v:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_and_support() {
        assert!(at_least("1.1.0", "0.4.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(check_supported("0.3.1").is_ok());
        let e = check_supported("9.9.9").unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("9.9.9"));
        assert_eq!(parse("1.0"), None);
        assert_eq!(require("1.0.0", "GC", "1.1.0").unwrap_err().code, 1);
    }
}
