"""The vLLM connector against the real vLLM package (CPU: no forward pass runs) and a real
prefixd process: vLLM's own Scheduler, its KV-cache layout code, its block hashes.

The model forward is the only thing stood in for: the test writes random bytes into the blocks
the scheduler handed out, as attention would have. Everything else is vLLM's and prefixd's.

Needs vLLM (0.26.0 in CI: `scripts/dev.sh test` installs it). Without it these tests skip, unless
PREFIXD_REQUIRE_VLLM=1 (set by `scripts/dev.sh test`), where they fail.
"""

import json
import os
import pathlib
import signal
import subprocess
import time
import urllib.request

import pytest

if os.environ.get("PREFIXD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")
import torch  # noqa: E402

import prefixd  # noqa: E402
from conftest import REPO, Server  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    AttentionConfig,
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256_cbor  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from prefixd.vllm import PrefixdConnector  # noqa: E402

BLOCK = 16
LAYERS = 2
KV_HEADS = 2
HEAD = 16
NUM_BLOCKS = 128
EOS = 2
SEED = "123"  # PYTHONHASHSEED of both "instances"

os.environ["PYTHONHASHSEED"] = SEED
init_none_hash(sha256_cbor)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 config (no weights: nothing runs the model here)."""
    return write_tiny_model(tmp_path_factory.mktemp("qwen3-tiny"))


def write_tiny_model(d):
    """Writes the tiny Qwen3 config into directory `d` (also used by bench/vllm/sched_cost.py)."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": EOS, "head_dim": HEAD,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
        "max_position_embeddings": 8192, "max_window_layers": LAYERS, "num_attention_heads": 4,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 10000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 4000,
    }
    (pathlib.Path(d) / "config.json").write_text(json.dumps(cfg))
    return str(d)


def vllm_config(model_dir, role, extra, policy="recompute", batched_tokens=4096):
    return VllmConfig(
        model_config=ModelConfig(model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True,
                                 dtype="bfloat16", seed=42),
        scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=batched_tokens, max_model_len=8192,
                                         enable_chunked_prefill=True, is_encoder_decoder=False,
                                         async_scheduling=False),
        cache_config=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto",
                                 enable_prefix_caching=True, prefix_caching_hash_algo="sha256_cbor"),
        kv_transfer_config=KVTransferConfig(kv_connector="PrefixdConnector", kv_connector_module_path="prefixd.vllm",
                                            kv_role=role, kv_connector_extra_config=extra,
                                            kv_load_failure_policy=policy),
        device_config=DeviceConfig("cpu"),
        attention_config=AttentionConfig(backend=None),
    )


def layer_names():
    return [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def kv_cache_config():
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(layer_names(), spec)])


def kv_caches(vc):
    """One KV tensor per layer, made by vLLM's own code: in 0.26, FlashAttention's shape and stride
    order and the model runner's reshape of a raw allocation; in 0.33, the one backing buffer
    viewed per layer in the resolved layout (LBNHC is 0.26's NHD)."""
    spec = kv_cache_config().kv_cache_groups[0].kv_cache_spec
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout  # 0.33
        from vllm.v1.kv_cache_interface import KVCacheTensor
        from vllm.v1.worker.utils import allocate_kv_cache
    except ImportError:
        KVCacheLayout = None
    if KVCacheLayout is not None:
        page = spec.page_size_bytes
        names = layer_names()
        kcc = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[KVCacheTensor(size=LAYERS * page * NUM_BLOCKS, layers=names,
                                            layer_stride=page * NUM_BLOCKS, block_stride=page)],
            kv_cache_groups=[KVCacheGroupSpec(names, spec)],
        )
        return allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout.LBNHC, [BLOCK])
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    with set_current_vllm_config(vc):
        shape = FlashAttentionBackend.get_kv_cache_shape(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD)
        order = FlashAttentionBackend.get_kv_cache_stride_order()
    out = {}
    for name in layer_names():
        raw = torch.zeros(NUM_BLOCKS * spec.page_size_bytes, dtype=torch.int8)
        out[name] = _reshape_attention_kv_cache(raw, spec, shape, order, NUM_BLOCKS, None)
    return out


def scheduler(vc):
    kcc = kv_cache_config()
    vc.cache_config.num_gpu_blocks = NUM_BLOCKS
    return Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=True,
                     structured_output_manager=StructuredOutputManager(vc), block_size=BLOCK)


def worker(vc):
    with set_current_vllm_config(vc):
        c = PrefixdConnector(vc, KVConnectorRole.WORKER, kv_cache_config())
        c.register_kv_caches(kv_caches(vc))
    return c


def request(rid, tokens, max_tokens=1, params=None):
    r = Request(request_id=rid, prompt_token_ids=list(tokens), sampling_params=SamplingParams(max_tokens=max_tokens),
                pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256_cbor))
    r.kv_transfer_params = params
    return r


