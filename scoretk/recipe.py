"""Recipes: YAML files that assemble registered components into a training/generation job.

Loading is strict and early: plain YAML only (safe_load), every section validated against its
pydantic model, every component block against the params model its plugin registered. An error
names the file and the dotted field, so a bad recipe fails in a second, not an hour into a run.
"""
from __future__ import annotations

import copy
import json
import os
import stat
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
    eval_every: int = Field(0, ge=0, description="every N steps (and at the end) score "
                            "eval_samples samples from the averaged weights against the "
                            "training data, log the figures and keep checkpoints/best.pt; "
                            "0: never")
    eval_samples: int = Field(1000, gt=3, description="samples per evaluation (ncsnv2's fast "
                              "FID uses 1,000; figures depend on N, docs/evaluation.md)")
    eval_features: str = Field("auto", description="feature extractor (`scoretk describe "
                               "features`); auto: inception_v3 for colour images, else pixels")
    eval_metric: Literal["fid", "kid_mean", "precision", "recall", "density", "coverage"] = \
        Field("fid", description="the figure that picks checkpoints/best.pt (FID and KID: "
              "lower is better; the others: higher)")
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
            raise _from_validation(exc, source, model=cls) from None
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
        raise _from_validation(exc, source, prefix=section, model=comp.params) from None
    spec = ComponentSpec(kind=comp.name, params=params)
    spec._component = comp
    return spec


def _from_validation(exc: ValidationError, source: str, prefix: str = "",
                     model: type[BaseModel] | None = None) -> RecipeError:
    # An unknown key first: a typo ('trian') also makes the real field look missing.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    missing = [e["loc"][0] for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if not prefix and errors[0]["type"] != "extra_forbidden" and missing:
        return _missing_sections(missing, len(errors) - len(missing), source)
    where = [_field_path(e["loc"], model) for e in errors]
    first = [e for e, w in zip(errors, where) if w == where[0]]  # one per union member
    field = ".".join(p for p in (prefix, where[0]) if p) or None
    if first[0]["type"] == "extra_forbidden":
        msg = "unknown field (not allowed here; check the spelling)"
    else:
        msg = _join_alternatives([e["msg"].removeprefix("Value error, ") for e in first])
    more = len(set(where)) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return RecipeError(source, field, msg)


def _field_path(loc: tuple, model: type[BaseModel] | None) -> str:
    """A pydantic error location as the dotted field a user wrote: the tags pydantic adds
    inside a field for union members and validators ('constrained-float', "literal['auto']")
    are dropped. Without a model, the location is kept as it is."""
    parts: list[str] = []
    in_model = True
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif in_model:
            parts.append(part)  # a field, or the unknown key of an extra_forbidden error
            if model is not None:
                field = model.model_fields.get(part)
                annotation = field.annotation if field is not None else None
                model = annotation if isinstance(annotation, type) and \
                    issubclass(annotation, BaseModel) else None
                in_model = model is not None
    return ".".join(parts)


def _join_alternatives(messages: list[str]) -> str:
    """'Input should be greater than 0', "Input should be 'auto'" -> one message with 'or'."""
    lead = "Input should be "
    if len(messages) > 1 and all(m.startswith(lead) for m in messages):
        return lead + ", or ".join(m[len(lead):] for m in messages)
    return " or ".join(dict.fromkeys(messages))


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
        parsed = safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)) and not value.strip().startswith(("[", "{")):
        parsed = value
    return keys, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """A copy of `raw` with each override (text or already parsed) applied in order. One that
    changes a block's `kind` (`-o sampler.kind=heun`) starts the block afresh, so later
    overrides set the new kind's parameters and the rest take its defaults."""
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
        if keys[-1] == "kind" and isinstance(node.get("kind"), str) and node["kind"] != value:
            node.clear()  # another component: the old kind's parameters do not apply to it
        node[keys[-1]] = value
    return raw


MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few KB; a file far beyond that is a mistake (or /dev/zero), not a recipe."""
MAX_YAML_DEPTH = 64
"""Nesting deeper than any recipe needs is refused before it can exhaust Python's stack."""


class _BoundedLoader(yaml.SafeLoader):
    """safe_load's loader, refusing nesting deeper than MAX_YAML_DEPTH as it composes."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep (line "
                                     f"{mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_load(text: str) -> Any:
    """yaml.safe_load with a bound on nesting (see _BoundedLoader)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_bounded(path: Path) -> str:
    """A regular file's text, at most MAX_RECIPE_BYTES: a FIFO, a device or a directory is
    refused before anything is read (opening without blocking, so a FIFO cannot hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RecipeError(str(path), None, "file not found") from None
    except OSError as exc:
        raise RecipeError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(str(path), None, "is a directory, expected a YAML file")
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(str(path), None, "not a regular file (a pipe or a device?); "
                              "expected a YAML file")
        try:
            data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise RecipeError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(str(path), None, f"larger than {MAX_RECIPE_BYTES >> 20} MiB: not a "
                          "recipe")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), None, f"cannot read: not UTF-8 text ({exc.reason} at "
                          f"byte {exc.start})") from None


def read_yaml(path: str | Path) -> Any:
    """safe_load a file, turning every failure into a one-line RecipeError; the input is
    bounded (a regular file, MAX_RECIPE_BYTES, MAX_YAML_DEPTH)."""
    path = Path(path)
    text = _read_bounded(path)
    try:
        return safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise RecipeError(str(path), None, f"unsupported YAML tag{mark}: only plain YAML "
                          "is accepted, no python objects") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc) or "syntax error"
        raise RecipeError(str(path), None, f"invalid YAML{where}: {problem}") from None


def load_recipe(path: str | Path, registry: Registry, overrides: list[str] = ()) -> Recipe:
    raw = read_yaml(path)
    if raw is None:
        raise RecipeError(str(path), None, "empty recipe")
    if not isinstance(raw, dict):
        raise RecipeError(str(path), None, "a recipe must be a mapping of sections")
    return with_overrides(raw, overrides, registry, source=str(path))


def with_overrides(raw: dict[str, Any], overrides: Sequence[str | Override], registry: Registry,
                   source: str) -> Recipe:
    """The recipe `raw` with the overrides applied; an error in a field an override set
    names that override (`-o sampler.eps=-1: ...`), not the file it came from."""
    parsed = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    try:
        return Recipe.from_dict(apply_overrides(raw, parsed), registry, source=source)
    except RecipeError as exc:
        blamed = _override_for(exc.field, parsed)
        if blamed is None:
            raise
        keys, value = blamed
        dotted = ".".join(keys)
        shown = value if isinstance(value, str) else json.dumps(value)
        text = f"-o {dotted}={shown if len(shown) <= 60 else shown[:57] + '...'}"
        field = None if exc.field == dotted else exc.field
        raise RecipeError(text, field, exc.message) from None


def _override_for(field: str | None, overrides: list[Override]) -> Override | None:
    """The last override that set `field`, a section around it, or a field inside it."""
    if not field:
        return None
    parts = tuple(field.split("."))
    for keys, value in reversed(overrides):
        n = min(len(keys), len(parts))
        if keys[:n] == parts[:n]:
            return keys, value
    return None
