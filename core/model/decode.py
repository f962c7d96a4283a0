"""Token-by-token decoding over a persistent static KV cache, replayed from a CUDA graph on the GPU.

Every input of a step lives in a fixed buffer (token, rope id, write index, key mask) and is advanced on the
device, so a step has fixed shapes and no host work: on CUDA it is captured once per cache size and replayed,
which removes the ~700 kernel launches per token that dominate batch-1 decoding. The cache grows in buckets;
growing drops the graph. With a LoRA adapter active the step runs eagerly (the graph holds the base weights).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from core.model.bagel import Bagel
from core.model.kv_cache import CacheSpan, KVCache

__all__ = ["CACHE_BUCKET", "TextDecoder"]

logger = logging.getLogger(__name__)

CACHE_BUCKET = 1024  # cache sizes are multiples of this, so graphs are re-captured rarely


class TextDecoder:
    """Prefill target and one-token steps for a single sequence; not thread-safe (the runtime holds a lock)."""

    def __init__(self, model: Bagel, *, cuda_graphs: bool = True) -> None:
        self.model = model
        c = model.cfg.llm
        self._cache_shape = (c.num_hidden_layers, 1, c.num_key_value_heads, 0, c.head_dim)
        self.device = model.vae2llm.weight.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = self._alloc(0)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.rope = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.write = torch.zeros(1, dtype=torch.long, device=self.device)
        self.key_mask = torch.zeros(1, 0, dtype=torch.bool, device=self.device)

    def _alloc(self, capacity: int) -> KVCache:
        layers, rows, heads, _, dim = self._cache_shape
        return KVCache(layers, rows, heads, capacity, dim, self.model.dtype, self.device)

    def reserve(self, need: int) -> KVCache:
        """A cache of at least ``need`` positions (grown by buckets); prefill writes into it."""
        if need > self.cache.capacity:
            self.cache = self._alloc(-(-need // CACHE_BUCKET) * CACHE_BUCKET)
            self.key_mask = torch.zeros(1, self.cache.capacity, dtype=torch.bool, device=self.device)
            self._graph = self._logits = None
        return self.cache

    def start(self, length: int, token: int, rope: int) -> None:
        """After a prefill of ``length`` positions: the first token to feed and its rope id."""
        self.token.fill_(token)
        self.rope.fill_(rope)
        self.write.fill_(length)
        self.key_mask.zero_()
        self.key_mask[:, :length] = True

    def step(self, *, eager: bool = False) -> Tensor:
        """Logits ``[1, V]`` (float32) after feeding the current token; valid until the next step.

        ``eager`` bypasses the graph: the caller passes True while a LoRA adapter is active.
        """
        self.key_mask.index_fill_(1, self.write, True)
        if eager or not self.use_graphs:
            return self._forward()
        if self._graph is None:
            try:
                self._capture()
            except RuntimeError:  # a kernel that cannot be captured: decode eagerly rather than fail the request
                logger.exception("CUDA graph capture of the decode step failed; decoding eagerly from now on")
                self.use_graphs = False
                return self._forward()
        self._graph.replay()
        return self._logits

    def advance(self, token: Tensor) -> None:
        """Feed ``token`` ``[1]`` next, one position and one rope id further (device-side, no sync)."""
        self.token.copy_(token.view(1, 1))
        self.rope.add_(1)
        self.write.add_(1)

    def _forward(self) -> Tensor:
        span = CacheSpan(rows=slice(0, 1), start=0, write=self.write, end=self.cache.capacity, key_mask=self.key_mask)
        lm = self.model.language_model
        hidden = lm.model(lm.model.embed_tokens(self.token), self.rope, cache=self.cache, span=span, causal=True)
        return lm.logits(hidden[:, -1])

    def _capture(self) -> None:
        # A step is idempotent (it rewrites the same cache slot), so warming up on the live state is harmless.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward()
        self._graph = graph
        logger.info("captured the decode step as a CUDA graph for %d cache positions", self.cache.capacity)
