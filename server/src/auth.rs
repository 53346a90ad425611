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

mod file;

use file::covers;
pub use file::{Auth, Grant};
use tonic::metadata::MetadataMap;
use tonic::Status;

/// Who is calling: nobody in particular (authentication off), or a token's holder.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    Open,
    Token(&'a str, u8, &'a [String]),
}

impl Auth {
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
        let rule = self.rule(secret).ok_or_else(|| Status::unauthenticated("unknown token"))?;
        Ok(Caller::Token(&rule.name, rule.grants, &rule.namespaces))
    }
}

/// A caller kept with its session: the grants of the token it connected with, for the requests
/// that come on the session's data endpoint (AM_FETCH_ASK), which carry no token. They hold for
/// the session's life; a token's holder reconnects to use new grants.
#[derive(Debug, Clone, Default)]
pub enum Access {
    #[default]
    Open,
    Token {
        name: String,
        grants: u8,
        namespaces: Vec<String>,
    },
}

impl Access {
    pub fn caller(&self) -> Caller<'_> {
        match self {
            Access::Open => Caller::Open,
            Access::Token { name, grants, namespaces } => Caller::Token(name, *grants, namespaces),
        }
    }
}

impl Caller<'_> {
    /// The caller's grants, kept beyond this request (see [`Access`]).
    pub fn to_access(self) -> Access {
        match self {
            Caller::Open => Access::Open,
            Caller::Token(name, grants, namespaces) => {
                Access::Token { name: name.to_owned(), grants, namespaces: namespaces.to_vec() }
            }
        }
    }

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
        // Kept with a session, the grants are the same.
        let kept = c.to_access();
        assert!(kept.caller().check(Grant::Read, "vllm|qwen").is_ok());
        assert!(kept.caller().check(Grant::Read, "other").is_err());
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
        // A secret_file that never ends (a typo for the secret's path) is refused, not read.
        let e =
            auth("[[token]]\nname = \"z\"\nsecret_file = \"/dev/zero\"\nnamespaces = [\"*\"]\ngrants = [\"read\"]\n")
                .unwrap_err();
        assert!(e.contains("not a secret") && e.contains("/dev/zero"), "{e}");
    }
}
