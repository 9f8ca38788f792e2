"""Resumable training runs of the toy models: a resumed run equals an uninterrupted one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tfmq_video.toy.training import EMA, RunState, load_run, prefetched, save_run

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_save_and_load_run_restores_model_ema_optimizer(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    ema.update(model, 1)
    save_run(tmp_path, model, ema, optimizer, RunState(step=1, seconds=2.0, losses=[(1, 0.5)]))

    clone = torch.nn.Linear(4, 3)
    clone_ema = EMA(clone, 0.9)
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    run = load_run(tmp_path, clone, clone_ema, clone_opt)
    assert run is not None and run.step == 1 and run.losses == [(1, 0.5)]
    assert torch.equal(clone.weight, model.weight)
    assert torch.equal(clone_ema.shadow["weight"], ema.shadow["weight"])
    assert torch.equal(clone_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert load_run(tmp_path / "empty", clone, clone_ema, clone_opt) is None


def test_prefetched_keeps_order() -> None:
    assert [s for s, _ in prefetched(lambda step: step * 2, range(3, 9), workers=3)] == list(range(3, 9))
    assert [b for _, b in prefetched(lambda step: step * 2, range(3, 9), workers=3)] == [6, 8, 10, 12, 14, 16]


@pytest.mark.parametrize("tool_name", ["train_toy_stdit3", "train_toy_cogvideox"])
def test_training_batches_are_a_function_of_seed_and_step(tool_name: str) -> None:
    tool = load_tool(tool_name)
    a, b, c = tool.training_batch(5, 0, 4), tool.training_batch(5, 0, 4), tool.training_batch(6, 0, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x0"], c["x0"])


@pytest.mark.parametrize("tool_name", ["train_toy_stdit3", "train_toy_cogvideox"])
def test_interrupted_training_resumes_exactly(tool_name: str, tmp_path: Path, monkeypatch) -> None:
    tool = load_tool(tool_name)
    common = ["--batch-size", "2", "--checkpoint-every", "1", "--no-bf16", "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", ["x", "--run-dir", str(tmp_path / "a"), "--steps", "2", *common])
    straight = tool.train(tool.parse_args())
    monkeypatch.setattr(sys, "argv", ["x", "--run-dir", str(tmp_path / "b"), "--steps", "1", *common])
    tool.train(tool.parse_args())
    monkeypatch.setattr(sys, "argv", ["x", "--run-dir", str(tmp_path / "b"), "--steps", "2", *common])
    resumed = tool.train(tool.parse_args())
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_toy_cogvideox_export_loads_through_the_adapter(tmp_path: Path, monkeypatch) -> None:
    from tfmq_video.toy.cogvideox_world import load_toy_cogvideox

    tool = load_tool("train_toy_cogvideox")
    monkeypatch.setattr(sys, "argv", ["x", "--run-dir", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                                      "--no-bf16", "--export", str(tmp_path / "model")])
    trained = tool.train(tool.parse_args())
    loaded = load_toy_cogvideox(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "training.json"]
    for (name, p), q in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
