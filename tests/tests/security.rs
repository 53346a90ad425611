//! Tokens and TLS against a real server: who may call, on which namespaces, for what; a real
//! TLS handshake (mutual) through the Rust client, prefixctl and the metrics port; and the
//! refusal to listen beyond loopback without tokens.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_client::{Access, Client, ClientOptions, Error, Secret, TlsOptions};
use prefixd_proto::v1::DeleteRequest;
use prefixd_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

const PREFILL: &str = "prefill-secret-0123456789abcdef";
const READER: &str = "reader-secret-0123456789abcdef";
const OPS: &str = "ops-secret-0123456789abcdef0123";
const LOCAL: &str = "local-secret-0123456789abcdef01";

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("pki");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "prefixd test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path("ca.pem"), ca.pem()).unwrap();

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
            let mut p = CertificateParams::new(names).unwrap();
            p.extended_key_usages = vec![usage];
            p.distinguished_name.push(DnType::CommonName, stem);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path(&format!("{stem}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path(&format!("{stem}.key")), key.serialize_pem()).unwrap();
        };
        leaf(vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth, "server");
        leaf(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth, "client");

        // A second CA that signed nothing of ours: trusting it must fail the handshake.
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = other.self_signed(&KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path("other-ca.pem"), other.pem()).unwrap();

        std::fs::write(
            dir.path("auth.toml"),
            format!(
                r#"
[[token]]
name = "prefill"
secret = "{PREFILL}"
namespaces = ["vllm|*"]
grants = ["read", "write"]

[[token]]
name = "local-engine"
secret = "{LOCAL}"
namespaces = ["vllm|*"]
grants = ["read", "write", "direct"]

[[token]]
name = "reader"
secret_file = "{}"
namespaces = ["vllm|*"]
grants = ["read"]

[[token]]
name = "ops"
secret = "{OPS}"
namespaces = ["*"]
grants = ["admin"]
"#,
                dir.path("reader.secret").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path("reader.secret"), format!("{READER}\n")).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A server with tokens and mutual TLS.
    fn server(&self) -> (Server, String) {
        let server = Server::start(&[
            "--host-pool",
            "8MiB",
            "--auth-file",
            &self.path_str("auth.toml"),
            "--tls-cert",
            &self.path_str("server.pem"),
            "--tls-key",
            &self.path_str("server.key"),
            "--tls-client-ca",
            &self.path_str("ca.pem"),
        ]);
        let url = server.grpc.replace("http://", "https://");
        (server, url)
    }

    fn access(&self, token: Option<&str>) -> Access {
        Access {
            token: token.map(Secret::new),
            tls: TlsOptions {
                ca: Some(self.path("ca.pem")),
                cert: Some(self.path("client.pem")),
                key: Some(self.path("client.key")),
                domain: None,
            },
        }
    }
}

fn opts(access: Access) -> ClientOptions {
    ClientOptions { net_devices: Some("lo".into()), force_remote: true, access, ..ClientOptions::default() }
}

fn code(e: &Error) -> Option<Code> {
    match e {
        Error::Server { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_per_namespace_over_mutual_tls() {
    let pki = Pki::new();
    let (_server, url) = pki.server();
    let tokens: Vec<u32> = (0..512).collect();
    let bytes = random_bytes(2 * 4096, 3);

    // The writer stores and reads in its namespaces.
    let prefill = Client::connect_with(&url, opts(pki.access(Some(PREFILL)))).await.unwrap();
    assert_eq!(prefill.put("vllm|qwen", &tokens, &bytes).await.unwrap().stored, 2);
    assert_eq!(prefill.get("vllm|qwen", &tokens).await.unwrap(), (512, bytes.clone()));

    // Outside them: refused, and nothing is stored.
    let e = prefill.put("other", &tokens, &bytes).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("\"prefill\" has no write grant on namespace \"other\""), "{e}");
    let e = prefill.lookup("other", &tokens).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    // A remote get_chunks looks its keys up inside Fetch: the same read grant is checked there.
    let buf = prefill.alloc(2 * 4096).unwrap();
    let slices = [buf.slice(0, 4096).unwrap(), buf.slice(4096, 4096).unwrap()];
    let e = prefill.get_chunks("other", &prefill.keys(&tokens), &slices).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    assert_eq!(prefill.get_chunks("vllm|qwen", &prefill.keys(&tokens), &slices).await.unwrap(), 2);
    assert_eq!(buf.to_vec(0, 2 * 4096).unwrap(), bytes, "one-call remote get, byte for byte");

    // A read-only token (secret from a file) reads but cannot write.
    let reader = Client::connect_with(&url, opts(pki.access(Some(READER)))).await.unwrap();
    assert_eq!(reader.get("vllm|qwen", &tokens).await.unwrap().0, 512);
    let e = reader.put("vllm|qwen2", &tokens, &bytes).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    assert_eq!(prefill.lookup("vllm|qwen2", &tokens).await.unwrap(), 0, "the refused put stored nothing");

    // No token, or an unknown one: no session at all.
    for token in [None, Some("not-a-known-token-0123456789")] {
        let e = Client::connect_with(&url, opts(pki.access(token))).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::Unauthenticated), "{e}");
    }

    // Delete needs admin: the writer is refused, the operator's token deletes.
    let keys: Vec<Vec<u8>> = prefill.keys(&tokens).into_iter().map(|k| k.0.to_vec()).collect();
    let delete = |secret: &str| {
        let (url, access, keys) = (url.clone(), pki.access(Some(secret)), keys.clone());
        async move {
            let ch = prefixd_client::channel_with(&url, Duration::from_secs(10), &access).await.unwrap();
            let mut g = prefixd_client::grpc_client(ch, &access).unwrap();
            g.delete(DeleteRequest { session_token: vec![], namespace: "vllm|qwen".into(), keys }).await
        }
    };
    assert_eq!(delete(PREFILL).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(prefill.lookup("vllm|qwen", &tokens).await.unwrap(), 512, "nothing deleted");
    // Delete also names a session; the operator's token is checked before it.
    let e = delete(OPS).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "past the token check: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_fail_with_clear_errors() {
    let pki = Pki::new();
    let (server, url) = pki.server();

    // No client certificate: the server wants one.
    let mut a = pki.access(Some(PREFILL));
    a.tls.cert = None;
    a.tls.key = None;
    let e = Client::connect_with(&url, opts(a)).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. } | Error::Server { .. }), "{e:?}");

    // A CA that did not sign the server's certificate.
    let mut a = pki.access(Some(PREFILL));
    a.tls.ca = Some(pki.path("other-ca.pem"));
    let e = Client::connect_with(&url, opts(a)).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "the cause is named: {e}");

    // Plain text to a TLS server fails; TLS options on an http:// endpoint are refused early.
    let e =
        Client::connect_with(&server.grpc, opts(Access { token: Some(Secret::new(PREFILL)), ..Default::default() }))
            .await
            .unwrap_err();
    assert!(matches!(e, Error::Connect { .. } | Error::Server { .. }), "{e:?}");
    let e = Client::connect_with(&server.grpc, opts(pki.access(Some(PREFILL)))).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("not https://")), "{e:?}");

    // Still serving those who are let in.
    let ok = Client::connect_with(&url, opts(pki.access(Some(PREFILL)))).await.unwrap();
    assert_eq!(ok.lookup("vllm|x", &(0..256).collect::<Vec<u32>>()).await.unwrap(), 0);
}

