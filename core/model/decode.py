"""Token-by-token decoding over a persistent static KV cache, replayed from a CUDA graph on the GPU.

Every input of a step lives in a fixed buffer (token, rope id, write index, key mask) and is advanced on the
device, so a step has fixed shapes and no host work: on CUDA it is captured once per cache size and replayed,
which removes the ~700 kernel launches per token that dominate batch-1 decoding. The cache grows in buckets;
growing drops the graphs. A character's LoRA adapter gets a graph of its own, whose kernels read that adapter's
factors: run eagerly instead, a step with a rank-64 adapter took 33-49 ms on an H200, against 6.1 ms replayed (the
base model's: 4.7 ms; bench/RESULTS.md). The base model's graph and those of the last adapters used are kept.

``TextDecoder.tokens`` runs one step ahead of its caller: step t+1 is launched, fed the sampled token still on the
device, before token t is read on the host, so the caller's work on token t (detokenising, streaming) overlaps the
GPU's next step instead of leaving it idle. ``TextStream`` turns ids into text pieces decoding only the ids since
the last complete character, so a token costs the same however long the reply.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.model.bagel import Bagel
from core.model.kv_cache import CacheSpan, KVCache

if TYPE_CHECKING:
    from core.model.lora import Adapter

__all__ = ["CACHE_BUCKET", "GRAPHS_KEPT", "TextDecoder", "TextStream"]

logger = logging.getLogger(__name__)

CACHE_BUCKET = 1024  # cache sizes are multiples of this, so graphs are re-captured rarely
GRAPHS_KEPT = 3  # decode graphs kept: the base model's and the last two adapters' (each keeps its adapter alive)


@dataclass(frozen=True, slots=True)
class _Graph:
    """A captured step and its output buffer; ``adapter`` holds the factors its kernels read."""

    graph: torch.cuda.CUDAGraph
    logits: Tensor
    adapter: Adapter | None


class TextDecoder:
    """Prefill target and one-token steps for a single sequence; not thread-safe (the runtime holds a lock)."""

    def __init__(self, model: Bagel, *, cuda_graphs: bool = True) -> None:
        self.model = model
        c = model.cfg.llm
        self._cache_shape = (c.num_hidden_layers, 1, c.num_key_value_heads, 0, c.head_dim)
        self.device = model.vae2llm.weight.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = self._alloc(0)
        self._graphs: OrderedDict[str | None, _Graph] = OrderedDict()  # by adapter id (None: the base model)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.rope = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.write = torch.zeros(1, dtype=torch.long, device=self.device)
        self.key_mask = torch.zeros(1, 0, dtype=torch.bool, device=self.device)
        # a sampled token's way to the host: a pinned slot filled asynchronously, and an event marking the copy
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.long, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    def _alloc(self, capacity: int) -> KVCache:
        layers, rows, heads, _, dim = self._cache_shape
        return KVCache(layers, rows, heads, capacity, dim, self.model.dtype, self.device)

    def reserve(self, need: int) -> KVCache:
        """A cache of at least ``need`` positions (grown by buckets); prefill writes into it."""
        if need > self.cache.capacity:
            self._drop_graphs(list(self._graphs))
            self.cache = self._alloc(-(-need // CACHE_BUCKET) * CACHE_BUCKET)
            self.key_mask = torch.zeros(1, self.cache.capacity, dtype=torch.bool, device=self.device)
        return self.cache

    def start(self, length: int, token: int, rope: int) -> None:
        """After a prefill of ``length`` positions: the first token to feed and its rope id."""
        self.token.fill_(token)
        self.rope.fill_(rope)
        self.write.fill_(length)
        self.key_mask.zero_()
        self.key_mask[:, :length] = True

    def step(self, adapter: Adapter | None = None) -> Tensor:
        """Logits ``[1, V]`` (float32) after feeding the current token; valid until the next step.

        ``adapter`` is the LoRA adapter active on the model (None: the base model). Its graph is used only with
        that very object: a file loaded again has new tensors, so it gets a new graph.
        """
        self.key_mask.index_fill_(1, self.write, True)
        if not self.use_graphs:
            return self._forward()
        key = None if adapter is None else adapter.id
        entry = self._graphs.get(key)
        if entry is None or entry.adapter is not adapter:
            try:
                entry = self._capture(key, adapter)
            except RuntimeError:  # a kernel that cannot be captured: decode eagerly rather than fail the request
                logger.exception("CUDA graph capture of the decode step failed; decoding eagerly from now on")
                self.use_graphs = False
                return self._forward()
        self._graphs.move_to_end(key)
        entry.graph.replay()
        return entry.logits

    def advance(self, token: Tensor) -> None:
        """Feed ``token`` ``[1]`` next, one position and one rope id further (device-side, no sync)."""
        self.token.copy_(token.view(1, 1))
        self.rope.add_(1)
        self.write.add_(1)

    def tokens(
        self, sample: Callable[[Tensor], Tensor], max_new_tokens: int, *, stop: int | None,
        adapter: Adapter | None = None,
    ) -> Iterator[int]:
        """Ids sampled from each step's logits until ``stop`` (not yielded) or ``max_new_tokens``, after ``start``;
        ``adapter`` is the one active on the model (:meth:`step`).

        ``sample`` maps logits ``[1, V]`` to a token ``[1]`` on the device. Sampling step t+1 waits until the caller
        is done with token t, so a generator's draws come in the same order as when stepping one by one. When token t
        is ``stop``, the step already launched is dropped: it wrote one cache slot past the reply, which nothing
        reads (``start`` resets the mask; ``reserve`` left room for ``max_new_tokens`` steps and no more run).
        """
        nxt = sample(self.step(adapter))
        for t in range(max_new_tokens):
            ahead = t + 1 < max_new_tokens
            self._post(nxt)
            if ahead:
                self.advance(nxt)
                logits = self.step(adapter)
            token = self._read()  # the one host read per token (a CPU-GPU sync point), not waiting for the step ahead
            if token == stop:
                return
            yield token
            if ahead:
                nxt = sample(logits)

    def _post(self, token: Tensor) -> None:
        """Start copying ``token`` ``[1]`` to the host without waiting for it."""
        self._host.copy_(token.view(1), non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _read(self) -> int:
        """The token last posted, once its copy has landed."""
        if self._copied is not None:
            self._copied.synchronize()
        return int(self._host[0])

    def _forward(self) -> Tensor:
        span = CacheSpan(rows=slice(0, 1), start=0, write=self.write, end=self.cache.capacity, key_mask=self.key_mask)
        lm = self.model.language_model
        hidden = lm.model(lm.model.embed_tokens(self.token), self.rope, cache=self.cache, span=span, causal=True)
        return lm.logits(hidden[:, -1])

    def _capture(self, key: str | None, adapter: Adapter | None) -> _Graph:
        """A graph of the step as the model now is (``adapter`` active), kept under ``key``; the least recently
        used graph goes when more than :data:`GRAPHS_KEPT` would be kept."""
        stale = [key] if key in self._graphs else list(self._graphs)[: max(0, len(self._graphs) + 1 - GRAPHS_KEPT)]
        self._drop_graphs(stale)
        # A step is idempotent (it rewrites the same cache slot), so warming up on the live state is harmless.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the image lane runs on meanwhile
            logits = self._forward()
        entry = self._graphs[key] = _Graph(graph, logits, adapter)
        logger.info("captured the decode step as a CUDA graph for %d cache positions%s", self.cache.capacity,
                    f" with adapter {key}" if key else "")
        return entry

    def _drop_graphs(self, keys: list[str | None]) -> None:
        if keys:  # a step run ahead may still be replaying a graph about to be dropped
            torch.cuda.current_stream(self.device).synchronize()
        for key in keys:
            del self._graphs[key]


class TextStream:
    """The text of a growing id sequence, piece by piece, exactly as decoding all ids at once would give it.

    A byte-level BPE decodes the concatenated bytes of its tokens, so once the text ends in a complete character
    (not U+FFFD) it splits there exactly: only the ids after the last piece are decoded again. A character split
    over several tokens is held back until its last byte arrives.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._pending: list[int] = []  # ids after the last piece
        self._pieces: list[str] = []

    def push(self, token: int) -> str:
        """The new text once ``token`` is added; empty while a character is incomplete."""
        self._pending.append(token)
        piece = self._decode(self._pending)
        if piece.endswith("\ufffd"):
            return ""
        self._pending = []  # empty text (skipped special tokens) adds no bytes either: a clean split too
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """The rest at the end, an incomplete character included (as U+FFFD)."""
        piece = self._decode(self._pending) if self._pending else ""
        self._pending = []
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """All pieces so far."""
        return "".join(self._pieces)
