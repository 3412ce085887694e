//! A minimal logger: `LEVEL message` lines on stderr, which container
//! runtimes and systemd timestamp themselves.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Info || m.target().starts_with("flanneld")
    }

    fn log(&self, r: &Record) {
        // Dependencies (tonic, h2) are chatty at debug level; keep theirs to warnings.
        if r.level() > Level::Info && !r.target().starts_with("flanneld") {
            return;
        }
        if r.level() > Level::Warn && !r.target().starts_with("flanneld") {
            return;
        }
        eprintln!("{:<5} {}", r.level(), r.args());
    }

    fn flush(&self) {}
}

/// Installs the logger; `FLANNELD_LOG=debug` for more.
pub fn init() {
    let level = match std::env::var("FLANNELD_LOG").as_deref() {
        Ok("debug") => LevelFilter::Debug,
        Ok("warn") => LevelFilter::Warn,
        _ => LevelFilter::Info,
    };
    let _ = log::set_boxed_logger(Box::new(Stderr)).map(|()| log::set_max_level(level));
}
