"""The `scoretk` command line.

Heavy modules (torch, the plugins) are imported inside commands, so `scoretk --help` and
`--version` start instantly. Expected failures print one line and exit with status 2;
`--debug` shows the traceback instead. `train` and `sample` stop on SIGINT/SIGTERM with a
message and status 130/143, whatever they are doing when the signal comes.
"""
from __future__ import annotations

import errno
import functools
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from scoretk import __version__
from scoretk.files import HeldSignals, LockedError, Stopped

USAGE_ERROR = 2
STOPPED = 1
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                      errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
"""Errors of the file system a user can fix (disk full, read-only, no permission): one line."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    from scoretk.assemble import ComponentError
    from scoretk.checkpoint import CheckpointError
    from scoretk.data import DataError
    from scoretk.evaluation.sources import EvaluationError
    from scoretk.execution.distributed import DeviceError
    from scoretk.pictures import PictureError
    from scoretk.recipe import RecipeError
    from scoretk.registry import RegistryError
    from scoretk.store import StoreError
    from scoretk.weights import WeightsError

    return (RecipeError, RegistryError, CheckpointError, DataError, ComponentError, StoreError,
            DeviceError, PictureError, EvaluationError, WeightsError, LockedError,
            FileExistsError, FileNotFoundError)


def _stopping_errors() -> tuple[type[BaseException], ...]:
    """Work that started and had to stop (a non-finite loss, an ODE solver giving up): what
    was written so far stays and is resumable, so these exit with status 1, not 2."""
    from scoretk.score import SolverError
    from scoretk.training import TrainingError

    return (TrainingError, SolverError)


def _is_expected(exc: Exception) -> bool:
    return isinstance(exc, _expected_errors()) or (
        isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS and bool(exc.filename))


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the toolkit's expected errors into `error: <one line>` and exit status 2, and
    stopped work (`_stopping_errors`) into the same line and status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            stopped = isinstance(exc, _stopping_errors())
            if _debug() or not (stopped or _is_expected(exc)):
                raise
            text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and \
                exc.filename and exc.strerror else exc
            if stopped:  # a solver's message may carry torchdiffeq's detail on more lines
                text = (str(exc).splitlines() or [""])[0]
            click.echo(f"error: {text}", err=True)
            sys.exit(STOPPED if stopped else USAGE_ERROR)

    return wrapper


def stops_on_signals(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SIGINT and SIGTERM end the command from its first line on: its message (training's
    says which checkpoint was written, sampling's how far the file got) and status 128 +
    signal (130, 143). Loops that finish a step first hold the signals inside this."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with HeldSignals(hold=0):
            try:
                return fn(*args, **kwargs)
            except Stopped as exc:
                click.echo(f"\n{exc}", err=True)
                sys.exit(exc.exit_status)
            except KeyboardInterrupt:  # a handler other than ours raised it
                click.echo("\ninterrupted", err=True)
                sys.exit(128 + signal.SIGINT)

    return wrapper


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))


def _plugins():
    """The plugin set, loaded once per command (its warnings printed once) and kept on the
    root click context, so every part of the command uses the same registry."""
    root = click.get_current_context().find_root()
    root.obj = root.obj or {}
    if "plugins" not in root.obj:
        from scoretk.plugins import load_plugins

        loaded = load_plugins()
        for info in loaded.errors:
            click.echo(f"warning: plugin {info.name!r} ({info.distribution}) {info.error}",
                       err=True)
        root.obj["plugins"] = loaded
    return root.obj["plugins"]


def _registry():
    return _plugins().registry


def _load(recipe_path: str, overrides: tuple[str, ...]):
    from scoretk.recipe import load_recipe

    return load_recipe(recipe_path, _registry(), overrides)


recipe_argument = click.argument("recipe_path", metavar="RECIPE",
                                 type=click.Path(dir_okay=False, readable=False))

override_option = click.option(
    "-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe field, e.g. -o train.iterations=100 (value parsed as YAML).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scoretk")
@click.option("-v", "--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """scoretk: score-based generative modelling from declarative recipes."""
    ctx.obj = {"debug": debug}


@main.command()
@recipe_argument
@override_option
@click.option("--restart", is_flag=True, help="Start over even if the run has checkpoints.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Default: runs/<recipe name>.")
@stops_on_signals
@friendly_errors
def train(recipe_path: str, overrides: tuple[str, ...], restart: bool,
          run_dir: str | None) -> None:
    """Train the recipe; resumes its run directory's latest checkpoint unless --restart."""
    from scoretk.execution.policy import ExecutionPolicy
    from scoretk.training import train as run_training

    recipe = _load(recipe_path, overrides)
    policy = ExecutionPolicy.for_training(recipe.train).setup_process()
    try:
        run_training(recipe, _registry(), run_dir=run_dir, restart=restart, policy=policy)
    finally:
        policy.dist.shutdown()


