//! `flannel install SRC DST`: how the DaemonSet's init containers put the
//! plugin binary into `/opt/cni/bin` and the conflist into `/etc/cni/net.d`.
//!
//! The image has no shell and no `cp`, and a plain copy would be wrong anyway:
//! the container runtime may exec `/opt/cni/bin/flannel` or reload
//! `/etc/cni/net.d` at any moment and must never see a half-written file. So
//! the content goes to a temporary file in the destination's own directory
//! (a rename is only atomic within one filesystem), is flushed to disk, and is
//! renamed over the destination: readers see the old file or the new one.
//! A plugin process already running keeps executing the old inode, and
//! replacing a binary that is being executed this way never fails with
//! `ETXTBSY` the way writing into it would.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// argv[1] that selects this mode. A CNI runtime never passes arguments (it
/// drives a plugin through `CNI_COMMAND`), so the word cannot clash with a
/// plugin call.
pub const INSTALL_ARG: &str = "install";

/// Mode of an installed executable, whatever the source's exact bits.
const EXEC_MODE: u32 = 0o755;
/// Mode of an installed configuration file.
const FILE_MODE: u32 = 0o644;

/// Temporary files older than this are leftovers of an installer that was
/// killed between create and rename (an install takes milliseconds).
const STALE_AFTER: Duration = Duration::from_secs(300);

/// What [`install`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination was written (created or replaced).
    Installed,
    /// The destination already had the same content and mode; nothing was
    /// touched, so the runtime's directory watcher sees no event.
    Unchanged,
}

/// An install that failed: names both paths, the step and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("install {} to {}: {step}: {source}", src.display(), dst.display())]
pub struct InstallError {
    src: PathBuf,
    dst: PathBuf,
    step: String,
    #[source]
    source: io::Error,
}

/// Copies `src` to `dst` atomically: temp file next to `dst`, fsync, rename,
/// fsync of the directory. `dst` gets mode 0755 when `src` is executable by
/// anyone, else 0644. The destination's directory is created if missing.
pub fn install(src: &Path, dst: &Path) -> Result<Outcome, InstallError> {
    let fail = |step: String| {
        move |source: io::Error| InstallError { src: src.to_path_buf(), dst: dst.to_path_buf(), step, source }
    };
    let content = fs::read(src).map_err(fail(format!("read {}", src.display())))?;
    let src_mode = fs::metadata(src).map_err(fail(format!("stat {}", src.display())))?.permissions().mode();
    let mode = if src_mode & 0o111 != 0 { EXEC_MODE } else { FILE_MODE };
    let name = dst
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name"))
        .map_err(fail("check destination".into()))?
        .to_string_lossy()
        .into_owned();
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(fail(format!("create directory {}", dir.display())))?;
    if is_same(dst, &content, mode) {
        return Ok(Outcome::Unchanged);
    }
    remove_stale_temps(&dir, &name);

    let (tmp, mut file) =
        create_temp(&dir, &name, mode).map_err(fail(format!("create a temporary file in {}", dir.display())))?;
    let written = (|| {
        // Explicitly, so the process umask cannot narrow the mode.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(&content)?;
        file.sync_all()
    })();
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(fail(format!("write {}", tmp.display()))(e));
    }
    if let Err(e) = fs::rename(&tmp, dst) {
        let _ = fs::remove_file(&tmp);
        return Err(fail(format!("rename {} over it", tmp.display()))(e));
    }
    // The rename is durable only once the directory entry is on disk.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(fail(format!("sync directory {}", dir.display())))?;
    Ok(Outcome::Installed)
}

/// Whether `dst` is a regular file with exactly `content` and `mode`.
fn is_same(dst: &Path, content: &[u8], mode: u32) -> bool {
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_file() && m.len() == content.len() as u64 && m.permissions().mode() & 0o7777 == mode => {
            fs::read(dst).is_ok_and(|old| old == content)
        }
        _ => false,
    }
}

/// The prefix of our temporary files for destination `name`. They are dot
/// files ending in `.tmp`, so neither libcni (which loads `*.conf`,
/// `*.conflist` and `*.json`) nor a `PATH` lookup ever picks one up.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.flannel-install.")
}

