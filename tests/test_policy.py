"""The execution policy: process-wide settings only at a command's entry, speed settings read
from the recipe in one place."""
from __future__ import annotations

import torch

import scoretk.execution.policy as policy_mod
from scoretk.execution.policy import ExecutionPolicy
from scoretk.plugins import default_registry
from scoretk.recipe import Recipe
from scoretk.training import train


def test_library_training_leaves_malloc_alone_and_the_entry_sets_it(tmp_path, toy_recipe,
                                                                  monkeypatch):
    calls = []
    monkeypatch.setattr(policy_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    toy_recipe["train"].update(iterations=2, checkpoint_every=2)
    train(Recipe.from_dict(toy_recipe, default_registry()), default_registry(), tmp_path)
    assert calls == []  # a notebook calling train() keeps its process as it was
    ExecutionPolicy.for_training(Recipe.from_dict(toy_recipe, default_registry()).train) \
        .setup_process()
    assert calls == [1]
    ExecutionPolicy(keep_freed_memory=False, device_name="cpu").setup_process()
    assert calls == [1]


def test_policy_reads_the_recipe_speed_settings(toy_recipe):
    toy_recipe["train"].update(channels_last=True, bf16=True, batch_threads=3)
    policy = ExecutionPolicy.for_training(Recipe.from_dict(toy_recipe, default_registry()).train)
    assert policy.device == torch.device("cpu") and not policy.uses_bf16
    assert any("bf16 applies on CUDA only" in n for n in policy.notes())
    x = policy.as_input(torch.zeros(2, 3, 4, 4))
    assert x.is_contiguous(memory_format=torch.channels_last)
    net = torch.nn.Linear(2, 2)
    net.batch_independent = True
    assert policy.split_chunks(net, batch=6, item_values=2) == 3
    assert policy.replace(batch_threads=1).split_chunks(net, batch=6, item_values=2) == 1