def block_bytes(conn, block_id):
    """One block of every layer, as raw bytes (the runs the connector moves)."""
    w = conn._worker
    return b"".join(_page(t, w.layout.layers[i], block_id) for i, t in enumerate(w._kv.values()))


def _page(t, runs, b):
    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    base = runs.base - storage.data_ptr() + b * runs.stride
    return b"".join(bytes(whole[base + o: base + o + runs.run_bytes].numpy()) for o in runs.runs)


def fill_blocks(conn, block_ids, seed):
    """What attention would have written: random bytes in these blocks of every layer."""
    g = torch.Generator().manual_seed(seed)
    w = conn._worker
    for i, t in enumerate(w._kv.values()):
        runs = w.layout.layers[i]
        storage = t.untyped_storage()
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        for b in block_ids:
            base = runs.base - storage.data_ptr() + b * runs.stride
            for o in runs.runs:
                whole[base + o: base + o + runs.run_bytes] = torch.randint(0, 256, (runs.run_bytes,), generator=g,
                                                                           dtype=torch.uint8)


def step(sched, conn, out, req_ids=(), eos=False, finished_recving=None, partial=()):
    """One engine step: the worker's connector calls around a forward that does nothing, then
    the scheduler's update (requests in `partial` are mid-prefill: no token sampled). Returns
    the EngineCoreOutputs."""
    md = out.kv_connector_metadata
    conn.bind_connector_metadata(md)
    conn.start_load_kv(None)
    conn.wait_for_save()
    sending, recving = conn.get_finished(out.finished_req_ids)
    if finished_recving:
        recving = (recving or set()) | finished_recving
    errors = conn.get_block_ids_with_load_errors()
    worker_meta = conn.build_connector_worker_meta()
    conn.clear_connector_metadata()
    ids = [r for r in req_ids if r in out.num_scheduled_tokens]
    mro = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[] if r in partial else [EOS if eos else 7] for r in ids], logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
        kv_connector_output=KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                              invalid_block_ids=errors, kv_connector_worker_meta=worker_meta),
    )
    return sched.update_from_output(out, mro), errors


def schedule_new(sched, limit=10.0):
    """schedule() until a request is scheduled (the connector may answer "ask me again" while
    its lookup is in flight: the first one also connects)."""
    t0 = time.monotonic()
    while True:
        out = sched.schedule()
        if out.scheduled_new_reqs or time.monotonic() - t0 > limit:
            return out
        # As the engine does: every schedule() is answered by an update_from_output().
        sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
        time.sleep(0.005)


def prefill(model_dir, endpoint, tokens, rid="p", seed=1, extra=None):
    """A producer instance computes `tokens` (max_tokens=1) and stores them; returns
    (kv_transfer_params, {block index: bytes}, connector)."""
    vc = vllm_config(model_dir, "kv_producer", {"endpoint": endpoint, **(extra or {})})
    sched, conn = scheduler(vc), worker(vc)
    req = request(rid, tokens)
    sched.add_request(req)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {rid: len(tokens)}
    blocks = list(out.scheduled_new_reqs[0].block_ids[0])
    fill_blocks(conn, blocks, seed)
    content = {i: block_bytes(conn, b) for i, b in enumerate(blocks)}
    outputs, _ = step(sched, conn, out, [rid], eos=True)
    params = next(o.kv_transfer_params for eo in outputs.values() for o in eo.outputs if o.request_id == rid)
    # The request finished; its blocks stay with the scheduler until the store is reported done.
    assert rid in sched.requests, "blocks are held while the store runs"
    for _ in range(200):
        if rid not in sched.requests:
            break
        time.sleep(0.01)
        step(sched, conn, sched.schedule())
    assert rid not in sched.requests, "the store finished and the blocks were freed"
    return params, content, conn


def test_connector_loads_from_its_configuration(model_dir, server):
    vc = vllm_config(model_dir, "kv_both", {"endpoint": server.endpoint})
    c = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.SCHEDULER,
                                            kv_cache_config=kv_cache_config())
    assert isinstance(c, PrefixdConnector)
    ns = c._sched.namespaces[0]
    assert "bfloat16" in ns and "bs16" in ns and "tp0of1" in ns and "sha256_cbor" in ns
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config keys"):
        PrefixdConnector(vllm_config(model_dir, "kv_both", {"endpont": "x"}), KVConnectorRole.SCHEDULER,
                         kv_cache_config())
    with pytest.raises(ValueError, match="not an http"):
        PrefixdConnector(vllm_config(model_dir, "kv_both", {"endpoint": "127.0.0.1:50051"}),
                         KVConnectorRole.SCHEDULER, kv_cache_config())
    c.shutdown()


