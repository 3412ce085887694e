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

use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::flags::VModule;

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
pub fn filter_spec(flanneld_log: Option<&str>, rust_log: Option<&str>, verbosity: Option<i32>) -> String {
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

/// klog's `-v N` as one of our levels: 0-3 (and below) info, 4-5 debug
/// (klog's "debug detail" starts at 4), 6 and more trace (klog's request dumps).
pub fn verbosity_level(n: i32) -> LevelFilter {
    match n {
        i32::MIN..=3 => LevelFilter::INFO,
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
pub fn env_filter(spec: &str, from: &str, verbosity: Option<i32>) -> (EnvFilter, Option<String>) {
    match EnvFilter::builder().parse(spec) {
        Ok(f) => (f, None),
        Err(e) => {
            let fallback = filter_spec(None, None, verbosity);
            let why = format!("log filter {spec:?} (from {from}) does not parse ({e}); using {fallback:?}");
            (EnvFilter::new(fallback), Some(why))
        }
    }
}

/// klog's `-vmodule` as a filter: an event passes when the last segment of
/// its target (the module: `flanneld_rs::subnet::kube` is `kube`) matches a
/// pattern (`*` and `?` globs, as klog's file names; a pattern with `/` is
/// matched against the whole path, `::` read as `/`) and its level is within
/// that pattern's (`N` read as for `-v`). The first matching pattern decides,
/// as in klog. Combined with the main filter by "or": `-vmodule` only adds.
#[derive(Debug, Clone, Default)]
pub struct VModuleFilter(Vec<(String, LevelFilter)>);

impl VModuleFilter {
    /// The filter for `-vmodule`'s entries.
    pub fn new(vmodule: &VModule) -> VModuleFilter {
        VModuleFilter(vmodule.0.iter().map(|(p, n)| (p.clone(), verbosity_level(*n))).collect())
    }

    /// The level `-vmodule` gives events of `target`, if a pattern matches.
    pub fn level_for(&self, target: &str) -> Option<LevelFilter> {
        let path = target.replace("::", "/");
        let module = path.rsplit('/').next().unwrap_or(&path);
        self.0.iter().find(|(p, _)| if p.contains('/') { glob(p, &path) } else { glob(p, module) }).map(|(_, l)| *l)
    }
}

impl<S> Filter<S> for VModuleFilter {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.level_for(meta.target()).is_some_and(|l| *meta.level() <= l)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.0.iter().map(|(_, l)| *l).max().unwrap_or(LevelFilter::OFF))
    }
}

/// `*` (any run of characters but `/`) and `?` (one such character) globs.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).take_while(|&i| i == 0 || t[i - 1] != '/').any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => t.first().is_some_and(|c| *c != '/') && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(&pattern.chars().collect::<Vec<_>>(), &text.chars().collect::<Vec<_>>())
}

/// Installs the subscriber and the `log` bridge, with the filter from
/// `FLANNELD_LOG`/`RUST_LOG`, `-v` and `-vmodule`. Call once, after parsing
/// flags; a second call changes nothing. `-log_backtrace_at` is accepted and
/// warned about: flanneld-rs has no Go source lines to trigger on.
pub fn init(format: LogFormat, verbosity: Option<i32>, vmodule: Option<&VModule>, backtrace_at: Option<&str>) {
    let flanneld_log = std::env::var("FLANNELD_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    let spec = filter_spec(flanneld_log.as_deref(), rust_log.as_deref(), verbosity);
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let from = if set(&flanneld_log) { "FLANNELD_LOG" } else { "RUST_LOG" };
    let (filter, problem) = env_filter(&spec, from, verbosity);
    let filter = filter.or(VModuleFilter::new(vmodule.unwrap_or(&VModule::default())));
    // No colours: the lines go to container logs and journald, where escape
    // codes are noise (the `ansi` feature is not even compiled in).
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // try_init also installs LogTracer (the `tracing-log` feature), which is
    // what carries our `log::info!` calls.
    let installed = match format {
        LogFormat::Text => tracing_subscriber::registry().with(layer.with_filter(filter)).try_init(),
        // Flattened, so `message` sits beside `level` and `target` where log
        // collectors look for it.
        LogFormat::Json => {
            tracing_subscriber::registry().with(layer.json().flatten_event(true).with_filter(filter)).try_init()
        }
    };
    if installed.is_ok() {
        if let Some(why) = problem {
            log::warn!("{why}");
        }
        if let Some(at) = backtrace_at.filter(|a| !a.is_empty()) {
            log::warn!(
                "-log_backtrace_at {at} has no effect: flanneld-rs is not written in Go and has no such source line"
            );
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
        assert_eq!(verbosity_level(i32::MAX), LevelFilter::TRACE);
        assert_eq!(verbosity_level(-1), LevelFilter::INFO);
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

    #[test]
    fn vmodule_matches_module_names_like_klog_matches_file_names() {
        let v = crate::flags::parse_vmodule("kube=4,vx*=6,flanneld_rs/subnet/e?cd=5,main=2").unwrap();
        let f = VModuleFilter::new(&v);
        assert_eq!(f.level_for("flanneld_rs::subnet::kube"), Some(LevelFilter::DEBUG));
        assert_eq!(f.level_for("flanneld_rs::backend::vxlan"), Some(LevelFilter::TRACE));
        assert_eq!(f.level_for("flanneld_rs::subnet::etcd"), Some(LevelFilter::DEBUG));
        assert_eq!(f.level_for("flanneld_rs::main"), Some(LevelFilter::INFO));
        assert_eq!(f.level_for("flanneld_rs::subnet::kube_annotations"), None);
        assert_eq!(f.level_for("flanneld_rs::subnet"), None);
        // A `*` stops at a path separator.
        let f = VModuleFilter::new(&crate::flags::parse_vmodule("flanneld_rs/*=6").unwrap());
        assert_eq!(f.level_for("flanneld_rs::daemon"), Some(LevelFilter::TRACE));
        assert_eq!(f.level_for("flanneld_rs::subnet::kube"), None);
        // Through a subscriber: -vmodule adds to the main filter, never takes
        // away. (Lines written, not `enabled!`, which per-layer filters answer
        // only when the event is dispatched.)
        let (main, _) = env_filter(&filter_spec(None, None, None), "a test", None);
        let filter = main.or(VModuleFilter::new(&crate::flags::parse_vmodule("etcd=4").unwrap()));
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(writer).without_time().with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "flanneld_rs::subnet::etcd", "etcd-debug");
            tracing::trace!(target: "flanneld_rs::subnet::etcd", "etcd-trace");
            tracing::debug!(target: "flanneld_rs::subnet::kube", "kube-debug");
            tracing::info!(target: "flanneld_rs::subnet::kube", "kube-info");
            tracing::info!(target: "kube_client::client", "dependency-info");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
        assert_eq!(lines, ["etcd-debug", "kube-info"], "{text}");
    }

    /// A writer into a shared buffer.
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
