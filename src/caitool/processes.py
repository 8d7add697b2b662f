"""Which process of a multi-process launch this is, and what only one of them may do.

``torchrun --nproc_per_node N`` or ``accelerate launch`` starts the same caitool command N
times (on one node or several). Every process trains on its share of the data; only the main
process writes files and prints, and the others wait at a barrier wherever a later step reads
what the main process wrote. Without a launcher there is one process and every wait is free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def launch_sharding() -> str | None:
    """What shards the weights across processes in this launch (DeepSpeed ZeRO-3, FSDP), or None.

    Read from the variables ``accelerate launch`` sets from its config, as accelerate itself
    reads them, so a setting that cannot work is refused before any model is loaded.
    """
    if _flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        import json
        from pathlib import Path

        stage = str(
            json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", stage)
        )
    return "DeepSpeed ZeRO-3" if stage == "3" else None


@dataclass(frozen=True)
class Processes:
    """The processes one command runs as; ``Processes()`` is a single process."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def wait(self) -> None:
        """A barrier: every process reaches it before any goes on."""
        if self.distributed:
            import torch.distributed

            torch.distributed.barrier()


def current_processes() -> Processes:
    """The processes of this launch; joins the launcher's process group (gloo on CPU, nccl on GPUs,
    DeepSpeed's when its launcher asked for it) the way accelerate and the Trainer then find it."""
    if launched_world_size() <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    processes = Processes(index=state.process_index, count=state.num_processes)
    if not processes.is_main:
        from caitool.progress import silence

        silence()
    return processes
