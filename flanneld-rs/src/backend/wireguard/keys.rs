//! The node's WireGuard private key, in flannel's key file: the path in
//! `WIREGUARD_KEY_FILE`, else `/run/flannel/wgkey`; its text is the key in
//! base64 (44 characters, as `wg genkey` writes it; flannel writes no
//! newline, a trailing one is accepted). Created once with mode 0400 (its
//! folder 0755) and reused across restarts, so the public key peers know
//! stays the same.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use boringtun::x25519::{PublicKey, StaticSecret};

/// flannel's default key file.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

/// The environment variable that overrides it, as in flannel.
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";

/// The key file: `WIREGUARD_KEY_FILE` when set, else the default.
pub fn key_file() -> PathBuf {
    std::env::var_os(KEY_FILE_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE))
}

/// The public key of a private key.
pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// Reads the private key in `path`, or creates it (a fresh random key,
/// mode 0400) when the file does not exist; returns it with its public key.
/// A file that does not hold a key is an error naming the file (never
/// replaced: peers may know its public key).
pub fn load_or_create(path: &Path) -> anyhow::Result<([u8; 32], [u8; 32])> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| anyhow::anyhow!("WireGuard key file {}: not text (want a base64 key)", path.display()))?;
            let private = crate::config::decode_key(text.trim_end_matches(['\n', '\r'])).map_err(|why| {
                anyhow::anyhow!(
                    "WireGuard key file {}: {why} (want the private key as `wg genkey` writes it; delete the file \
                     to have a new key made, peers then learn the new public key from our lease)",
                    path.display()
                )
            })?;
            Ok((private, public_of(&private)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(e).with_context(|| format!("read the WireGuard key file {}", path.display())),
    }
}

fn create(path: &Path) -> anyhow::Result<([u8; 32], [u8; 32])> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod 0755 {}", dir.display()))?;
        }
    }
    let mut private = [0u8; 32];
    getrandom(&mut private).context("random bytes for a WireGuard private key")?;
    // Curve25519 clamping, as `wg genkey` does (the key works either way).
    private[0] &= 248;
    private[31] = (private[31] & 127) | 64;
    let text = crate::config::encode_key(&private);
    // Made with its final mode and never there half-written under its name:
    // written to a temporary file, then linked into place (a concurrent
    // start that won the race keeps its key, and we read that one).
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("write the WireGuard key file {}", path.display()));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            log::info!("wireguard: created the key file {} (mode 0400)", path.display());
            Ok((private, public_of(&private)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
        Err(e) => Err(e).with_context(|| format!("create the WireGuard key file {}", path.display())),
    }
}

/// Fills `buf` from the kernel's random source.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into `buf[done..]`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0400_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (private, public) = load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o755);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 44, "{text:?}");
        assert_eq!(crate::config::decode_key(&text).unwrap(), private);
        assert_eq!(load_or_create(&path).unwrap(), (private, public));
        assert_ne!(private, [0; 32]);
        // No temporary file left.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_wg_genkey_file_is_read_and_its_public_key_is_wgs() {
        // RFC 7748's Alice: private and public key.
        let private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        std::fs::write(&path, format!("{private}\n")).unwrap();
        let (_, public) = load_or_create(&path).unwrap();
        assert_eq!(crate::config::encode_key(&public), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn a_malformed_key_file_is_refused_by_name_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        for bad in ["not a key", "c2VjcmV0", ""] {
            std::fs::write(&path, bad).unwrap();
            let e = format!("{:#}", load_or_create(&path).unwrap_err());
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("base64") || e.contains("bytes"), "{e}");
            assert!(!e.contains(bad) || bad.is_empty(), "the key file's text is not shown: {e}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
    }
}