model_options = [
    click.option("--run", "run_dir", type=click.Path(readable=False),
                 help="Run directory (its latest checkpoint)."),
    click.option("--checkpoint", type=click.Path(readable=False), help="A checkpoint file."),
    click.option("--recipe", type=click.Path(dir_okay=False, readable=False),
                 help="A recipe whose net has no trainable parameters (an exact score): no "
                 "checkpoint needed."),
    click.option("--best", is_flag=True,
                 help="With --run: checkpoints/best.pt, kept by train.eval_every's figure."),
]


def with_options(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """Decorate a command with a shared list of click options."""
    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


@main.command()
@with_options(model_options)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write.")
@click.option("-n", "--num-samples", type=int, help="Default: the recipe's sample.num_samples.")
@click.option("--batch-size", type=int, help="Default: the recipe's sample.batch_size.")
@click.option("--seed", type=int, help="Default: the recipe's sample.seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--raw-weights", is_flag=True, help="Use the raw, not the averaged, weights.")
@click.option("--keep-float", is_flag=True, help="Also store the float samples.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--grid", type=click.Path(dir_okay=False),
              help="Also write a PNG: images beside real ones, or 2-D points over the data.")
@click.option("--inpaint-mask", metavar="MASK",
              help="Inpaint: a black-and-white PNG, or FILE.h5[:DATASET] of 0/1; white (1) "
              "pixels are generated, the others come from --known.")
@click.option("--known", metavar="SOURCE",
              help="The known pixels for --inpaint-mask: 'data' (the recipe's held-out data) "
              "or a sample file.")
@click.option("--colourise", metavar="SOURCE",
              help="Colourise the grey images of SOURCE: 'data' or a sample file.")
@click.option("--interpolate", type=int, metavar="K",
              help="Groups of K samples moving smoothly from one to another.")
@override_option
@stops_on_signals
@friendly_errors
def sample(**options: Any) -> None:
    """Generate samples into an HDF5 file, batch by batch (resumable), optionally inpainting,
    colourising or interpolating."""
    from scoretk.execution.policy import ExecutionPolicy
    from scoretk.generation.request import SampleRequest
    from scoretk.generation.sample import run_sampling

    request = SampleRequest.from_options(**options)
    request.check()  # the --grid path too, before any work
    policy = ExecutionPolicy.for_sampling(request.device).setup_process()
    try:
        run_sampling(request, _registry(), policy)
    finally:
        policy.dist.shutdown()


@main.command()
@with_options(model_options)
@click.option("-n", "--num-samples", type=int, default=1000, show_default=True,
              help="Items of the data to score (all of them if fewer).")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Chooses the items, their dequantisation and trace-estimator vectors.")
@click.option("--solver", type=click.Choice(["auto", "adaptive", "heun"]), default="auto",
              show_default=True, help="auto: adaptive where torchdiffeq is installed and the "
              "net accepts any sigma, else Heun steps through the schedule.")
@click.option("--tolerance", type=float, default=1e-5, show_default=True,
              help="rtol and atol of the adaptive solver.")
@click.option("--raw-weights", is_flag=True, help="Use the raw, not the averaged, weights.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@stops_on_signals
@friendly_errors
def likelihood(as_json: bool, run_dir: str | None, checkpoint: str | None,
               recipe: str | None, **options: Any) -> None:
    """Bits per dimension on the recipe's data (held-out where there is a split), by the
    probability-flow ODE."""
    import json

    from scoretk.evaluation.bits_per_dim import LikelihoodRequest, format_table, measure

    as_path = lambda p: Path(p) if p else None  # noqa: E731
    request = LikelihoodRequest(checkpoint=as_path(checkpoint), run_dir=as_path(run_dir),
                                recipe=as_path(recipe), **options)
    request.check()
    with _LikelihoodProgress() as bar:
        res = measure(request, _registry(), bar)
    click.echo(json.dumps(res, indent=1) if as_json else format_table(res))


class _LikelihoodProgress:
    """A tqdm bar in items for `measure`'s progress(done, total, evaluations) callback."""

    def __init__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(unit="item", dynamic_ncols=True, disable=None)

    def __enter__(self) -> "_LikelihoodProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def __call__(self, done: int, total: int, evaluations: int) -> None:
        self.bar.total = total
        self.bar.set_postfix_str(f"{evaluations} evaluations per item", refresh=False)
        self.bar.update(done - self.bar.n)


def _sample_picture(file: str | Path, png: str | Path, count: int | None) -> None:
    from scoretk.pictures import sample_picture

    for note in sample_picture(file, png, count, _registry()):
        click.echo(note, err=True)
    click.echo(f"grid: {png}")


@main.command("import")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="The recipe the checkpoint was trained with (recipes/ncsnv2_cifar10.yaml, ...).")
@override_option
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="The new run directory to create.")
@friendly_errors
def import_checkpoint(checkpoint: str, recipe_path: str, overrides: tuple[str, ...],
                      run_dir: str) -> None:
    """Convert a checkpoint of the released NCSN/NCSNv2 code into a scoretk run."""
    from scoretk.interop.importer import import_released

    done = import_released(checkpoint, _load(recipe_path, overrides), _registry(), run_dir)
    click.echo(f"imported {checkpoint} ({done.net}, {done.layout}, step {done.step}, "
               f"{done.parameters:,} parameters{', EMA weights' if done.ema else ''}) "
               f"into {done.checkpoint}")
    click.echo(f"sample: scoretk sample --run {run_dir} --out samples.h5; resume training: "
               f"scoretk train {recipe_path} --run-dir {run_dir} (with the same -o options)")


