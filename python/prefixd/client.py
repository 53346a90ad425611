"""prefixd.Client: one session with a prefixd server."""

import os
import sys
from dataclasses import dataclass

from . import _memory
from ._native import NativeClient


@dataclass(frozen=True)
class PutResult:
    """What a put did: chunks in the request, chunks written, chunks already cached (skipped)."""

    chunks: int
    stored: int
    skipped: int


def _default_device():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.current_device()
    return None


class Client:
    """A session with one prefixd server.

    `endpoint`: the server's gRPC URL. `namespace`: keys live per namespace (e.g. per model and
    KV layout); every call uses this one unless given another. `device`: the CUDA device whose
    tensors this client moves (default: PyTorch's current device when torch is imported and sees
    a GPU, else none: host memory only). `transports`: UCX transports as UCX_TLS (default
    "cuda_ipc,cuda_copy,sm,tcp" with a device, "sm,tcp" without; PREFIXD_TRANSPORTS overrides).
    `seed`, `block_tokens`, `chunk_tokens`: the key recipe, which producers and consumers must
    share (vLLM's PYTHONHASHSEED and block size; prefixd's chunk). `timeout`: seconds for every
    call and transfer.

    Servers that check callers (`--auth-file`, `--tls-cert`): `token` or `token_file` (default:
    PREFIXD_TOKEN, then PREFIXD_TOKEN_FILE) is sent with every call; an `https://` endpoint
    speaks TLS, checked against `tls_ca` (default: the system's roots), with the client
    certificate `tls_cert`/`tls_key` where the server wants one, and `tls_domain` as the name to
    check (default: the endpoint's host). Each defaults to PREFIXD_TLS_CA, _CERT, _KEY, _DOMAIN.

    Data in CUDA tensors: before a put, the current stream of the tensors' device is
    synchronized (work on other streams is the caller's to finish). After a get returns, the
    bytes are in place for any stream.
    """

    def __init__(
        self,
        endpoint="http://127.0.0.1:50051",
        *,
        namespace="default",
        device=None,
        transports=None,
        name="prefixd-python",
        net_devices=None,
        force_remote=False,
        timeout=30.0,
        seed="0",
        block_tokens=16,
        chunk_tokens=256,
        token=None,
        token_file=None,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        tls_domain=None,
    ):
        if device is None:
            device = _default_device()
        if transports is None:
            transports = os.environ.get("PREFIXD_TRANSPORTS") or (
                "cuda_ipc,cuda_copy,sm,tcp" if device is not None else "sm,tcp"
            )
        env = os.environ.get
        if token is None and token_file is None:
            token = env("PREFIXD_TOKEN") or None
            token_file = None if token else (env("PREFIXD_TOKEN_FILE") or None)
        tls = (
            tls_ca or env("PREFIXD_TLS_CA") or None,
            tls_cert or env("PREFIXD_TLS_CERT") or None,
            tls_key or env("PREFIXD_TLS_KEY") or None,
            tls_domain or env("PREFIXD_TLS_DOMAIN") or None,
        )
        self.namespace = namespace
        self.device = device
        self.chunk_tokens = chunk_tokens
        self._c = NativeClient(
            endpoint,
            name,
            transports,
            net_devices,
            bool(force_remote),
            float(timeout),
            str(seed),
            int(block_tokens),
            int(chunk_tokens),
            device,
            token,
            token_file,
            tls,
        )

    # -- session ---------------------------------------------------------------------------

    @property
    def endpoint(self):
        return self._c.endpoint

    @property
    def data_path(self):
        """"rma" for a same-host session (direct reads and writes of the server's pools),
        "active_message" otherwise."""
        return self._c.data_path

    @property
    def transports(self):
        return self._c.transports

    def endpoint_transports(self):
        """The UCX lanes in use, e.g. ['posix/memory', 'cuda_ipc/cuda']."""
        return self._c.endpoint_transports()

    def stats(self):
        """The server's counters and pools, as a dict."""
        return self._c.stats()

    def health(self):
        """True when the server reports SERVING."""
        return self._c.health()

    def close(self):
        """Ends the session (the server also ends idle sessions by itself)."""
        self._c.close()

    @property
    def closed(self):
        return self._c.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else self.data_path
        return f"prefixd.Client({self.endpoint!r}, namespace={self.namespace!r}, {state})"

    # -- keys and lookups ------------------------------------------------------------------

    def keys(self, tokens):
        """The keys of the full chunks of `tokens` (a list of ints or a 1-D integer tensor)."""
        return [bytes(k) for k in self._c.keys(_tokens(tokens))]

    def lookup(self, tokens, *, namespace=None):
        """How many leading tokens of `tokens` are cached, in whole chunks."""
        keys = self.keys(tokens)
        if not keys:
            return 0
        return self._c.lookup(namespace or self.namespace, keys) * self.chunk_tokens

    def lookup_keys(self, keys, *, namespace=None):
        """How many leading chunks of `keys` are cached."""
        return self._c.lookup(namespace or self.namespace, _keys(keys)) if keys else 0

    # -- whole chunks ----------------------------------------------------------------------

    def put(self, tokens, kv, *, namespace=None):
        """Stores the KV of the full chunks of `tokens`. `kv` is one tensor split evenly over
        those chunks, or a list with one tensor per chunk. Chunks already cached are skipped."""
        keys = self.keys(tokens)
        if not keys:
            return PutResult(0, 0, 0)
        return self.put_chunks(keys, kv, namespace=namespace)

    def get(self, tokens, out, *, namespace=None):
        """Reads the longest cached prefix of `tokens` into `out` (one tensor split evenly over
        the full chunks, or one tensor per chunk); returns the number of tokens read. Parts of
        `out` past the hit are left as they were."""
        keys = self.keys(tokens)
        if not keys:
            return 0
        return self.get_chunks(keys, out, namespace=namespace) * self.chunk_tokens

    def put_chunks(self, keys, data, *, parent=None, namespace=None):
        """Stores one buffer per key (`data`: a tensor split evenly, or a list); `parent` is the
        key that keys[0] extends (None for a prompt's first chunk)."""
        keys = _keys(keys)
        bufs = _buffers(data, len(keys), writable=False)
        _memory.synchronize(bufs)
        chunks, stored, skipped = self._c.put_buffers(
            namespace or self.namespace, keys, bufs, bytes(parent) if parent is not None else None
        )
        return PutResult(chunks, stored, skipped)

    def get_chunks(self, keys, out, *, namespace=None):
        """Reads the longest cached prefix of `keys` into `out` (one buffer per key, each the
        chunk's size); returns the number of chunks read."""
        keys = _keys(keys)
        bufs = _buffers(out, len(keys), writable=True)
        return self._c.get_buffers(namespace or self.namespace, keys, bufs)

    # -- paged chunks ----------------------------------------------------------------------

    def put_paged(self, tokens, fragments, *, first_chunk=0, namespace=None):
        """Stores chunks first_chunk .. first_chunk + fragments.chunks of `tokens`, each made of
        its fragments (see `prefixd.Fragments`). CUDA fragments move by one gather kernel into
        the server's pool (same-host sessions); host fragments through a staging buffer."""
        keys = self.keys(tokens)
        end = first_chunk + fragments.chunks
        if first_chunk < 0 or end > len(keys):
            raise ValueError(
                f"chunks {first_chunk}..{end} requested; the tokens have {len(keys)} full chunks"
            )
        parent = keys[first_chunk - 1] if first_chunk > 0 else None
        _memory.synchronize(fragments.bounds)
        chunks, stored, skipped = self._c.put_paged(
            namespace or self.namespace,
            keys[first_chunk:end],
            fragments.packed,
            fragments.fragment_bytes,
            fragments.bounds,
            parent,
        )
        return PutResult(chunks, stored, skipped)

    def get_paged(self, tokens, fragments, *, namespace=None):
        """Reads the longest cached prefix of `tokens` (at most fragments.chunks chunks) into
        the fragments; returns the number of tokens read. Same-host sessions copy straight from
        the pools; remote ones fetch into a staging buffer and scatter from there."""
        keys = self.keys(tokens)[: fragments.chunks]
        if len(keys) < fragments.chunks:
            raise ValueError(f"{fragments.chunks} chunks of fragments; the tokens have {len(keys)} full chunks")
        for i, t in enumerate(fragments.tensors):
            _memory.describe(t, writable=True, what=f"tensor {i}")
        read = self._c.get_paged if self.data_path == "rma" else self._c.get_paged_any
        hits = read(namespace or self.namespace, keys, fragments.packed, fragments.fragment_bytes, fragments.bounds)
        return hits * self.chunk_tokens


def _tokens(tokens):
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(t) for t in tokens]


def _keys(keys):
    out = [bytes(k) for k in keys]
    for i, k in enumerate(out):
        if len(k) != 32:
            raise ValueError(f"key {i} is {len(k)} bytes; keys are 32 bytes")
    return out


def _buffers(data, n, *, writable):
    if isinstance(data, (list, tuple)):
        if len(data) != n:
            raise ValueError(f"{len(data)} tensors for {n} chunks")
        return [_memory.describe(t, writable=writable, what=f"tensor {i}") for i, t in enumerate(data)]
    return _memory.split(_memory.describe(data, writable=writable), n)