def test_chunk_keys_are_vllms_block_hashes_and_match_prefixctl(tmp_path):
    """With sha256_cbor and PYTHONHASHSEED, vLLM's block hashes at chunk ends are what
    `prefixctl keys` prints (and the connector keys chunks by vLLM's hashes, never its own)."""
    from prefixd.vllm import chunks

    tokens = [(i * 7919) % 4000 for i in range(1000)]
    r = request("k", tokens)
    plan = chunks.plan(r.block_hashes, len(r.block_hashes), 16)
    assert [c.key for c in plan[:3]] == [bytes(r.block_hashes[i]) for i in (15, 31, 47)]
    assert plan[-1].key == bytes(r.block_hashes[61]) and plan[-1].blocks == 14, "the tail chunk"
    prefixctl = REPO / "target" / "debug" / "prefixctl"
    if not prefixctl.exists():
        subprocess.run(["cargo", "build", "--quiet", "-p", "prefixd-client", "--bin", "prefixctl"], cwd=REPO,
                       check=True)
    (tmp_path / "t.txt").write_text(" ".join(map(str, tokens)))
    out = subprocess.run([str(prefixctl), "keys", "--tokens", str(tmp_path / "t.txt"), "--hash-seed", SEED],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [c.key.hex() for c in plan if c.blocks == 16]
    assert prefixd.chunk_keys(tokens, seed=SEED) == [c.key for c in plan if c.blocks == 16]


def test_prefill_stores_and_decode_loads_the_whole_prompt(model_dir, server):
    """P computes a 300-token prompt (18 full blocks: a full chunk and a 2-block tail) and stores
    it; D's real Scheduler gets 288 tokens matched (all but the last partial block) and D's
    worker fills exactly those blocks with P's bytes."""
    tokens = [(i * 31 + 5) % 4000 for i in range(300)]
    params, content, _ = prefill(model_dir, server.endpoint, tokens, rid="p1", seed=11)
    assert params == {"prefixd": {"endpoint": server.endpoint, "chunks": 2}}

    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint})
    sched, conn = scheduler(vc), worker(vc)
    req = request("d1", tokens, max_tokens=4, params=params)
    sched.add_request(req)
    out = schedule_new(sched)
    new = out.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 288, "everything but the last partial block came from prefixd"
    assert out.num_scheduled_tokens["d1"] == 12
    md = out.kv_connector_metadata
    assert [len(ids) for ids in md.loads[0].block_ids] == [16, 2]
    blocks = new.block_ids[0]
    step(sched, conn, out, ["d1"])
    for i in range(18):
        assert block_bytes(conn, blocks[i]) == content[i], f"block {i} differs from what P computed"
    assert sched.connector_prefix_cache_stats is not None
    conn.shutdown()


def test_a_prefill_chunked_over_steps_stores_every_chunk_in_order(model_dir, server):
    """A 600-token prompt prefilled 256 tokens a step: each step's finished chunk is stored
    while the engine goes on (background puts, collected each step, a request's in order: each
    extends the one before), and the decode gets all 37 full blocks, byte for byte."""
    tokens = [(i * 13 + 7) % 4000 for i in range(600)]
    vc = vllm_config(model_dir, "kv_producer", {"endpoint": server.endpoint}, batched_tokens=256)
    sched, conn = scheduler(vc), worker(vc)
    sched.add_request(request("pc", tokens))
    content, stores, params, rounds = {}, [], None, 0
    out = sched.schedule()
    while "pc" in sched.requests and rounds < 300:
        rounds += 1
        n = out.num_scheduled_tokens.get("pc", 0)
        partial = ()
        if n:
            # schedule() has already counted this step's tokens as computed.
            done = sched.requests["pc"].num_computed_tokens
            blocks = list(sched.kv_cache_manager.get_block_ids("pc")[0])
            first, last = (done - n) // BLOCK, done // BLOCK
            fill_blocks(conn, blocks[first:last], 100 + rounds)
            content.update({i: block_bytes(conn, blocks[i]) for i in range(first, last)})
            partial = ("pc",) if done < len(tokens) else ()
        if out.kv_connector_metadata is not None:
            stores += [len(s.keys) for s in out.kv_connector_metadata.stores]
        outputs, _ = step(sched, conn, out, ["pc"], eos=True, partial=partial)
        for eo in outputs.values():
            for o in eo.outputs:
                if o.request_id == "pc" and o.kv_transfer_params:
                    params = o.kv_transfer_params
        time.sleep(0.005)
        out = sched.schedule()
    assert "pc" not in sched.requests, "every store committed and the blocks were freed"
    assert stores == [1, 1, 1], f"one chunk a step as each was finished: {stores}"
    assert params == {"prefixd": {"endpoint": server.endpoint, "chunks": 3}}
    assert conn._worker.stats().get("stored_chunks") == 3
    conn.shutdown()
    decode_reads(model_dir, server.endpoint, tokens, params, "dc", 592, [content[i] for i in range(37)])


