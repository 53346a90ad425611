//! prefixd's configuration file as an operator may write it: any text goes through the same
//! resolution the server runs (TOML, sizes, durations, addresses, validation), which must
//! answer with a configuration or one error line, never a panic.
#![no_main]

#[allow(dead_code)]
#[path = "../../server/src/units.rs"]
mod units;

#[allow(dead_code)]
#[path = "../../server/src/config.rs"]
mod config;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cli = config::Cli::parse_from(["prefixd"]);
    match config::Config::resolve_text(&cli, Some((text, "fuzz.toml"))) {
        Ok(c) => {
            // A configuration that resolves prints as TOML that resolves to the same.
            let again = config::Config::resolve_text(&cli, Some((&c.to_toml(), "printed.toml")));
            assert!(again.is_ok(), "printed config does not resolve: {:?}\n{}", again.err(), c.to_toml());
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
