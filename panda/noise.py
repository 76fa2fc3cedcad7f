"""Where every random draw of PANDA's loss and sampler comes from: a seeded generator, or recorded tensors (the
golden tests replay the public code's draws through it)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class NoiseSource(Protocol):
    """Standard normal and uniform integer draws, in call order."""

    def randn(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor: ...

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device | str) -> Tensor: ...


class GeneratorNoise:
    """Draws from one seeded ``torch.Generator`` on its own device, then moves them to ``device`` (the same draws
    whatever device the model runs on when the generator is a CPU one). Its state is part of a run's state."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device | str = "cpu") -> GeneratorNoise:
        """A fresh generator on ``device`` seeded with ``seed``."""
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(generator)

    def randn(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(device)

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        return torch.randint(0, high, shape, generator=self.generator, device=self.generator.device).to(device)

    def get_state(self) -> Tensor:
        """The generator state (a uint8 tensor) for a checkpoint."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class RecordedNoise:
    """Replays recorded draws in order; a draw of another shape or kind, or one past the end, raises ValueError
    (a wrong draw order fails loudly instead of silently shifting every later draw)."""

    def __init__(self, tensors: Sequence[Tensor]):
        self._tensors = tensors
        self.used = 0

    def _next(self, shape: tuple[int, ...], floating: bool, device: torch.device | str) -> Tensor:
        if self.used >= len(self._tensors):
            raise ValueError(f"recorded noise exhausted after {self.used} draws")
        value = self._tensors[self.used]
        if tuple(value.shape) != tuple(shape) or value.is_floating_point() != floating:
            kind = "randn" if floating else "randint"
            raise ValueError(f"recorded draw {self.used} is {value.dtype} {tuple(value.shape)}, "
                             f"the code asked {kind} {tuple(shape)}")
        self.used += 1
        return value.to(device)

    def randn(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        return self._next(shape, True, device)

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        value = self._next(shape, False, device)
        if value.numel() and (value.min() < 0 or value.max() >= high):
            raise ValueError(f"recorded randint draw {self.used - 1} is outside [0, {high})")
        return value

    def exhausted(self) -> bool:
        """True when every recorded draw was used."""
        return self.used == len(self._tensors)
