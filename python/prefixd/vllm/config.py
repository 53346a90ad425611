"""The connector's settings (`kv_connector_extra_config`) and the namespace it derives.

Every setting has a default that works with one sidecar on the node; most users set nothing but
`endpoint`. The namespace is derived, never configured: model, KV-cache dtype and layout, block
size, hash algorithm, and tensor-parallel rank and size, so that engines whose bytes differ never
share them.
"""

import hashlib
import os
from dataclasses import dataclass

# The namespace limit of the server (proto/prefixd.proto).
MAX_NAMESPACE = 256

_DEFAULTS = {
    "endpoint": "http://127.0.0.1:50051",
    "advertise": None,
    "force_remote": False,
    "chunk_blocks": 16,
    "lookup_timeout_ms": 100,
    "lookup_inline_ms": 2,
    "pd_wait_ms": 2000,
    "transports": None,
    "remote_transports": None,
    "tenant": "",
    "timeout_s": 10.0,
    "reconnect_s": 1.0,
    "debug_dir": None,
    "token_file": None,
    "tls_ca": None,
    "tls_cert": None,
    "tls_key": None,
}


@dataclass(frozen=True)
class ConnectorConfig:
    """`endpoint`: this node's sidecar. `advertise`: the endpoint other nodes reach it at (goes
    into `kv_transfer_params`; default `endpoint`). `force_remote`: load from a sidecar named in
    `kv_transfer_params` over the remote path even when it is this node's (tests, benchmarks).
    `chunk_blocks`: blocks per stored chunk (16: 256 tokens at block size 16). `lookup_timeout_ms`:
    after this a pending lookup counts as a miss (a lookup the sidecar holds for announced chunks
    gets `pd_wait_ms` more). `lookup_inline_ms`: how long the scheduler may wait for a request's
    first lookup (once) before it asks vLLM to come back next step. `pd_wait_ms`: how long a
    decode instance waits for chunks its prefill instance announced but has not committed yet
    (the sidecar holds one lookup that long and answers when the last of them commits).
    `transports`: UCX transports of the local session (default cuda_ipc,cuda_copy,sm,tcp with a GPU).
    `remote_transports`: of sessions to other nodes' sidecars (default: tcp, plus cuda_copy with
    a GPU, for UCX to stage device memory). `tenant`: added to the namespace.
    `timeout_s`: of every call. `reconnect_s`: least time between reconnect attempts after a
    failure. `debug_dir`: write the sha256 of every stored and loaded chunk there (or set
    PREFIXD_VLLM_DEBUG_DIR). `token_file`, `tls_ca`, `tls_cert`, `tls_key`: for sidecars that
    check callers (`--auth-file`, `--tls-cert`; https:// endpoints), used with every sidecar
    (default: PREFIXD_TOKEN or PREFIXD_TOKEN_FILE, and PREFIXD_TLS_CA, _CERT, _KEY)."""

    endpoint: str
    advertise: str
    force_remote: bool
    chunk_blocks: int
    lookup_timeout_ms: float
    lookup_inline_ms: float
    pd_wait_ms: float
    transports: str | None
    remote_transports: str | None
    tenant: str
    timeout_s: float
    reconnect_s: float
    debug_dir: str | None
    token_file: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None

    @classmethod
    def from_extra(cls, extra):
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"prefixd connector: unknown kv_connector_extra_config keys {unknown}; "
                f"known: {sorted(_DEFAULTS)}"
            )
        v = {**_DEFAULTS, **extra}
        v["advertise"] = v["advertise"] or v["endpoint"]
        v["debug_dir"] = v["debug_dir"] or os.environ.get("PREFIXD_VLLM_DEBUG_DIR") or None
        for k in ("chunk_blocks",):
            v[k] = int(v[k])
            if v[k] <= 0:
                raise ValueError(f"prefixd connector: {k} must be positive, not {v[k]}")
        for k in ("lookup_timeout_ms", "lookup_inline_ms", "pd_wait_ms", "timeout_s", "reconnect_s"):
            v[k] = float(v[k])
            if v[k] < 0:
                raise ValueError(f"prefixd connector: {k} must not be negative, not {v[k]}")
        if v["timeout_s"] == 0:
            raise ValueError("prefixd connector: timeout_s must be positive")
        for k in ("endpoint", "advertise"):
            if not str(v[k]).startswith(("http://", "https://")):
                raise ValueError(f"prefixd connector: {k} {v[k]!r} is not an http:// or https:// URL")
        v["force_remote"] = bool(v["force_remote"])
        return cls(**v)


def kv_layout(vllm_config):
    """The KV-cache layout name the attention backend uses (vLLM 0.26: NHD/HND; 0.33: resolved
    names such as LBNHC)."""
    cache = vllm_config.cache_config
    resolved = getattr(cache, "get_resolved_kv_cache_layout", None)
    if resolved is not None:
        try:
            return str(resolved())
        except Exception:  # not resolved yet in this process
            pass
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        return str(get_kv_cache_layout())
    except Exception:
        return os.environ.get("VLLM_KV_CACHE_LAYOUT", "NHD")


def namespace(vllm_config, cfg, tp_rank, tp_size):
    """The namespace of one tensor-parallel rank's KV. Incompatible engines get different ones."""
    m = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = cache.cache_dtype if cache.cache_dtype != "auto" else str(m.dtype).removeprefix("torch.")
    parallel = vllm_config.parallel_config
    try:
        geometry = (
            f"L{m.get_num_layers(parallel)}h{m.get_num_kv_heads(parallel)}d{m.get_head_size()}"
        )
    except Exception:
        geometry = "unknown"
    algo = getattr(cache, "prefix_caching_hash_algo", "sha256")
    parts = [
        "vllm",
        str(m.model),
        dtype,
        kv_layout(vllm_config),
        f"bs{cache.block_size}",
        f"cb{cfg.chunk_blocks}",
        geometry,
        algo,
        f"tp{tp_rank}of{tp_size}",
    ]
    if cfg.tenant:
        parts.append(cfg.tenant)
    ns = "|".join(parts)
    if len(ns.encode()) > MAX_NAMESPACE:
        # Keep the readable tail (rank, tenant) and a digest of the whole.
        digest = hashlib.sha256(ns.encode()).hexdigest()[:32]
        ns = f"vllm|{digest}|" + "|".join(parts[-2:] if cfg.tenant else parts[-1:])
    return ns
