//! Who may do what: bearer tokens, each granted read, write and/or admin on some namespaces.
//!
//! Tokens come from a TOML file (`--auth-file`), never from flags (they would show in `ps`):
//!
//! ```toml
//! [[token]]
//! name = "prefill"                      # for logs and metrics; never the secret
//! secret_file = "/run/secrets/prefill"  # or: secret = "..." (the file's own mode protects it)
//! namespaces = ["vllm|*"]               # exact names, or prefixes ending in '*'; "*" is all
//! grants = ["read", "write"]            # read: Lookup, Fetch; write: puts; admin: Delete
//! ```
//!
//! A fourth grant, `direct`, lets a same-host client's sessions use the RMA path (the pools'
//! remote keys and the mapped host pool). That access spans the whole pools, every namespace,
//! and cannot be taken back from a process that mapped the pool, so it is given only to tokens
//! that name it (README: Security); other sessions move data by active messages, where the
//! server checks every chunk against the session's grants.
//!
//! Clients send `authorization: Bearer <secret>` with every call. Secrets are kept as SHA-256
//! digests and found by digest, so no comparison depends on how much of a guess was right.
//! Without a file, every call is allowed: the server then refuses to listen beyond loopback
//! unless `--allow-insecure-remote` says that is meant.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Read = 1,
    Write = 2,
    Admin = 4,
    Direct = 8,
}

impl Grant {
    fn name(self) -> &'static str {
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

#[derive(Debug)]
struct Rule {
    name: String,
    namespaces: Vec<String>,
    grants: u8,
}

/// Whether namespace patterns (exact names, or prefixes ending in '*') cover `ns`.
fn covers(patterns: &[String], ns: &str) -> bool {
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

/// Who is calling: nobody in particular (authentication off), or a token's holder.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    Open,
    Token(&'a str, u8, &'a [String]),
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

impl Auth {
    /// Reads the token file; every problem is one clear line.
    pub fn load(path: &Path) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("auth file {}: {e}", path.display()))?;
        let file: TokenFile = toml::from_str(&text).map_err(|e| format!("auth file {}: {e}", path.display()))?;
        if file.token.is_empty() {
            return Err(format!("auth file {} names no [[token]]", path.display()));
        }
        let mut by_digest = HashMap::new();
        for t in file.token {
            let secret = match (&t.secret, &t.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| format!("auth file: token {:?}: secret_file {f}: {e}", t.name))?,
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

    /// The caller of a request: its bearer token must be a known one when authentication is on.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller<'_>, Status> {
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        let value = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("this server needs a bearer token (authorization: Bearer ...)"))?;
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))?;
        let rule = self.by_digest.get(&digest(secret)).ok_or_else(|| Status::unauthenticated("unknown token"))?;
        Ok(Caller::Token(&rule.name, rule.grants, &rule.namespaces))
    }
}

impl Caller<'_> {
    /// Whether the caller holds `need` on namespace `ns`.
    pub fn check(&self, need: Grant, ns: &str) -> Result<(), Status> {
        match self {
            Caller::Open => Ok(()),
            Caller::Token(name, grants, namespaces) => {
                if grants & need as u8 != 0 && covers(namespaces, ns) {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "token {name:?} has no {} grant on namespace {ns:?}",
                        need.name()
                    )))
                }
            }
        }
    }

    /// Whether the caller's sessions may use same-host RMA (always, without authentication).
    pub fn may_use_direct(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Token(_, grants, _) => grants & Grant::Direct as u8 != 0,
        }
    }

    /// The caller's name for logs ("open" without authentication).
    pub fn name(&self) -> &str {
        match self {
            Caller::Open => "open",
            Caller::Token(name, ..) => name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(toml: &str) -> Result<Auth, String> {
        let p = std::env::temp_dir().join(format!("prefixd-auth-{}-{}.toml", std::process::id(), toml.len()));
        std::fs::write(&p, toml).unwrap();
        let r = Auth::load(&p);
        let _ = std::fs::remove_file(&p);
        r
    }

    fn with_token(secret: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {secret}").parse().unwrap());
        m
    }

    #[test]
    fn grants_are_per_namespace_and_per_kind() {
        let a = auth(
            r#"
[[token]]
name = "prefill"
secret = "prefill-secret-0123456789"
namespaces = ["vllm|*"]
grants = ["read", "write"]

[[token]]
name = "ops"
secret = "ops-secret-0123456789abcd"
namespaces = ["*"]
grants = ["admin"]
"#,
        )
        .unwrap();
        let p = with_token("prefill-secret-0123456789");
        let c = a.caller(&p).unwrap();
        assert!(c.check(Grant::Write, "vllm|qwen").is_ok());
        assert!(c.check(Grant::Read, "vllm|qwen").is_ok());
        assert_eq!(c.check(Grant::Write, "other").unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(c.check(Grant::Admin, "vllm|qwen").unwrap_err().code(), tonic::Code::PermissionDenied);
        let ops = a.caller(&with_token("ops-secret-0123456789abcd")).unwrap();
        assert!(ops.check(Grant::Admin, "anything").is_ok());
        assert!(ops.check(Grant::Read, "anything").is_err());
        assert_eq!(a.caller(&MetadataMap::new()).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(a.caller(&with_token("guess")).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_files_are_refused_with_one_line() {
        assert!(auth("[[token]]\nname = \"x\"\nsecret = \"short\"\nnamespaces = [\"*\"]\ngrants = [\"read\"]\n")
            .unwrap_err()
            .contains("16 characters"));
        assert!(auth(
            "[[token]]\nname = \"x\"\nsecret = \"0123456789abcdefgh\"\nnamespaces = [\"*\"]\ngrants = [\"fly\"]\n"
        )
        .unwrap_err()
        .contains("fly"));
        assert!(auth("").unwrap_err().contains("no [[token]]"));
        assert!(Auth::default().caller(&MetadataMap::new()).is_ok(), "no file: open");
    }
}
