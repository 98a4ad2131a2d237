"""What `scoretk sample` was asked to do, checked before anything is loaded or written."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from scoretk.pictures import check_png_path
from scoretk.recipe import SAMPLING_SECTIONS, Override, RecipeError, parse_override
from scoretk.store import StoreError


@dataclass(frozen=True)
class ControlOptions:
    """Controllable generation as asked on the command line (scoretk.generation.control):
    the mask and sources as given (a path, `FILE.h5:DATASET`, or `data`), None: not asked."""

    inpaint_mask: str | None = None
    known: str | None = None
    colourise: str | None = None
    interpolate: int | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.inpaint_mask, self.known, self.colourise,
                                           self.interpolate))

    def check(self) -> None:
        """Option combinations; raises StoreError (one line)."""
        if (self.inpaint_mask is None) != (self.known is None):
            raise StoreError("--inpaint-mask MASK and --known SOURCE go together: the mask "
                             "says which pixels to generate, the source what the others hold")
        if self.inpaint_mask is not None and self.colourise is not None:
            raise StoreError("give --inpaint-mask or --colourise, not both")
        if self.interpolate is not None and self.interpolate < 2:
            raise StoreError(f"--interpolate needs at least 2 samples per group (got "
                             f"{self.interpolate})")


class ModelChoice(Protocol):
    """Where the model comes from (`scoretk sample`, `scoretk likelihood`): a checkpoint, a
    run's latest, or a recipe alone; None everywhere: the resumed file's, else the most
    recent run."""

    checkpoint: Path | None
    run_dir: Path | None
    recipe: Path | None
    raw_weights: bool
    best: bool
    overrides: tuple[Override, ...]


def check_counts(**counts: int | None) -> None:
    """StoreError naming the first option whose count is given but not positive."""
    for name, value in counts.items():
        if value is not None and value <= 0:
            raise StoreError(f"{name} must be positive (got {value})")


@dataclass(frozen=True)
class SampleRequest:
    """The command line's choices; None means 'from the file being resumed, else the recipe'.

    Numbers arrive validated by click's types; the checks here are the ones between options
    and against the file system.
    """

    out: Path
    run_dir: Path | None = None
    checkpoint: Path | None = None
    recipe: Path | None = None
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
    control: ControlOptions = field(default_factory=ControlOptions)

    @classmethod
    def from_options(cls, *, out: str, run_dir: str | None = None,
                     checkpoint: str | None = None, recipe: str | None = None,
                     grid: str | None = None, overrides: Sequence[str] = (),
                     inpaint_mask: str | None = None, known: str | None = None,
                     colourise: str | None = None, interpolate: int | None = None,
                     **options) -> "SampleRequest":
        """From click's values: paths as Path, overrides parsed (once) and checked."""
        parsed = tuple(parse_override(text) for text in overrides)
        for keys, _ in parsed:
            if keys[0] not in SAMPLING_SECTIONS and recipe is None:
                raise RecipeError("-o", ".".join(keys), "only sampler.* and sample.* can be "
                                  "overridden when sampling; the rest is fixed by the checkpoint")
        as_path = lambda p: Path(p) if p else None  # noqa: E731
        control = ControlOptions(inpaint_mask, known, colourise, interpolate)
        return cls(Path(out), as_path(run_dir), as_path(checkpoint), as_path(recipe),
                   grid=as_path(grid), overrides=parsed, control=control, **options)

    def check(self) -> None:
        """Option combinations and paths; raises StoreError (one line)."""
        check_counts(**{"-n/--num-samples": self.num_samples, "--batch-size": self.batch_size})
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise StoreError(f"--seed must be a whole number from 0 to 2**63 - 1 (got {self.seed})")
        if self.resume and self.force:
            raise StoreError("--resume continues a file and --force overwrites it: give one")
        check_model_choice(self)
        self.control.check()
        if self.grid is not None:
            check_png_path(self.grid, "--grid")
        if self.out.is_dir():
            raise StoreError(f"--out {self.out}: is a directory, expected a file name")
        if not self.out.parent.is_dir():
            raise StoreError(f"--out {self.out}: directory {self.out.parent} does not exist")
        if self.out.exists() and not (self.resume or self.force):
            raise StoreError(f"{self.out} already exists; --resume continues it, --force "
                             "overwrites it")


def check_model_choice(choice: ModelChoice) -> None:
    """At most one of --checkpoint, --run and --recipe; --raw-weights needs weights, --best
    a run."""
    given = [opt for opt, value in (("--checkpoint", choice.checkpoint),
                                    ("--run", choice.run_dir), ("--recipe", choice.recipe))
             if value]
    if len(given) > 1:
        raise StoreError(f"give one of --checkpoint, --run and --recipe (got "
                         f"{' and '.join(given)})")
    if choice.recipe and choice.raw_weights:
        raise StoreError("--raw-weights chooses a checkpoint's weights; a net sampled from "
                         "--recipe has none")
    if choice.best and not choice.run_dir:
        raise StoreError("--best picks a run's checkpoints/best.pt: give --run DIR")