/// Creates a new temporary file in `dir`. Every init container runs as PID 1
/// of its own namespace, so the PID alone does not tell two installers apart:
/// the name adds the clock, and `O_EXCL` settles any remaining tie.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut attempt = 0u32;
    loop {
        let path = dir.join(format!("{}{}-{nanos}-{attempt}.tmp", temp_prefix(name), std::process::id()));
        match OpenOptions::new().write(true).create_new(true).mode(mode).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Best effort: removes our temporary files for `name` that a killed
/// installer left behind. Recent ones may belong to an installer running right
/// now (two pods overlap during a rolling update) and are kept.
fn remove_stale_temps(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let prefix = temp_prefix(name);
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !file_name.starts_with(&prefix) || !file_name.ends_with(".tmp") {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The `flannel install SRC DST` command line: prints what happened, returns
/// the exit status.
pub fn main(args: &[String]) -> i32 {
    let [src, dst] = args else {
        eprintln!("usage: flannel {INSTALL_ARG} SRC DST   (copies SRC to DST atomically; 0755 if SRC is executable)");
        return 2;
    };
    match install(Path::new(src), Path::new(dst)) {
        Ok(Outcome::Installed) => {
            println!("installed {src} as {dst}");
            0
        }
        Ok(Outcome::Unchanged) => {
            println!("{dst} is up to date");
            0
        }
        Err(e) => {
            eprintln!("flannel: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    fn write(path: &Path, content: &str, mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Everything in `dir` except the names in `keep`.
    fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !keep.contains(&n.as_str()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_executable_is_installed_with_mode_0755() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("flannel");
        write(&src, "binary", 0o700);
        let dst = d.path().join("bin/flannel");
        assert_eq!(install(&src, &dst).unwrap(), Outcome::Installed);
        assert_eq!(fs::read_to_string(&dst).unwrap(), "binary");
        assert_eq!(mode_of(&dst), 0o755);
        assert!(others(&d.path().join("bin"), &["flannel"]).is_empty());
    }

    #[test]
    fn a_configuration_file_is_installed_with_mode_0644() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("cni-conf.json");
        write(&src, "{}", 0o600);
        let dst = d.path().join("10-flannel.conflist");
        install(&src, &dst).unwrap();
        assert_eq!(mode_of(&dst), 0o644);
    }

    #[test]
    fn an_existing_file_is_replaced_by_a_new_inode_and_its_readers_keep_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("dst");
        write(&src, "new", 0o755);
        write(&dst, "old", 0o755);
        let old_inode = fs::metadata(&dst).unwrap().ino();
        let mut reader = File::open(&dst).unwrap();

        assert_eq!(install(&src, &dst).unwrap(), Outcome::Installed);
        assert_eq!(fs::read_to_string(&dst).unwrap(), "new");
        assert_ne!(fs::metadata(&dst).unwrap().ino(), old_inode, "replaced in place, not renamed over");
        let mut seen = String::new();
        reader.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "old");
        assert_eq!(others(d.path(), &["src", "dst"]), Vec::<String>::new());
    }

    #[test]
    fn the_same_content_and_mode_leaves_the_file_alone() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("dst");
        write(&src, "same", 0o755);
        install(&src, &dst).unwrap();
        let inode = fs::metadata(&dst).unwrap().ino();
        assert_eq!(install(&src, &dst).unwrap(), Outcome::Unchanged);
        assert_eq!(fs::metadata(&dst).unwrap().ino(), inode);

        // A different mode alone is reason enough to rewrite.
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(install(&src, &dst).unwrap(), Outcome::Installed);
        assert_eq!(mode_of(&dst), 0o755);
    }

    #[test]
    fn a_missing_source_is_an_error_naming_both_paths() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("nope");
        let dst = d.path().join("dst");
        let msg = install(&src, &dst).unwrap_err().to_string();
        assert!(msg.contains(&*src.to_string_lossy()) && msg.contains(&*dst.to_string_lossy()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        assert!(!dst.exists());
    }

    #[test]
    fn a_destination_directory_that_is_a_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write(&src, "x", 0o644);
        let blocker = d.path().join("net.d");
        write(&blocker, "not a directory", 0o644);
        let msg = install(&src, &blocker.join("10-flannel.conflist")).unwrap_err().to_string();
        assert!(msg.contains(&*blocker.to_string_lossy()), "{msg}");
        assert!(msg.contains("create directory"), "{msg}");
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write(&src, "x", 0o644);
        // A non-empty directory cannot be replaced by a file.
        let dst = d.path().join("dst");
        fs::create_dir(&dst).unwrap();
        fs::write(dst.join("inside"), "").unwrap();
        let msg = install(&src, &dst).unwrap_err().to_string();
        assert!(msg.contains("rename"), "{msg}");
        assert_eq!(others(d.path(), &["src", "dst"]), Vec::<String>::new());
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write(&src, "x", 0o644);
        let dst = d.path().join("10-flannel.conflist");
        let stale = d.path().join(".10-flannel.conflist.flannel-install.1-1-0.tmp");
        let fresh = d.path().join(".10-flannel.conflist.flannel-install.1-2-0.tmp");
        let unrelated = d.path().join(".other.flannel-install.1-1-0.tmp");
        for p in [&stale, &fresh, &unrelated] {
            let f = File::create(p).unwrap();
            if p != &fresh {
                f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
            }
        }
        install(&src, &dst).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists() && unrelated.exists());
    }

    #[test]
    fn the_command_line_wants_exactly_two_paths() {
        assert_eq!(main(&["only-one".to_string()]), 2);
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write(&src, "x", 0o755);
        let args = [src.to_string_lossy().into_owned(), d.path().join("dst").to_string_lossy().into_owned()];
        assert_eq!(main(&args), 0);
        assert_eq!(main(&[args[0].clone(), d.path().join("src/x").to_string_lossy().into_owned()]), 1);
    }
}
