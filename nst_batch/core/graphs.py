"""L-BFGS chunks replayed as a CUDA graph: one launch for a whole chunk of iterations.

Measured on an H200 (docs/benchmarks.md, "GPU"): the card sat 97% idle, the host launching hundreds
of small kernels per evaluation (VGG's convolutions, the Gram matrices, the losses, the L-BFGS update)
and waiting on the loss. core/lbfgs.py removed the waits; a CUDA graph removes the launches: a chunk of
optimize.CHUNK iterations is captured once per scale (the batch's shape fixes every tensor's shape) and
replayed. Everything a chunk reads is a static tensor of that scale: lbfgs.State (updated in place), the
recorder's buffer, the net's weights, and the content and style targets the evaluate closes over.

`GraphChunks` is an optimize.ChunkRunner: the first full chunk of a scale runs eagerly on a side stream
(the warm-up torch.cuda.graphs asks for: cuDNN picks its kernels, autograd sets up its streams), the
next one is captured, and it and every later full chunk are replays. A shorter chunk (a scale's last)
runs eagerly. Any failure to capture is noted once and the engine goes on eagerly; on a CPU (or any
device but CUDA) nothing is ever captured. Whether to use it at all is DeviceConfig.cuda_graphs.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import lbfgs
from .optimize import CHUNK, EagerChunks, Recorder


def _on_cuda(st: lbfgs.State) -> bool:
    return st.x.is_cuda


def _side_stream(work: Callable[[], None], device: torch.device) -> None:
    """`work` on a side stream, ordered after and before the current one (CUDA); as is elsewhere."""
    if device.type != "cuda":
        work()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)


def _capture(work: Callable[[], None], device: torch.device) -> "torch.cuda.CUDAGraph":
    """`work`'s kernels captured into a graph, none of them run (replay runs them)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the driver's I/O threads (decoding, encoding) may touch CUDA meanwhile; only this
    # thread's work must stay out of the captured stream.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        work()
    return graph


class GraphChunks(EagerChunks):
    """Full chunks of a scale as one CUDA graph; see the module's docstring. `note` hears, once, why
    capturing failed; `usable(state)` says whether a state's device can be captured (a test forces it)."""

    def __init__(self, note: Callable[[str], None], usable: Callable[[lbfgs.State], bool] = _on_cuda):
        self.note, self.usable = note, usable
        self.broken = False  # capture failed once: eager from then on, for this engine
        self.captures = 0  # graphs captured (a test and the benchmark read it)
        self.release()

    def release(self) -> None:
        """Forget the scale's graph (and the state it holds on to): its memory pool goes back."""
        self._for: tuple[lbfgs.State, Recorder] | None = None
        self._graph = None
        self._warm = False

    def __call__(self, st: lbfgs.State, fn: Recorder, n: int, window: int, tolerance: float) -> None:
        if self.broken or n != CHUNK or not self.usable(st):
            return super().__call__(st, fn, n, window, tolerance)
        if self._for is None or self._for[0] is not st or self._for[1] is not fn:
            self.release()
            self._for = (st, fn)

        def chunk() -> None:
            lbfgs.run_chunk(st, fn, n, window=window, tolerance=tolerance)

        if not self._warm:
            _side_stream(chunk, st.x.device)
            self._warm = True
            return None
        if self._graph is None:
            slot = fn.slot
            try:
                self._graph = _capture(chunk, st.x.device)
            except Exception as e:  # noqa: BLE001  (whatever it was, eager still works)
                self.broken = True
                fn.slot = slot
                self.note(f"CUDA graph capture failed ({type(e).__name__}: {e}); running without graphs")
                return super().__call__(st, fn, n, window, tolerance)
            fn.slot = slot  # capturing ran no kernel: the replay below makes the chunk
            self.captures += 1
        slot = fn.slot
        self._graph.replay()
        fn.slot = slot + n  # the slots its capture wrote, which it wrote again
        return None
