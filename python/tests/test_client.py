"""The Python client against a real prefixd process, over real UCX (shared memory and tcp)."""

import numpy as np
import pytest

import prefixd

CHUNK = 256


def tokens(prompt, n):
    return [prompt * 1_000_000 + i for i in range(n)]


def random_kv(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture()
def client(server):
    with prefixd.Client(server.endpoint, device=None) as c:
        yield c


def test_key_vectors_match_python_reference(key_vectors):
    """The committed vectors (hashlib + cbor2, as vLLM hashes blocks) come out the same here."""
    for seed, block, chunk, toks, keys in key_vectors:
        assert prefixd.chunk_keys(toks, seed=seed, block_tokens=block, chunk_tokens=chunk) == keys


def test_client_keys_use_its_recipe(server, key_vectors):
    seed, block, chunk, toks, keys = next(r for r in key_vectors if r[3] and r[4])
    with prefixd.Client(server.endpoint, device=None, seed=seed, block_tokens=block, chunk_tokens=chunk) as c:
        assert c.keys(toks) == keys


def test_put_get_whole_prompt(client):
    t = tokens(1, 2 * CHUNK + 17)  # two full chunks; the tail is never cached
    kv = random_kv((2, 4096), 1)
    r = client.put(t, kv)
    assert (r.chunks, r.stored, r.skipped) == (2, 2, 0)
    assert client.lookup(t) == 2 * CHUNK
    out = np.zeros_like(kv)
    assert client.get(t, out) == 2 * CHUNK
    assert np.array_equal(out, kv)
    # A second put of the same prompt writes nothing.
    assert client.put(t, kv).skipped == 2


def test_shared_prefix_hits_exactly(client):
    a = tokens(2, 2 * CHUNK)
    b = a[:CHUNK] + tokens(3, CHUNK)
    kv = random_kv((2, 1024), 2)
    client.put(a, kv)
    assert client.lookup(b) == CHUNK
    out = np.full((2, 1024), 7, dtype=np.uint8)
    assert client.get(b, [out[0], out[1]]) == CHUNK
    assert np.array_equal(out[0], kv[0])
    assert np.all(out[1] == 7), "the chunk past the hit must be left as it was"


def test_miss_reads_nothing(client):
    out = np.full(4096, 9, dtype=np.uint8)
    assert client.get(tokens(4, CHUNK), out) == 0
    assert np.all(out == 9)
    assert client.lookup(tokens(4, CHUNK - 1)) == 0


def test_active_message_path(server):
    with prefixd.Client(server.endpoint, device=None, force_remote=True) as c:
        assert c.data_path == "active_message"
        t = tokens(5, 3 * CHUNK)
        kv = random_kv((3, 65536), 5)
        assert c.put(t, kv).stored == 3
        out = np.zeros_like(kv)
        assert c.get(t, out) == 3 * CHUNK
        assert np.array_equal(out, kv)


def test_paged_host_fragments_round_trip(client):
    """Per-layer K and V arrays [1, heads, tokens, dim], as HuggingFace keeps them: the
    fragments of a chunk are each (tensor, head)'s 256-token run."""
    layers, heads, dim, n = 3, 2, 8, 2 * CHUNK + 40
    src = [random_kv((1, heads, n, dim), 100 + i) for i in range(2 * layers)]
    t = tokens(6, n)
    frags = prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=2)
    assert (frags.chunks, frags.per_chunk, frags.fragment_bytes) == (2, 2 * layers * heads, CHUNK * dim)
    assert client.put_paged(t, frags).stored == 2

    # The chunk's bytes are its fragments in order.
    whole = np.zeros((2, frags.chunk_bytes), dtype=np.uint8)
    assert client.get(t, whole) == 2 * CHUNK
    expect = np.concatenate([a[0, h, c * CHUNK:(c + 1) * CHUNK].reshape(-1)
                             for c in range(2) for a in src for h in range(heads)])
    assert np.array_equal(whole.reshape(-1), expect)

    dst = [np.zeros_like(a) for a in src]
    back = prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=2)
    assert client.get_paged(t, back) == 2 * CHUNK
    for a, b in zip(src, dst):
        assert np.array_equal(a[:, :, : 2 * CHUNK], b[:, :, : 2 * CHUNK])
        assert not b[:, :, 2 * CHUNK:].any(), "tokens past the chunks must be untouched"


def test_paged_get_on_a_remote_session(server, client):
    """A client of another node (forced onto active messages over tcp) reads paged chunks
    too: fetched into its staging buffer, then scattered into the fragments."""
    layers, heads, dim, n = 2, 2, 8, 2 * CHUNK + 7
    src = [random_kv((1, heads, n, dim), 300 + i) for i in range(2 * layers)]
    t = tokens(9, n)
    assert client.put_paged(t, prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=2)).stored == 2
    with prefixd.Client(server.endpoint, device=None, transports="tcp", force_remote=True) as remote:
        assert remote.data_path == "active_message"
        dst = [np.zeros_like(a) for a in src]
        back = prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=2)
        assert remote.get_paged(t, back) == 2 * CHUNK
    for a, b in zip(src, dst):
        assert np.array_equal(a[:, :, : 2 * CHUNK], b[:, :, : 2 * CHUNK])
        assert not b[:, :, 2 * CHUNK:].any()


def test_paged_put_of_later_chunks_extends_the_prefix(client):
    t = tokens(7, 3 * CHUNK)
    kv = [random_kv((1, 2, 3 * CHUNK, 16), 70 + i) for i in range(2)]
    client.put_paged(t, prefixd.Fragments.token_runs(kv, token_dim=2, first_token=0, chunks=1))
    assert client.lookup(t) == CHUNK
    r = client.put_paged(t, prefixd.Fragments.token_runs(kv, token_dim=2, first_token=CHUNK, chunks=2), first_chunk=1)
    assert r.stored == 2
    assert client.lookup(t) == 3 * CHUNK


