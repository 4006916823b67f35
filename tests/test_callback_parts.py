"""The callback's parts, each alone: mode checks, refresh schedule, projection, replay, state, telemetry."""

import types

import pytest
import torch

from lora_ogpsa import OGPSACallback, OGPSAConfig, compute_subspace
from lora_ogpsa.callback.guards import check_modes
from lora_ogpsa.callback.projection import Projection
from lora_ogpsa.callback.schedule import RefreshSchedule
from lora_ogpsa.callback.state import load_checkpoint_subspace, save_subspace
from lora_ogpsa.callback.telemetry import Telemetry
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import checkpoint_dir


def _parameters(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.nn.Parameter(torch.randn(4, 6, generator=generator)),
            "a.lora_B.weight": torch.nn.Parameter(torch.randn(6, 4, generator=generator))}


def _subspace(parameters, k: int = 3):
    samples = {name: torch.randn(8, *p.shape, generator=torch.Generator().manual_seed(1))
               for name, p in parameters.items()}
    return compute_subspace(samples, max_directions=k, energy=1.0)


@pytest.mark.parametrize("project", ["update", "none"])
def test_replay_needs_a_gradient_projection_in_the_python_api_too(project):
    with pytest.raises(ValueError, match=f"needs project='grad', got project='{project}'"):
        check_modes(OGPSAConfig(project=project), replay=True)
    replay = types.SimpleNamespace(batches=[object()])
    with pytest.raises(ValueError, match="needs project='grad'"):
        OGPSACallback(OGPSAConfig(project=project), [], replay=replay)
    check_modes(OGPSAConfig(project="grad"), replay=True)
    check_modes(OGPSAConfig(project=project), replay=False)


def test_refresh_schedule():
    schedule = RefreshSchedule(every=4)
    assert [step for step in range(10) if schedule.is_due(step)] == [0, 1, 4, 8]
    assert not schedule.runs_after(8, max_steps=8) and schedule.runs_after(4, max_steps=8)
    assert [step for step in range(10) if RefreshSchedule(0).is_due(step)] == [0, 1]


def test_update_projection_leaves_no_change_in_the_span():
    parameters = _parameters()
    subspace = _subspace(parameters)
    projection = Projection(subspace, parameters)
    before = {name: p.detach().clone() for name, p in parameters.items()}
    projection.snapshot()
    with torch.no_grad():
        for p in parameters.values():
            p.add_(torch.randn_like(p))
    stats = projection.project_change_(one_sided=False)
    for name, p in parameters.items():
        change = (p.detach() - before[name]).flatten()
        assert float((subspace.basis_by_name[name] @ change).norm()) < 1e-5 * float(change.norm())
    assert 0 < stats.span_fraction < 1


def test_grad_projection_and_first_moment():
    parameters = _parameters()
    subspace = _subspace(parameters)
    projection = Projection(subspace, parameters)
    for p in parameters.values():
        p.grad = torch.randn_like(p)
    projection.project_gradients_()
    optimizer = torch.optim.AdamW(parameters.values())
    for p in parameters.values():
        optimizer.state[p]["exp_avg"] = torch.randn_like(p)
    projection.project_first_moment_(optimizer)
    for name, p in parameters.items():
        for vector in (p.grad, optimizer.state[p]["exp_avg"]):
            assert float((subspace.basis_by_name[name] @ vector.flatten()).norm()) < 1e-5


def test_state_round_trip_and_a_missing_or_broken_file(tmp_path):
    parameters = _parameters()
    subspace = _subspace(parameters)
    subspace.metadata["step"] = "2"
    assert load_checkpoint_subspace(tmp_path, 2, parameters) is None  # nothing saved: recompute
    directory = checkpoint_dir(tmp_path, 2)
    directory.mkdir(parents=True)
    save_subspace(subspace, directory)
    loaded = load_checkpoint_subspace(tmp_path, 2, parameters)
    for name, basis in subspace.basis_by_name.items():
        assert torch.equal(loaded.basis_by_name[name], basis)
    (directory / "ogpsa_subspace.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=r"--resume: .*resume from an earlier checkpoint"):
        load_checkpoint_subspace(tmp_path, 2, parameters)


def test_telemetry_waits_for_a_log_with_a_loss():
    parameters = _parameters()
    telemetry = Telemetry()
    telemetry.basis_installed(_subspace(parameters))
    telemetry.add("refresh_seconds", 1.0)
    telemetry.add("refresh_seconds", 2.0)
    state = types.SimpleNamespace(log_history=[{"step": 3, "loss": 1.0}], global_step=3)
    logs = {"learning_rate": 1e-3}
    telemetry.merge_into(logs, state)
    assert logs == {"learning_rate": 1e-3}  # no loss: kept for the next log
    logs = {"loss": 1.0}
    telemetry.merge_into(logs, state)
    assert logs["ogpsa/refresh_seconds"] == 3.0 and "ogpsa/k_max" not in logs
    assert state.log_history[-1]["ogpsa/refresh_seconds"] == 3.0 and telemetry.pending == {}
