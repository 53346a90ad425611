//! `chaos-client`: a client that stops half-way, for the failure tests.
//!
//! - `hold-put ENDPOINT NS`: BeginPut of two 1 MiB chunks, print `RESERVED`, then wait forever
//!   (the test kills it between BeginPut and CommitPut).
//! - `hold-lease ENDPOINT NS TOKENS_FILE`: lease the cached prefix of the prompt, print
//!   `LEASED <chunks>`, then wait forever (the test kills it while it holds the lease).
//! - `slow-put ENDPOINT NS TOKENS_FILE`: BeginPut, print `BEGUN`, wait for a line on stdin, then
//!   write and commit; print `COMMITTED` or `FAILED <error>`.
//! - `bad-header ENDPOINT NS`: send one active-message put with a malformed header (the server
//!   drops it and counts it), print `SENT`, exit.

use prefixd_client::{Client, ClientOptions};
use prefixd_proto::v1::prefixd_client::PrefixdClient;
use prefixd_proto::v1::{BeginPutRequest, LookupRequest};
use std::io::Write;
use tokio::io::AsyncBufReadExt;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, endpoint, ns) = match args.as_slice() {
        [_, m, e, n, ..] => (m.as_str(), e.clone(), n.clone()),
        _ => anyhow::bail!("usage: chaos-client hold-put|hold-lease|slow-put ENDPOINT NS [TOKENS_FILE]"),
    };
    let opts = ClientOptions { name: "chaos".into(), net_devices: Some("lo".into()), ..ClientOptions::default() };
    match mode {
        "hold-put" | "hold-lease" => {
            // Raw protocol: a session whose process will die without a word.
            let s = prefixd_tests::RawSession::open(&endpoint, true, true).await?;
            let channel = tonic::transport::Channel::from_shared(endpoint)?.connect().await?;
            let mut grpc = PrefixdClient::new(channel);
            if mode == "hold-put" {
                let keys = vec![vec![0xAB; 32], vec![0xCD; 32]];
                grpc.begin_put(BeginPutRequest {
                    session_token: s.token(),
                    namespace: ns,
                    keys,
                    sizes: vec![1 << 20, 1 << 20],
                    parent_key: vec![],
                })
                .await?;
                say("RESERVED");
            } else {
                let path = args.get(4).ok_or_else(|| anyhow::anyhow!("hold-lease needs TOKENS_FILE"))?;
                let tokens =
                    prefixd_client::parse_tokens(&std::fs::read_to_string(path)?).map_err(anyhow::Error::msg)?;
                let keys = opts.keys.chunk_keys(&tokens);
                let r = grpc
                    .lookup(LookupRequest {
                        session_token: s.token(),
                        namespace: ns,
                        keys: keys.iter().map(|k| k.0.to_vec()).collect(),
                        lease: true,
                        lease_ttl_ms: 0,
                        chunk_tokens: 0,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                say(&format!("LEASED {}", r.hit_chunks));
            }
            std::future::pending::<()>().await;
            Ok(())
        }
        "slow-put" => {
            let path = args.get(4).ok_or_else(|| anyhow::anyhow!("slow-put needs TOKENS_FILE"))?;
            let tokens = prefixd_client::parse_tokens(&std::fs::read_to_string(path)?).map_err(anyhow::Error::msg)?;
            let client = Client::connect_with(&endpoint, opts).await?;
            let keys = client.keys(&tokens);
            let size = 1 << 20;
            let buf = client.alloc(size * keys.len())?;
            let data: Vec<_> = (0..keys.len()).map(|i| buf.slice(i * size, size)).collect::<Result<_, _>>()?;
            let put = client.begin_put(&ns, &keys, &vec![size as u64; keys.len()], None).await?;
            say("BEGUN");
            let mut line = String::new();
            tokio::io::BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
            let r = async {
                put.write(&data).await?;
                put.commit().await
            }
            .await;
            match r {
                Ok(o) => say(&format!("COMMITTED {}", o.stored)),
                Err(e) => say(&format!("FAILED {e}")),
            }
            Ok(())
        }
        "bad-header" => {
            let s = prefixd_tests::RawSession::open(&endpoint, true, true).await?;
            let timeout = std::time::Duration::from_secs(10);
            s.ep().am_send(prefixd_proto::dataplane::AM_PUT, &[1, 2, 3], ucx_bindings::AmData::None, timeout).await?;
            // Give the server a moment to read it before the endpoint closes.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            say("SENT");
            Ok(())
        }
        other => anyhow::bail!("unknown mode {other:?}"),
    }
}
