"""Where a block's KV lives in vLLM's paged cache, read from the tensors themselves.

vLLM hands the worker one tensor per attention layer (`register_kv_caches`). Their shapes and
strides differ between versions and backends: FlashAttention in vLLM 0.26 and 0.33 has a logical
`(num_blocks, kv_heads, block_size, 2 * head_dim)` view over physical `(num_blocks, block_size,
kv_heads, 2 * head_dim)` memory (NHD) or a contiguous HND one; older vLLM used `(2, num_blocks,
block_size, kv_heads, head_dim)`, K and V apart. Nothing here is hard-coded: the block dimension
is the one whose size is the number of blocks, and the rest of a block is cut into the fewest
equal contiguous runs its strides allow (one 64 KiB page per layer and block for Qwen3-4B in
NHD; two runs, K and V, in the old layout).

A chunk's bytes in prefixd are, for each layer in registration order, for each of its blocks in
order, for each run in order: that run. Producer and consumer compute the same order from the
same model and layout (which the namespace pins).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerRuns:
    """Block b of a layer is `runs` (byte offsets, each `run_bytes` long) at `base + b * stride`."""

    base: int
    stride: int
    runs: tuple
    run_bytes: int


def block_runs(tensor, num_blocks):
    """Splits one layer's KV tensor into per-block runs. Raises ValueError when the tensor has no
    block dimension of `num_blocks` or its blocks are not made of equal contiguous runs."""
    shape = list(tensor.shape)
    strides = list(tensor.stride())
    elem = tensor.element_size()
    if any(s < 0 for s in strides):
        raise ValueError("KV tensor with negative strides")
    dims = [i for i, n in enumerate(shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"KV tensor of shape {tuple(shape)} has no dimension of {num_blocks} blocks")
    # The block dimension has the largest stride among the candidates (e.g. dim 1 of
    # (2, num_blocks, ...), never a head dimension that happens to be as large).
    bdim = max(dims, key=lambda i: strides[i])
    rest = [(shape[i], strides[i]) for i in range(len(shape)) if i != bdim and shape[i] > 1]
    # Innermost first; merge dimensions that continue each other in memory into one run.
    rest.sort(key=lambda d: d[1])
    run_elems = 1
    outer = []
    for size, stride in rest:
        if not outer and stride == run_elems:
            run_elems *= size
        else:
            outer.append((size, stride))
    offsets = [0]
    for size, stride in outer:
        offsets = [o + k * stride for o in offsets for k in range(size)]
    offsets.sort()
    run_bytes = run_elems * elem
    runs = tuple(o * elem for o in offsets)
    for a, b in zip(runs, runs[1:]):
        if b - a < run_bytes:
            raise ValueError("KV tensor whose block runs overlap")
    return LayerRuns(tensor.data_ptr(), strides[bdim] * elem, runs, run_bytes)


@dataclass(frozen=True)
class KVLayout:
    """Every layer's runs; all layers alike in run count and size (a uniform model)."""

    layers: tuple
    run_bytes: int
    runs_per_block: int
    device: int  # CUDA ordinal, or -1 for host memory
    bounds: tuple  # ((address, bytes, device), ...): the memory fragments may lie in

    @property
    def block_bytes(self):
        """Bytes of one block across all layers."""
        return len(self.layers) * self.runs_per_block * self.run_bytes

    def fragments(self, block_ids):
        """Fragment addresses of one chunk made of `block_ids` (layer-major), as uint64."""
        bases = np.array([l.base for l in self.layers], dtype=np.uint64)
        strides = np.array([l.stride for l in self.layers], dtype=np.uint64)
        runs = np.array(self.layers[0].runs, dtype=np.uint64)
        blocks = np.asarray(block_ids, dtype=np.uint64)
        # (layer, block, run)
        addr = bases[:, None, None] + strides[:, None, None] * blocks[None, :, None] + runs[None, None, :]
        return addr.reshape(-1)

    def table(self, chunks_block_ids):
        """(packed little-endian addresses, per-chunk fragment counts) for several chunks."""
        parts = [self.fragments(b) for b in chunks_block_ids]
        counts = [int(p.size) for p in parts]
        packed = np.concatenate(parts).astype("<u8").tobytes() if parts else b""
        return packed, counts


def _storage_bounds(tensor):
    """(address, bytes) of the allocation behind `tensor` (its whole storage)."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def kv_layout(kv_caches, num_blocks):
    """The layout of vLLM's registered KV caches (`{layer name: tensor}`, in model order)."""
    if not kv_caches:
        raise ValueError("no KV-cache tensors registered")
    layers = []
    seen = {}
    bounds = []
    device = None
    for name, t in kv_caches.items():
        d = t.device.index if t.device.type == "cuda" else -1
        if t.device.type not in ("cuda", "cpu"):
            raise ValueError(f"layer {name}: KV cache on {t.device}; prefixd moves CUDA and CPU memory")
        if device is None:
            device = d if d is not None else 0
        elif d != device:
            raise ValueError(f"layer {name}: KV caches on devices {device} and {d}")
        runs = block_runs(t, num_blocks)
        if layers and (runs.runs != layers[0].runs or runs.run_bytes != layers[0].run_bytes):
            raise ValueError(f"layer {name}: blocks laid out unlike layer 0 (non-uniform model)")
        layers.append(runs)
        start, n = _storage_bounds(t)
        if start not in seen:
            seen[start] = n
            bounds.append((start, n, device))
    return KVLayout(tuple(layers), layers[0].run_bytes, len(layers[0].runs), device, tuple(bounds))
