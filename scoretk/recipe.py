"""Recipes: YAML files that assemble registered components into a training/generation job.

Loading is strict and early: plain YAML only (safe_load), every section validated against its
pydantic model, every component block against the params model its plugin registered. An error
names the file and the dotted field, so a bad recipe fails in a second, not an hour into a run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr,
                      SerializationInfo, ValidationError, model_serializer, model_validator)

from scoretk.registry import Component, Registry, RegistryError

COMPONENT_SECTIONS: dict[str, str] = {
    "data": "dataset",
    "schedule": "schedule",
    "net": "net",
    "loss": "loss",
    "sampler": "sampler",
    "averager": "averager",
}
"""Recipe section -> registry kind."""

FIXED_BY_RUN = ("data", "schedule", "net", "loss", "averager")
"""Sections a training run fixes: a resume must agree on them, and sampling from its
checkpoint cannot change them (the rest, sampler and loop settings, may change)."""

SAMPLING_SECTIONS = ("sampler", "sample")
"""Sections `scoretk sample` may override and a sample file records for its resume."""


class RecipeError(Exception):
    """A recipe that cannot be used; `str()` is one line: 'file: dotted.field: message'."""

    def __init__(self, source: str, field: str | None, message: str):
        self.source, self.field, self.message = source, field, message
        where = f"{field}: " if field else ""
        super().__init__(f"{source}: {where}{message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _batch_threads(value: Any) -> Literal["auto"] | int:
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f"expected 'auto' or a whole number >= 1, got {value!r}")


BatchThreadsSetting = Annotated[Literal["auto"] | int, PlainValidator(_batch_threads)]
_BATCH_THREADS = ("on CPU, split each batch across this many threads, one intra-op thread each "
                  "(scoretk.execution.batch_threads); auto: torch's thread count for nets whose samples are "
                  "independent, in chunks of at least 16k input values; 1: off; ignored off "
                  "the CPU")


class OptimConfig(_Strict):
    """Adam, as in the reference: no warm-up or learning-rate schedule."""

    lr: float = Field(1e-4, gt=0, description="learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's decay rates for the "
                                       "gradient's first and second moments")
    eps: float = Field(1e-8, gt=0, description="Adam's epsilon, added to the root of the "
                       "second moment")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty added to the gradient")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to "
                                    "this; null: no clipping")


class TrainConfig(_Strict):
    """The training loop: length, batches, device, checkpoints, logging."""

    iterations: int = Field(gt=0, description="optimisation steps in all (a resumed run "
                            "continues up to this)")
    batch_size: int = Field(128, gt=0, description="items per step, summed over all processes")
    seed: int = Field(0, description="initial weights, batch order and noise are functions of "
                      "this seed and the step")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda if available, else mps, else cpu")
    run_dir: str | None = Field(None, description="where checkpoints and metrics go; null: "
                                "runs/<recipe name>")
    checkpoint_every: int = Field(1000, gt=0, description="write a checkpoint every N steps "
                                  "(and at the end)")
    keep_checkpoints: int = Field(3, gt=0, description="the newest N checkpoints are kept")
    log_every: int = Field(50, gt=0, description="a metrics.jsonl line every N steps")
    sample_every: int = Field(0, ge=0, description="write samples/step-N.png with the averaged "
                              "weights every N steps; 0: never")
    grid_size: int = Field(64, gt=0, description="samples in each of those grids")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes reading batches; "
                             "0: read in the training process")
    time_limit_minutes: float | None = Field(
        None, gt=0, description="checkpoint and stop after this long; rerun to resume")
    bf16: bool = Field(False, description="bf16 autocast (CUDA only)")
    compile: bool = Field(False, description="torch.compile the net")
    channels_last: bool = Field(False, description="keep image batches and the net's weights "
                                "in channels_last memory format")
    batch_threads: BatchThreadsSetting = Field("auto", description=_BATCH_THREADS)


class SampleConfig(_Strict):
    """Defaults for `scoretk sample` (its options override them)."""

    num_samples: int = Field(100, gt=0, description="samples `scoretk sample` writes unless -n")
    batch_size: int = Field(100, gt=0, description="samples drawn at once (the output does not "
                            "depend on it)")
    seed: int = Field(0, description="sample i depends on (seed, i) alone")
    batch_threads: BatchThreadsSetting = Field("auto", description=_BATCH_THREADS)


@dataclass(frozen=True)
class Nested:
    """Marks a params field that holds another component's `{kind: ..., ...}` block:
    `inner: Annotated[ComponentSpec, Nested("net")]`. The recipe validates it like a section,
    through the registry (so any registered component of that kind fits; errors name
    `net.inner.channels`), and the factory builds it with `spec.build(**context)`."""

    kind: str


class ComponentSpec(BaseModel):
    """A validated `{kind: name, ...params}` block; dumped flat, as it is written."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    kind: str
    params: Any
    _component: Component | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _not_raw(cls, value: Any) -> Any:
        if isinstance(value, dict) and "params" not in value:
            raise ValueError("a nested {kind: ...} block is validated against the registry "
                             "when the recipe loads (Recipe.from_dict), not on its own")
        return value

    @model_serializer(mode="plain")
    def _flat(self, info: SerializationInfo) -> dict[str, Any]:
        params = self.params.model_dump(mode=info.mode) if self.params is not None else {}
        return {"kind": self.kind, **params}

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def build(self, **context: Any) -> Any:
        """The component, from the registry entry it was validated against."""
        if self._component is None:
            raise ValueError(f"{self.kind!r}: this block was not validated against a registry")
        return self._component.build(self.params, **context)


