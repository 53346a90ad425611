"""Fragments: where the bytes of paged chunks live.

An engine keeps KV in its own layout: per layer K and V tensors, split into blocks or heads.
A chunk of 256 tokens is then many separate pieces ("fragments") of equal size. `Fragments`
names them: fragment j of chunk i is `fragment_bytes` bytes at `addresses[i][j]`, and every
fragment must lie inside one of `tensors` (checked before any byte moves). A chunk's bytes in
prefixd are its fragments in order, so producer and consumer must list them the same way.
"""

import array

from ._memory import describe, shape_and_itemsize


class Fragments:
    def __init__(self, tensors, addresses, fragment_bytes):
        """`tensors`: the tensors the fragments lie in (all on one device, or all on the host).
        `addresses`: chunks x F addresses, as a list of lists, a 2-D integer torch tensor or a
        2-D NumPy array. `fragment_bytes`: the size of every fragment."""
        if isinstance(tensors, (list, tuple)):
            tensors = list(tensors)
        else:
            tensors = [tensors]
        if not tensors:
            raise ValueError("Fragments need at least one tensor")
        self.tensors = tensors
        self.bounds = [describe(t, what=f"tensor {i}") for i, t in enumerate(tensors)]
        rows = addresses.tolist() if hasattr(addresses, "tolist") else addresses
        rows = [list(r) for r in rows]
        if not rows or not rows[0]:
            raise ValueError("Fragments need at least one chunk of at least one fragment")
        per = len(rows[0])
        if any(len(r) != per for r in rows):
            raise ValueError("every chunk must have the same number of fragments")
        if int(fragment_bytes) <= 0:
            raise ValueError("fragment_bytes must be positive")
        self.chunks = len(rows)
        self.per_chunk = per
        self.fragment_bytes = int(fragment_bytes)
        self.packed = array.array("Q", [a for r in rows for a in r]).tobytes()

    @property
    def chunk_bytes(self):
        return self.per_chunk * self.fragment_bytes

    @property
    def device(self):
        return self.bounds[0][2]

    @classmethod
    def token_runs(cls, tensors, *, token_dim, first_token, chunks, chunk_tokens=256):
        """Fragments of tensors laid out with a token dimension, such as HuggingFace's per-layer
        K and V tensors of shape [batch, kv_heads, tokens, head_dim] (token_dim=2). For each
        chunk, the fragments are: for each tensor in order, for each index of the dimensions
        before `token_dim`, the run of `chunk_tokens` tokens (contiguous, since every dimension
        after the token dimension is whole)."""
        tensors = list(tensors)
        if not tensors:
            raise ValueError("token_runs needs at least one tensor")
        if chunks <= 0:
            raise ValueError("chunks must be positive")
        bases, run = [], None
        for i, t in enumerate(tensors):
            ptr, _, _ = describe(t, what=f"tensor {i}")
            shape, itemsize = shape_and_itemsize(t)
            dim = token_dim % len(shape)
            tokens = shape[dim]
            if first_token < 0 or first_token + chunks * chunk_tokens > tokens:
                raise ValueError(
                    f"tensor {i} has {tokens} tokens; chunks {first_token // chunk_tokens}.."
                    f"{first_token // chunk_tokens + chunks} need {first_token + chunks * chunk_tokens}"
                )
            inner = itemsize
            for d in shape[dim + 1:]:
                inner *= d
            outer = 1
            for d in shape[:dim]:
                outer *= d
            this_run = chunk_tokens * inner
            if run is None:
                run = this_run
            elif run != this_run:
                raise ValueError(f"tensor {i}: runs of {this_run} bytes, tensor 0 has {run}")
            row = tokens * inner
            start = ptr + first_token * inner
            bases.extend(start + r * row for r in range(outer))
        # Chunk c starts c runs further along the token dimension of every row.
        rows = [[b + c * run for b in bases] for c in range(chunks)]
        return cls(tensors, rows, run)
