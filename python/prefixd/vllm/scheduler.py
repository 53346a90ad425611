"""The scheduler half of the connector: decides what to load and what to store.

It runs inside vLLM's engine loop, so nothing here may stall it:
- Lookups start when a request arrives (`on_new_request`) and run on the prefixd client's own
  runtime (no Python thread, so nothing of theirs competes with the engine loop for the GIL).
  They lease the hit chunks on the local sidecar (leased chunks cannot be evicted or moved before
  they are read). `get_num_new_matched_tokens` waits for a request's first lookup at most
  `lookup_inline_ms` (with the GIL released), otherwise answers "ask me again" (None), and counts
  a lookup still pending after `lookup_timeout_ms` as a miss.
- P/D: a decode request whose prefill announced N chunks (in `kv_transfer_params`) and found
  fewer looks up once more with "wait for N": the sidecar answers the moment the last of them
  commits (or when `pd_wait_ms` runs out), one call instead of polling every few milliseconds.
- Local loads are synchronous in vLLM's terms (the worker queues one kernel on the compute stream
  before the forward), with the lease's chunk addresses in the step's metadata; the lease is
  released when the workers report that step (its output reaches the scheduler only after the
  forward ran), or when the request finishes, or at the lease's TTL.
- Loads from another node's sidecar (named in `kv_transfer_params`) are asynchronous: the worker
  fetches them on a thread and reports them finished.
- Stores are planned per step: every chunk whose blocks are all computed, then the prompt's tail.
  A request that stored anything keeps its blocks (`request_finished` returns True) until the
  workers report its stores done.

Failures are misses: a sidecar that is down, a lookup that times out, a lease that runs out all
end in recomputing, logged once per kind and counted.
"""

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

from . import chunks as chunking
from .config import namespace
from .state import Counters, ReconnectingClient

# Under vLLM's logger, so that its handlers (and level) show the connector's lines too.
log = logging.getLogger("vllm.prefixd")

# A P/D lookup that came back short while the wait has time left (the sidecar cut the wait
# short: its own cap, a call timeout, a sidecar too old to wait) is started again, at most this
# often.
PD_RETRY_S = 0.005
# The longest the sidecar holds a waiting lookup (server/src/service.rs MAX_LOOKUP_WAIT).
LOOKUP_WAIT_CAP_S = 30.0


@dataclass
class LoadSpec:
    """One request's load, as the worker needs it (picklable: it crosses processes)."""

    req_id: str
    # Per chunk: its key, vLLM block ids to fill (a block already computed locally is written to
    # the worker's sink instead: -1), and for local loads its (address, length) in the pools.
    keys: list
    block_ids: list
    locations: list | None
    lease_expires: float  # wall clock; 0 for remote loads
    remote: str | None  # the sidecar to fetch from (None: local, read by address)
    namespace: str


@dataclass
class StoreSpec:
    req_id: str
    keys: list
    parent: bytes | None
    block_ids: list  # per chunk


