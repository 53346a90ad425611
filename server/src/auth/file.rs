//! The token file: its format (see `super`), its rules and their checks, with no gRPC in
//! sight (the fuzz target `auth_file` compiles this file alone).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Read = 1,
    Write = 2,
    Admin = 4,
    Direct = 8,
}

impl Grant {
    pub fn name(self) -> &'static str {
        match self {
            Grant::Read => "read",
            Grant::Write => "write",
            Grant::Admin => "admin",
            Grant::Direct => "direct",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    secret: Option<String>,
    secret_file: Option<String>,
    namespaces: Vec<String>,
    grants: Vec<String>,
}

/// One token's rule: what its holder may do, where.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub namespaces: Vec<String>,
    pub grants: u8,
}

/// Whether namespace patterns (exact names, or prefixes ending in '*') cover `ns`.
pub fn covers(patterns: &[String], ns: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => ns.starts_with(prefix),
        None => p == ns,
    })
}

/// The token rules, by secret digest. Empty: authentication is off.
#[derive(Debug, Default)]
pub struct Auth {
    by_digest: HashMap<[u8; 32], Rule>,
}

pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

impl Auth {
    /// Reads the token file; every problem is one clear line.
    pub fn load(path: &Path) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("auth file {}: {e}", path.display()))?;
        Auth::parse(&text, &path.display().to_string(), read_secret_file)
    }

    /// The rules in a token file's text (`origin` names it in errors); `read_secret` reads a
    /// token's `secret_file` (the fuzz target passes one that touches no file).
    pub fn parse(
        text: &str,
        origin: &str,
        read_secret: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Auth, String> {
        let file: TokenFile = toml::from_str(text).map_err(|e| format!("auth file {origin}: {e}"))?;
        if file.token.is_empty() {
            return Err(format!("auth file {origin} names no [[token]]"));
        }
        let mut by_digest = HashMap::new();
        for t in file.token {
            let secret = match (&t.secret, &t.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(f)) => {
                    read_secret(f).map_err(|e| format!("auth file: token {:?}: secret_file {f}: {e}", t.name))?
                }
                _ => return Err(format!("auth file: token {:?} needs exactly one of secret, secret_file", t.name)),
            };
            if secret.trim().len() < 16 {
                return Err(format!("auth file: token {:?}: a secret needs at least 16 characters", t.name));
            }
            let mut grants = 0u8;
            for g in &t.grants {
                grants |= match g.as_str() {
                    "read" => Grant::Read as u8,
                    "write" => Grant::Write as u8,
                    "admin" => Grant::Admin as u8,
                    "direct" => Grant::Direct as u8,
                    other => {
                        return Err(format!(
                            "auth file: token {:?}: grant {other:?} is none of read, write, admin, direct",
                            t.name
                        ))
                    }
                };
            }
            if t.namespaces.is_empty() || grants == 0 {
                return Err(format!("auth file: token {:?} grants nothing (namespaces and grants)", t.name));
            }
            let rule = Rule { name: t.name.clone(), namespaces: t.namespaces, grants };
            if by_digest.insert(digest(&secret), rule).is_some() {
                return Err(format!("auth file: token {:?} repeats another token's secret", t.name));
            }
        }
        Ok(Auth { by_digest })
    }

    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// Names of the configured tokens (for the start-up log).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_digest.values().map(|r| r.name.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// The rule of the token whose secret this is.
    pub fn rule(&self, secret: &str) -> Option<&Rule> {
        self.by_digest.get(&digest(secret))
    }
}

/// Reads a secret file, refusing one larger than any secret (a path such as /dev/zero would
/// otherwise never end).
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE as u64 + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() > MAX_SECRET_FILE {
        return Err(format!("longer than {MAX_SECRET_FILE} bytes: not a secret"));
    }
    Ok(text)
}

/// The largest secret file read.
const MAX_SECRET_FILE: usize = 4096;
