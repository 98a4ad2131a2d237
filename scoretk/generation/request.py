"""What `scoretk sample` was asked to do, checked before anything is loaded or written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scoretk.pictures import check_png_path
from scoretk.recipe import SAMPLING_SECTIONS, Override, RecipeError, parse_override
from scoretk.store import StoreError


@dataclass(frozen=True)
class SampleRequest:
    """The command line's choices; None means 'from the file being resumed, else the recipe'.

    Numbers arrive validated by click's types; the checks here are the ones between options
    and against the file system.
    """

    out: Path
    run_dir: Path | None = None
    checkpoint: Path | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    resume: bool = False
    force: bool = False
    raw_weights: bool = False
    best: bool = False
    keep_float: bool = False
    device: str = "auto"
    grid: Path | None = None
    overrides: tuple[Override, ...] = ()

    @classmethod
    def from_options(cls, *, out: str, run_dir: str | None = None,
                     checkpoint: str | None = None, grid: str | None = None,
                     overrides: Sequence[str] = (), **options) -> "SampleRequest":
        """From click's values: paths as Path, overrides parsed (once) and checked."""
        parsed = tuple(parse_override(text) for text in overrides)
        for keys, _ in parsed:
            if keys[0] not in SAMPLING_SECTIONS:
                raise RecipeError("-o", ".".join(keys), "only sampler.* and sample.* can be "
                                  "overridden when sampling; the rest is fixed by the checkpoint")
        as_path = lambda p: Path(p) if p else None  # noqa: E731
        return cls(Path(out), as_path(run_dir), as_path(checkpoint), grid=as_path(grid),
                   overrides=parsed, **options)

    def check(self) -> None:
        """Option combinations and paths; raises StoreError (one line)."""
        for name, value in (("-n/--num-samples", self.num_samples),
                            ("--batch-size", self.batch_size)):
            if value is not None and value <= 0:
                raise StoreError(f"{name} must be positive (got {value})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise StoreError(f"--seed must be a whole number from 0 to 2**63 - 1 (got {self.seed})")
        if self.resume and self.force:
            raise StoreError("--resume continues a file and --force overwrites it: give one")
        if self.checkpoint and self.run_dir:
            raise StoreError("give either --checkpoint or --run, not both")
        if self.best and not self.run_dir:
            raise StoreError("--best picks a run's checkpoints/best.pt: give --run DIR")
        if self.grid is not None:
            check_png_path(self.grid, "--grid")
        if self.out.is_dir():
            raise StoreError(f"--out {self.out}: is a directory, expected a file name")
        if not self.out.parent.is_dir():
            raise StoreError(f"--out {self.out}: directory {self.out.parent} does not exist")
        if self.out.exists() and not (self.resume or self.force):
            raise StoreError(f"{self.out} already exists; --resume continues it, --force "
                             "overwrites it")

