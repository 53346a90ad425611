"""The worker half of the connector: moves KV between vLLM's paged cache and prefixd.

- Local loads (`start_load_kv`): one kernel, queued on the compute stream before the forward,
  scatters the leased chunks from prefixd's pools (GPU pool through its CUDA IPC mapping, host
  pool mapped for the device) into the request's blocks. Nothing waits: the stream orders the
  forward after the copy. Blocks vLLM already had are written to a sink instead.
- Remote loads (another node's sidecar): background calls of the prefixd client
  (`get_paged_any_start`: active messages into a staging buffer, then one kernel), started by the
  engine thread with at most REMOTE_INFLIGHT_BYTES in flight, collected once a step and reported
  in `get_finished`. No Python thread of ours: one would need the GIL back from the engine loop
  after its call. A sidecar not connected to yet is connected to on a thread of its own.
- Stores (`wait_for_save`): a store stream waits for the compute stream (GPU-side, no host
  synchronize), and a background call of the prefixd client (`put_paged_start`: no Python
  thread, no GIL) reserves slots, queues the gather kernel on that stream, waits for it and
  commits. The engine's next step never waits for a store; it looks at its stores once a step,
  and the request keeps its blocks until its store is done (`get_finished` reports it).

CPU tensors (vLLM's own allocation on the host, as in the CPU tests) move by direct copies to
and from the mapped host pool, synchronously.

Any failure of a load marks its blocks failed (`get_block_ids_with_load_errors`): vLLM then
recomputes them; it never reads other bytes.
"""

import collections
import hashlib
import logging
import os
import threading
import time

import numpy as np

from . import layout as kvlayout
from .config import namespace
from .state import Counters, ReconnectingClient, Unavailable

# Under vLLM's logger, so that its handlers (and level) show the connector's lines too.
log = logging.getLogger("vllm.prefixd")

# A lease this close to its end is not read any more (the slot could be reused mid-copy).
LEASE_MARGIN_S = 0.5
# Stores are queued on this many CUDA streams, a request always on the same one.
STORE_SHARDS = 4
# Bytes of puts in flight at once (each reserves its chunks' bytes in prefixd until it commits;
# the four store threads this replaced had up to 4 x 32 chunks of 36 MiB in flight). At least
# one put always runs. Puts start when the engine looks (each step), so a step's stores all
# start together: a burst of 100 short prompts is 100 puts of 18 MiB. A request's own puts go
# one at a time, in order: each chunk extends the one before.
STORE_INFLIGHT_BYTES = 4 << 30
# Remote loads in flight at most (each stages its bytes in host memory on the way), in bytes; one
# is always let through.
REMOTE_INFLIGHT_BYTES = 4 << 30


class _Debug:
    """Per-block sha256 of what was stored and loaded (PREFIXD_VLLM_DEBUG_DIR), for checking
    that the decode side reads bit for bit what the prefill side computed. Hashing reads every
    block back (and waits for the streams), so it runs only while a file named `on` exists in
    the directory: a check can switch it on and off around its own requests."""

    def __init__(self, directory, role):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{role}-{os.getpid()}.txt")
        self.switch = os.path.join(directory, "on")
        self.lock = threading.Lock()

    def active(self):
        return os.path.exists(self.switch)

    def write(self, what, key, block_index, digest):
        with self.lock, open(self.path, "a") as f:
            f.write(f"{what} {key.hex()} {block_index} {digest}\n")


