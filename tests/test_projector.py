"""Properties of the projection: orthogonality, idempotence, norms, float32 math for other dtypes."""

import pytest
import torch

from lora_ogpsa import compute_subspace, project_out
from lora_ogpsa.core.projector import StackedBasis, project_out_, span_fraction


def _basis(k, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=generator))[0].T.contiguous()  # (k, n)


def test_projected_vectors_are_orthogonal_to_the_basis():
    torch.manual_seed(0)
    basis, vectors = _basis(8, 500), torch.randn(4, 3, 500)
    projected = project_out(vectors, basis)
    assert projected.shape == vectors.shape
    residual = (projected @ basis.T).norm() / vectors.norm()
    assert residual < 1e-6


def test_idempotent_and_never_increases_the_norm():
    basis, vectors = _basis(5, 200), torch.randn(16, 200)
    once = project_out(vectors, basis)
    assert torch.allclose(project_out(once, basis), once, atol=1e-6)
    assert (once.norm(dim=-1) <= vectors.norm(dim=-1) + 1e-6).all()


def test_empty_basis_returns_input():
    vectors = torch.randn(3, 7)
    assert project_out(vectors, torch.empty(0, 7)) is vectors


def test_bfloat16_vectors_keep_dtype_and_use_float32_math():
    basis, vectors = _basis(4, 256), torch.randn(2, 256).bfloat16()
    projected = project_out(vectors, basis)
    assert projected.dtype == torch.bfloat16
    expected = vectors.float() - (vectors.float() @ basis.T) @ basis
    assert torch.equal(projected, expected.bfloat16())


def test_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="entries"):
        project_out(torch.randn(3, 10), _basis(2, 11))


def test_span_fraction():
    basis = _basis(3, 50)
    inside, outside = torch.randn(3) @ basis, project_out(torch.randn(50), basis)
    fractions = span_fraction(torch.stack([inside, outside, inside + outside, torch.zeros(50)]), basis)
    assert fractions[0] == pytest.approx(1.0, abs=1e-6)
    assert fractions[1] == pytest.approx(0.0, abs=1e-6)
    expected = inside.square().sum() / (inside + outside).square().sum()
    assert fractions[2] == pytest.approx(float(expected), rel=1e-5)
    assert fractions[3] == 0.0
    assert torch.equal(span_fraction(torch.randn(2, 50), torch.empty(0, 50)), torch.zeros(2))


def _tensors_and_bases(dtype=torch.float32):
    torch.manual_seed(0)
    samples = {"a": torch.randn(10, 4, 30), "b": torch.randn(10, 30, 4), "c": torch.randn(10, 5, 5),
               "zero": torch.zeros(10, 5, 5)}
    subspace = compute_subspace(samples, max_directions=3, energy=0.7)
    tensors = {name: torch.randn(value.shape[1:]).to(dtype) for name, value in samples.items()}
    tensors["no_basis"] = torch.randn(6).to(dtype)
    return tensors, subspace.basis_by_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_projection_matches_project_out(dtype):
    tensors, bases = _tensors_and_bases(dtype)
    original = {name: tensor.clone() for name, tensor in tensors.items()}
    stats = project_out_(tensors, bases)
    total, inside = 0.0, 0.0
    assert torch.equal(tensors.pop("no_basis"), original["no_basis"])  # skipped: not projected, not counted
    for name, tensor in tensors.items():
        assert tensor.dtype == dtype
        basis = bases[name]
        expected = project_out(original[name].reshape(-1), basis).view_as(tensor)
        tolerance = {"rtol": 2**-8, "atol": 1e-6} if dtype == torch.bfloat16 else {"atol": 1e-6}  # one bf16 ulp
        assert torch.allclose(tensor.float(), expected.float(), **tolerance)
        total += float(original[name].float().square().sum())
        inside += float((basis @ original[name].float().reshape(-1)).square().sum()) if basis.shape[0] else 0.0
    assert stats.squared_norm == pytest.approx(total, rel=1e-5)
    assert stats.squared_in_span == pytest.approx(inside, rel=1e-4)
    assert stats.removed_norm == pytest.approx(inside**0.5, rel=1e-4)
    assert 0 < stats.span_fraction < 1


def test_project_change_keeps_only_the_orthogonal_part_of_the_change():
    tensors, bases = _tensors_and_bases()
    del tensors["no_basis"]
    stacked = StackedBasis(bases)
    before_values = {name: tensor.clone() for name, tensor in tensors.items()}
    before = stacked.snapshot(tensors)
    for tensor in tensors.values():
        tensor.add_(torch.randn_like(tensor))
    change_norm = sum(float((tensors[n] - before_values[n]).square().sum()) for n in tensors)
    stats = stacked.project_change_(tensors, before)
    assert stats.squared_norm == pytest.approx(change_norm, rel=1e-5)  # k = 0 tensors count too
    for name, tensor in tensors.items():
        change = (tensor - before_values[name]).reshape(-1)
        assert (bases[name] @ change).norm() <= 1e-6 * change.norm()
    assert 0 < stats.span_fraction < 1
    # The parts outside the span are untouched: projecting again changes nothing.
    again = {name: tensor.clone() for name, tensor in tensors.items()}
    stacked.project_change_(again, before)
    assert all(torch.allclose(again[name], tensors[name], atol=1e-6) for name in tensors)


def test_stacked_views_match_the_bases():
    _, bases = _tensors_and_bases()
    views = StackedBasis(bases).views()
    assert list(views) == list(bases)
    for name, basis in bases.items():
        assert torch.equal(views[name], basis)


def test_one_sided_projection_removes_only_what_raises_the_reference_loss():
    torch.manual_seed(1)
    samples = {"a": torch.randn(12, 40) + 0.5, "b": torch.randn(12, 6, 5)}
    subspace = compute_subspace(samples, max_directions=4, energy=1.0)
    stacked = StackedBasis(subspace.basis_by_name, subspace.mean_coefficients_by_name)
    tensors = {name: torch.randn(value.shape[1:]) for name, value in samples.items()}
    before_values = {name: t.clone() for name, t in tensors.items()}
    before = stacked.snapshot(tensors)
    changes = {name: torch.randn_like(t) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        tensor.add_(changes[name])
    stacked.project_change_(tensors, before, one_sided=True)
    for name, values in samples.items():
        basis, slope = subspace.basis_by_name[name], subspace.mean_coefficients_by_name[name]
        original = basis @ changes[name].reshape(-1)
        applied = basis @ (tensors[name] - before_values[name]).reshape(-1)
        rises = original * slope > 0
        assert torch.allclose(applied[rises], torch.zeros(int(rises.sum())), atol=1e-5)
        assert torch.allclose(applied[~rises], original[~rises], atol=1e-5)  # loss-lowering parts are kept
        mean_gradient = values.reshape(12, -1).mean(0)
        # first order: the applied change does not raise the mean reference loss along the protected rows
        assert float((slope * applied).sum()) <= 1e-5
        assert float(mean_gradient @ basis.T @ applied) <= 1e-4