def decode_reads(model_dir, endpoint, tokens, params, rid, computed, content):
    """A consumer instance schedules `tokens` with the prefill's `params`: `computed` tokens
    come from prefixd, and its first len(content) blocks then hold exactly those bytes."""
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": endpoint})
    sched, conn = scheduler(vc), worker(vc)
    sched.add_request(request(rid, tokens, params=params))
    out = schedule_new(sched)
    assert out.scheduled_new_reqs[0].num_computed_tokens == computed
    blocks = out.scheduled_new_reqs[0].block_ids[0]
    step(sched, conn, out, [rid])
    assert [block_bytes(conn, blocks[i]) for i in range(len(content))] == content
    conn.shutdown()


def test_prompt_shorter_than_a_chunk_crosses_whole(model_dir, server):
    """The seed's benchmark: 128-token prompts, shorter than one chunk. All 8 blocks cross;
    vLLM recomputes only the last token."""
    tokens = [(i * 17 + 3) % 4000 for i in range(128)]
    params, content, _ = prefill(model_dir, server.endpoint, tokens, rid="p2", seed=12)
    assert params["prefixd"]["chunks"] == 1
    decode_reads(model_dir, server.endpoint, tokens, params, "d2", 127, [content[i] for i in range(8)])


def test_decode_waits_for_announced_chunks_then_recomputes(model_dir, server):
    """D learns from P's kv_transfer_params that 2 chunks are coming; while they are not there,
    the scheduler is asked again (None: the request waits, nothing stalls); after pd_wait_ms it
    takes what is there (here nothing) and recomputes."""
    tokens = [(i * 13 + 1) % 4000 for i in range(300)]
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint, "pd_wait_ms": 300})
    sched = scheduler(vc)
    t0 = time.monotonic()  # the wait counts from when the connector first sees the request
    sched.add_request(request("d3", tokens, params={"prefixd": {"endpoint": server.endpoint, "chunks": 2}}))
    out = sched.schedule()
    assert not out.num_scheduled_tokens, "the request waits for the announced chunks"
    while not out.num_scheduled_tokens:
        assert time.monotonic() - t0 < 5
        sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
        # The engine loop comes back far more often than the connector retries its lookup:
        # every call in between must still say "wait" (once, a call there let the miss through).
        time.sleep(0.0005)
        out = sched.schedule()
    assert time.monotonic() - t0 >= 0.3
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert out.num_scheduled_tokens["d3"] == 300
    assert sched.connector._sched.counters.snapshot().get("pd_incomplete") == 1
    sched.connector.shutdown()


def lookup_calls(srv):
    """Lookup RPCs the sidecar has answered (its Prometheus counter)."""
    text = urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prefixd_requests_total{") and 'op="lookup"' in line)


def sessions(srv):
    """Client sessions the sidecar holds (its Prometheus gauge)."""
    text = urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("prefixd_sessions "))


def test_both_halves_connect_as_vllm_builds_them_not_on_the_first_request(model_dir):
    """A process's first connect (about a second per engine on 2x H200, from the sidecar's log).
    Made on the first request, it stalled the prefill's and then the decode's engine loop
    under the seed benchmark's first burst: each of its first 100 requests took 2.0 s to its
    first token (2026-11-30). The scheduler (which looks up) and the worker connect as vLLM
    builds them, before any request."""
    srv = Server("--host-pool", "64MiB")
    try:
        assert sessions(srv) == 0
        vc = vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint})
        sched = scheduler(vc)
        assert sessions(srv) == 1, "the scheduler connected when vLLM built it"
        conn = worker(vc)
        assert sessions(srv) == 2, "the worker connected when vLLM registered its KV caches"
        assert sched.connector._sched.counters.snapshot().get("connects") == 1
        assert conn._worker.counters.snapshot().get("connects") == 1
        sched.connector.shutdown()
        conn.shutdown()
    finally:
        srv.stop()


def test_decode_waiting_for_the_prefill_is_answered_when_it_commits(model_dir):
    """D's request arrives before P has stored anything (under load P's stores run behind its
    responses). D's lookup waits on the sidecar for the announced chunks and is answered as soon
    as P commits them: a couple of lookup calls, not one every few milliseconds. (On 2x H200 the
    polling engine process's lookups queued for over 100 ms behind its busy loop.)"""
    srv = Server("--host-pool", "64MiB")
    try:
        tokens = [(i * 37 + 9) % 4000 for i in range(300)]
        params = {"prefixd": {"endpoint": srv.endpoint, "chunks": 2}}
        vc = vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint, "pd_wait_ms": 5000})
        sched = scheduler(vc)
        before = lookup_calls(srv)
        sched.add_request(request("d9", tokens, params=params))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:  # the engine loop keeps asking while P computes
            out = sched.schedule()
            assert not out.num_scheduled_tokens, "nothing stored yet: the request waits"
            sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
            time.sleep(0.001)
        prefill(model_dir, srv.endpoint, tokens, rid="p9", seed=19)
        stored = time.monotonic()
        out = sched.schedule()
        while not out.num_scheduled_tokens:
            assert time.monotonic() - stored < 2, "the waiting lookup was not answered when P committed"
            sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
            time.sleep(0.001)
            out = sched.schedule()
        answered = time.monotonic() - stored
        assert out.scheduled_new_reqs[0].num_computed_tokens == 288
        # One waiting lookup, one lease after it; polling every 5 ms made over 60 in 0.3 s.
        calls = lookup_calls(srv) - before
        assert calls <= 3, f"{calls:.0f} lookup calls for one waiting request"
        assert answered < 0.5, f"answered {answered:.3f} s after P committed"
        assert "pd_incomplete" not in sched.connector._sched.counters.snapshot()
        sched.connector.shutdown()
    finally:
        srv.stop()