@main.command()
@click.option("--run", "run_dir", type=click.Path(), help="Run directory (its latest checkpoint).")
@click.option("--checkpoint", type=click.Path(), help="A checkpoint file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write.")
@click.option("--raw-weights", is_flag=True, help="The raw, not the averaged, weights.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@friendly_errors
def export(run_dir: str | None, checkpoint: str | None, out: str, raw_weights: bool,
           force: bool) -> None:
    """Write a checkpoint's weights to a safetensors file (averaged weights by default)."""
    from scoretk.interop.export import export_run

    ckpt, step = export_run(_registry(), out, run_dir, checkpoint, raw_weights, force)
    click.echo(f"wrote {out}: the {'raw' if raw_weights else 'averaged'} weights of {ckpt} "
               f"(step {step}); sample with scoretk sample --checkpoint {out} --out samples.h5")


@main.command()
@click.argument("samples_path", metavar="SAMPLES.h5", type=click.Path(dir_okay=False))
@click.option("--against", metavar="REF.h5|RECIPE",
              help="Real data: an HDF5 file with a 'samples' dataset, or a recipe whose data "
              "block gives the data (then held-out data too). Default: the recipe stored in "
              "SAMPLES.h5.")
@click.option("--features", "feature_names", multiple=True, metavar="NAME",
              help="Feature space, repeatable (see `scoretk plugins`). Default: inception_v3 "
              "for images, pixels for vectors.")
@click.option("--feature-weights", type=click.Path(dir_okay=False),
              help="Weights file for the feature extractor (checked by SHA-256).")
@click.option("-n", "--num-samples", type=click.IntRange(min=1),
              help="Score the first N samples (default: all written).")
@click.option("--num-reference", type=click.IntRange(min=2), default=50_000, show_default=True,
              help="Reference items taken from a recipe's training data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the fixed subsets (reference, held-out, KID subsets).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--require", "requirements", multiple=True, metavar="[SPACE.]METRIC>=X",
              help="Threshold that must hold, e.g. precision>=0.8, 'fid<=heldout*1.5', "
              "pixels.recall>=heldout-0.2 (repeatable); exit status 1 when one fails.")
@override_option
@friendly_errors
def evaluate(samples_path: str, as_json: bool, **kwargs: Any) -> None:
    """Score samples against real data: FID, KID, precision/recall, density/coverage, IS."""
    import json

    from scoretk.evaluation import evaluate_file, format_report
    from scoretk.execution.policy import ExecutionPolicy

    policy = ExecutionPolicy.for_sampling(kwargs.pop("device")).setup_process()
    result = evaluate_file(samples_path, _registry(), device=policy.device, **kwargs)
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(json.dumps(result, indent=1) if as_json else format_report(result))
    if not result["pass"]:
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--grid", type=click.Path(dir_okay=False),
              help="Write a PNG: images beside real ones, or 2-D points over the data.")
