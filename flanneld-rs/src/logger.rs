//! Log lines on stderr through `tracing-subscriber`: each with an RFC 3339
//! UTC timestamp, the level and the target (the module that logged it), so a
//! dependency's "client error (Connect)" says it came from `kube_client` and
//! lines can be lined up with other nodes' and the API server's.
//!
//! Our code logs with the `log` macros; kube and tonic emit `tracing` events.
//! The subscriber's `log` bridge (`LogTracer`) turns the former into the
//! latter, so both go through one filter and one format.
//!
//! The filter is in `RUST_LOG` syntax (`warn,flanneld_rs::subnet=debug`),
//! from `FLANNELD_LOG`, else `RUST_LOG`. A bare level in `FLANNELD_LOG`
//! (`debug`, `warn`) keeps its old meaning: that level for our crates, and at
//! most `warn` for dependencies, whose debug output (h2, tonic, hyper) would
//! drown ours. `RUST_LOG` means what it means for any Rust program: a bare
//! level there is for everything.

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL TARGET: message`, for people.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`
    /// and any other fields), for log collectors.
    Json,
}

/// The crates whose lines are ours: they get the chosen level, dependencies
/// stay at `warn` unless a full filter says otherwise.
const OUR_CRATES: [&str; 2] = ["flanneld_rs", "flannel_net"];

/// The level dependencies get when nothing else is said.
const DEPENDENCY_LEVEL: LevelFilter = LevelFilter::WARN;

/// The filter, in `RUST_LOG` syntax, from the two variables' values and klog's
/// `-v` (which wins for our crates: the command line beats the environment).
pub fn filter_spec(flanneld_log: Option<&str>, rust_log: Option<&str>, verbosity: Option<u8>) -> String {
    let flanneld_log = flanneld_log.map(str::trim).filter(|s| !s.is_empty());
    let rust_log = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut spec = match (flanneld_log, rust_log) {
        (Some(v), _) => match v.parse::<LevelFilter>() {
            Ok(level) => ours_at(level),
            Err(_) => v.to_string(),
        },
        (None, Some(v)) => v.to_string(),
        (None, None) => ours_at(LevelFilter::INFO),
    };
    if let Some(n) = verbosity {
        // EnvFilter keeps the last directive given for a target, so these
        // override whatever the environment said about our crates.
        let level = verbosity_level(n);
        for krate in OUR_CRATES {
            spec.push_str(&format!(",{krate}={level}"));
        }
    }
    spec
}