def test_a_pending_lookup_holds_the_engine_loop_once_at_most(model_dir, server):
    """The engine asks about a waiting request every step. The connector may wait for its lookup
    (up to lookup_inline_ms) once per request, never on every call: that cost 8.4 ms per step at
    100 requests/s in bench/vllm/sched_cost.py, once lookups could stay pending for a whole P/D
    wait."""
    tokens = [(i * 41 + 3) % 4000 for i in range(300)]
    vc = vllm_config(model_dir, "kv_consumer",
                     {"endpoint": server.endpoint, "pd_wait_ms": 2000, "lookup_inline_ms": 20})
    sched = scheduler(vc)
    sched.connector.get_kv_connector_stats = lambda: None  # keep the counters for this test
    sched.add_request(request("d11", tokens, params={"prefixd": {"endpoint": server.endpoint, "chunks": 2}}))
    t0, calls = time.monotonic(), 0
    while time.monotonic() - t0 < 0.5:
        out = sched.schedule()
        assert not out.num_scheduled_tokens, "the announced chunks never come: the request waits"
        sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
        calls += 1
        time.sleep(0.001)
    spent = sched.connector._sched.scheduler_seconds
    assert calls > 50, f"only {calls} engine steps in 0.5 s"
    assert spent < 0.2, f"{spent:.3f} s of the engine loop spent in the connector over {calls} steps"
    sched.connector.shutdown()


def test_malformed_kv_transfer_params_are_no_announcement(model_dir, server):
    """kv_transfer_params come in the request's JSON, which any client can write (vLLM checks
    only that it is an object): what the connector cannot read is no announcement (a bad count
    once raised in the engine loop)."""
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint, "pd_wait_ms": 100})
    sched = scheduler(vc)
    bad = [{"prefixd": {"endpoint": server.endpoint, "chunks": "many"}}, {"prefixd": {"chunks": -3}},
           {"prefixd": {"endpoint": 5, "chunks": 1.5}}, {"prefixd": [1, 2]}, {"prefixd": {"chunks": True}}]
    for i, params in enumerate(bad):
        rid = f"bad{i}"
        sched.add_request(request(rid, [(j * 13 + i) % 4000 for j in range(40)], params=params))
        out = schedule_new(sched)
        assert out.num_scheduled_tokens.get(rid) == 40, f"{params!r}: computed here, nothing to wait for"
        sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
    sched.connector.shutdown()


def test_prefixd_down_means_recompute(model_dir):
    """No sidecar at the endpoint: lookups miss, loads and stores fail quietly, vLLM computes."""
    dead = "http://127.0.0.1:9"
    vc = vllm_config(model_dir, "kv_both", {"endpoint": dead, "reconnect_s": 0.05})
    sched, conn = scheduler(vc), worker(vc)
    sched.add_request(request("x", list(range(300)), max_tokens=1))
    out = schedule_new(sched)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert out.num_scheduled_tokens["x"] == 300
    fill_blocks(conn, out.scheduled_new_reqs[0].block_ids[0], 3)
    outputs, errors = step(sched, conn, out, ["x"], eos=True)
    assert not errors
    for _ in range(100):  # the failed store still releases the blocks
        if "x" not in sched.requests:
            break
        time.sleep(0.01)
        step(sched, conn, sched.schedule())
    assert "x" not in sched.requests
    counts = {**sched.connector._sched.counters.snapshot(), **conn._worker.counters.snapshot()}
    assert counts.get("connect_failed", 0) >= 1
    assert counts.get("lookup_failed", 0) + counts.get("store_unavailable", 0) >= 1
    conn.shutdown()


def test_expired_lease_is_a_load_error_and_vllm_recomputes(model_dir, tmp_path):
    """The lease the scheduler took has run out by the time the worker would read: the blocks
    are reported failed, and with the recompute policy vLLM computes them itself."""
    srv = Server("--host-pool", "64MiB", "--lease-ttl", "1s")
    try:
        tokens = [(i * 29 + 7) % 4000 for i in range(300)]
        params, _, _ = prefill(model_dir, srv.endpoint, tokens, rid="p4", seed=14)
        vc = vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint})
        sched, conn = scheduler(vc), worker(vc)
        sched.add_request(request("d4", tokens, params=params))
        out = schedule_new(sched)
        assert out.scheduled_new_reqs[0].num_computed_tokens == 288
        time.sleep(1.2)  # past the lease (the worker stops reading 0.5 s before its end)
        _, errors = step(sched, conn, out, ["d4"])
        assert len(errors) == 18
        assert sched.requests["d4"].num_computed_tokens == 0, "vLLM rolled back to recompute"
        assert conn._worker.counters.snapshot().get("lease_expired") == 1
        # vLLM asks the connector again; offering the same load again would loop on a source
        # that keeps failing (the remote path did on the GPU machine): the prompt is recomputed.
        conn.shutdown()
    finally:
        srv.stop()


