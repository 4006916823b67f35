"""Properties of compute_subspace and the Subspace file format, on random and constructed inputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_ogpsa import Subspace, compute_subspace


def _random_samples(*shape, rank=None, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    samples, n = shape[0], int(torch.tensor(shape[1:]).prod())
    if rank is None:
        matrix = torch.randn(samples, n, generator=generator)
    else:
        matrix = torch.randn(samples, rank, generator=generator) @ torch.randn(rank, n, generator=generator)
    return matrix.reshape(shape).to(dtype)


def _with_spectrum(singular_values, n, seed=0):
    """An (S, n) matrix whose singular values are exactly `singular_values`; returns it and its right vectors."""
    generator = torch.Generator().manual_seed(seed)
    count = len(singular_values)
    left = torch.linalg.qr(torch.randn(count, count, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, count, generator=generator, dtype=torch.float64))[0].T  # (S, n)
    matrix = left @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ right
    return matrix.float(), right


def _orthonormality_error(basis):
    gram = basis.double() @ basis.double().T
    return float((gram - torch.eye(basis.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_orthonormal_float32(dtype):
    samples = {"a": _random_samples(32, 16, 40, dtype=dtype), "b": _random_samples(32, 300, 4, seed=1, dtype=dtype)}
    subspace = compute_subspace(samples, max_directions=12, energy=1.0)
    for name, basis in subspace.basis_by_name.items():
        assert basis.dtype == torch.float32
        assert basis.shape == (12, samples[name][0].numel())
        assert _orthonormality_error(basis) < 1e-6


def test_spans_the_float64_svd_top_k():
    matrix = _random_samples(48, 2000, seed=3)
    # A decaying spectrum so that the top-k space is well separated from the rest.
    matrix = torch.diag(torch.logspace(0, -3, 48)) @ matrix
    basis = compute_subspace({"a": matrix}, max_directions=10, energy=1.0).basis_by_name["a"]
    reference = torch.linalg.svd(matrix.double(), full_matrices=False).Vh[:10]
    cosines = torch.linalg.svdvals(basis.double() @ reference.T)  # cosines of the principal angles
    assert torch.allclose(cosines, torch.ones(10, dtype=torch.float64), atol=1e-5)


def test_energy_threshold_picks_expected_k():
    spectrum = [10.0, 5.0, 3.0, 1.0] + [0.1] * 28
    matrix, right = _with_spectrum(spectrum, 500)
    total = sum(s * s for s in spectrum)
    for energy, expected in [(0.5, 1), (0.9, 2), (0.95, 3), (0.995, 4), (1.0, 32)]:
        subspace = compute_subspace({"a": matrix}, max_directions=64, energy=energy)
        assert subspace.directions_by_name["a"] == expected, energy
        captured = sum(s * s for s in spectrum[:expected]) / total
        assert subspace.energy_by_name["a"] == pytest.approx(captured, rel=1e-5)
    values = compute_subspace({"a": matrix}, max_directions=3, energy=1.0).singular_values_by_name["a"]
    assert torch.allclose(values, torch.tensor([10.0, 5.0, 3.0]), rtol=1e-5)
    basis = compute_subspace({"a": matrix}, max_directions=2, energy=1.0).basis_by_name["a"]
    assert torch.allclose(torch.linalg.svdvals(basis.double() @ right[:2].T), torch.ones(2, dtype=torch.float64))


def test_k_is_capped_by_samples_and_max_directions():
    subspace = compute_subspace({"few": _random_samples(5, 100), "many": _random_samples(40, 100)},
                                max_directions=8, energy=1.0)
    assert subspace.directions_by_name == {"few": 5, "many": 8}


def test_rank_deficient_gives_only_real_directions():
    subspace = compute_subspace({"a": _random_samples(64, 3000, rank=5)}, max_directions=32, energy=1.0)
    assert subspace.directions_by_name["a"] == 5
    assert subspace.energy_by_name["a"] == pytest.approx(1.0)


def test_zero_samples_give_empty_basis_not_nan():
    subspace = compute_subspace({"zero": torch.zeros(16, 8, 4), "live": _random_samples(16, 8, 4)},
                                max_directions=4, energy=0.9)
    assert subspace.basis_by_name["zero"].shape == (0, 32)
    assert subspace.energy_by_name["zero"] == 0.0
    assert subspace.directions_by_name["live"] > 0
    assert all(torch.isfinite(basis).all() for basis in subspace.basis_by_name.values())


def test_nan_and_inf_samples_are_dropped_and_counted():
    clean = _random_samples(12, 200, rank=3)
    dirty = torch.cat([clean, torch.full((1, 200), float("nan")), torch.full((1, 200), float("inf"))])
    subspace = compute_subspace({"a": dirty, "b": clean}, max_directions=8, energy=1.0)
    assert subspace.dropped_by_name == {"a": 2, "b": 0}
    assert subspace.dropped_samples == 2
    basis, expected = subspace.basis_by_name["a"], compute_subspace({"a": clean}, max_directions=8, energy=1.0)
    assert basis.shape == (3, 200) and torch.isfinite(basis).all()
    assert torch.allclose(basis @ expected.basis_by_name["a"].T @ expected.basis_by_name["a"], basis, atol=1e-5)
    every_row_bad = compute_subspace({"a": torch.full((4, 10), float("nan"))}, max_directions=2, energy=1.0)
    assert every_row_bad.directions_by_name == {"a": 0} and every_row_bad.dropped_samples == 4


def test_batched_equals_per_tensor():
    samples = {f"t{i}": _random_samples(24, 6, 50, seed=i) for i in range(5)}
    samples["other_shape"] = _random_samples(24, 7, 3, seed=9)
    batched = compute_subspace(samples, max_directions=6, energy=0.8)
    probe = torch.randn(10, 300)
    for name, tensor in samples.items():
        alone = compute_subspace({name: tensor}, max_directions=6, energy=0.8)
        assert alone.directions_by_name[name] == batched.directions_by_name[name]
        # Compare the projectors (bases are only defined up to sign).
        u, v = batched.basis_by_name[name], alone.basis_by_name[name]
        x = probe[:, : u.shape[1]]
        assert torch.allclose((x @ u.T) @ u, (x @ v.T) @ v, atol=1e-5)
        assert torch.allclose(batched.singular_values_by_name[name], alone.singular_values_by_name[name])


def test_keeps_the_order_and_device_of_the_input():
    samples = {"z": _random_samples(8, 10), "a": _random_samples(8, 3, 3)}
    subspace = compute_subspace(samples, max_directions=2, energy=1.0)
    assert list(subspace.basis_by_name) == ["z", "a"]
    assert all(basis.device == samples["z"].device for basis in subspace.basis_by_name.values())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_directions": 0, "energy": 0.9}, "max_directions"),
    ({"max_directions": 2.5, "energy": 0.9}, "max_directions"),
    ({"max_directions": 4, "energy": 0.0}, "energy"),
    ({"max_directions": 4, "energy": 1.5}, "energy"),
    ({"max_directions": 4, "energy": float("nan")}, "energy"),
])
def test_compute_subspace_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_subspace({"a": torch.ones(3, 4)}, **kwargs)


def test_compute_subspace_rejects_samples_without_sample_axis():
    with pytest.raises(ValueError, match=r"shape \(S, \*param_shape\)"):
        compute_subspace({"a": torch.ones(4)}, max_directions=2, energy=1.0)


def test_save_load_round_trip(tmp_path):
    samples = {"layer.lora_A.weight": _random_samples(16, 4, 30), "layer.lora_B.weight": torch.zeros(16, 30, 4)}
    subspace = compute_subspace(samples, max_directions=3, energy=1.0)
    subspace.metadata = {"step": "7", "reference_hash": "abc"}
    path = tmp_path / "ogpsa_subspace.safetensors"
    subspace.save(path)
    loaded = Subspace.load(path, numel_by_name={"layer.lora_A.weight": 120, "layer.lora_B.weight": 120})
    assert loaded.metadata == {"step": "7", "reference_hash": "abc"}
    assert loaded.directions_by_name == {"layer.lora_A.weight": 3, "layer.lora_B.weight": 0}
    for name, basis in subspace.basis_by_name.items():
        assert torch.equal(loaded.basis_by_name[name], basis)
        assert torch.allclose(loaded.singular_values_by_name[name], subspace.singular_values_by_name[name])
    assert loaded.energy_by_name == pytest.approx(subspace.energy_by_name)
    assert not list(tmp_path.glob(".*partial"))


def test_load_refuses_corrupt_file(tmp_path):
    path = tmp_path / "ogpsa_subspace.safetensors"
    compute_subspace({"a": _random_samples(4, 10)}, max_directions=2, energy=1.0).save(path)
    path.write_bytes(path.read_bytes()[:-17])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        Subspace.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        Subspace.load(path)


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Subspace.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.eye(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an OGPSA subspace file"):
        Subspace.load(foreign)


def _save_raw(path, tensor):
    save_file({"a": tensor}, str(path), metadata={"format": "lora_ogpsa.core.subspace", "singular_values": json.dumps({})})


def test_load_refuses_non_orthonormal_or_malformed_bases(tmp_path):
    path = tmp_path / "s.safetensors"
    _save_raw(path, torch.ones(2, 5))
    with pytest.raises(ValueError, match="not orthonormal"):
        Subspace.load(path)
    _save_raw(path, torch.ones(5))
    with pytest.raises(ValueError, match="2-D float32"):
        Subspace.load(path)
    _save_raw(path, torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        Subspace.load(path)


def test_load_checks_names_and_sizes_against_the_model(tmp_path):
    path = tmp_path / "s.safetensors"
    compute_subspace({"a": _random_samples(4, 10)}, max_directions=2, energy=1.0).save(path)
    with pytest.raises(ValueError, match="does not match"):
        Subspace.load(path, numel_by_name={"b": 10})
    with pytest.raises(ValueError, match="10 columns, the tensor has 12"):
        Subspace.load(path, numel_by_name={"a": 12})


def test_summary_and_to():
    subspace = compute_subspace({"a": _random_samples(6, 10), "b": torch.zeros(6, 10)}, max_directions=4, energy=1.0)
    summary = subspace.summary()
    assert (summary["k_min"], summary["k_max"], summary["k_zero"], summary["directions"]) == (0, 4, 1, 4)
    assert summary["megabytes"] == pytest.approx(4 * 10 * 4 / 2**20)
    assert subspace.to("cpu").directions_by_name == subspace.directions_by_name


def test_mean_coefficients_are_the_mean_sample_in_basis_coordinates(tmp_path):
    samples = {"a": _random_samples(20, 6, 40, seed=4) + 0.3, "b": torch.zeros(20, 8), "c": _random_samples(20, 30)}
    samples["c"][3] = float("nan")
    subspace = compute_subspace(samples, max_directions=5, energy=1.0)
    for name, values in samples.items():
        matrix = values.reshape(20, -1)
        finite = matrix[torch.isfinite(matrix).all(1)]
        expected = subspace.basis_by_name[name] @ finite.mean(0)
        assert torch.allclose(subspace.mean_coefficients_by_name[name], expected, atol=1e-5), name
    subspace.save(tmp_path / "s.safetensors")
    loaded = Subspace.load(tmp_path / "s.safetensors")
    assert all(torch.allclose(loaded.mean_coefficients_by_name[n], v) for n, v in
               subspace.mean_coefficients_by_name.items())
