//! Fuzz target for the broker config (`ketenbus::config`).
//!
//! Arbitrary text goes through `Config::from_toml` and, when that gives a config, through
//! `validate` with an empty environment. Checks: no panic, and every problem names a key
//! path. Run from `connectors/`, see `fuzz/README.md`.
#![no_main]

use ketenbus::config::{Config, Env};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_toml(text) {
        Ok(config) => config,
        Err(problems) => {
            assert!(!problems.is_empty(), "a refusal names at least one problem");
            for problem in problems {
                let _ = problem.to_string();
            }
            return;
        }
    };
    if let Err(problems) = config.validate(&Env::empty()) {
        assert!(!problems.is_empty(), "a refusal names at least one problem");
        for problem in problems {
            let _ = problem.to_string();
        }
    }
});
