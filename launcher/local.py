"""Command lines for `facescale train` on several processes of this host, as the demo and the tests run it."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from launcher.ports import free_port


def local_train_command(ranks: int, config: str, overrides: Iterable[str] = ()) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node=R -m facescale train --config C --set K=V ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={free_port()}", "-m", "facescale", "train", "--config", config]
    for override in overrides:
        cmd += ["--set", override]
    return cmd
