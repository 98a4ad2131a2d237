"""The training loop: data -> loss -> optimiser -> averager -> checkpoint.

Every random number a step uses comes from a generator seeded by (seed, step, rank) and the
batch order is a pure function of (seed, step), so a resumed run replays the uninterrupted one
exactly. Checkpoints are atomic; a non-finite loss or gradient stops the run before anything
bad is written; SIGINT/SIGTERM finish the step, write a checkpoint and exit.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

import scoretk
from scoretk import assemble
from scoretk.execution.batch_threads import BatchThreads, split_batches
from scoretk.checkpoint import RunDir, checkpoint_step, load_checkpoint
from scoretk.components import Dataset
from scoretk.execution.cpu_memory import keep_freed_memory
from scoretk.data import augment
from scoretk.files import HeldSignals, atomic_write_text
from scoretk.execution.distributed import pick_device, setup_distributed
from scoretk.recipe import Recipe, RecipeError
from scoretk.registry import Registry
from scoretk.rng import PerSampleNoise, derive_seed, generator
from scoretk.training.step import TrainStep, make_optimiser
from scoretk.training.log import LogWindow, open_tensorboard, write_record


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written."""


class StepBatches:
    """Batch indices as a pure function of the step: epoch permutations seeded by (seed, epoch).

    With W processes, the global batch is split into W equal slices, one per rank.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise RecipeError("recipe", "train.batch_size",
                              f"{global_batch} is not divisible by the {world} processes")
        if size < global_batch:
            raise RecipeError("recipe", "train.batch_size",
                              f"{global_batch} is larger than the dataset ({size} items)")
        self.size, self.batch, self.seed = size, global_batch, seed
        self.local = global_batch // world
        self.rank = rank
        self.steps_per_epoch = size // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.size, generator=generator(
                derive_seed(self.seed, "epoch", epoch)))
            self._epoch = epoch
        start = k * self.batch + self.rank * self.local
        return self._perm[start:start + self.local]


class _StepDataset(torch.utils.data.Dataset):
    """Lets a DataLoader's workers fetch whole batches (index lists) of a scoretk Dataset."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


def _batches(data: Dataset, order: StepBatches, start: int, end: int,
             workers: int) -> Iterator[torch.Tensor]:
    if workers == 0:
        for step in range(start, end):
            yield data.batch(order(step))
        return
    sampler = [order(step).tolist() for step in range(start, end)]
    loader = torch.utils.data.DataLoader(_StepDataset(data), batch_sampler=sampler,
                                         num_workers=workers, pin_memory=torch.cuda.is_available())
    yield from loader


def _model_sections(recipe_dump: dict) -> dict:
    return {s: recipe_dump[s] for s in ("data", "schedule", "net", "loss", "averager")}


def prepare_run(run: RunDir, restart: bool) -> dict | None:
    """Checkpoint state to resume from, or None; --restart clears the old checkpoints."""
    if restart:
        for path in (run.checkpoints, run.samples):
            shutil.rmtree(path, ignore_errors=True)
        for path in (run.metrics, run.latest_pointer):
            path.unlink(missing_ok=True)
        return None
    latest = run.latest()
    return load_checkpoint(latest) if latest is not None else None


