"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A block holds ``block_size`` tokens of K/V for every layer. A full block is named by
a hash chained over the token ids of the whole prefix up to its end, so two
sequences with the same first N*block_size tokens share N blocks. Freed blocks that
carry a hash stay findable (LRU order) until a new allocation needs them.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from deepserve.engine.sequence import Sequence


class BlockManager:
    """Hands out KV blocks to sequences and finds cached prefixes again."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but still cached
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- capacity -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -----------------------------------------------------------------
    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens``; False (no change) if full."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(extra))
        return True

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; cached ones stay findable, the tail evicted first."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.block_hashes = []

    # -- prefix caching -------------------------------------------------------------
    def _hash_block(self, seq: Sequence, index: int) -> int:
        parent = seq.block_hashes[index - 1] if index else 0
        start = index * self.block_size
        return hash((parent, tuple(seq.tokens[start:start + self.block_size])))

    def match_prefix(self, seq: Sequence, count: bool = True) -> int:
        """Attach cached blocks for the longest cached prefix of a fresh sequence.

        Returns the number of tokens served from cache. At least one token is always
        left to compute, since the last position's logits are needed to sample.
        ``count`` adds the lookup to the hit-rate statistics (first admission only).
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if count:
            self.queried_tokens += seq.num_tokens
        for index in range(max_blocks):
            h = self._hash_block(seq, index)
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_hashed_blocks = len(seq.block_table)
        hit = seq.num_hashed_blocks * self.block_size
        if count:
            self.hit_tokens += hit
        return hit

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's newly completed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        while seq.num_hashed_blocks < full:
            index = seq.num_hashed_blocks
            h = self._hash_block(seq, index)
            seq.block_hashes.append(h)
            block = seq.block_table[index]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
            seq.num_hashed_blocks += 1