def test_a_timed_out_lookup_leaks_no_lease(model_dir):
    """A lookup that answers after its deadline counts as a miss; the lease its late answer
    carries is released when it comes (it once stayed until its TTL, pinning the chunks and
    holding a draining sidecar)."""
    srv = Server("--host-pool", "64MiB")
    try:
        tokens = [(i * 11 + 2) % 4000 for i in range(300)]
        params, _, _ = prefill(model_dir, srv.endpoint, tokens, rid="p7", seed=17)
        vc = vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint, "lookup_timeout_ms": 0})
        sched = scheduler(vc)
        sched.connector._sched.local.get()  # connected before the sidecar stalls
        # A stalled sidecar makes the lookup late for certain (lookups no longer wait for the
        # engine's GIL, so an idle one can answer before the scheduler first asks).
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            sched.add_request(request("d7", tokens))
            out = schedule_new(sched)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert out.num_scheduled_tokens["d7"] == 300, "the late lookup counted as a miss"
        assert sched.connector._sched.counters.snapshot().get("lookup_timeout") == 1
        with prefixd.Client(srv.endpoint, device=None) as c:
            for _ in range(200):
                if c.stats()["active_leases"] == 0:
                    break
                time.sleep(0.01)
            assert c.stats()["active_leases"] == 0, "the late answer's lease was released"
        sched.connector.shutdown()
        assert srv.stop() == 0, "prefixd drained at once"
    finally:
        srv.stop()


def test_remote_sidecar_over_the_active_message_path(model_dir, server):
    """Across nodes: D's connector pulls from the sidecar P named (forced onto the remote path:
    active messages over tcp), asynchronously; vLLM waits for it and then schedules the rest."""
    tokens = [(i * 23 + 9) % 4000 for i in range(520)]
    params, content, _ = prefill(model_dir, server.endpoint, tokens, rid="p5", seed=15)
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint, "force_remote": True})
    sched, conn = scheduler(vc), worker(vc)
    sched.add_request(request("d5", tokens, params=params))
    t0 = time.monotonic()
    while sched.requests["d5"].status != RequestStatus.WAITING_FOR_REMOTE_KVS:
        assert time.monotonic() - t0 < 10, "the remote lookup never answered"
        out = sched.schedule()
        assert not out.num_scheduled_tokens, "an asynchronous load: nothing computed yet"
        if sched.requests["d5"].status != RequestStatus.WAITING_FOR_REMOTE_KVS:
            step(sched, conn, out)
            time.sleep(0.005)
    blocks = list(sched.kv_cache_manager.get_blocks("d5").get_block_ids()[0])
    step(sched, conn, out)
    for _ in range(500):
        out = sched.schedule()
        if out.num_scheduled_tokens:
            break
        step(sched, conn, out)
        time.sleep(0.01)
    assert out.num_scheduled_tokens["d5"] == 520 - 512
    step(sched, conn, out, ["d5"])
    for i in range(32):
        assert block_bytes(conn, blocks[i]) == content[i], f"block {i}"
    assert conn._worker.counters.snapshot().get("remote_loads") == 1
    conn.shutdown()


def run_until_scheduled(sched, conn, rid, limit=10.0):
    """Engine steps until `rid` gets tokens to compute (after a load, synchronous or not)."""
    t0 = time.monotonic()
    while True:
        out = sched.schedule()
        if rid in out.num_scheduled_tokens:
            return out
        assert time.monotonic() - t0 < limit, f"{rid} was never scheduled"
        step(sched, conn, out)
        time.sleep(0.005)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_blocks_in_vllms_own_prefix_cache_are_not_moved_again(model_dir, server, remote):
    """D already holds a prompt's first two chunks in its own prefix cache (an earlier request
    loaded them): the next request with that prefix moves only the chunks past it. On 2x H200
    across nodes every chunk was fetched again into a scratch block, 9 bytes in 10 of the
    prefix-reuse run's tcp traffic (2026-11-30)."""
    tokens = [(i * 41 + 3) % 4000 for i in range(812)]  # 50 full blocks: chunks of 16, 16, 16, 2
    params, content, _ = prefill(model_dir, server.endpoint, tokens, rid=f"p8{remote}", seed=18)
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint, "force_remote": remote})
    sched, conn = scheduler(vc), worker(vc)
    counters = conn._worker.counters

    sched.add_request(request("d8a", tokens[:520], params=params))  # 32 full blocks: 2 chunks
    out = run_until_scheduled(sched, conn, "d8a")
    assert out.num_scheduled_tokens["d8a"] == 8
    step(sched, conn, out, ["d8a"], eos=True)
    assert "d8a" not in sched.requests, "finished: its blocks go to D's prefix cache"
    before = counters.snapshot()

    sched.add_request(request("d8b", tokens, max_tokens=4, params=params))
    out = run_until_scheduled(sched, conn, "d8b")
    assert out.num_scheduled_tokens["d8b"] == 12, "all but the last partial block: 512 local, 288 loaded"
    step(sched, conn, out, ["d8b"])
    blocks = list(sched.kv_cache_manager.get_blocks("d8b").get_block_ids()[0])
    after = counters.snapshot()
    if remote:
        moved = after["remote_loaded_bytes"] - before["remote_loaded_bytes"]
    else:
        moved = after["loaded_bytes"] - before["loaded_bytes"]
    assert moved == 18 * conn._worker.layout.block_bytes, "only blocks 32..49 moved"
    for i in range(50):
        assert block_bytes(conn, blocks[i]) == content[i], f"block {i}"
    conn.shutdown()


