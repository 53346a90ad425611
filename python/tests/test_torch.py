"""torch tensors: CPU always (where torch is installed), CUDA where a GPU is present.

CUDA cases start their own server with a GPU pool on device 0; with two GPUs the producer
writes from GPU 0 and the consumer reads into GPU 1 (cuda_ipc over NVLink/PCIe).
"""

import pytest

import prefixd

torch = pytest.importorskip("torch")

from conftest import Server  # noqa: E402

CHUNK = 256


def tokens(prompt, n):
    return [prompt * 1_000_000 + i for i in range(n)]


def test_cpu_bf16_put_get(server):
    with prefixd.Client(server.endpoint, device=None) as c:
        t = tokens(20, 2 * CHUNK)
        g = torch.Generator().manual_seed(20)
        kv = torch.randn(2, 4, 1024, generator=g).to(torch.bfloat16)
        assert c.put(torch.tensor(t), kv).stored == 2
        out = torch.zeros_like(kv)
        assert c.get(t, out) == 2 * CHUNK
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_cpu_paged_hf_layout(server):
    """HuggingFace keeps K and V per layer as [batch, kv_heads, tokens, head_dim]."""
    with prefixd.Client(server.endpoint, device=None) as c:
        n, layers = 2 * CHUNK + 5, 2
        g = torch.Generator().manual_seed(21)
        src = [torch.randn(1, 2, n, 16, generator=g).to(torch.bfloat16) for _ in range(2 * layers)]
        t = tokens(21, n)
        assert c.put_paged(t, prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=2)).stored == 2
        dst = [torch.zeros_like(x) for x in src]
        assert c.get_paged(t, prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=2)) == 2 * CHUNK
        for a, b in zip(src, dst):
            assert torch.equal(a[:, :, : 2 * CHUNK], b[:, :, : 2 * CHUNK])


def test_non_contiguous_tensor_is_refused(server):
    with prefixd.Client(server.endpoint, device=None) as c:
        with pytest.raises(ValueError, match="contiguous"):
            c.put(tokens(22, CHUNK), torch.zeros(64, 64).t())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_server():
    s = Server("--host-pool", "256MiB", "--gpu-pool", "1GiB", "--gpu", "0")
    yield s
    s.stop()


def _devices():
    return (0, 1) if torch.cuda.device_count() > 1 else (0, 0)


@cuda
def test_cuda_contiguous_across_gpus(gpu_server):
    dp, dc = _devices()
    prod = prefixd.Client(gpu_server.endpoint, device=dp)
    cons = prefixd.Client(gpu_server.endpoint, device=dc)
    t = tokens(30, 4 * CHUNK)
    kv = torch.randn(4, 1 << 20, device=f"cuda:{dp}", dtype=torch.bfloat16)
    assert prod.put(t, kv).stored == 4
    out = torch.zeros_like(kv, device=f"cuda:{dc}")
    assert cons.get(t, out) == 4 * CHUNK
    assert torch.equal(out.cpu().view(torch.int16), kv.cpu().view(torch.int16))
    prod.close()
    cons.close()


@cuda
def test_cuda_paged_across_gpus(gpu_server):
    dp, dc = _devices()
    prod = prefixd.Client(gpu_server.endpoint, device=dp)
    cons = prefixd.Client(gpu_server.endpoint, device=dc)
    n, layers = 3 * CHUNK + 10, 4
    src = [torch.randn(1, 8, n, 128, device=f"cuda:{dp}", dtype=torch.bfloat16) for _ in range(2 * layers)]
    t = tokens(31, n)
    f = prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=3)
    assert prod.put_paged(t, f).stored == 3
    dst = [torch.zeros(1, 8, n, 128, device=f"cuda:{dc}", dtype=torch.bfloat16) for _ in range(2 * layers)]
    assert cons.get_paged(t, prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=3)) == 3 * CHUNK
    for a, b in zip(src, dst):
        assert torch.equal(a[:, :, : 3 * CHUNK].cpu().view(torch.int16), b[:, :, : 3 * CHUNK].cpu().view(torch.int16))
        assert not b[:, :, 3 * CHUNK:].any()
    prod.close()
    cons.close()


@cuda
def test_cuda_paged_reads_chunks_demoted_to_the_host_tier():
    """A GPU pool of 8 chunks and 12 to store: older chunks move to the host pool, and a paged get must read
    them there (the kernel reads the mapped, page-locked host pool) as well as from the GPU, after the
    consumer prepared its device copies (prepare_device) as the vLLM worker does."""
    s = Server("--host-pool", "256MiB", "--gpu-pool", "64MiB", "--gpu", "0")
    try:
        dp, dc = _devices()
        prod = prefixd.Client(s.endpoint, device=dp)
        cons = prefixd.Client(s.endpoint, device=dc)
        n = 12 * CHUNK
        # 16 tensors x 8 heads x 64 KiB: 8 MiB chunks, 96 MiB in all.
        src = [torch.randn(1, 8, n, 128, device=f"cuda:{dp}", dtype=torch.bfloat16) for _ in range(16)]
        t = tokens(32, n)
        assert prod.put_paged(t, prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=12)).stored == 12
        tiers = {x["tier"]: x for x in prod.stats()["tiers"]}
        assert tiers["host"]["used_bytes"] > 0, "expected demotion to the host tier"
        dst = [torch.zeros(1, 8, n, 128, device=f"cuda:{dc}", dtype=torch.bfloat16) for _ in range(16)]
        # What the vLLM worker does at start-up: the first copy's set-up (page-locking the
        # mapped host pool, mapping the GPU pool, loading the kernel) done beforehand; twice is
        # fine; a host pointer names no CUDA context.
        cons._c.prepare_device(dst[0].data_ptr())
        cons._c.prepare_device(dst[1].data_ptr())
        with pytest.raises(ValueError, match="cuPointerGetAttribute"):
            cons._c.prepare_device(torch.zeros(4).data_ptr())
        assert cons.get_paged(t, prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=12)) == n
        for a, b in zip(src, dst):
            assert torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))
        prod.close()
        cons.close()
    finally:
        s.stop()


@cuda
def test_cuda_paged_remote_get_into_gpu(gpu_server):
    """The cross-node path as vLLM's decode uses it: a client forced onto active messages with
    "cuda_copy,tcp" fetches chunks held in the GPU pool into paged CUDA tensors. UCX's cuda_copy
    page-locks the client's staging buffer itself; the scatter must accept that (on 2x H200
    every such load once failed with CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED)."""
    dp, dc = _devices()
    prod = prefixd.Client(gpu_server.endpoint, device=dp)
    cons = prefixd.Client(gpu_server.endpoint, device=dc, transports="cuda_copy,tcp", force_remote=True)
    n = 2 * CHUNK + 3
    src = [torch.randn(1, 8, n, 128, device=f"cuda:{dp}", dtype=torch.bfloat16) for _ in range(4)]
    t = tokens(33, n)
    assert prod.put_paged(t, prefixd.Fragments.token_runs(src, token_dim=2, first_token=0, chunks=2)).stored == 2
    for _ in range(2):  # the second get reuses the staging buffer
        dst = [torch.zeros(1, 8, n, 128, device=f"cuda:{dc}", dtype=torch.bfloat16) for _ in range(4)]
        assert cons.get_paged(t, prefixd.Fragments.token_runs(dst, token_dim=2, first_token=0, chunks=2)) == 2 * CHUNK
        for a, b in zip(src, dst):
            assert torch.equal(a[:, :, : 2 * CHUNK].cpu().view(torch.int16), b[:, :, : 2 * CHUNK].cpu().view(torch.int16))
    prod.close()
    cons.close()
