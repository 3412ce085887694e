//! Running a property: the case count, the report, the minimal failing input.

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
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
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
            panic!("proptest {name}: failed: {why}\nminimal failing input: {minimal:#?}")
        }
        Err(TestError::Abort(why)) => panic!("proptest {name}: aborted: {why}"),
    }
}
