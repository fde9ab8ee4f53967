"""Experts laid out beside the serving.

A large MoE file's experts are most of its bytes; writing them into the kernels'
interleaved order at load costs about a third of a second per GB (page faults
included). With ``DEEPSERVE_EXPERT_LAYOUT`` "auto" (past ``MAPPED_EXPERTS_OVER``) or
"background", the loader leaves them as the file maps them (gate and up apart, read by
the same ``moe_gguf`` kernel), the server is ready that much sooner, and a thread writes
each layer's new layout after the load. The engine thread adopts finished layers between
steps (``ModelRunner.execute`` calls ``poll``), so a forward never sees half a layer;
then the file's pages are dropped. The thread starts after the server's warm-up (or at
an offline engine's first step). "load" writes the layout during the load instead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import torch

from deepserve.errors import DeepserveError

logger = logging.getLogger(__name__)

MODES = ("auto", "load", "background")


def expert_layout() -> str:
    """DEEPSERVE_EXPERT_LAYOUT: auto (the default), load or background."""
    value = os.environ.get("DEEPSERVE_EXPERT_LAYOUT", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise DeepserveError(f"DEEPSERVE_EXPERT_LAYOUT={value!r} is not a setting: use auto "
                             "(experts over 1 GiB laid out after the load), load (during "
                             "it) or background (always after it)",
                             param="DEEPSERVE_EXPERT_LAYOUT")
    return value


class BackgroundLayout:
    """The mapped experts of one model, laid out by a thread and adopted by the engine."""

    def __init__(self, modules: list) -> None:
        self.modules = modules
        self.done: queue.SimpleQueue = queue.SimpleQueue()  # (module, tensors) or error
        self.thread: threading.Thread | None = None
        self.adopted = 0
        self.started = 0.0

    @classmethod
    def of(cls, model: torch.nn.Module) -> BackgroundLayout | None:
        from deepserve.layers.moe import Experts

        modules = [m for m in model.modules() if isinstance(m, Experts) and m.up is not None]
        if not modules:
            return None
        mib = sum(m.gate_up.nbytes + m.up.nbytes + m.down.nbytes for m in modules) / 2**20
        logger.info("experts run as the file maps them (%d layers, %.0f MiB); the kernels' "
                    "layout is written beside the first requests", len(modules), mib)
        return cls(modules)

    def _run(self) -> None:
        for module in self.modules:
            try:
                self.done.put((module, module.lay_out()))
            except Exception as exc:  # out of memory, most likely: stay as mapped
                self.done.put((None, exc))
                return

    def start(self) -> None:
        """Start the thread (the server does after its warm-up; else the first ``poll``)."""
        if self.thread is None:
            self.started = time.perf_counter()
            self.thread = threading.Thread(target=self._run, name="deepserve-layout",
                                           daemon=True)
            self.thread.start()

    def poll(self) -> bool:
        """Adopt what the thread finished (starting it if need be); True once all are."""
        self.start()
        while True:
            try:
                module, result = self.done.get_nowait()
            except queue.Empty:
                return False
            if module is None:
                logger.warning("experts stay as mapped from the file (slower for large "
                               "batches): their layout failed: %s", result)
                return True
            module.adopt(*result)
            self.adopted += 1
            if self.adopted == len(self.modules):
                logger.info("experts in the kernels' layout: %d layers, adopted %.1f s "
                            "after the thread started", self.adopted,
                            time.perf_counter() - self.started)
                return True

    def finish(self) -> None:
        """Wait for every layer and adopt it (tests, benchmarks)."""
        while not self.poll():
            assert self.thread is not None
            time.sleep(0.005)
