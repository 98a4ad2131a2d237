"""The training loop: data -> step -> periodic work (log, grid, checkpoint).

Every random number a step uses comes from a generator seeded by (seed, step, rank) and the
batch order is a pure function of (seed, step), so a resumed run replays the uninterrupted one
exactly. Checkpoints are atomic; a non-finite loss or gradient stops the run before anything
bad is written; SIGINT/SIGTERM finish the step, write a checkpoint and exit, and a second
signal stops at once (never inside a checkpoint write).

Every check that can fail (data, batch size, the net) runs before the run directory is
touched, so a bad restart loses nothing.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from scoretk import assemble
from scoretk.checkpoint import checkpoint_step
from scoretk.components import Dataset
from scoretk.data import augment
from scoretk.execution.policy import ExecutionPolicy
from scoretk.files import HeldSignals, Stopped
from scoretk.recipe import Recipe
from scoretk.registry import Registry
from scoretk.rng import derive_seed, generator, set_global_rng_state
from scoretk.training.batches import StepBatches, batches
from scoretk.training.builder import build_trainer
from scoretk.training.callbacks import Periodic, Session, StepInfo, default_callbacks
from scoretk.training.quality import prepare as prepare_evaluation
from scoretk.training.log import LogWindow, open_tensorboard
from scoretk.training.run import TrainingRun

__all__ = ["Interrupted", "StepBatches", "TrainingError", "train"]


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


class Interrupted(Stopped):
    """SIGINT/SIGTERM arrived; the step finished and a checkpoint was written."""


def train(recipe: Recipe, registry: Registry, run_dir: str | Path | None = None,
          restart: bool = False, policy: ExecutionPolicy | None = None) -> Path:
    """Train `recipe`; returns the path of the final checkpoint. Without a `policy`, the
    recipe's own settings in this process (the command line sets up torchrun and malloc)."""
    policy = policy or ExecutionPolicy.for_training(recipe.train)
    policy.device  # an unavailable device fails here, before anything is written
    data = assemble.build_data(recipe, registry)
    resolved = assemble.resolve(recipe, data)  # deterministic: same values on every rank
    order = StepBatches(len(data), resolved.train.batch_size, resolved.train.seed,
                        policy.dist.rank, policy.dist.world)
    trainer = build_trainer(resolved, registry, data.shape, policy)
    evaluation = prepare_evaluation(resolved, registry, data, policy)
    run = TrainingRun.for_recipe(recipe, run_dir, policy.dist)
    with run.open(restart) as state:
        step, changes = 0, []
        if state is not None:
            changes = run.check_resumable(state, resolved, registry)
            trainer.load_state_dict(state)
            step = int(state["step"])
            set_global_rng_state(state.get("rng", {}))
        run.begin(resolved, step)
        session = _open_session(resolved, run, trainer, policy, data, step)
        session.best = state.get("eval_best") if state is not None else None
        if session.is_main:
            _print_header(session, data, order, step, changes)
        try:
            _run(session, data, order, default_callbacks(session, evaluation))
        finally:
            session.bar.close()
            if session.writer is not None:
                session.writer.close()
    return session.last_checkpoint if session.last_checkpoint is not None else run.latest()


