"""prefixd: Python client of the prefixd KV-cache server.

A prefill engine puts the KV cache of a prompt, chunk by chunk, keyed by the prompt's tokens; a
decode engine on another GPU or node gets the longest cached prefix instead of recomputing it.
Tensors move straight from and into their memory (CUDA or host): no staging copies in Python.

    import prefixd, torch
    c = prefixd.Client("http://127.0.0.1:50051", device=0)
    kv = torch.randn(2, 1024, device="cuda")           # 2 full chunks of 256 tokens
    c.put(tokens, kv)                                   # split evenly over the chunks
    out = torch.empty_like(kv)
    hit_tokens = c.get(tokens, out)                     # 512 when both chunks are cached

Keys follow vLLM's block-hash chain (sha256 over CBOR), the same recipe as the Rust client and
prefixctl: `prefixd.chunk_keys(tokens)`.
"""

from ._loader import load_ucx as _load_ucx

_load_ucx()

from ._native import AccessDeniedError, PrefixdError, RetryableError, SessionLostError, __version__  # noqa: E402
from ._native import chunk_keys as _chunk_keys  # noqa: E402
from .client import Client, PutResult  # noqa: E402
from .fragments import Fragments  # noqa: E402


def chunk_keys(tokens, *, seed="0", block_tokens=16, chunk_tokens=256):
    """The 32-byte keys of the full chunks of `tokens` (vLLM's sha256_cbor chain: `seed` is
    vLLM's PYTHONHASHSEED, `block_tokens` its block size)."""
    return [bytes(k) for k in _chunk_keys(list(tokens), seed, block_tokens, chunk_tokens)]


__all__ = [
    "Client",
    "PutResult",
    "Fragments",
    "chunk_keys",
    "PrefixdError",
    "RetryableError",
    "SessionLostError",
    "AccessDeniedError",
    "__version__",
]