class WorkerSide:
    def __init__(self, vllm_config, kv_cache_config, cfg, role_loads, role_stores):
        self.cfg = cfg
        try:
            from vllm.distributed.parallel_state import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        except Exception:  # no distributed state (a unit test building the worker alone)
            rank, size = 0, vllm_config.parallel_config.tensor_parallel_size
        self.namespace = namespace(vllm_config, cfg, rank, size)
        self.num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else None
        self.loads_enabled = role_loads
        self.stores_enabled = role_stores
        self.counters = Counters()
        self.layout = None
        self.local = None
        self._kv = None
        self._sink = None
        self._bounds = None
        self._store_streams = []
        self._remotes = {}
        self._lock = threading.Lock()
        self._errors = set()
        self._recv_done = set()
        self._pending_stores = {}  # req_id -> store jobs not done yet
        self._stored_reqs = set()  # req ids with store jobs, until reported
        self._finished = set()  # finished req ids still waiting for their stores
        self._send_done = set()
        self._timings = []  # (start event, end event, bytes) of queued local loads
        self._loaded = set()  # requests whose local loads this step queued (their leases can go)
        self._store_waiting = collections.OrderedDict()  # req_id -> deque of (spec, shard, stream)
        self._store_running = {}  # req_id -> (spec, shard, native Pending, start time)
        self._remote_waiting = []  # LoadSpecs of remote loads not started yet, in arrival order
        self._remote_running = {}  # req_id -> (spec, client, native Pending, start time, bytes, counts)
        debug_dir = cfg.debug_dir
        self.debug = _Debug(debug_dir, "worker") if debug_dir else None

    # -- setup --------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches):
        import torch

        first = next(iter(kv_caches.values()))
        num_blocks = self.num_blocks
        if num_blocks is None:
            num_blocks = first.shape[0]
        self._kv = kv_caches
        self.layout = kvlayout.kv_layout(kv_caches, num_blocks)
        on_gpu = self.layout.device >= 0
        # Fragments of blocks a load must not touch (vLLM computed them itself) land here.
        self._sink = torch.empty(self.layout.run_bytes, dtype=torch.uint8, device=first.device)
        self._bounds = list(self.layout.bounds) + [(self._sink.data_ptr(), self._sink.numel(), self.layout.device)]
        device = self.layout.device if on_gpu else None
        transports = self.cfg.transports
        self.local = ReconnectingClient(
            self.cfg, self.cfg.endpoint, "vllm-worker", self.counters, transports=transports, device=device
        )
        self.local.connect()  # now, not under the first requests
        if on_gpu:
            try:
                # What the first copy would do (page-lock the mapped host pool, map the GPU
                # pool, load the copy kernel): that copy may be a load inside an engine step.
                t0 = time.perf_counter()
                self.local.call("prepare_device", first.data_ptr())
                log.info("prefixd: device copies prepared in %.0f ms", (time.perf_counter() - t0) * 1000)
            except Exception as e:  # device copies report it too, as failed loads or stores
                log.warning("prefixd: preparing device copies failed: %s", e)
            self._store_streams = [torch.cuda.Stream(device=first.device) for _ in range(STORE_SHARDS)]
        log.info(
            "prefixd: %d layers, %d run(s) of %d bytes per block (%d bytes a block), %s, namespace %s",
            len(self.layout.layers),
            self.layout.runs_per_block,
            self.layout.run_bytes,
            self.layout.block_bytes,
            f"cuda:{device}" if on_gpu else "host memory",
            self.namespace,
        )

    def _table(self, per_chunk_block_ids):
        """Packed fragment addresses and per-chunk counts; block id -1 goes to the sink."""
        parts = []
        for ids in per_chunk_block_ids:
            ids = np.asarray(ids, dtype=np.int64)
            addr = self.layout.fragments(np.where(ids < 0, 0, ids))
            if (ids < 0).any():
                per_block = self.layout.runs_per_block
                mask = np.broadcast_to((ids < 0)[None, :, None], (len(self.layout.layers), len(ids), per_block))
                addr = np.where(mask.reshape(-1), np.uint64(self._sink.data_ptr()), addr)
            parts.append(addr)
        counts = [int(p.size) for p in parts]
        return np.concatenate(parts).astype("<u8").tobytes(), counts

    def _stream(self):
        if self.layout.device < 0:
            return None
        import torch

        return torch.cuda.current_stream().cuda_stream

    # -- loads --------------------------------------------------------------------------------

    def start_load_kv(self, meta):
        if meta is None or self.layout is None:
            return
        for spec in meta.loads:
            if spec.remote is not None:
                self._remote_waiting.append(spec)
            else:
                self._load_local(spec)
        if self._remote_waiting:
            self._poll_remote()

    def _fail(self, spec, kind, message):
        ids = {b for chunk in spec.block_ids for b in chunk if b >= 0}
        with self._lock:
            self._errors.update(ids)
        self.counters.bump(kind, f"{spec.req_id}: {message}; its {len(ids)} blocks will be recomputed")

    def take_loaded(self):
        with self._lock:
            loaded, self._loaded = self._loaded, set()
        return loaded

    def _load_local(self, spec):
        with self._lock:
            self._loaded.add(spec.req_id)  # read or failed: either way the lease is done with
        if time.time() > spec.lease_expires - LEASE_MARGIN_S:
            self._fail(spec, "lease_expired", "the lease on its chunks ran out before the load")
            return
        addrs, counts = self._table(spec.block_ids)
        nbytes = sum(counts) * self.layout.run_bytes
        try:
            stream = self._stream()
            timing = None
            if stream is not None:
                import torch

                timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                timing[0].record()
            self.local.call(
                "scatter",
                [tuple(loc) for loc in spec.locations],
                addrs,
                self.layout.run_bytes,
                self._bounds,
                stream=stream,
                counts=counts,
            )
            if timing is not None:
                timing[1].record()
                with self._lock:
                    self._timings.append((timing[0], timing[1], nbytes))
            self.counters.add("loaded_chunks", len(spec.keys))
            self.counters.add("loaded_bytes", nbytes)
            self.counters.add("loads")
        except Unavailable as e:
            self._fail(spec, "load_unavailable", f"prefixd unreachable ({e})")
            return
        except Exception as e:  # a short read, a bad mapping, a lost session: all misses
            self._fail(spec, "load_failed", f"load failed ({e})")
            return
        if self.debug is not None and self.debug.active():
            self._debug_hash("load", spec.keys, spec.block_ids)

    def _remote_client(self, endpoint):
        with self._lock:
            c = self._remotes.get(endpoint)
            if c is None:
                device = self.layout.device if self.layout.device >= 0 else None
                c = ReconnectingClient(
                    self.cfg,
                    endpoint,
                    "vllm-worker-remote",
                    self.counters,
                    transports=self.cfg.remote_transports or ("cuda_copy,tcp" if device is not None else "tcp"),
                    device=device,
                    force_remote=True,
                )
                self._remotes[endpoint] = c
            return c

    def _poll_remote(self):
        """Collects finished remote loads and starts waiting ones (engine thread only)."""
        for req_id, (spec, client, pending, t0, _n, counts) in list(self._remote_running.items()):
            if pending.done():
                del self._remote_running[req_id]
                self._finish_remote(spec, client, pending, t0, counts)
        inflight = sum(r[4] for r in self._remote_running.values())
        waiting, self._remote_waiting = self._remote_waiting, []
        for spec in waiting:
            # Sized from its block count: the address table is built only for a load that starts.
            nbytes = sum(len(ids) for ids in spec.block_ids) * self.layout.block_bytes
            if self._remote_running and inflight + nbytes > REMOTE_INFLIGHT_BYTES:
                self._remote_waiting.append(spec)
                continue
            try:
                client = self._remote_client(spec.remote)
                if client.get_nowait() is None:  # connecting, on its own thread
                    self._remote_waiting.append(spec)
                    continue
                addrs, counts = self._table(spec.block_ids)
                pending = client.call(
                    "get_paged_any_start", spec.namespace, spec.keys, addrs, self.layout.run_bytes, self._bounds,
                    counts=counts,
                )
            except Exception as e:  # unreachable, a lost session, bad input: the load failed
                self._fail(spec, "remote_load_failed", f"load from {spec.remote} failed ({e})")
                self._remote_done(spec.req_id)
                continue
            self._remote_running[spec.req_id] = (spec, client, pending, time.perf_counter(), nbytes, counts)
            inflight += nbytes

    def _finish_remote(self, spec, client, pending, t0, counts):
        """Books a finished remote load: its blocks past a short read, or all of them after an
        error, are reported failed; the request is reported received either way."""
        try:
            hits = client.take(pending)
            if hits < len(spec.keys):
                missing = type(spec)(**{**spec.__dict__, "block_ids": spec.block_ids[hits:]})
                self._fail(missing, "remote_short_read", f"{hits} of {len(spec.keys)} chunks at {spec.remote}")
            nbytes = sum(counts[:hits]) * self.layout.run_bytes
            self.counters.add("remote_loaded_bytes", nbytes)
            self.counters.add("remote_load_seconds", time.perf_counter() - t0)
            self.counters.add("remote_loads")
            if self.debug is not None and self.debug.active():
                self._debug_hash("load", spec.keys[:hits], spec.block_ids[:hits])
        except Exception as e:
            self._fail(spec, "remote_load_failed", f"load from {spec.remote} failed ({e})")
        finally:
            self._remote_done(spec.req_id)

    def _remote_done(self, req_id):
        with self._lock:
            self._recv_done.add(req_id)

    # -- stores -------------------------------------------------------------------------------

    def wait_for_save(self, meta):
        if meta is None or self.layout is None or not meta.stores:
            return
        with self._lock:
            for spec in meta.stores:
                self._pending_stores[spec.req_id] = self._pending_stores.get(spec.req_id, 0) + 1
                self._stored_reqs.add(spec.req_id)
        streams = {}  # shard -> its stream, made to wait for this step's forward once
        for spec in meta.stores:  # queued in the scheduler's order: first come, first stored
            i = hash(spec.req_id) % STORE_SHARDS
            if i not in streams:
                streams[i] = None
                if self._store_streams:
                    import torch

                    # GPU-side ordering only: later work on the store stream runs after what the
                    # compute stream has queued so far (this step's forward, which wrote the blocks).
                    self._store_streams[i].wait_stream(torch.cuda.current_stream())
                    streams[i] = self._store_streams[i].cuda_stream
            self._store_waiting.setdefault(spec.req_id, collections.deque()).append((spec, i, streams[i]))
        self._poll_stores()

    def _poll_stores(self):
        """Takes the answers of finished puts and starts waiting ones (a request's next put
        once its last one is done; STORE_INFLIGHT_BYTES in flight at most). Engine thread only."""
        for req_id, (spec, shard, pending, t0, nbytes) in list(self._store_running.items()):
            if not pending.done():
                continue
            del self._store_running[req_id]
            try:
                _chunks, stored, skipped = self.local.take(pending)
                self.counters.add("stored_chunks", stored)
                self.counters.add("skipped_chunks", skipped)
                self.counters.add("stored_bytes", nbytes)
                self.counters.add("store_seconds", time.perf_counter() - t0)
                if self.debug is not None and self.debug.active():
                    self._debug_hash("store", spec.keys, spec.block_ids, shard)
            except Exception as e:
                self.counters.bump("store_failed", f"{spec.req_id}: store failed ({e})")
            self._store_done(spec.req_id)
        inflight = sum(r[4] for r in self._store_running.values())
        for req_id in list(self._store_waiting):
            if req_id in self._store_running:
                continue
            jobs = self._store_waiting[req_id]
            spec, shard, stream = jobs[0]
            nbytes = sum(len(ids) for ids in spec.block_ids) * self.layout.block_bytes
            if self._store_running and inflight + nbytes > STORE_INFLIGHT_BYTES:
                break
            jobs.popleft()
            if not jobs:
                del self._store_waiting[req_id]
            try:
                addrs, counts = self._table(spec.block_ids)
                pending = self.local.call(
                    "put_paged_start",
                    self.namespace,
                    spec.keys,
                    addrs,
                    self.layout.run_bytes,
                    self._bounds,
                    spec.parent,
                    stream,
                    counts,
                )
                self._store_running[req_id] = (spec, shard, pending, time.perf_counter(), nbytes)
                inflight += nbytes
            except Unavailable as e:
                self.counters.bump("store_unavailable", f"{spec.req_id}: prefixd unreachable, not stored ({e})")
                self._store_done(spec.req_id)
            except Exception as e:
                self.counters.bump("store_failed", f"{spec.req_id}: store failed ({e})")
                self._store_done(spec.req_id)

    def _store_done(self, req_id):
        with self._lock:
            left = self._pending_stores.get(req_id, 1) - 1
            if left > 0:
                self._pending_stores[req_id] = left
            else:
                self._pending_stores.pop(req_id, None)
                if req_id in self._finished:
                    self._finished.discard(req_id)
                    self._stored_reqs.discard(req_id)
                    self._send_done.add(req_id)

    # -- per step -----------------------------------------------------------------------------

    def get_finished(self, finished_req_ids):
        if self._store_running or self._store_waiting:
            self._poll_stores()
        if self._remote_running or self._remote_waiting:
            self._poll_remote()
        with self._lock:
            for r in finished_req_ids or ():
                if r not in self._stored_reqs:
                    continue
                if self._pending_stores.get(r, 0) == 0:
                    self._stored_reqs.discard(r)
                    self._send_done.add(r)
                else:
                    self._finished.add(r)
            sending, self._send_done = self._send_done, set()
            recving, self._recv_done = self._recv_done, set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self):
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def stats(self):
        done, keep = [], []
        with self._lock:
            for t in self._timings:
                (done if t[1].query() else keep).append(t)
            self._timings = keep
        for start, end, nbytes in done:
            self.counters.add("load_seconds", start.elapsed_time(end) / 1000)
        return self.counters.take()

    def _debug_hash(self, what, keys, per_chunk_block_ids, shard=0):
        """sha256 of every block's bytes (layer-major, as stored), read back from the KV cache."""
        import torch

        if self.layout.device >= 0:
            stream = torch.cuda.current_stream() if what == "load" else self._store_streams[shard]
            stream.synchronize()
        for key, ids in zip(keys, per_chunk_block_ids):
            for j, b in enumerate(ids):
                if b < 0:
                    continue
                h = hashlib.sha256()
                for name, t in self._kv.items():
                    page = _block_bytes(t, self.layout, list(self._kv).index(name), b)
                    h.update(page)
                self.debug.write(what, key, j, h.hexdigest())

    def shutdown(self):
        # Let the stores in flight and waiting finish (each has its own deadline), up to 30 s.
        deadline = time.monotonic() + 30
        while (self._store_running or self._store_waiting) and time.monotonic() < deadline:
            for _spec, _shard, pending, _t0, _n in list(self._store_running.values()):
                pending.wait(0.05)
            self._poll_stores()
        if self.local is not None:
            self.local.close()
        for c in self._remotes.values():
            c.close()


def _block_bytes(t, layout, layer, block):
    """The bytes of one block of one layer, runs in order, as the copies move them."""
    import torch

    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
    runs = layout.layers[layer]
    base = runs.base - storage.data_ptr() + block * runs.stride
    parts = [whole[base + off : base + off + runs.run_bytes] for off in runs.runs]
    return torch.cat(parts).cpu().numpy().tobytes()