#[test]
fn prefixctl_and_metrics_speak_tls() {
    let pki = Pki::new();
    let (server, url) = pki.server();
    let token_file = pki.path("prefill.secret");
    std::fs::write(&token_file, PREFILL).unwrap();
    let run = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push("stats");
        prefixctl(&url, &args)
    };
    let tls = [
        "--tls-ca",
        &pki.path_str("ca.pem"),
        "--tls-cert",
        &pki.path_str("client.pem"),
        "--tls-key",
        &pki.path_str("client.key"),
    ];
    let mut with_token = tls.to_vec();
    with_token.extend(["--token-file", token_file.to_str().unwrap()]);
    let out = run(&with_token);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("entries"), "{}", String::from_utf8_lossy(&out.stdout));

    let out = run(&tls);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bearer token"), "says what is missing: {err}");

    // The metrics port uses the same certificate: a client trusting the CA reads it.
    let port = server.metrics.rsplit(':').next().unwrap();
    let script = format!(
        "import ssl,urllib.request;c=ssl.create_default_context(cafile={:?});\
         print(urllib.request.urlopen('https://localhost:{port}/metrics',context=c,timeout=10).read().decode())",
        pki.path_str("ca.pem")
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(metrics.contains(r#"prefixd_requests_total{code="Unauthenticated",op="stats"} 1"#), "{metrics}");
}

#[test]
fn no_tokens_no_listening_beyond_loopback() {
    let out = std::process::Command::new(bin("prefixd"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0", "--host-pool", "8MiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--auth-file") && err.contains("--allow-insecure-remote"), "{err}");

    let bad = TempDir::new("badauth");
    std::fs::write(
        bad.path("a.toml"),
        "[[token]]\nname = \"x\"\nsecret = \"short\"\nnamespaces = [\"*\"]\ngrants = [\"read\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("prefixd"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--auth-file"])
        .arg(bad.path("a.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 characters"));
}

/// Same-host RMA reaches every namespace's bytes and cannot be revoked from a process that
/// mapped the pool: with tokens, only a token granted `direct` gets it; others on this host
/// move data by active messages, where every chunk is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_direct_tokens_get_same_host_rma() {
    let pki = Pki::new();
    let (_server, url) = pki.server();
    let local = |secret: &str| ClientOptions {
        net_devices: Some("lo".into()),
        access: pki.access(Some(secret)),
        ..ClientOptions::default()
    };
    let direct = Client::connect_with(&url, local(LOCAL)).await.unwrap();
    assert_eq!(direct.data_path(), prefixd_client::DataPath::Rma);
    let plain = Client::connect_with(&url, local(PREFILL)).await.unwrap();
    assert_eq!(plain.data_path(), prefixd_client::DataPath::ActiveMessage);
    let tokens: Vec<u32> = (0..256).collect();
    let bytes = random_bytes(4096, 5);
    assert_eq!(plain.put("vllm|a", &tokens, &bytes).await.unwrap().stored, 1);
    assert_eq!(direct.get("vllm|a", &tokens).await.unwrap(), (256, bytes));
}
