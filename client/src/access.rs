//! How a client reaches a server that checks who calls: a bearer token on every call, and TLS
//! for the gRPC channel (`https://` endpoints).
//!
//! A server started with `--auth-file` refuses calls without a known token (UNAUTHENTICATED) and
//! calls outside the token's namespaces or grants (PERMISSION_DENIED). A server started with
//! `--tls-cert/--tls-key` speaks TLS only; with `--tls-client-ca` it also wants a client
//! certificate (mutual TLS).

use crate::{Error, Result};
use prefixd_proto::v1::prefixd_client::PrefixdClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into().trim().to_owned())
    }

    /// Reads a secret from a file (surrounding whitespace dropped).
    pub fn from_file(path: &std::path::Path) -> Result<Secret> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("token file {}: {e}", path.display())))?;
        Ok(Secret::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// TLS for the gRPC channel; used for `https://` endpoints.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file of the CA that signed the server's certificate. Default: the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM certificate and key of this client, for servers that want client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to check the server's certificate against. Default: the endpoint's host.
    pub domain: Option<String>,
}

/// Credentials and channel security of a client. Default: no token, TLS only for `https://`
/// endpoints, checked against the system's roots.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub token: Option<Secret>,
    pub tls: TlsOptions,
}

impl Access {
    /// The usual environment: `PREFIXD_TOKEN` or `PREFIXD_TOKEN_FILE`, and `PREFIXD_TLS_CA`,
    /// `PREFIXD_TLS_CERT`, `PREFIXD_TLS_KEY`, `PREFIXD_TLS_DOMAIN`.
    pub fn from_env() -> Result<Access> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = match (var("PREFIXD_TOKEN"), var("PREFIXD_TOKEN_FILE")) {
            (Some(t), _) => Some(Secret::new(t)),
            (None, Some(f)) => Some(Secret::from_file(f.as_ref())?),
            (None, None) => None,
        };
        Ok(Access {
            token,
            tls: TlsOptions {
                ca: var("PREFIXD_TLS_CA").map(PathBuf::from),
                cert: var("PREFIXD_TLS_CERT").map(PathBuf::from),
                key: var("PREFIXD_TLS_KEY").map(PathBuf::from),
                domain: var("PREFIXD_TLS_DOMAIN"),
            },
        })
    }

    fn tls_config(&self) -> Result<ClientTlsConfig> {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::InvalidArgument(format!("TLS {what} {}: {e}", p.display())))
        };
        let t = &self.tls;
        let mut cfg = ClientTlsConfig::new();
        cfg = match &t.ca {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("CA", ca)?)),
            None => cfg.with_native_roots(),
        };
        match (&t.cert, &t.key) {
            (Some(c), Some(k)) => cfg = cfg.identity(Identity::from_pem(read("certificate", c)?, read("key", k)?)),
            (None, None) => {}
            _ => return Err(Error::InvalidArgument("a TLS client certificate needs both cert and key".into())),
        }
        if let Some(d) = &t.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }

    /// The header value every call carries, checked once here so a bad token fails early.
    fn bearer(&self) -> Result<Option<AsciiMetadataValue>> {
        let Some(t) = &self.token else { return Ok(None) };
        if t.expose().is_empty() {
            return Err(Error::InvalidArgument("the token is empty".into()));
        }
        let mut v: AsciiMetadataValue = format!("Bearer {}", t.expose())
            .parse()
            .map_err(|_| Error::InvalidArgument("the token must be printable ASCII".into()))?;
        v.set_sensitive(true);
        Ok(Some(v))
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The gRPC client every call goes through.
pub type Grpc = PrefixdClient<InterceptedService<Channel, Bearer>>;

/// A channel to `endpoint` (`http://` or `https://`), with TLS set up from `access`.
pub async fn channel_with(endpoint: &str, timeout: Duration, access: &Access) -> Result<Channel> {
    let mut ep = Channel::from_shared(endpoint.to_owned())
        .map_err(|e| Error::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .tcp_nodelay(true);
    let https = endpoint.starts_with("https://");
    let tls_asked = access.tls.ca.is_some() || access.tls.cert.is_some() || access.tls.domain.is_some();
    if tls_asked && !https {
        return Err(Error::InvalidArgument(format!(
            "TLS options were given but the endpoint {endpoint:?} is not https://"
        )));
    }
    if https {
        ep = ep.tls_config(access.tls_config()?).map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
    }
    ep.connect().await.map_err(|e| Error::Connect {
        endpoint: endpoint.to_owned(),
        message: format!("{}; is prefixd running{}?", source_chain(&e), if https { " with TLS" } else { "" }),
    })
}

/// The gRPC client of `channel`, sending `access`'s token.
pub fn grpc(channel: Channel, access: &Access) -> Result<Grpc> {
    Ok(PrefixdClient::with_interceptor(channel, Bearer(access.bearer()?))
        .max_decoding_message_size(prefixd_proto::limits::MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(prefixd_proto::limits::MAX_GRPC_MESSAGE_BYTES))
}

/// An error with its causes ("transport error: ...: invalid peer certificate: ..."): tonic's
/// own message for a failed TLS handshake is only "transport error".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