def nested_fields(params_model: type[BaseModel]) -> dict[str, str]:
    """{field: component kind} for the fields marked `Nested`."""
    return {name: meta.kind for name, info in params_model.model_fields.items()
            for meta in info.metadata if isinstance(meta, Nested)}


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the run directory "
                      "(runs/<name>)")
    description: str = Field("", description="free text, kept with the run")
    data: ComponentSpec
    schedule: ComponentSpec
    net: ComponentSpec
    loss: ComponentSpec
    sampler: ComponentSpec
    averager: ComponentSpec
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    sample: SampleConfig = SampleConfig()

    def dump(self) -> dict[str, Any]:
        """Plain JSON-able dict that `Recipe.from_dict` reads back (stored in checkpoints)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for section in COMPONENT_SECTIONS:
            out[section] = getattr(self, section).dump()
        for section in ("optim", "train", "sample"):
            out[section] = getattr(self, section).model_dump(mode="json")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)

    def with_params(self, section: str, params: BaseModel) -> "Recipe":
        spec = ComponentSpec(kind=getattr(self, section).kind, params=params)
        return self.model_copy(update={section: spec})

    @classmethod
    def from_dict(cls, raw: Any, registry: Registry, source: str = "<recipe>") -> "Recipe":
        if not isinstance(raw, dict):
            raise RecipeError(source, None, "a recipe must be a mapping of sections "
                              f"(got {type(raw).__name__})")
        blocks = {s: raw[s] for s in COMPONENT_SECTIONS if s in raw}
        # The sections first, components standing in as placeholders: pydantic then reports
        # every missing section, components included, in one go.
        placeholder = ComponentSpec(kind="?", params=None)
        try:
            recipe = cls.model_validate({**raw, **{s: placeholder for s in blocks}})
        except ValidationError as exc:
            raise _from_validation(exc, source) from None
        components = {section: _validate_component(block, section, COMPONENT_SECTIONS[section],
                                                   registry, source)
                      for section, block in blocks.items()}
        return recipe.model_copy(update=components)


def _validate_component(block: Any, section: str, kind: str, registry: Registry,
                        source: str) -> ComponentSpec:
    """Check a `{kind: name, ...}` block (and the blocks nested in it) against the params
    model its plugin registered; `section` is the dotted place it sits, named in errors."""
    if not isinstance(block, dict):
        raise RecipeError(source, section, f"expected a mapping like {{kind: <{kind} name>, ...}}"
                          f", got {type(block).__name__}")
    block = dict(block)
    name = block.pop("kind", None)
    if name is None:
        raise RecipeError(source, f"{section}.kind", f"Field required (registered: "
                          f"{', '.join(registry.names(kind))})")
    try:
        comp = registry.get(kind, str(name))
    except RegistryError as exc:
        raise RecipeError(source, f"{section}.kind", str(exc)) from None
    for field, inner_kind in nested_fields(comp.params).items():
        if field in block:
            block[field] = _validate_component(block[field], f"{section}.{field}", inner_kind,
                                               registry, source)
    try:
        params = comp.params.model_validate(block)
    except ValidationError as exc:
        raise _from_validation(exc, source, prefix=section) from None
    spec = ComponentSpec(kind=comp.name, params=params)
    spec._component = comp
    return spec


def _from_validation(exc: ValidationError, source: str, prefix: str = "") -> RecipeError:
    # An unknown key first: a typo ('trian') also makes the real field look missing.
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    missing = [e["loc"][0] for e in exc.errors() if e["type"] == "missing" and len(e["loc"]) == 1]
    if not prefix and err["type"] != "extra_forbidden" and missing:
        return _missing_sections(missing, len(exc.errors()) - len(missing), source)
    loc = ".".join(str(p) for p in err["loc"])
    field = ".".join(p for p in (prefix, loc) if p) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (not allowed here; check the spelling)"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return RecipeError(source, field, msg)


def _missing_sections(missing: list[str], others: int, source: str) -> RecipeError:
    """Every missing section in one line, so a skeleton recipe is completed in one pass."""
    blocks = [s for s in missing if s in COMPONENT_SECTIONS]
    hint = ""
    if blocks:
        what = "a {kind: ...} block" if len(blocks) == 1 else "{kind: ...} blocks"
        hint = (f" ({', '.join(blocks)}: {what}; `scoretk describe` lists the registered "
                "components)")
    more = f" (and {others} more error{'s' if others > 1 else ''})" if others else ""
    return RecipeError(source, ", ".join(missing), f"Field required{hint}{more}")


Override = tuple[tuple[str, ...], Any]
"""A parsed `-o dotted.key=value`: (('net', 'ngf'), 64)."""


def parse_override(text: str) -> Override:
    """'net.ngf=64' -> (('net', 'ngf'), 64); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise RecipeError("-o", text, "an override must look like dotted.key=value")
    key, value = text.split("=", 1)
    keys = tuple(key.strip().split("."))
    if not all(keys):
        raise RecipeError("-o", key, "empty key in dotted path")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)) and not value.strip().startswith(("[", "{")):
        parsed = value
    return keys, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """A copy of `raw` with each override (text or already parsed) applied in order."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        keys, value = parse_override(override) if isinstance(override, str) else override
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise RecipeError("-o", ".".join(keys[: i + 1]),
                                  "cannot override inside a non-mapping value")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> Any:
    """safe_load a file, turning every failure into a one-line RecipeError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(str(path), None, "file not found") from None
    except IsADirectoryError:
        raise RecipeError(str(path), None, "is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), None, f"cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise RecipeError(str(path), None, f"unsupported YAML tag{mark}: only plain YAML "
                          "is accepted, no python objects") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise RecipeError(str(path), None, f"invalid YAML{where}: {problem}") from None


def load_recipe(path: str | Path, registry: Registry, overrides: list[str] = ()) -> Recipe:
    raw = read_yaml(path)
    if raw is None:
        raise RecipeError(str(path), None, "empty recipe")
    if not isinstance(raw, dict):
        raise RecipeError(str(path), None, "a recipe must be a mapping of sections")
    return Recipe.from_dict(apply_overrides(raw, list(overrides)), registry, source=str(path))
