//! The token file (`--auth-file`) as an operator may write it: any text is parsed as the server
//! parses it and must answer with rules or an error, never a panic; and every token the text
//! gives an inline secret for must then be known by that secret, with some grant. `secret_file`
//! paths are not read here (the reader refuses them), so the fuzzer touches no file.
#![no_main]

#[allow(dead_code)]
#[path = "../../server/src/auth/file.rs"]
mod file;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match file::Auth::parse(text, "fuzz.toml", |_| Err("no files in the fuzzer".into())) {
        Ok(auth) => {
            assert!(auth.enabled(), "rules without a token");
            let value: toml::Value = toml::from_str(text).expect("parsed once, parses again");
            let tokens = value.get("token").and_then(|t| t.as_array()).expect("a [[token]] list");
            for t in tokens {
                if let Some(secret) = t.get("secret").and_then(|s| s.as_str()) {
                    let rule = auth.rule(secret).expect("a token is known by its own secret");
                    assert!(rule.grants != 0 && !rule.namespaces.is_empty(), "a rule that grants nothing");
                }
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
