//! `flanneld-rs`: the per-node daemon (and its `diagnose` tool).

use flanneld_rs::flags::{Cli, Cmd};

fn main() {
    // First: nothing has started a thread yet, whatever the code below
    // comes to do.
    limit_malloc_arenas();
    // Go's flag syntax (flannel's) as well as clap's.
    let cli = Cli::parse_go(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // After parsing: the format and -v are flags. Flag errors are clap's own
    // messages on stderr, not log lines.
    flanneld_rs::logger::init(
        cli.opts.log_format,
        cli.opts.v,
        cli.opts.vmodule.as_ref(),
        cli.opts.log_backtrace_at.as_deref(),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld-rs: start async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Diagnose { json }) => match flanneld_rs::diagnose::run(&cli.opts, json).await {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("flanneld-rs diagnose: {e:#}");
                    2
                }
            },
            None => match flanneld_rs::daemon::run(cli.opts).await {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    1
                }
            },
        }
    });
    // Do not wait for background tasks (watchers, servers) to wind down.
    std::process::exit(code);
}

/// One malloc arena instead of glibc's default of one per thread (up to 8
/// per core): the runtime's threads each parsed, dumped and freed in their
/// own arena, and each arena kept its share of the peak (at 5000 peers about
/// 1 MB of the RSS). The daemon allocates little outside start-up and full
/// reconciles, so the shared arena's lock is not contended. An explicit
/// `MALLOC_ARENA_MAX` in the environment is left to glibc.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called first in
        // main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