/// klog's `-v N` as one of our levels: 0-3 info, 4-5 debug (klog's "debug
/// detail" starts at 4), 6 and more trace (klog's request dumps).
pub fn verbosity_level(n: u8) -> LevelFilter {
    match n {
        0..=3 => LevelFilter::INFO,
        4..=5 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// `level` for our crates, dependencies at `warn` or quieter: `FLANNELD_LOG=warn`
/// quiets everything to warnings, `error` to errors, as the old logger did.
fn ours_at(level: LevelFilter) -> String {
    let deps = std::cmp::min(level, DEPENDENCY_LEVEL);
    let mut spec = deps.to_string().to_lowercase();
    for krate in OUR_CRATES {
        spec.push_str(&format!(",{krate}={}", level.to_string().to_lowercase()));
    }
    spec
}

/// The filter for `spec`, which came from variable `from`; a spec that does
/// not parse falls back to the default (with `-v` applied) and the reason is
/// returned for logging once the subscriber is up.
pub fn env_filter(spec: &str, from: &str, verbosity: Option<u8>) -> (EnvFilter, Option<String>) {
    match EnvFilter::builder().parse(spec) {
        Ok(f) => (f, None),
        Err(e) => {
            let fallback = filter_spec(None, None, verbosity);
            let why = format!("log filter {spec:?} (from {from}) does not parse ({e}); using {fallback:?}");
            (EnvFilter::new(fallback), Some(why))
        }
    }
}

/// Installs the subscriber and the `log` bridge, with the filter from
/// `FLANNELD_LOG`/`RUST_LOG` and `-v`. Call once, after parsing flags; a
/// second call changes nothing.
pub fn init(format: LogFormat, verbosity: Option<u8>) {
    let flanneld_log = std::env::var("FLANNELD_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    let spec = filter_spec(flanneld_log.as_deref(), rust_log.as_deref(), verbosity);
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let from = if set(&flanneld_log) { "FLANNELD_LOG" } else { "RUST_LOG" };
    let (filter, problem) = env_filter(&spec, from, verbosity);
    // No colours: the lines go to container logs and journald, where escape
    // codes are noise (the `ansi` feature is not even compiled in).
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    // try_init also installs LogTracer (the `tracing-log` feature), which is
    // what carries our `log::info!` calls.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        // Flattened, so `message` sits beside `level` and `target` where log
        // collectors look for it.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        if let Some(why) = problem {
            log::warn!("{why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    /// Which of (ours, a dependency) the filter lets through at `level`.
    fn lets_through(spec: &str, level: Level) -> (bool, bool) {
        let (filter, problem) = env_filter(spec, "a test", None);
        assert_eq!(problem, None, "{spec}");
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            // `enabled!` needs a constant level, hence one arm per level.
            macro_rules! both {
                ($l:expr) => {
                    (
                        tracing::enabled!(target: "flanneld_rs::subnet::etcd", $l),
                        tracing::enabled!(target: "kube_client::client", $l),
                    )
                };
            }
            match level {
                Level::ERROR => both!(Level::ERROR),
                Level::WARN => both!(Level::WARN),
                Level::INFO => both!(Level::INFO),
                Level::DEBUG => both!(Level::DEBUG),
                Level::TRACE => both!(Level::TRACE),
            }
        })
    }

    #[test]
    fn default_is_info_for_us_and_warn_for_dependencies() {
        let spec = filter_spec(None, None, None);
        assert_eq!(spec, "warn,flanneld_rs=info,flannel_net=info");
        assert_eq!(lets_through(&spec, Level::INFO), (true, false));
        assert_eq!(lets_through(&spec, Level::WARN), (true, true));
        assert_eq!(lets_through(&spec, Level::DEBUG), (false, false));
        // Empty variables are as good as unset.
        assert_eq!(filter_spec(Some(" "), Some(""), None), spec);
    }

    #[test]
    fn flanneld_log_bare_levels_keep_their_old_meaning() {
        let debug = filter_spec(Some("debug"), None, None);
        assert_eq!(lets_through(&debug, Level::DEBUG), (true, false));
        assert_eq!(lets_through(&debug, Level::WARN), (true, true));
        let warn = filter_spec(Some("warn"), None, None);
        assert_eq!(lets_through(&warn, Level::INFO), (false, false));
        assert_eq!(lets_through(&warn, Level::WARN), (true, true));
        let error = filter_spec(Some("ERROR"), None, None);
        assert_eq!(lets_through(&error, Level::WARN), (false, false));
        assert_eq!(lets_through(&error, Level::ERROR), (true, true));
    }

    #[test]
    fn full_filters_are_taken_as_written_and_flanneld_log_wins() {
        let spec = filter_spec(Some("info,kube_client=debug"), Some("trace"), None);
        assert_eq!(spec, "info,kube_client=debug");
        assert_eq!(lets_through(&spec, Level::DEBUG), (false, true));
        // RUST_LOG's bare level is for everything, as in any Rust program.
        let spec = filter_spec(None, Some("debug"), None);
        assert_eq!(lets_through(&spec, Level::DEBUG), (true, true));
    }

    #[test]
    fn klog_verbosity_maps_onto_our_levels() {
        let cases = [(0, Level::INFO), (3, Level::INFO), (4, Level::DEBUG), (5, Level::DEBUG), (6, Level::TRACE)];
        for (n, level) in cases {
            assert_eq!(verbosity_level(n), LevelFilter::from_level(level), "-v {n}");
        }
        assert_eq!(verbosity_level(u8::MAX), LevelFilter::TRACE);
        // -v beats the environment for our crates and leaves dependencies be.
        let spec = filter_spec(Some("warn"), None, Some(4));
        assert_eq!(lets_through(&spec, Level::DEBUG), (true, false));
        assert_eq!(lets_through(&spec, Level::INFO), (true, false));
        let spec = filter_spec(Some("trace"), None, Some(0));
        assert_eq!(lets_through(&spec, Level::DEBUG), (false, false));
        assert_eq!(lets_through(&spec, Level::INFO), (true, false));
    }

    #[test]
    fn a_filter_that_does_not_parse_falls_back_to_the_default() {
        let (_, problem) = env_filter("flanneld_rs=loud", "FLANNELD_LOG", Some(4));
        let problem = problem.expect("an error");
        assert!(problem.contains("flanneld_rs=loud") && problem.contains("FLANNELD_LOG"), "{problem}");
        assert!(problem.contains("flanneld_rs=debug"), "{problem}");
    }
}
