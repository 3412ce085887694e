//! Running a property test (feature `proptest`): the case count, the
//! report, the minimal failing input. One runner for every crate's property
//! tests, so that `scripts/fuzz.sh` reads the same report line from each.

use std::cell::Cell;
use std::fmt::Debug;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// Cases per property: `PROPTEST_CASES` when set, else 256.
pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// Runs `test` on [`cases`] values of `strategy`. A failure panics with the
/// shrunk (minimal) input; a pass prints `proptest <name>: <n> cases passed`,
/// the line `scripts/fuzz.sh` reports (libtest shows it with `--nocapture`).
///
/// Failures are not persisted to `proptest-regressions/`: each finding
/// becomes a named regression test instead, which says what it is about.
pub fn check<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Clone + Debug,
{
    check_n(name, cases(), strategy, test)
}

/// [`check`] with `cases` cases (for properties too slow for the default).
pub fn check_n<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Clone + Debug,
{
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let passed = Cell::new(0u32);
    let result = runner.run(&strategy, |v| {
        test(v)?;
        passed.set(passed.get() + 1);
        Ok(())
    });
    match result {
        Ok(()) => eprintln!("proptest {name}: {} cases passed", passed.get()),
        Err(TestError::Fail(why, minimal)) => {
            // The reason proptest keeps is its last failing shrink step's,
            // which need not be the minimal input's: ask the minimal one.
            let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(minimal.clone()))) {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => format!("{why} (passes when run again: flaky?)"),
                Err(panic) => {
                    let msg =
                        panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
                    format!("panicked: {}", msg.unwrap_or("(not a string)"))
                }
            };
            panic!("proptest {name}: failed: {why}\nminimal failing input: {}", shown(name, &minimal))
        }
        Err(TestError::Abort(why)) => panic!("proptest {name}: aborted: {why}"),
    }
}

/// `value` for a failure message: whole when short; else its start, and
/// all of it in a file under the temporary directory (a 64 KB packet shown
/// byte by byte would bury the message).
fn shown(name: &str, value: &impl Debug) -> String {
    let text = format!("{value:?}");
    if text.len() <= 4000 {
        return format!("{value:#?}");
    }
    let path = std::env::temp_dir().join(format!("{name}.minimal.txt"));
    let saved = match std::fs::write(&path, &text) {
        Ok(()) => format!("all of it in {}", path.display()),
        Err(e) => format!("could not save it to {}: {e}", path.display()),
    };
    let cut = (0..=2000).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{} ... ({} characters; {saved})", &text[..cut], text.len())
}
