//! Process start for the short-lived programs (the CNI plugin runs once per
//! pod call): they skip std's runtime set-up (`#![no_main]`, a C `main`)
//! and do here the two parts of it they rely on.
//!
//! std's set-up installs a SIGSEGV/SIGBUS handler on an alternate stack to
//! name a stack overflow, and to find the main thread's guard page it reads
//! and parses `/proc/self/maps`: about a dozen system calls and 50-60 µs of
//! every start on the benchmark machine, a tenth of starting a static
//! program there. Without it an overflow still kills the process, by
//! SIGSEGV, without the message.

/// Opens `/dev/null` on any of descriptors 0, 1 and 2 that is closed, so
/// that no file opened later takes the place of stdin, stdout or stderr (a
/// result written into an IPAM file), and ignores SIGPIPE, so that writing
/// to a pipe whose reader is gone fails with `EPIPE` instead of killing the
/// process: what std's start-up does for a `main`. Aborts if a closed
/// descriptor cannot be filled, as std's start-up does.
pub fn prepare_process() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    loop {
        // SAFETY: polls three pollfd structs we own, without waiting.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if rc != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    for pfd in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
        // SAFETY: a NUL-terminated path; the lowest free descriptor is the
        // closed one, since the lower ones are open by now.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if fd != pfd.fd {
            std::process::abort();
        }
    }
    // SAFETY: sets a signal's disposition to SIG_IGN; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// In a child (the test harness's own start-up has filled the standard
    /// descriptors and ignored SIGPIPE already): stdout closed and SIGPIPE
    /// back to its default, then `prepare_process` must fill and ignore them.
    #[test]
    fn a_closed_stdout_is_filled_and_sigpipe_ignored() {
        if std::env::var_os("FLANNEL_NET_ENTRY_CHILD").is_some() {
            // SAFETY: closes our stdout and resets one signal's disposition;
            // nothing in this child writes to stdout afterwards.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::close(1);
            }
            super::prepare_process();
            let file = std::fs::File::open("/proc/self/status").unwrap();
            assert_ne!(std::os::fd::AsRawFd::as_raw_fd(&file), 1, "a file took stdout's place");
            let target = std::fs::read_link("/proc/self/fd/1").unwrap();
            assert_eq!(target, std::path::Path::new("/dev/null"));
            // SAFETY: sets the disposition it reads back to what it was.
            let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            assert_eq!(old, libc::SIG_IGN, "SIGPIPE not ignored");
            return;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "entry::tests::a_closed_stdout_is_filled_and_sigpipe_ignored"])
            .env("FLANNEL_NET_ENTRY_CHILD", "1")
            .output()
            .unwrap();
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "child: {all}");
        // The child's harness reports on stdout, which is /dev/null by then:
        // what shows is only its start, so the test did run there.
        assert!(all.contains("running 1 test"), "child ran no test: {all}");
    }
}