@click.option("-k", "count", type=int, help="Samples drawn (default: 64 images, 2000 points).")
@friendly_errors
def inspect(file: str, grid: str | None, count: int | None) -> None:
    """Show what an HDF5 sample file holds."""
    from scoretk.pictures import check_png_path
    from scoretk.store import describe

    if grid:
        check_png_path(grid, "--grid")
    click.echo(describe(file))
    if grid:
        _sample_picture(file, grid, count)


@main.command()
@click.argument("run", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default RUN/loss.png).")
@friendly_errors
def plot(run: str, out: str | None) -> None:
    """Loss curves of a training run from RUN/metrics.jsonl: overall and per noise level."""
    from scoretk.pictures import plot_metrics

    click.echo(f"wrote {plot_metrics(run, out, _registry())}")


@main.command()
@friendly_errors
def plugins() -> None:
    """List plugins, their components and load errors."""
    loaded = _plugins()
    for info in loaded.plugins:
        status = "ok" if info.ok else "ERROR"
        click.echo(f"{info.name} ({info.distribution} {info.version}) [{status}]")
        if info.error:
            click.echo(f"    {info.error}")
        for comp in info.components:
            click.echo(f"    {comp.kind:9s} {comp.name:22s} {comp.description}")
    if loaded.errors:
        click.echo(f"{len(loaded.errors)} plugin(s) failed to load; the others work.")


@main.command("describe")
@click.argument("what", metavar="[KIND|SECTION]", required=False)
@click.argument("name", required=False)
@click.option("--markdown", is_flag=True,
              help="Markdown tables (the README's component reference is this output).")
@friendly_errors
def describe_command(what: str | None, name: str | None, markdown: bool) -> None:
    """Components and recipe sections with their parameters: type, default, constraint,
    description. No argument: the kinds, their sections and components."""
    from scoretk import describe

    if markdown and what is None:
        click.echo(describe.markdown(_registry()), nl=False)
    elif what is None:
        click.echo(describe.overview(_registry()))
    else:
        entries = describe.select(_registry(), what, name)
        click.echo(describe.as_markdown(entries) if markdown else describe.as_text(entries))


@main.group()
def recipe() -> None:
    """Validate and inspect recipes."""


@recipe.command("validate")
@recipe_argument
@override_option
@friendly_errors
def recipe_validate(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe against the registered components."""
    loaded = _load(recipe_path, overrides)
    click.echo(f"{recipe_path}: ok (recipe {loaded.name!r})")


@recipe.command("show")
@recipe_argument
@override_option
@friendly_errors
def recipe_show(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Print the recipe (its `auto` values resolved when the data are at hand), then its
    size: parameters, levels, evaluations."""
    from scoretk.summary import resolve_if_possible, summarise

    resolved, notes = resolve_if_possible(_load(recipe_path, overrides), _registry())
    click.echo(resolved.to_yaml().rstrip())
    click.echo("---")
    for note in notes:
        click.echo(f"# {note}")
    for key, value in summarise(resolved, _registry()).items():
        click.echo(f"# {key}: {value}")


@main.command()
@recipe_argument
@override_option
@click.option("--write", "write_to", type=click.Path(dir_okay=False),
              help="Write a copy of the recipe with the planned values filled in.")
@friendly_errors
def plan(recipe_path: str, overrides: tuple[str, ...], write_to: str | None) -> None:
    """Choose sigma_max, the number of levels and eps from the data (NCSNv2 techniques)."""
    from scoretk.summary import plan_recipe

    planned, lines = plan_recipe(_load(recipe_path, overrides), _registry())
    for line in lines:
        click.echo(line)
    if write_to:
        Path(write_to).write_text(planned.to_yaml())
        click.echo(f"wrote {write_to}")


if __name__ == "__main__":  # pragma: no cover
    main()