def _open_session(recipe: Recipe, run: TrainingRun, trainer, policy: ExecutionPolicy,
                  data: Dataset, step: int) -> Session:
    main = policy.dist.is_main
    bar = tqdm(total=recipe.train.iterations, initial=step, disable=not main, unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    return Session(recipe, run, trainer, policy, tuple(data.shape),
                   LogWindow(trainer.model.schedule.num_levels, policy.device), bar,
                   open_tensorboard(run.dir) if main else None, run.resumed_from, step)


def _print_header(s: Session, data: Dataset, order: StepBatches, step: int,
                  changes: list[str]) -> None:
    chunks = s.policy.split_chunks(s.trainer.net, order.local, math.prod(data.shape))
    dist = s.policy.dist
    where = f"device {s.policy.device}" + (f" on each of {dist.world} processes (this is rank "
                                           f"{dist.rank})" if dist.world > 1 else "")
    print(f"scoretk train: {s.recipe.name} | run {s.run.path} | {where} | "
          f"{assemble.count_parameters(s.trainer.net):,} parameters | "
          f"{s.trainer.model.schedule.num_levels} levels | {len(data)} items "
          f"{tuple(data.shape)}"
          + (f" | batch split across {chunks} CPU threads" if chunks > 1 else "")
          + (f" | resuming at step {step}" if step else ""), file=sys.stderr)
    if changes:
        print(f"resuming with changed settings: {', '.join(changes)}", file=sys.stderr)
    for note in s.policy.notes():
        print(f"note: {note}", file=sys.stderr)


def _run(s: Session, data: Dataset, order: StepBatches, callbacks: list[Periodic]) -> None:
    """Steps until the recipe's last one, a stop signal or the time limit. The first signal
    lets the step finish and a checkpoint be written; a second one stops at once."""
    with HeldSignals(hold=1) as signals:
        try:
            _steps(s, data, order, callbacks, signals)
        except Stopped as exc:
            if isinstance(exc, Interrupted):
                raise
            raise Stopped(exc.signum, f"stopped at once by a second signal, after step "
                          f"{s.step}; the last checkpoint is "
                          f"{s.last_checkpoint or '(none yet)'}") from None
    _finish(s, s.step)


def _steps(s: Session, data: Dataset, order: StepBatches, callbacks: list[Periodic],
           signals: HeldSignals) -> None:
    cfg, dist, device = s.recipe.train, s.policy.dist, s.policy.device
    limit = cfg.time_limit_minutes
    deadline = time.monotonic() + 60 * limit if limit else None
    for x in batches(data, order, s.step, cfg.iterations, cfg.num_workers):
        g = generator(derive_seed(cfg.seed, "step", s.step, dist.rank), device)
        x = augment(x.to(device, non_blocking=True), s.recipe.data.params, g)
        loss, grad_norm, stats = s.trainer.step(s.policy.as_input(x), g, s.step)
        s.step += 1
        s.window.add(loss, grad_norm, stats, x.shape[0] * dist.world)
        s.bar.update(1)
        info = StepInfo(s.step, _stop_reason(signals, deadline, dist), s.step == cfg.iterations)
        due = [cb for cb in callbacks if cb.due(info)]
        if due or dist.world > 1:  # the only host sync, never per step on one process
            _check_finite(s)
        for cb in due:
            cb(info)
        if info.stop == "signal":
            raise Interrupted(signals.pending() or signal.SIGINT,
                              f"interrupted at step {s.step}; checkpoint {s.last_checkpoint} "
                              "written; run the same command again to resume")
        if info.stop == "time":
            if s.is_main:
                print(f"\ntime limit of {limit} min reached at step {s.step}; run the same "
                      "command again to continue", file=sys.stderr)
            return


def _stop_reason(signals: HeldSignals, deadline: float | None, dist) -> str | None:
    """Why the run stops after this step, if it does; every rank takes the same decision."""
    stopping = signals.pending() is not None
    out_of_time = deadline is not None and time.monotonic() > deadline
    if dist.world > 1:
        stopping, out_of_time = bool(dist.max_int(int(stopping))), \
            bool(dist.max_int(int(out_of_time)))
    return "signal" if stopping else "time" if out_of_time else None


def _check_finite(s: Session) -> None:
    bad = s.policy.dist.max_int(s.trainer.step.first_bad())
    if bad >= 0:
        raise TrainingError(f"non-finite loss or gradient at step {bad}; stopped. The last good "
                            f"checkpoint is {s.last_checkpoint or '(none yet)'}; lower optim.lr "
                            "or set optim.grad_clip")


def _finish(s: Session, step: int) -> None:
    if s.is_main and (s.last_checkpoint is None or checkpoint_step(s.last_checkpoint) < step):
        s.save(step)
    if s.is_main:
        print(f"done: {step} steps; checkpoint {s.last_checkpoint}", file=sys.stderr)
