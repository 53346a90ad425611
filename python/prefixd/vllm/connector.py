"""`PrefixdConnector`: vLLM's `KVConnectorBase_V1`, backed by the node's prefixd sidecar.

Why a `KVConnectorBase_V1` subclass rather than an `OffloadingSpec` for vLLM's
`OffloadingConnector`: the offloading connector is built for one engine spilling its own blocks
to a local tier. Disaggregated serving needs what only the base API gives: the prefill's
response carrying `kv_transfer_params` (which sidecar holds the prompt, how many chunks it
announced), roles that only store or only load, loads from another node's sidecar, holding a
finished request's blocks until its store is done, and reporting failed blocks so that vLLM
recomputes them. vLLM's Mooncake store connector and LMCache take the same route.

vLLM builds one instance per role: the scheduler's (`scheduler.SchedulerSide`) in the engine
process, and one per worker (`worker.WorkerSide`). They share nothing but the metadata below.
"""

import logging
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .config import ConnectorConfig

# Under vLLM's logger, so that its handlers (and level) show the connector's lines too.
log = logging.getLogger("vllm.prefixd")


@dataclass
class PrefixdConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers: loads (`scheduler.LoadSpec`) and stores (`StoreSpec`)."""

    loads: list = field(default_factory=list)
    stores: list = field(default_factory=list)


@dataclass
class PrefixdWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker to scheduler, per step: the requests whose local loads that step queued. The step's
    output reaches the scheduler only after its forward ran, so their leases may be released."""

    loaded: set = field(default_factory=set)

    def aggregate(self, other):
        return PrefixdWorkerMetadata(self.loaded | other.loaded)


@dataclass
class PrefixdStats(KVConnectorStats):
    """Counters of one interval: lookups (hit and miss tokens), loads and stores (chunks, bytes,
    seconds), and every kind of failure (each a miss that vLLM recomputed)."""

    def reset(self):
        self.data = {}

    def aggregate(self, other):
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self):
        d = dict(self.data)
        loads = d.get("loads", 0)
        if loads and "load_seconds" in d:
            d["load_ms_avg"] = round(1000 * d["load_seconds"] / loads, 3)
            if d["load_seconds"]:
                d["load_GBps"] = round(d.get("loaded_bytes", 0) / d["load_seconds"] / 1e9, 1)
        return d

    def is_empty(self):
        return not self.data


class PrefixdConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = vllm_config.kv_transfer_config
        self.cfg = ConnectorConfig.from_extra(tc.kv_connector_extra_config)
        loads, stores = bool(tc.is_kv_consumer), bool(tc.is_kv_producer)
        self._sched = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import SchedulerSide

            self._sched = SchedulerSide(vllm_config, self.cfg, loads, stores)
        else:
            from .worker import WorkerSide

            self._worker = WorkerSide(vllm_config, kv_cache_config, self.cfg, loads, stores)
        log.info(
            "prefixd connector (%s, %s): sidecar %s",
            role.name.lower(),
            tc.kv_role,
            self.cfg.endpoint,
        )

    # A cache, not a hand-off: a request whose KV never arrives is recomputed (vLLM 0.33).
    @property
    def requires_kv_delivery(self):
        return False

    # -- scheduler side -----------------------------------------------------------------------

    def on_new_request(self, request):
        self._sched.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._sched.request_finished(request, block_ids)

    # -- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches):
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        self._worker.start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name):
        # Loads are queued before the forward on its own stream: nothing to wait for here (and
        # this hook does not run inside full CUDA graphs anyway).
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        # Stores are gathered once per step in wait_for_save, after the whole forward.
        return

    def wait_for_save(self):
        self._worker.wait_for_save(self._connector_metadata)

    def get_finished(self, finished_req_ids):
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self):
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self):
        loaded = self._worker.take_loaded()
        return PrefixdWorkerMetadata(loaded) if loaded else None

    # -- both ---------------------------------------------------------------------------------

    def get_kv_connector_stats(self):
        side = self._sched if self._sched is not None else self._worker
        data = side.stats()
        return PrefixdStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return PrefixdStats(data=dict(data or {}))

    def shutdown(self):
        side = self._sched if self._sched is not None else self._worker
        side.shutdown()
