"""Which chunks a prompt's KV is stored as, keyed by vLLM's own block hashes.

A chunk is `chunk_blocks` consecutive blocks starting at a multiple of `chunk_blocks`; its key is
the block hash of its last block, so it names the whole prefix up to there (the hashes are
chained). A prompt's trailing blocks short of a full chunk are stored as one shorter chunk keyed
the same way: chunk boundaries stay at multiples of `chunk_blocks`, so a key always determines
its block range. Nothing is ever re-hashed: the keys are `request.block_hashes`, whatever
`--prefix-caching-hash-algo` and extra keys (LoRA, multimodal, cache_salt) made them.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Blocks [first, first + blocks) of a request; key = the hash of the last of them."""

    first: int
    blocks: int
    key: bytes

    @property
    def last(self):
        return self.first + self.blocks - 1


def plan(block_hashes, num_blocks, chunk_blocks):
    """The chunks covering the first `num_blocks` full blocks: full chunks, then the tail."""
    num_blocks = min(num_blocks, len(block_hashes))
    out = []
    first = 0
    while first < num_blocks:
        n = min(chunk_blocks, num_blocks - first)
        out.append(Chunk(first, n, bytes(block_hashes[first + n - 1])))
        first += n
    return out


def blocks_hit(chunks, hits):
    """Blocks covered by the first `hits` chunks."""
    return sum(c.blocks for c in chunks[:hits])