def test_a_remote_sidecar_that_does_not_answer_never_stalls_the_engine_loop(model_dir, server):
    """The prefill's sidecar, on another node, accepts connections and never answers (a hung
    node). Connecting to it takes the whole call timeout; it once did so inside the engine loop,
    every reconnect interval. Now the connect runs on a thread: no engine step waits for it, and
    after the P/D wait the request is computed here."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        remote = f"http://127.0.0.1:{silent.getsockname()[1]}"
        vc = vllm_config(model_dir, "kv_consumer",
                         {"endpoint": server.endpoint, "pd_wait_ms": 500, "timeout_s": 5.0})
        sched = scheduler(vc)
        tokens = [(i * 7 + 1) % 4000 for i in range(300)]
        t0 = time.monotonic()
        sched.add_request(request("d9", tokens, params={"prefixd": {"endpoint": remote, "chunks": 2}}))
        slowest = time.monotonic() - t0  # the engine adds requests between its steps
        while True:
            s0 = time.monotonic()
            out = sched.schedule()
            slowest = max(slowest, time.monotonic() - s0)
            if "d9" in out.num_scheduled_tokens:
                break
            assert time.monotonic() - t0 < 8, "the request never went ahead"
            sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
            time.sleep(0.002)
        # A step takes about a millisecond; the connect, 5 s. The margin is for a loaded machine.
        assert slowest < 1.0, f"an engine step (or adding the request) took {slowest * 1000:.0f} ms"
        assert out.num_scheduled_tokens["d9"] == 300, "computed here"
        assert 0.4 < time.monotonic() - t0 < 4.0, "after the P/D wait, not the 5 s connect"
        sched.connector.shutdown()
    finally:
        silent.close()


def test_failed_remote_load_is_recomputed_not_retried(model_dir, server):
    """An asynchronous (remote) load fails while the lookup still hits: vLLM moves the request
    back to waiting and asks the connector again. The connector must answer 0 (recompute) rather
    than offer the same load again: on 2x H200 a broken remote data path looped one request
    forever. The failure is injected where the worker reaches the remote sidecar's data path."""
    tokens = [(i * 19 + 4) % 4000 for i in range(300)]
    params, _, _ = prefill(model_dir, server.endpoint, tokens, rid="p6", seed=16)
    vc = vllm_config(model_dir, "kv_consumer", {"endpoint": server.endpoint, "force_remote": True})
    sched, conn = scheduler(vc), worker(vc)

    def broken(endpoint):
        raise ConnectionError(f"data path to {endpoint} is down")

    conn._worker._remote_client = broken
    sched.add_request(request("d6", tokens, params=params))
    loads = 0
    for _ in range(500):
        out = sched.schedule()
        loads += len(out.kv_connector_metadata.loads)
        if out.num_scheduled_tokens:
            break
        step(sched, conn, out)
        time.sleep(0.005)
    assert loads == 1, "one load, then recompute"
    assert out.num_scheduled_tokens.get("d6") == 300, "the whole prompt recomputed"
    conn.shutdown()


