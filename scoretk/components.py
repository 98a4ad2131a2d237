"""The interfaces a plugin implements: one small abstract class per component kind.

The core programs against these and nothing else, so a third-party schedule, net, loss,
sampler, averager, dataset or feature extractor drops in by name without the core knowing
what it is.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

ProgressFn = Callable[[int, int], None]
"""progress(done, total): called by long loops, e.g. with network evaluations done so far."""


class Noise(Protocol):
    """Source of the random numbers a sampler draws, one row per sample.

    Samplers never touch a global RNG: they ask this object, so the same seed yields the same
    sample whatever the batch size or number of processes (see `scoretk.rng.PerSampleNoise`).
    """

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal numbers of shape (B, *shape)."""

    def rand(self, shape: tuple[int, ...]) -> Tensor:
        """Uniform [0, 1) numbers of shape (B, *shape)."""


class Schedule(ABC):
    """The noise levels sigma_1 > ... > sigma_L (index 0 is the largest)."""

    sigmas: Tensor  # (L,) float32, strictly descending

    @property
    def num_levels(self) -> int:
        return int(self.sigmas.numel())

    def sample_levels(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
        """Level indices for a training batch, one per sample (uniform by default)."""
        idx = torch.randint(0, self.num_levels, (batch_size,), generator=generator,
                            device=generator.device if generator is not None else "cpu")
        return idx.to(device)


class ScoreNet(nn.Module):
    """s(x, sigma): `forward(x, sigma, level)` with sigma (B,) float and level (B,) long.

    Every net receives both: level-conditioned nets (NCSN v1) read `level`, sigma-normalised
    ones (NCSNv2) read `sigma`, and losses and samplers never need to know which.
    """

    batch_independent: bool = False
    """True if each sample's output depends on that sample alone (no batch norm). Such nets
    may have their batches split across CPU threads (`scoretk.execution.batch_threads`)."""

    prefers_channels_last: bool = False
    """True if the net's layers run faster on channels_last activations (CPU and CUDA): the
    execution policy then calls it with channels_last inputs and hands back the caller's
    layout (`scoretk.execution.layout`)."""

    accepts_any_sigma: bool = True
    """False for nets that know only the schedule's L levels (NCSN v1 reads `level` alone):
    samplers that evaluate the net at other sigmas refuse such nets."""

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class Loss(ABC):
    """Turns a data batch into the scalar to minimise, plus per-level numbers for logging."""

    @abstractmethod
    def __call__(self, net: nn.Module, x: Tensor, schedule: Schedule,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (loss, stats); stats holds tensors, e.g. per-level loss sums and counts."""


class Condition(ABC):
    """What is known about each sample: a linear constraint P x = P y, with P an orthogonal
    projection (keeping the pixels under a mask, or each pixel's channel mean) and y the known
    values. Samplers impose it on their state at every noise level (docs/theory.md#conditions).
    """

    target: Tensor
    """P y: the known part, broadcastable to the batch (B, *shape)."""

    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """P x, the part of `x` the condition fixes (same shape as x)."""

    def impose(self, x: Tensor, sigma: float, z: Tensor | None = None) -> Tensor:
        """x with its known part replaced by the known values noised to `sigma`:
        x - P x + P y + sigma P z (z standard normal, x's shape; None or sigma 0: no noise)."""
        x = x - self.project(x) + self.target
        return x if z is None or sigma == 0 else x + sigma * self.project(z)


class Sampler(ABC):
    """Draws samples from a trained score net."""

    last_evaluations: int | None = None
    """Network evaluations per sample the last `sample` call made. Fixed-step samplers make
    `evaluations_per_sample` exactly; adaptive solvers make up to that many."""

    @abstractmethod
    def evaluations_per_sample(self, schedule: Schedule) -> int:
        """Network evaluations one sample costs (the budget the summary reports)."""

    @abstractmethod
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        """Returns a (B, *shape) tensor; B is set by `noise`. `init` is data for data+noise
        starts; `condition` fixes part of each sample (a sampler that cannot honour it raises
        ValueError)."""

    def check_net(self, net: nn.Module) -> None:
        """Raise ValueError, in one line, if this sampler cannot use `net` (it evaluates sigmas
        a level-conditioned net does not know). `sample` checks too; callers check first so
        that nothing is written before the error."""

    def settings(self, schedule: Schedule) -> dict:
        """Resolved settings recorded as provenance next to the samples."""
        return {}

    @property
    def starts_from_data(self) -> bool:
        """True if `sample` needs `init` (starting data): the caller then builds the dataset."""
        return False


class Averager(ABC):
    """Keeps averaged copies of a model's parameters (EMA, ...)."""

    @abstractmethod
    def update(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into `model` (no second copy of the model)."""


class Dataset(ABC):
    """A finite source of training data in the [0, 1] convention.

    Images are float tensors (C, H, W) in [0, 1]; vector data are (D,) float tensors.
    """

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of one item, e.g. (3, 32, 32) or (2,)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Tensor: ...

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def batch(self, indices: Tensor) -> Tensor:
        """Items stacked; in-memory datasets override this with one indexing operation."""
        return torch.stack([self[int(i)] for i in indices])


class FeatureExtractor(ABC):
    """Maps a batch to the feature space in which sample quality is measured (FID, KID,
    precision/recall, ...): Inception pool3, raw pixels, or a third party's DINOv2 or CLIP.

    Input is in the [0, 1] convention: images (B, C, H, W) already quantised to the 256 levels a
    sample file stores (samples and real data are treated alike), or vectors (B, D).
    """

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Everything that makes two feature sets comparable (name, weights hash, input
        protocol). Cached reference features are keyed by it, so it must change whenever
        the features would."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Features (B, D) float32 on the CPU; ValueError (one line) for input it cannot
        take, which the evaluation reports naming the extractor."""

    def class_logits(self, features: Tensor) -> Tensor | None:
        """Classifier logits computed from features (for the Inception Score); None when the
        extractor has no classifier."""
        return None

    def describe(self) -> str:
        """One line for reports: what the features are and where the weights came from."""
        return self.fingerprint