def test_bad_input_is_refused_and_changes_nothing(client):
    t = tokens(8, CHUNK)
    before = client.stats()["entries"]
    with pytest.raises(ValueError, match="split evenly"):
        client.put(t + tokens(8, CHUNK), np.zeros(1001, dtype=np.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        client.put(t, np.zeros((64, 64), dtype=np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="tensors for"):
        client.put_chunks(client.keys(t), [np.zeros(16, np.uint8)] * 2)
    with pytest.raises(ValueError, match="32 bytes"):
        client.lookup_keys([b"short"])
    with pytest.raises(TypeError):
        client.put(t, "not a tensor")
    ro = np.zeros(4096, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        client.get(t, ro)
    # A fragment address outside the given arrays is caught before any byte moves.
    a = np.zeros((1, 1, CHUNK, 16), dtype=np.uint8)
    f = prefixd.Fragments.token_runs([a], token_dim=2, first_token=0, chunks=1)
    bad = prefixd.Fragments([a], [[a.__array_interface__["data"][0] + 64]], f.fragment_bytes)
    with pytest.raises(ValueError, match="outside the given tensors"):
        client.put_paged(t, bad)
    with pytest.raises(ValueError, match="need"):
        prefixd.Fragments.token_runs([a], token_dim=2, first_token=0, chunks=2)
    assert client.stats()["entries"] == before
    assert client.lookup(t) == 0


def test_errors_name_the_cause(server):
    with pytest.raises(prefixd.RetryableError, match="cannot reach prefixd"):
        prefixd.Client("http://127.0.0.1:1", device=None, timeout=2)
    with pytest.raises(ValueError, match="multiple of"):
        prefixd.Client(server.endpoint, device=None, block_tokens=16, chunk_tokens=100)
    with pytest.raises(ValueError, match="transport"):
        prefixd.Client(server.endpoint, device=None, transports="sm,bogus")
    c = prefixd.Client(server.endpoint, device=None)
    c.close()
    c.close()
    with pytest.raises(prefixd.PrefixdError, match="closed"):
        c.lookup(tokens(9, CHUNK))


def test_stats_and_health(client):
    s = client.stats()
    assert s["tiers"][0]["tier"] == "host"
    assert s["tiers"][0]["capacity_bytes"] == 64 << 20
    assert s["sessions"] >= 1
    assert client.health() is True
    assert "prefixd.Client" in repr(client)


def test_concurrent_threads_share_a_client(client):
    """Calls release the GIL: several Python threads may use one client at once."""
    import threading

    errors = []

    def work(p):
        try:
            t = tokens(100 + p, CHUNK)
            kv = random_kv(8192, p)
            client.put(t, kv)
            out = np.zeros_like(kv)
            assert client.get(t, out) == CHUNK and np.array_equal(out, kv)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_client_survives_a_server_restart():
    """4e6c6e7's client raised "unknown session" on every call forever after the server
    restarted. Now the first call that finds its session gone connects again and is retried."""
    import socket

    from conftest import Server

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = Server("--host-pool", "16MiB", listen=f"127.0.0.1:{port}")
    try:
        c = prefixd.Client(srv.endpoint, device=None)
        t = tokens(77, CHUNK * 2)
        assert c.put(t, random_kv((2, 1024), 7)).stored == 2
        srv.stop()
        srv = Server("--host-pool", "16MiB", listen=f"127.0.0.1:{port}")
        assert c.lookup(t) == 0, "a new server, empty; the call itself succeeds"
        kv = random_kv((2, 1024), 8)
        assert c.put(t, kv).stored == 2
        out = np.zeros_like(kv)
        assert c.get(t, out) == 2 * CHUNK
        assert (out == kv).all()
        c.close()
    finally:
        srv.stop()


def test_a_closed_client_leaves_no_lease_and_opens_no_session():
    """A waiting lease lookup is in flight when its client closes, and the chunk arrives before
    the wait ends. Neither the server (granting the lease to the closed session) nor the client
    (connecting again to retry the call) may leave a lease behind: nobody would give it back,
    and it held a draining sidecar for its whole TTL (the vLLM tests' shared sidecar,
    2026-11-30)."""
    import time

    from conftest import Server

    srv = Server("--host-pool", "16MiB")
    try:
        waiter = prefixd.Client(srv.endpoint, device=None)
        t = tokens(91, CHUNK)
        pending = waiter._c.lease_start(waiter.namespace, waiter.keys(t), 1, 1500)
        time.sleep(0.2)  # held by the server now, waiting for the chunk
        waiter.close()
        with prefixd.Client(srv.endpoint, device=None) as c:
            assert c.put(t, random_kv((1, 1024), 9)).stored == 1
            assert pending.wait(5.0), "the waiting call ended"
            with pytest.raises(prefixd.PrefixdError):
                pending.result()
            stats = c.stats()
            assert stats["active_leases"] == 0, "no lease granted to a closed session"
            assert stats["sessions"] == 1, "only this client's: the closed one did not connect again"
        assert srv.stop() == 0, "drained at once"
    finally:
        srv.stop()


def test_preparing_device_copies_without_cuda_is_a_clear_error(client):
    """`prepare_device` (the vLLM worker calls it at start-up) names what is missing rather than
    crashing when the pointer is not CUDA memory or there is no CUDA at all."""
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match="CUDA"):
        client._c.prepare_device(buf.ctypes.data)
    assert client.lookup(tokens(93, CHUNK)) == 0, "the session still works"
