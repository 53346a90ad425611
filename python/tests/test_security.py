"""Tokens and TLS through the Python client, against a real server with --auth-file and
--tls-cert: certificates are made here with the openssl command."""

import subprocess

import numpy as np
import pytest

import prefixd
from conftest import Server

WRITER = "writer-secret-0123456789abcdef"
READER = "reader-secret-0123456789abcdef"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=prefixd test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    (d / "reader.secret").write_text(READER + "\n")
    (d / "auth.toml").write_text(f"""
[[token]]
name = "writer"
secret = "{WRITER}"
namespaces = ["team-a|*"]
grants = ["read", "write"]

[[token]]
name = "reader"
secret_file = "{d / 'reader.secret'}"
namespaces = ["team-a|*"]
grants = ["read"]
""")
    s = Server("--host-pool", "16MiB", "--auth-file", str(d / "auth.toml"),
               "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"))
    s.endpoint = s.endpoint.replace("http://", "https://")
    yield s, d
    assert s.stop() == 0


def _kv(n_chunks, seed):
    return np.random.default_rng(seed).integers(0, 255, size=(n_chunks, 4096), dtype=np.uint8)


def test_tokens_and_tls(secure):
    s, d = secure
    tokens = list(range(512))
    kv = _kv(2, 1)
    w = prefixd.Client(s.endpoint, namespace="team-a|m", token=WRITER, tls_ca=str(d / "ca.pem"),
                       net_devices="lo", device=None)
    assert w.put(tokens, kv).stored == 2
    out = np.zeros_like(kv)
    assert w.get(tokens, out) == 512
    assert (out == kv).all()

    with pytest.raises(prefixd.AccessDeniedError, match="no write grant on namespace \"team-b|m\""):
        w.put(tokens, kv, namespace="team-b|m")

    r = prefixd.Client(s.endpoint, namespace="team-a|m", token_file=str(d / "reader.secret"),
                       tls_ca=str(d / "ca.pem"), net_devices="lo", device=None)
    assert r.lookup(tokens) == 512
    with pytest.raises(prefixd.AccessDeniedError, match="no write grant"):
        r.put(tokens, _kv(2, 2), namespace="team-a|other")
    assert w.lookup(tokens, namespace="team-a|other") == 0, "the refused put stored nothing"

    with pytest.raises(prefixd.AccessDeniedError, match="bearer token"):
        prefixd.Client(s.endpoint, tls_ca=str(d / "ca.pem"), net_devices="lo", device=None)


def test_token_and_ca_from_the_environment(secure, monkeypatch):
    s, d = secure
    monkeypatch.setenv("PREFIXD_TOKEN_FILE", str(d / "reader.secret"))
    monkeypatch.setenv("PREFIXD_TLS_CA", str(d / "ca.pem"))
    c = prefixd.Client(s.endpoint, namespace="team-a|m", net_devices="lo", device=None)
    assert c.lookup(list(range(256))) in (0, 256)
    # Without the CA, the server's certificate is not trusted: a clear connection error.
    monkeypatch.delenv("PREFIXD_TLS_CA")
    with pytest.raises(prefixd.PrefixdError, match="(?i)certificate"):
        prefixd.Client(s.endpoint, namespace="team-a|m", net_devices="lo", device=None)
