"""This process's place in a job, as the launcher (DeepSpeed's, torchrun, Open MPI, MPICH) set it in the
environment. No imports: the command line asks it before anything else is loaded."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class World:
    """(rank, local rank, world size); (0, 0, 1) for a plain run."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        for rank_var, local_var, size_var in (
            ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
        ):
            if rank_var in os.environ and size_var in os.environ:
                return cls(int(os.environ[rank_var]), int(os.environ.get(local_var, 0)), int(os.environ[size_var]))
        return cls()
