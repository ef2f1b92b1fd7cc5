"""torch.compile of the backbone (`model.compile: true`), with a count of the graphs it compiles.

The module is compiled in place (`nn.Module.compile`): parameter names and the checkpoint layout stay those of
the eager module, and DeepSpeed's engine calls it like any module (its bf16 autocast is traced into the
graph).
Every graph dynamo hands to the backend passes through `_CountingBackend`, so a run can say how many graphs it
compiled and how long that took, and a test can prove that a resumed run compiles once and never recompiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn


@dataclass
class CompileStats:
    """Graphs handed to the compile backend so far in this process, and the seconds spent in it."""

    graphs: int = 0
    backend_s: float = 0.0


STATS = CompileStats()


class _CountingBackend:
    """A torch.compile backend that counts each graph, then compiles it with the named backend."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, graph_module, example_inputs):
        import torch._dynamo

        started = time.perf_counter()
        compiled = torch._dynamo.lookup_backend(self.name)(graph_module, example_inputs)
        STATS.graphs += 1
        STATS.backend_s += time.perf_counter() - started
        return compiled


def compile_backbone(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile `model` in place (static shapes: every micro-batch has the same size) and return it."""
    model.compile(backend=_CountingBackend(backend), dynamic=False)
    return model


def compile_line(step: int, step_s: float) -> str:
    """The console line after a compiled run's first and last step: graphs so far (a count that grows after
    the first step means recompiles) and the compile time, apart from the step time."""
    return (
        f"[facescale] torch.compile: {STATS.graphs} graph(s) compiled in this process, "
        f"{STATS.backend_s:.1f} s in the backend; step {step} took {step_s:.1f} s"
    )


def known_backends() -> list[str]:
    """Names `model.compile_backend` accepts."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


