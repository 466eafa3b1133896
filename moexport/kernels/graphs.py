"""CUDA-graph replays of the inference forward: repeated eager calls with less host work (opt-in).

An eager call of `ops.sigma_moe_forward` costs tens of microseconds of host time (checks,
allocations, two to five launches). With `cuda_graph=True` (or MOEXPORT_CUDA_GRAPHS=1 for calls
that leave it unset, e.g. through `SigmaMoE.forward`; then only for x <= `MAX_INPUT_BYTES`) a
plain eager call is served from a cached CUDA graph of the same launch sequence: the second call
with a key captures it, and every call from then on copies x into the graph's static input,
replays the graph on the caller's current stream and returns a copy of the static output, a fresh
tensor, so the outputs of successive calls never alias.

Measured on the H200 (bench/results/kernels_notes.md, round 3): host time per call 32-62 us instead
of 42-128 us, but 3-6 us more GPU time (the two copies and the graph launch). It pays in
host-bound loops (many small calls back to back); where the host keeps ahead of the GPU, direct
launches are faster. So it is not the default.

The key is x's shape and dtype, the current stream (each stream its own buffers), the layer's
plan and each weight's address, shape and dtype. The graph reads the weights by address, so
in-place updates of the same tensors (optimizer steps, `load_state_dict`) are seen by the next
replay without a new capture; a weight replaced by another tensor makes another key. Entries live
in a bounded LRU (`MAX_GRAPHS`); keys seen once, or evicted, are remembered in a bounded table.

Calls that launch directly instead: `skip_reason` says why (input larger than `MAX_INPUT_BYTES`
unless asked for, autograd, non-contiguous weights, CPU tensors, inside an outer stream capture);
torch.compile, export and dispatch modes never get here (`ops._plain_eager`).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

from moexport.core.errors import MoexportError

MAX_GRAPHS = 64  # captured graphs kept (each holds its static buffers and workspace: <= ~20 MB)
MAX_INPUT_BYTES = 4 << 20  # larger inputs are GPU-bound: the copies would cost more than the host saves
_BROKEN = False  # set when a capture failed: every call launches directly from then on


class GraphCache:
    """Bounded LRU of captured entries, built on the second sight of a key.

    A key whose entry was evicted is not built again while the table of seen keys remembers it:
    more keys in rotation than `capacity` run directly instead of capturing on every other call.

    Args:
        capacity: Entries kept; the least recently used one goes first.
        evict: Called with each entry dropped (e.g. to wait until its last replay is done).
    """

    def __init__(self, capacity: int, evict: Callable[[object], None] | None = None):
        self.capacity = capacity
        self.evict = evict
        self.entries: OrderedDict[tuple, object] = OrderedDict()
        self.seen: OrderedDict[tuple, bool] = OrderedDict()  # key -> its entry was evicted

    def get(self, key: tuple, build: Callable[[], object]) -> object | None:
        """The entry of `key`; None the first time a key is asked for (build() the second time)."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        if key not in self.seen:
            self._remember(key, False)
            return None
        if self.seen[key]:
            return None
        del self.seen[key]
        while len(self.entries) >= self.capacity:
            old_key, old = self.entries.popitem(last=False)
            self._remember(old_key, True)
            if self.evict is not None:
                self.evict(old)
        entry = self.entries[key] = build()
        return entry

    def _remember(self, key: tuple, evicted: bool) -> None:
        self.seen[key] = evicted
        if len(self.seen) > 4 * self.capacity:
            self.seen.popitem(last=False)


class _Entry:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, y: torch.Tensor, run: Callable):
        # run is held so that what it refers to (the plan whose id is in the key) outlives the entry
        self.graph, self.x, self.y, self.run = graph, x, y, run


def _release(entry: _Entry) -> None:
    # the graph's memory goes back to the allocator: its last replay must be over
    torch.cuda.synchronize(entry.x.device)


_CACHE = GraphCache(MAX_GRAPHS, evict=_release)


def skip_reason(x: torch.Tensor, weights: Sequence[torch.Tensor | None], *, any_size: bool = False) -> str | None:
    """Why a call with input x [N, d] and these weights cannot be replayed from a graph, or None."""
    if not any_size and x.numel() * x.element_size() > MAX_INPUT_BYTES:
        return f"input over {MAX_INPUT_BYTES} bytes"
    if x.numel() == 0:
        return "no tokens (nothing to launch)"
    if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        return "autograd needs the eager graph"
    if any(w is not None and not w.is_contiguous() for w in weights):
        return "a weight is not contiguous (the plan would read a copy made at capture)"
    if not x.is_cuda:
        return "not a CUDA tensor"
    if torch.cuda.is_current_stream_capturing():
        return "inside a stream capture (the launches are captured by it)"
    if _BROKEN:
        return "CUDA graphs turned off (a capture failed)"
    return None


def wanted() -> bool:
    """Whether calls that do not say (cuda_graph=None) replay graphs: MOEXPORT_CUDA_GRAPHS=1."""
    return os.environ.get("MOEXPORT_CUDA_GRAPHS") == "1"


def replay(x: torch.Tensor, weights: Sequence[torch.Tensor | None], options: Hashable,
           run: Callable[[torch.Tensor], torch.Tensor], *, any_size: bool = False) -> torch.Tensor | None:
    """run(x) from a cached CUDA graph of it, as a fresh tensor; None when the call must run directly
    (not eligible: `skip_reason`, or the key's first call).

    Args:
        x: Tokens [N, d] (any strides).
        weights: The tensors run reads besides x (None for absent ones).
        options: Everything else run depends on (hashable; run is kept alive with the entry, so
            an id() of an object run holds stays unique).
        run: Launches the sequence on the current stream for a contiguous x and returns its output.
        any_size: Also for inputs larger than `MAX_INPUT_BYTES`.
    """
    if skip_reason(x, weights, any_size=any_size) is not None:
        return None
    device = x.device
    key = (torch._C._cuda_getCurrentRawStream(device.index), device.index, x.shape, x.dtype, options,
           *[None if w is None else (w.data_ptr(), w.shape, w.dtype) for w in weights])
    try:
        entry = _CACHE.get(key, lambda: _capture(run, x))
    except MoexportError:  # bad input: the caller's error, not the graphs'
        raise
    except Exception as error:  # noqa: BLE001 - any capture failure: launch directly from now on, loudly
        global _BROKEN
        _BROKEN = True
        warnings.warn(f"moexport kernels: CUDA-graph replays turned off ({type(error).__name__}: {error})")
        return None
    if entry is None:
        return None
    entry.x.copy_(x)
    entry.graph.replay()
    return entry.y.clone()


def _capture(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> _Entry:
    """Capture run on a static copy of x's shape (normal tensors, also when called under
    inference_mode, so later calls outside it may write the static input)."""
    device = x.device
    with torch.inference_mode(False), torch.no_grad():
        static = torch.empty(x.shape, dtype=x.dtype, device=device)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                y = run(static)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
    return _Entry(graph, static, y, run)


def cached() -> int:
    """Number of captured graphs held."""
    return len(_CACHE.entries)


def clear() -> None:
    """Drop every captured graph (their memory goes back to PyTorch's allocator) and seen key."""
    while _CACHE.entries:
        _release(_CACHE.entries.popitem()[1])
    _CACHE.seen.clear()
