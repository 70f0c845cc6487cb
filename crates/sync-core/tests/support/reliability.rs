//! What the reliability tests of both crates share: the figures they report
//! and the sizes they take from the environment. The server's tests include
//! this file by path, so there is one copy.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::Write;

use proptest::test_runner::Config;

/// Prints a measured figure (one line) and appends it to the file named by
/// `WHISKER_RELIABILITY_REPORT`, which `make test` prints at the end.
pub fn figure(line: &str) {
    println!("figure: {line}");
    if let Some(path) = std::env::var_os("WHISKER_RELIABILITY_REPORT") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// A count from the environment variable `name`, else `default` (longer
/// runs outside `make test` raise them).
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Cases per property: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    u32::try_from(env_count("PROPTEST_CASES", default.into())).unwrap_or(u32::MAX)
}

/// A proptest configuration running [`cases`] cases and writing no
/// regression files.
pub fn proptest_config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}
