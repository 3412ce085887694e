//! The shared property-test runner.

pub use netns_fixtures::prop::check;