def train(recipe: Recipe, registry: Registry, run_dir: str | Path | None = None,
          restart: bool = False) -> Path:
    """Train `recipe`; returns the path of the final checkpoint."""
    cfg = recipe.train
    dist = setup_distributed(cfg.device)
    device = pick_device(cfg.device, dist)
    if device.type == "cpu":
        keep_freed_memory()
    run = RunDir(run_dir or cfg.run_dir or Path("runs") / recipe.name)
    data = assemble.build_data(recipe, registry)
    state = None
    if dist.is_main:
        state = prepare_run(run, restart)
        run.create()
    dist.barrier()
    if not dist.is_main and not restart:
        latest = run.latest()
        state = load_checkpoint(latest) if latest is not None else None

    resolved = assemble.resolve(recipe, data)  # deterministic: same values on every rank
    if state is not None:
        stored = Recipe.from_dict(state["recipe"], registry, source=f"{run.latest()}")
        if _model_sections(stored.dump()) != _model_sections(resolved.dump()):
            raise RecipeError(str(run.path), None, "the recipe's data/schedule/net/loss/averager "
                              "differ from the checkpoint's; use --restart to start over or "
                              "--run-dir for a new run")

    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights on every rank and run
    model = assemble.build_model(resolved, registry, data.shape)
    net = model.net.to(device)
    if cfg.channels_last and len(data.shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    optimiser = make_optimiser(net, resolved.optim)
    averager = assemble.build_averager(resolved, registry, net)
    loss_fn = assemble.build_loss(resolved, registry)
    schedule = model.schedule
    schedule.sigmas = schedule.sigmas.to(device)
    step = 0
    if state is not None:
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        averager.load_state_dict(state["averager"])
        step = int(state["step"])
        _set_rng_state(state.get("rng", {}))
    if dist.is_main:
        atomic_write_text(run.recipe, resolved.to_yaml())

    split = net if cfg.compile else split_batches(net, cfg.batch_threads, device)
    train_net: nn.Module = split
    if dist.world > 1:
        train_net = nn.parallel.DistributedDataParallel(
            train_net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_net = torch.compile(train_net)
    train_step = TrainStep(net, train_net, loss_fn, schedule, optimiser, averager,
                           clip=resolved.optim.grad_clip, bf16=cfg.bf16 and device.type == "cuda")

    def checkpoint(at_step: int) -> Path:
        return run.save({
            "model": net.state_dict(), "optimizer": optimiser.state_dict(),
            "averager": averager.state_dict(), "step": at_step, "recipe": resolved.dump(),
            "shape": list(data.shape), "rng": _rng_state(),
            "scoretk_version": scoretk.__version__, "torch_version": str(torch.__version__),
        }, at_step, cfg.keep_checkpoints)

    order = StepBatches(len(data), cfg.batch_size, cfg.seed, dist.rank, dist.world)
    chunks = split.chunks(order.local, math.prod(data.shape)) \
        if isinstance(split, BatchThreads) else 1
    num_levels = schedule.num_levels
    window = LogWindow(num_levels, device)
    last_ckpt = run.latest()
    if dist.is_main:
        print(f"scoretk train: {recipe.name} | run {run.path} | device {device} | "
              f"{assemble.count_parameters(net):,} parameters | {num_levels} levels | "
              f"{len(data)} items {tuple(data.shape)}"
              + (f" | batch split across {chunks} CPU threads" if chunks > 1 else "")
              + (f" | resuming at step {step}" if step else ""), file=sys.stderr)
        if cfg.bf16 and device.type != "cuda":
            print(f"note: train.bf16 applies on CUDA only; training in float32 on {device}",
                  file=sys.stderr)
        if cfg.compile and cfg.batch_threads not in ("auto", 1):
            print("note: train.batch_threads does not apply to compiled nets; the batch is not "
                  "split", file=sys.stderr)
    bar = tqdm(total=cfg.iterations, initial=step, disable=not dist.is_main, unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    writer = open_tensorboard(run) if dist.is_main else None
    deadline = time.monotonic() + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None

    with HeldSignals(escalate=True) as stop:
        for x in _batches(data, order, step, cfg.iterations, cfg.num_workers):
            g = generator(derive_seed(cfg.seed, "step", step, dist.rank), device)
            x = augment(x.to(device, non_blocking=True), resolved.data.params, g)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, grad_norm, stats = train_step(x, g, step)
            step += 1
            window.add(loss, grad_norm, stats, x.shape[0] * dist.world)
            bar.update(1)

            stopping = bool(stop.received)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if dist.world > 1:  # every rank must take the same decision at the same step
                stopping = bool(dist.max_int(int(stopping)))
                out_of_time = bool(dist.max_int(int(out_of_time)))
            saving = step % cfg.checkpoint_every == 0 or step == cfg.iterations or stopping \
                or out_of_time
            if saving or step % cfg.log_every == 0 or dist.world > 1:
                # The only host sync: before anything is logged or saved, never per step.
                bad = dist.max_int(train_step.first_bad())
                if bad >= 0:
                    bar.close()
                    raise TrainingError(
                        f"non-finite loss or gradient at step {bad}; stopped. The last good "
                        f"checkpoint is {last_ckpt or '(none yet)'}; lower optim.lr or set "
                        "optim.grad_clip")
            if step % cfg.log_every == 0 or step == cfg.iterations:
                record = window.flush(step)
                bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['items_per_s']:.0f}")
                if dist.is_main:
                    write_record(run, record, writer)
            if dist.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                _sample_grid(model, net, averager, run, step, cfg, device)
            if saving:
                if dist.is_main:
                    last_ckpt = checkpoint(step)
                dist.barrier()
            if stopping:
                bar.close()
                raise Interrupted(f"interrupted at step {step}; checkpoint {last_ckpt} written; "
                                  "run the same command again to resume")
            if out_of_time:
                if dist.is_main:
                    print(f"\ntime limit of {cfg.time_limit_minutes} min reached at step {step}; "
                          "run the same command again to continue", file=sys.stderr)
                break
    bar.close()
    if dist.is_main and (last_ckpt is None or checkpoint_step(last_ckpt) < step):
        last_ckpt = checkpoint(step)
    if writer is not None:
        writer.close()
    if dist.is_main:
        print(f"done: {step} steps; checkpoint {last_ckpt}", file=sys.stderr)
    dist.shutdown()
    return Path(last_ckpt) if last_ckpt is not None else run.latest()


def _rng_state() -> dict:
    """Global RNG states: scoretk draws from per-step generators, but a plugin's net may use
    the global RNG (dropout), and a resumed run must see the same numbers."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sample_grid(model: assemble.Model, net: nn.Module, averager, run: RunDir, step: int,
                 cfg, device: torch.device) -> None:
    """A PNG of samples with the averaged weights; the same noise every time, for comparison."""
    if len(model.shape) != 3:
        return
    from scoretk.images import save_grid

    was_training = net.training
    net.eval()
    with averager.averaged(net):
        noise = PerSampleNoise(derive_seed(cfg.seed, "grid"), range(cfg.grid_size), device)
        x = model.sampler.sample(net, model.schedule, model.shape, noise, device=device)
    net.train(was_training)
    save_grid(x.float().cpu(), run.samples / f"step-{step:08d}.png")
