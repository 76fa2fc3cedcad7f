"""Runs in a spawned process (tests/test_loader_workers.py): only torch at import, so the child starts fast."""
from __future__ import annotations

import torch


class ForkedFlag(torch.utils.data.Dataset):
    """One item: 1 where the loader worker inherited this process's modules (forked: ``runner`` is loaded
    already), 0 where it started afresh (spawned: it imported only what unpickling this dataset needed)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        import sys

        return torch.tensor(int("runner" in sys.modules))


def loader_worker_forked(start_method: str, conn) -> None:
    """In a job worker process (spawned, as runner's are): adopt the parent's start method, then report whether
    a DataLoader worker started from here is forked."""
    import runner

    runner.adopt_start_method(start_method)
    loader = torch.utils.data.DataLoader(ForkedFlag(), batch_size=1, num_workers=1)
    conn.send(int(next(iter(loader))[0]))

