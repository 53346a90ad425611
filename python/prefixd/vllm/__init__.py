"""prefixd inside vLLM: a KV connector that stores prompts' KV in the node's prefixd sidecar and
loads it back instead of recomputing.

One flag turns it on (the whole configuration is one JSON):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PrefixdConnector",
        "kv_connector_module_path": "prefixd.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": "http://127.0.0.1:50051"}}'

Roles: `kv_producer` (a prefill instance) stores, `kv_consumer` (a decode instance) loads,
`kv_both` does both (a prefix cache shared by instances). See `prefixd.vllm.connector` for how
it works and README.md ("prefixd in vLLM") for the whole setup. Importing this package imports
vLLM; `import prefixd` alone does not.
"""

from .connector import PrefixdConnector, PrefixdConnectorMetadata, PrefixdStats

__all__ = ["PrefixdConnector", "PrefixdConnectorMetadata", "PrefixdStats"]
