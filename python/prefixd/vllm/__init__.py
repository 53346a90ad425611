"""prefixd inside vLLM: a KV connector that stores prompts' KV in the node's prefixd sidecar and
loads it back instead of recomputing.

One flag turns it on (the whole configuration is one JSON):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PrefixdConnector",
        "kv_connector_module_path": "prefixd.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": "http://127.0.0.1:50051"}}'

Roles: `kv_producer` (a prefill instance) stores, `kv_consumer` (a decode instance) loads,
`kv_both` does both (a prefix cache shared by instances). See `prefixd.vllm.connector` for how
it works and README.md ("prefixd in vLLM") for the whole setup. The connector's names import
vLLM on first use; `import prefixd` and the proxy (`python -m prefixd.vllm.proxy`) never do.
"""

__all__ = ["PrefixdConnector", "PrefixdConnectorMetadata", "PrefixdStats", "PrefixdWorkerMetadata"]


def __getattr__(name):
    # vLLM's factory does getattr(import_module("prefixd.vllm"), "PrefixdConnector").
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'prefixd.vllm' has no attribute {name!r}")