def test_sidecar_restart_is_survived(model_dir, tmp_path):
    """prefixd restarts: the connector's session is gone; the client connects again by itself
    and the lookups hit again."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = Server("--host-pool", "64MiB")
    srv.stop()
    srv = _server_on(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        vc = vllm_config(model_dir, "kv_consumer", {"endpoint": endpoint, "reconnect_s": 0.1})
        sched = scheduler(vc)
        tokens = [(i * 3 + 2) % 4000 for i in range(300)]
        sched.add_request(request("r1", tokens))
        assert schedule_new(sched).scheduled_new_reqs[0].num_computed_tokens == 0  # nothing stored yet
        srv.stop()
        srv = _server_on(port)
        prefill(model_dir, endpoint, tokens, rid="p6", seed=16)
        hit = 0
        for i in range(50):
            sched.add_request(request(f"r2-{i}", tokens))
            out = schedule_new(sched)
            hit = out.scheduled_new_reqs[0].num_computed_tokens if out.scheduled_new_reqs else 0
            if hit:
                break
            time.sleep(0.05)
        assert hit == 288, "the session reconnected by itself (the client retries a call that found it lost)"
    finally:
        srv.stop()


def _server_on(port):
    for _ in range(50):
        try:
            return Server("--host-pool", "64MiB", listen=f"127.0.0.1:{port}")
        except RuntimeError:
            time.sleep(0.1)
    raise RuntimeError(f"no prefixd on port {port}")



class _FakePending:
    def __init__(self, answer):
        self.answer, self.finished = answer, False

    def done(self):
        return self.finished

    def wait(self, timeout):
        return self.finished


class _FakeStoreClient:
    """Stands in for the prefixd client in a unit test of the worker's store bookkeeping (which
    put starts when, what is reported): every put waits until the test finishes it."""

    def __init__(self):
        self.started = []  # (keys, parent, pending)

    def call(self, method, namespace, keys, *rest):
        assert method == "put_paged_start"
        p = _FakePending((len(keys), len(keys), 0))
        self.started.append((keys, rest[3], p))
        return p

    def take(self, pending):
        if isinstance(pending.answer, Exception):
            raise pending.answer
        return pending.answer

    def close(self):
        pass


def test_stores_go_in_order_per_request_within_the_byte_cap(model_dir, server, monkeypatch):
    """The worker's store bookkeeping, its client replaced: a request's second put starts only
    once its first is done; puts beyond STORE_INFLIGHT_BYTES wait (one always runs); a failed put
    is counted and still lets vLLM free the blocks."""
    from prefixd.vllm import worker as worker_mod
    from prefixd.vllm.connector import PrefixdConnectorMetadata
    from prefixd.vllm.scheduler import StoreSpec

    vc = vllm_config(model_dir, "kv_producer", {"endpoint": server.endpoint})
    conn = worker(vc)
    w = conn._worker
    fake = _FakeStoreClient()
    w.local = fake
    chunk = 16 * w.layout.block_bytes  # one full chunk's bytes
    monkeypatch.setattr(worker_mod, "STORE_INFLIGHT_BYTES", 2 * chunk)
    k = [bytes([i]) * 32 for i in range(8)]

    def save(*specs):
        conn.bind_connector_metadata(PrefixdConnectorMetadata(stores=list(specs)))
        conn.wait_for_save()
        conn.clear_connector_metadata()

    save(StoreSpec("a", [k[0]], None, [list(range(0, 16))]),
         StoreSpec("b", [k[1]], None, [list(range(16, 32))]),
         StoreSpec("c", [k[2]], None, [list(range(32, 48))]))
    assert [s[0] for s in fake.started] == [[k[0]], [k[1]]], "two chunks' bytes in flight at most"
    save(StoreSpec("a", [k[3]], k[0], [list(range(48, 64))]))
    assert len(fake.started) == 2, "a's next put waits for its first (it extends it)"
    sending, _ = conn.get_finished({"a", "b", "c"})
    assert not sending, "nothing is reported before its store is done"

    fake.started[0][2].finished = True  # a's first put commits
    sending, _ = conn.get_finished(set())
    assert not sending, "a still has a put to make"
    assert [s[0] for s in fake.started][2:] == [[k[2]]], "c takes the freed room (it waited first)"
    fake.started[1][2].answer = RuntimeError("reservation expired")
    fake.started[1][2].finished = True  # b's put fails
    fake.started[2][2].finished = True
    sending, _ = conn.get_finished(set())
    assert sending == {"b", "c"}, "a failed store still frees its blocks"
    assert [(s[0], s[1]) for s in fake.started][3:] == [([k[3]], k[0])], "a's second put, after its first"
    fake.started[3][2].finished = True
    sending, _ = conn.get_finished(set())
    assert sending == {"a"}
    stats = w.stats()
    assert stats.get("stored_chunks") == 3 and stats.get("store_failed") == 1

    # With room to spare, a request's two puts of one step still go one after the other.
    monkeypatch.setattr(worker_mod, "STORE_INFLIGHT_BYTES", 100 * chunk)
    save(StoreSpec("d", [k[4]], None, [list(range(0, 16))]), StoreSpec("d", [k[5]], k[4], [list(range(16, 32))]))
    assert [s[0] for s in fake.started][4:] == [[k[4]]]
    fake.started[4][2].finished = True
    conn.get_finished(set())
    assert [(s[0], s[1]) for s in fake.started][5:] == [([k[5]], k[4])]
    fake.started[5][2].finished = True
    assert conn.get_finished({"d"})[0] == {"d"}
    w.local = None
    conn.shutdown()