class _Pending:
    """One request's lookup in flight: a lease per TP rank's namespace on the local sidecar, or a
    lookup on the remote one, each a `prefixd` Pending call (no thread of ours waits in it).
    `result()` gives (hits, leases, locations) as the scheduler uses them."""

    def __init__(self, side, plan, remote, want, wait_ms):
        keys = [c.key for c in plan]
        self.handles = []  # (client, namespace, native Pending)
        self.error = None
        # A remote sidecar not connected yet: (client, lookup arguments) until it is. Its connect
        # runs on a thread: one to a sidecar that does not answer takes the whole call timeout.
        self.connecting = None
        try:
            if remote is not None:
                c = side._remote_client(remote)
                self.connecting = (c, (side.namespaces[0], keys, want, wait_ms))
                self._start_remote()
            else:
                for ns in side.namespaces:
                    self.handles.append((side.local, ns, side.local.call("lease_start", ns, keys, want, wait_ms)))
        except Exception as e:  # unreachable sidecar, lost session: a failed lookup
            self.error = e
            if self.handles:  # leases already asked for (another TP rank's): freed when granted
                threading.Thread(target=_release_later, args=(list(self.handles),), daemon=True).start()

    def _start_remote(self):
        """Starts the remote lookup once its client is connected; False while it is not."""
        if self.connecting is None:
            return True
        c, args = self.connecting
        try:
            if c.get_nowait() is None:
                return False
            self.handles.append((c, None, c.call("lookup_start", *args)))
        except Exception as e:  # unreachable, or lost again: a failed lookup
            self.error = e
        self.connecting = None
        return True

    def done(self):
        if not self._start_remote():
            return False
        return self.error is not None or all(h.done() for _, _, h in self.handles)

    def wait(self, timeout):
        """Waits up to `timeout` seconds (with the GIL released) for every answer; `done()`."""
        deadline = time.monotonic() + timeout
        while not self._start_remote():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        for _, _, h in self.handles:
            if self.error is None and not h.done() and not h.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def result(self, timeout=0.0):
        """(hits, leases, (locations, lease expiry) or None); raises the lookup's error, or
        TimeoutError when it has not answered within `timeout` seconds. Taken once."""
        if self.error is not None:
            raise self.error
        if not self.wait(timeout):
            raise TimeoutError("lookup still pending")
        answers, failure = [], None
        for client, ns, h in self.handles:
            try:
                answers.append((client, ns, client.take(h)))
            except Exception as e:
                failure = failure or e
        self.error = failure or RuntimeError("lookup result already taken")
        if failure is not None:
            for client, ns, a in answers:
                if ns is not None and a[0]:
                    client.release(a[0])
            raise failure
        if answers and answers[0][1] is None:  # remote: hits only
            return answers[0][2], [], None
        leases, hits, located = [], None, None
        for client, ns, (lease_id, chunks, left) in answers:
            if lease_id:
                leases.append((client, lease_id, ns))
            hits = len(chunks) if hits is None else min(hits, len(chunks))
            if located is None:
                located = (chunks, time.time() + left)
        if not hits:
            for client, lease_id, _ns in leases:
                client.release(lease_id)
            return 0, [], None
        return hits, leases, (located[0][:hits], located[1])


def _release_later(handles):
    """Releases the leases of calls nobody will read, as they are granted."""
    for client, ns, h in handles:
        try:
            if ns is not None and h.wait(LOOKUP_WAIT_CAP_S):
                lease_id = client.take(h)[0]
                if lease_id:
                    client.release(lease_id)
        except Exception:
            pass  # failed: no lease (or one that runs out at its TTL)


@dataclass
class _Lookup:
    future: _Pending
    started: float
    chunks: list
    remote: str | None
    expected: int  # chunks the prefill announced (P/D), 0 if none
    first_seen: float  # when the request was first looked up (the P/D wait counts from here)
    wait_ms: float = 0.0  # how long the sidecar may hold this lookup for announced chunks
    waited_inline: bool = False  # the engine loop has waited for it once already
    result: tuple | None = None  # (hits, leases, locations) once consumed
    local: int = 0  # tokens vLLM had computed locally when the match was made
    gave_up: bool = False  # the P/D wait ran out: take what is there


@dataclass
class _Tracked:
    """A request the scheduler plans stores for."""

    request: object
    block_ids: list = field(default_factory=list)
    stored_blocks: int = 0
    stored_chunks: int = 0
    parent: bytes | None = None


def _remote_source(params, cfg):
    """The sidecar named by a prefill instance's kv_transfer_params, when the load must go over
    the remote path (another node's sidecar, or forced); None for a local load."""
    p = (params or {}).get("prefixd") if isinstance(params, dict) else None
    if not isinstance(p, dict):
        return None, 0
    endpoint = p.get("endpoint")
    # From a request's JSON (a client can send its own): anything but a count is none.
    chunks = p.get("chunks")
    expected = chunks if isinstance(chunks, int) and not isinstance(chunks, bool) and chunks > 0 else 0
    if not isinstance(endpoint, str):
        return None, expected
    if cfg.force_remote or endpoint != cfg.advertise:
        return endpoint, expected
    return None, expected


