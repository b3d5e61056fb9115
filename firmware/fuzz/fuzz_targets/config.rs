//! The configuration parser: TOML text → `Config` (unknown keys are problems) → `validate()`. Every
//! problem names a key and a fix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passerelle_config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let problems = match Config::parse(text) {
        Ok(cfg) => cfg.validate(),
        Err(problems) => {
            assert!(!problems.is_empty(), "a refused config without a problem");
            problems
        }
    };
    for p in problems {
        assert!(!p.key.is_empty() && !p.fix.is_empty(), "{p}");
        let _ = p.to_string();
    }
});