def _timed(method):
    """Adds the method's time to the scheduler time the connector costs (reported in stats)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.scheduler_seconds += time.perf_counter() - t0

    return wrapper


class SchedulerSide:
    def __init__(self, vllm_config, cfg, role_loads, role_stores):
        self.cfg = cfg
        self.block_size = vllm_config.cache_config.block_size
        self.loads_enabled = role_loads
        self.stores_enabled = role_stores
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.namespaces = [namespace(vllm_config, cfg, r, tp) for r in range(tp)]
        self.counters = Counters()
        self.local = ReconnectingClient(cfg, cfg.endpoint, "vllm-scheduler", self.counters, transports="sm,tcp")
        if role_loads:  # only lookups use it
            self.local.connect()
        self._remotes = {}
        self._remotes_lock = threading.Lock()
        self._lookups = {}
        self._loads = {}  # req_id -> LoadSpec, until emitted in metadata
        self._leases = {}  # req_id -> [(client, lease id, namespace)], until the load is read
        self._tracked = {}  # req_id -> _Tracked (producers)
        self._storing = set()  # req ids with at least one store planned
        self._load_planned = set()  # req ids whose load went out (one load per request)
        self.scheduler_seconds = 0.0

    # -- lookups ------------------------------------------------------------------------------

    def _remote_client(self, endpoint):
        with self._remotes_lock:
            c = self._remotes.get(endpoint)
            if c is None:
                c = ReconnectingClient(
                    self.cfg,
                    endpoint,
                    "vllm-scheduler-remote",
                    self.counters,
                    transports=self.cfg.remote_transports or "tcp",
                    force_remote=True,
                )
                self._remotes[endpoint] = c
            return c

    def _release(self, leases):
        for client, lease_id, _ns in leases:
            client.release(lease_id)

    def _start(self, request, first_seen=None):
        params = getattr(request, "kv_transfer_params", None)
        remote, expected = _remote_source(params, self.cfg)
        if not expected and not self.stores_enabled and first_seen is None:
            # A decode instance (kv_consumer) gets its prompts through a P/D proxy: without the
            # prefill's announcement it cannot wait for chunks still being stored.
            self.counters.bump(
                "no_prefill_params",
                f"{request.request_id}: no prefixd kv_transfer_params from a prefill instance "
                f"(got {params!r}); looking up what is there now, without waiting",
            )
        plan = chunking.plan(request.block_hashes, len(request.block_hashes), self.cfg.chunk_blocks)
        if not plan:
            return None
        # A prompt shorter than the one the prefill stored (a prefix of it) can hit only its own
        # chunks: waiting for the rest would only run out the P/D wait.
        expected = min(expected, len(plan))
        now = time.monotonic()
        retry = first_seen is not None
        first_seen = first_seen if retry else now
        # P/D: a request's first lookup answers at once (the engine loop may wait for it
        # briefly: when the prefill's chunks are already there, the request goes this step). If
        # it came back short, the next one asks the sidecar to hold it until the announced chunks
        # are all there, for what is left of the P/D wait: one call, answered the moment the
        # last one commits, which the loop never waits for.
        want = min(expected, len(plan)) if retry else 0
        wait_ms = max(0.0, self.cfg.pd_wait_ms - (now - first_seen) * 1000) if want else 0.0
        pending = _Pending(self, plan, remote, want, int(wait_ms))
        look = _Lookup(pending, now, plan, remote, expected, first_seen, wait_ms=wait_ms)
        self._lookups[request.request_id] = look
        return look

    @_timed
    def on_new_request(self, request):
        if self.loads_enabled:
            self._start(request)
        if self.stores_enabled:
            self._tracked.setdefault(request.request_id, _Tracked(request))

    @_timed
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        if not self.loads_enabled:
            return 0, False
        if request.request_id in self._load_planned:
            # vLLM asks again only after the load we planned failed (its recompute policy
            # rescheduled the request) or the request was preempted. Offering the same hit
            # again would loop on a source that keeps failing (seen on 2x H200 with a broken
            # remote path): the rest is recomputed.
            self.counters.bump(
                "reload_refused",
                f"{request.request_id}: asked again after its load (a failed load or a preemption); recomputing",
            )
            return 0, False
        look = self._lookups.get(request.request_id) or self._start(request)
        if look is None:
            return 0, False
        if look.result is None:
            if not look.future.done():
                waited = (time.monotonic() - look.started) * 1000
                # Only a request's first lookup may hold the engine loop briefly; P/D retries
                # never do, or a step with many waiting requests would stall for
                # lookup_inline_ms each. A lookup the sidecar holds for announced chunks is
                # given that wait on top of the timeout.
                limit = self.cfg.lookup_timeout_ms + look.wait_ms
                if look.expected and look.future.connecting is not None:
                    # The first lookup from a sidecar not connected to yet (its prefill's, on
                    # another node): the P/D wait, not a lookup's, bounds that connect.
                    limit = max(limit, self.cfg.pd_wait_ms)
                if waited < limit and look.started == look.first_seen and not look.waited_inline:
                    # Once per request (the engine asks again every step while it is pending).
                    look.waited_inline = True
                    look.future.wait(self.cfg.lookup_inline_ms / 1000)
                if not look.future.done():
                    if waited < limit:
                        return None, False
                    self.counters.bump("lookup_timeout", f"lookup of {request.request_id} took over "
                                       f"{limit:.0f} ms: counted as a miss")
                    look.result = (0, [], None)
                    # Its answer still comes, with a lease that nobody reads: release it then
                    # (it pinned the chunks until its TTL, and a draining sidecar waited for it).
                    self._release_when_done(look.future)
            if look.result is None:
                try:
                    look.result = look.future.result()
                except Exception as e:
                    self.counters.bump("lookup_failed", f"lookup failed, recomputing: {e}")
                    look.result = (0, [], None)
        # P/D: fewer chunks than the prefill announced, and the wait has time left (the sidecar
        # answered early: a capped wait, or a sidecar that does not wait): ask again, at most
        # every PD_RETRY_S. This runs on every call, not only the one that took the lookup's
        # answer: a call between two retries once let a partial hit through (2x H200).
        hits = look.result[0]
        if look.expected and hits < look.expected and not look.gave_up:
            now = time.monotonic()
            if (now - look.first_seen) * 1000 < self.cfg.pd_wait_ms:
                # The first retry is the waiting lookup: at once. Later ones (a wait the
                # sidecar cut short) at most every PD_RETRY_S.
                if not look.wait_ms or now - look.started >= PD_RETRY_S:
                    self._release(look.result[1])
                    self._start(request, first_seen=look.first_seen)
                return None, False
            look.gave_up = True
            self.counters.bump(
                "pd_incomplete",
                f"{request.request_id}: {hits} of {look.expected} announced chunks after "
                f"{self.cfg.pd_wait_ms:.0f} ms; recomputing the rest",
            )
        hits, leases, located = look.result
        look.local = num_computed_tokens
        blocks = chunking.blocks_hit(look.chunks, hits)
        tokens = blocks * self.block_size
        # vLLM computes at least the last prompt token itself.
        tokens = min(tokens, request.num_tokens - 1)
        new = tokens - num_computed_tokens
        if new <= 0:
            self._forget(request.request_id)
            self.counters.add("lookup_miss_tokens", max(0, request.num_tokens - num_computed_tokens))
            return 0, False
        self.counters.add("lookup_hit_tokens", new)
        return new, look.remote is not None

    @_timed
    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if self.stores_enabled:
            t = self._tracked.setdefault(request.request_id, _Tracked(request))
            t.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens == 0:
            return
        look = self._lookups.pop(request.request_id, None)
        if look is None or look.result is None:
            return
        hits, leases, located = look.result
        block_ids = list(blocks.get_block_ids()[0])
        local_blocks = look.local // self.block_size
        want_blocks = -(-(local_blocks * self.block_size + num_external_tokens) // self.block_size)
        keys, per_chunk, locs = [], [], []
        for i, c in enumerate(look.chunks[:hits]):
            if c.first >= want_blocks:
                break
            if c.first + c.blocks <= local_blocks:
                # Every block of it is in vLLM's own prefix cache: nothing to move. (These were
                # fetched into the sink: in the 2x H200 prefix-reuse run across nodes, 9 of every
                # 10 bytes a request pulled over tcp, 2026-11-30.)
                continue
            ids = [block_ids[b] if local_blocks <= b < want_blocks else -1 for b in range(c.first, c.first + c.blocks)]
            keys.append(c.key)
            per_chunk.append(ids)
            if located is not None:
                locs.append(located[0][i][:2])
        spec = LoadSpec(
            req_id=request.request_id,
            keys=keys,
            block_ids=per_chunk,
            locations=locs if look.remote is None else None,
            lease_expires=located[1] if located is not None else 0.0,
            remote=look.remote,
            namespace=self.namespaces[0],
        )
        self._loads[request.request_id] = spec
        self._load_planned.add(request.request_id)
        if leases:
            self._leases[request.request_id] = leases
        log.info(
            "prefixd: %s loads %d tokens (%d chunks%s; %d announced) after %d local",
            request.request_id,
            num_external_tokens,
            len(keys),
            f" from {look.remote}" if look.remote else "",
            look.expected,
            local_blocks * self.block_size,
        )

    def _forget(self, req_id):
        look = self._lookups.pop(req_id, None)
        if look is not None and look.result is not None:
            self._release(look.result[1])
        elif look is not None:
            self._release_when_done(look.future)

    def _release_when_done(self, pending):
        """Releases the leases of a lookup whose answer is no longer wanted, once it comes (on a
        thread of its own: rare, and an idle engine runs no steps that could do it)."""

        def release():
            try:
                pending.wait(LOOKUP_WAIT_CAP_S)
                self._release(pending.result()[1])
            except Exception:
                pass  # failed or never answered: it holds no lease (or one that runs out)

        threading.Thread(target=release, name="prefixd-late-lease", daemon=True).start()

    # -- stores -------------------------------------------------------------------------------

    def _plan_stores(self, scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        for nr in scheduler_output.scheduled_new_reqs:
            t = self._tracked.get(nr.req_id)
            if t is not None:
                t.block_ids = list(nr.block_ids[0])
        for i, req_id in enumerate(cached.req_ids):
            t = self._tracked.get(req_id)
            new = cached.new_block_ids[i]
            if t is None or new is None:
                continue
            if req_id in cached.resumed_req_ids:
                t.block_ids = list(new[0])
            else:
                t.block_ids.extend(new[0])
        stores = []
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            t = self._tracked.get(req_id)
            if t is None:
                continue
            r = t.request
            computed = r.num_computed_tokens + n
            prompt_blocks = min(r.num_prompt_tokens // self.block_size, len(r.block_hashes))
            done_blocks = min(computed // self.block_size, prompt_blocks, len(t.block_ids))
            plan = chunking.plan(r.block_hashes, prompt_blocks, self.cfg.chunk_blocks)
            keys, ids = [], []
            parent = t.parent
            for c in plan:
                if c.first < t.stored_blocks:
                    continue
                full = c.blocks == self.cfg.chunk_blocks
                if c.last >= done_blocks or not (full or done_blocks == prompt_blocks):
                    break
                keys.append(c.key)
                ids.append(t.block_ids[c.first : c.first + c.blocks])
                t.stored_blocks = c.first + c.blocks
            if keys:
                stores.append(StoreSpec(req_id, keys, parent, ids))
                # The next chunk extends the last full one (a tail chunk is a leaf).
                t.parent = keys[-1]
                t.stored_chunks += len(keys)
                self._storing.add(req_id)
        return stores

    # -- per step -----------------------------------------------------------------------------

    @_timed
    def build_connector_meta(self, scheduler_output):
        from .connector import PrefixdConnectorMetadata

        loads = list(self._loads.values())
        self._loads.clear()
        stores = self._plan_stores(scheduler_output) if self.stores_enabled else []
        self.counters.add("steps")
        return PrefixdConnectorMetadata(loads=loads, stores=stores)

    @_timed
    def update_connector_output(self, connector_output):
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        for req_id in getattr(meta, "loaded", ()) or ():
            self._release(self._leases.pop(req_id, []))

    @_timed
    def request_finished(self, request, block_ids):
        req_id = request.request_id
        self._forget(req_id)
        self._load_planned.discard(req_id)
        for lease in self._leases.pop(req_id, []):
            self._release([lease])
        t = self._tracked.pop(req_id, None)
        delay = req_id in self._storing
        self._storing.discard(req_id)
        params = None
        if t is not None and t.stored_chunks:
            params = {"prefixd": {"endpoint": self.cfg.advertise, "chunks": t.stored_chunks}}
            self.counters.add("announced_chunks", t.stored_chunks)
        elif t is not None and request.num_prompt_tokens >= self.block_size:
            self.counters.bump(
                "finished_unannounced",
                f"{req_id} finished with no chunk planned for storing ({request.num_prompt_tokens} prompt "
                f"tokens, {t.stored_blocks} blocks stored, {len(t.block_ids)} block ids known)",
            )
        return delay, params

    def stats(self):
        """Counts since the last call; `scheduler_seconds` is the time the connector's scheduler
        hooks took (divide by `steps` for the cost per step)."""
        d = self.counters.take()
        if self.scheduler_seconds:
            d["scheduler_seconds"] = self.scheduler_seconds
            self.scheduler_seconds = 0.0
        return d

    def shutdown(self):
        for look in self._lookups.values():
            if look.result is None and look.future.wait(0.2):
                try:
                    self._release(look.future.result()[1])
                except Exception:
                    pass
        self.local.close()
        for c in self._remotes.values():
            c.close()
