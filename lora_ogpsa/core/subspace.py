"""The reference subspace: a low-rank orthonormal basis per LoRA tensor, estimated from gradient samples.

For one tensor, stack its S reference-gradient samples as the rows of G (S×n). The directions the reference
loss is most sensitive to are the top right singular vectors of G. With S ≪ n they come cheapest from the
S×S Gram matrix:

    K = G Gᵀ = V Λ Vᵀ          (eigh; Λ = squared singular values)
    U = Λ^{-1/2} Vᵀ G          (k×n, orthonormal rows: the top-k right singular vectors)

Tensors with the same number of entries are stacked and solved in one batched call. Pure torch (+ safetensors
for the file format): no transformers, no PEFT.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

FORMAT_NAME = "lora_ogpsa.core.subspace"
FORMAT_VERSION = "1"
INPUT_PREFIX = "input_basis/"  # keys of the activation-space bases in the file
ORTHONORMAL_TOLERANCE = 1e-4
# Eigenvalues of a float32 Gram matrix below λ_max·S·this are rounding noise, not directions.
_NOISE_FLOOR = 4 * torch.finfo(torch.float32).eps


@dataclass
class Subspace:
    """Orthonormal bases, one per tensor name, plus what is needed to judge them.

    Attributes:
        basis_by_name: `(k, n)` float32, orthonormal rows, for each tensor name (k may be 0).
        singular_values_by_name: `(k,)` float32, descending: the singular values of the kept directions.
        energy_by_name: share of the samples' squared norm that the kept directions capture (0 when k = 0).
        dropped_by_name: samples dropped for holding NaN/Inf.
        mean_coefficients_by_name: `(k,)` float32: the mean sample (the gradient of the mean reference loss)
            in basis coordinates, `U ḡ`; its signs say which way along each direction the loss rises.
        metadata: free-form strings saved with the file (config, step, reference-set hash, ...).
        input_basis_by_name: activation-space protection, per lora_A tensor name: `(m, d_in)` orthonormal
            rows spanning the reference inputs of that layer (energy `input_energy_by_name`); the rows of
            lora_A are kept orthogonal to them. Saved under `input_basis/<name>` keys.
    """

    basis_by_name: dict[str, torch.Tensor]
    singular_values_by_name: dict[str, torch.Tensor] = field(default_factory=dict)
    energy_by_name: dict[str, float] = field(default_factory=dict)
    dropped_by_name: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    mean_coefficients_by_name: dict[str, torch.Tensor] = field(default_factory=dict)
    input_basis_by_name: dict[str, torch.Tensor] = field(default_factory=dict)
    input_energy_by_name: dict[str, float] = field(default_factory=dict)

    @property
    def directions_by_name(self) -> dict[str, int]:
        """k for every tensor name."""
        return {name: basis.shape[0] for name, basis in self.basis_by_name.items()}

    @property
    def dropped_samples(self) -> int:
        """Total samples dropped for holding NaN/Inf, over all tensors."""
        return sum(self.dropped_by_name.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the bases."""
        return sum(basis.numel() * basis.element_size() for basis in self.basis_by_name.values())

    def summary(self) -> dict[str, float]:
        """min / median / max k, the number of tensors with k = 0, total directions and bytes."""
        ks = list(self.directions_by_name.values()) or [0]
        return {
            "k_min": min(ks),
            "k_median": statistics.median(ks),
            "k_max": max(ks),
            "k_zero": sum(k == 0 for k in ks),
            "directions": sum(ks),
            "tensors": len(self.basis_by_name),
            "dropped_samples": self.dropped_samples,
            "megabytes": self.nbytes / 2**20,
        }

    def to(self, device: torch.device | str) -> Subspace:
        """A copy with every basis on `device` (the other fields are shared)."""
        moved = {name: basis.to(device) for name, basis in self.basis_by_name.items()}
        inputs = {name: basis.to(device) for name, basis in self.input_basis_by_name.items()}
        return Subspace(moved, self.singular_values_by_name, self.energy_by_name, self.dropped_by_name,
                        dict(self.metadata), self.mean_coefficients_by_name, inputs, self.input_energy_by_name)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: one `(k, n)` float32 tensor per name, the rest as string metadata.

        The file is written to a temporary sibling and renamed, so a crash never leaves half a file.
        """
        path = Path(path)
        tensors = {name: basis.detach().to("cpu", torch.float32).contiguous()
                   for name, basis in self.basis_by_name.items()}
        tensors.update({INPUT_PREFIX + name: basis.detach().to("cpu", torch.float32).clone()
                        for name, basis in self.input_basis_by_name.items()})  # shared inputs: one copy each
        header = {
            **self.metadata,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "singular_values": _tensors_json(self.singular_values_by_name),
            "energy": json.dumps(self.energy_by_name),
            "dropped_samples": json.dumps(self.dropped_by_name),
            "mean_coefficients": _tensors_json(self.mean_coefficients_by_name),
            "input_energy": json.dumps(self.input_energy_by_name),
        }
        partial = path.with_name(f".{path.name}.partial")
        save_file(tensors, str(partial), metadata=header)
        partial.replace(path)

    @classmethod
    def load(cls, path: str | Path, *, numel_by_name: Mapping[str, int] | None = None) -> Subspace:
        """Read a file written by `save`, checking that it is ours and that every basis is orthonormal.

        Args:
            path: the `ogpsa_subspace.safetensors` file.
            numel_by_name: when given, every name must be present with a basis of this many columns
                (the LoRA tensors of the model it will constrain).

        Raises:
            ValueError: missing, corrupt or foreign file; a basis that is not 2-D, not finite or not
                orthonormal; names or sizes that do not match `numel_by_name`.
        """
        path = Path(path)
        header, basis_by_name = _read_safetensors(path)
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not an OGPSA subspace file (metadata `format` is "
                             f"{header.get('format')!r}, expected {FORMAT_NAME!r}); was it written by Subspace.save?")
        for name, basis in basis_by_name.items():
            _check_basis(path, name, basis)
        inputs = {name[len(INPUT_PREFIX):]: basis_by_name.pop(name) for name in list(basis_by_name)
                  if name.startswith(INPUT_PREFIX)}
        if numel_by_name is not None:
            _check_names(path, basis_by_name, numel_by_name)
        singular_values = _tensors_from_json(header.pop("singular_values", "{}"))
        mean_coefficients = _tensors_from_json(header.pop("mean_coefficients", "{}"))
        _check_recorded_k(path, basis_by_name, singular_values, mean_coefficients)
        energy = json.loads(header.pop("energy", "{}"))
        dropped = json.loads(header.pop("dropped_samples", "{}"))
        input_energy = json.loads(header.pop("input_energy", "{}"))
        for key in ("format", "format_version"):
            header.pop(key, None)
        return cls(basis_by_name, singular_values, energy, dropped, header, mean_coefficients, inputs, input_energy)


def compute_subspace(
    samples_by_name: Mapping[str, torch.Tensor], *, max_directions: int, energy: float
) -> Subspace:
    """Top right singular directions of each tensor's reference-gradient samples.

    Args:
        samples_by_name: for each tensor, its S gradient samples, shape `(S, *param_shape)`, any float dtype.
        max_directions: cap on k per tensor.
        energy: keep the fewest directions whose squared singular values reach this share of the total.

    Returns:
        A Subspace whose `basis_by_name[name]` is `(k, numel)` float32 with orthonormal rows, on the samples'
        device, `k ≤ min(S, max_directions)`. Samples holding NaN/Inf are dropped and counted; an all-zero
        (or all-dropped) sample matrix gives k = 0; rank-deficient samples give only their real directions.

    Raises:
        ValueError: `max_directions` < 1, `energy` outside (0, 1], or a tensor with fewer than 2 dimensions,
            not floating point, or with no sample (S = 0).
    """
    _check_arguments(max_directions, energy)
    matrices: dict[str, torch.Tensor] = {}
    for name, samples in samples_by_name.items():
        _check_samples(name, samples)
        matrices[name] = samples.detach().reshape(samples.shape[0], -1).float()  # (S, n)
    subspace = Subspace({})
    for names in _groups_of_equal_shape(matrices):
        _store(subspace, names, _solve_group([matrices[name] for name in names], max_directions, energy))
    return _finish(subspace, list(samples_by_name))


def _check_samples(name: str, samples: torch.Tensor) -> None:
    """`compute_subspace`'s contract for one tensor's samples: a floating tensor `(S, *param_shape)`, S >= 1."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples for {name!r} must be a torch.Tensor (S, *param_shape), got {type(samples).__name__}")
    if samples.dim() < 2:
        raise ValueError(f"samples for {name!r} must have shape (S, *param_shape), got {tuple(samples.shape)}")
    if not samples.is_floating_point():
        raise ValueError(f"samples for {name!r} must be floating point (gradients), got {samples.dtype}")
    if samples.shape[0] < 1 or samples[0].numel() < 1:
        raise ValueError(f"samples for {name!r}: shape {tuple(samples.shape)} holds no sample; give S >= 1 gradient "
                         "samples of a non-empty parameter")


def _check_arguments(max_directions: int, energy: float) -> None:
    if isinstance(max_directions, bool) or not isinstance(max_directions, int) or max_directions < 1:
        raise ValueError(f"`max_directions` must be an integer >= 1, got {max_directions!r}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1], got {energy!r}")


def _store(subspace: Subspace, names: list[str], solutions: list[_Solution]) -> None:
    for name, solution in zip(names, solutions, strict=True):
        subspace.basis_by_name[name] = solution.basis
        subspace.singular_values_by_name[name] = solution.singular_values
        subspace.energy_by_name[name] = solution.energy
        subspace.dropped_by_name[name] = solution.dropped
        subspace.mean_coefficients_by_name[name] = solution.mean_coefficients


def _finish(subspace: Subspace, names: list[str]) -> Subspace:
    """The bases in the callers' name order; NaN/Inf drops logged."""
    subspace.basis_by_name = {name: subspace.basis_by_name[name] for name in names}
    if subspace.dropped_samples:
        logger.warning("dropped %d reference-gradient samples holding NaN/Inf", subspace.dropped_samples)
    return subspace


def _groups_of_equal_shape(matrices: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names whose sample matrices share shape and device."""
    by_key: dict[tuple, list[str]] = defaultdict(list)
    for name, matrix in matrices.items():
        by_key[(*matrix.shape, str(matrix.device))].append(name)
    return list(by_key.values())


@dataclass
class _Solution:
    """One tensor's part of a batched solve."""

    basis: torch.Tensor  # (k, n)
    singular_values: torch.Tensor  # (k,)
    energy: float
    dropped: int
    mean_coefficients: torch.Tensor  # (k,): U ḡ


@dataclass
class _Streamed:
    """What a sketch knows of P tensors' samples besides its rows (`GradientSketch`)."""

    dropped: list[int]
    totals: torch.Tensor | None  # (P,) float64: the samples' squared norm; None: never shrunk (rows = samples)
    sums: torch.Tensor  # (P, n): sum of the kept samples
    counts: torch.Tensor  # (P,) float64: kept samples


@torch.no_grad()
def _solve_group(matrices: list[torch.Tensor], max_directions: int, energy: float,
                 streamed: _Streamed | None = None) -> list[_Solution]:
    """Top-k right singular vectors of P equal-shape `(S, n)` matrices, with one batched `eigh`.

    The Gram matrices and the final products are formed per matrix: stacking the samples into one (P, S, n)
    tensor copies all of them, which measured 3x slower than the products themselves. `streamed`: the matrices
    are sketches; energy shares are then of the samples' squared norm, and the means come from their sums.
    """
    rows, cols = matrices[0].shape
    if rows == 0:
        empty, none = matrices[0].new_zeros(0, cols), matrices[0].new_zeros(0)
        return [_Solution(empty, none, 0.0, 0, none) for _ in matrices]
    matrices, grams, dropped = _finite_grams(matrices)
    dropped = dropped if streamed is None else streamed.dropped
    totals = None if streamed is None else streamed.totals
    gram = torch.stack(grams).double()  # (P, S, S)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # (P, S), (P, S, S) ascending; float64 is free here
    eigenvalues, eigenvectors = eigenvalues.flip(-1).clamp_min(0), eigenvectors.flip(-1)
    real = eigenvalues > eigenvalues[:, :1] * rows * _NOISE_FLOOR  # (P, S): above the rounding noise
    eigenvalues = torch.where(real, eigenvalues, 0.0)
    ks = _directions_for_energy(eigenvalues, real, max_directions, energy, totals)  # (P,)
    k_max = int(ks.max())
    kept = torch.arange(rows, device=ks.device) < ks[:, None]  # (P, S)
    totals = eigenvalues.sum(-1) if totals is None else totals  # (P,)
    shares = ((eigenvalues * kept).sum(-1) / totals.clamp_min(1e-300)).tolist()
    singular_values = eigenvalues[:, :k_max].sqrt().float()  # (P, k_max)
    ks = ks.tolist()
    if k_max == 0:
        empty, none = matrices[0].new_zeros(0, cols), matrices[0].new_zeros(0)
        return [_Solution(empty, none, share, count, none) for share, count in zip(shares, dropped, strict=True)]
    # Rows of one tensor past its own k are computed and dropped: a batched product over k_max is cheaper
    # than ragged ones, and CholeskyQR orthonormalizes row by row, so the first k rows do not see the others.
    scale = torch.where(real[:, :k_max], eigenvalues[:, :k_max].clamp_min(1e-300).rsqrt(), 0.0)  # (P, k_max)
    weights = (eigenvectors[:, :, :k_max] * scale[:, None, :]).mT  # (P, k, S): Λ^{-1/2} Vᵀ
    projectors = weights.to(matrices[0].dtype).contiguous()
    raw = [projector @ matrix for projector, matrix in zip(projectors, matrices, strict=True)]  # (k_max, n) each
    inverses = _cholesky_qr_factors(raw, zero_rows=scale == 0)  # (P, k_max, k_max)
    bases = [inverse @ basis for inverse, basis in zip(inverses, raw, strict=True)]  # (k_max, n) each
    if streamed is None or streamed.totals is None:
        # U ḡ without another pass over G: Λ^{-1/2} Vᵀ G Gᵀ 1 / S, then the CholeskyQR correction.
        valid = (rows - torch.tensor(dropped, dtype=torch.float64, device=gram.device)).clamp_min(1)[:, None]
        means = (inverses.double() @ (weights @ gram.sum(-1, keepdim=True))).squeeze(-1) / valid  # (P, k_max)
    else:  # the sketch's rows are not the samples: their running sum gives ḡ
        sums = torch.stack([basis @ total for basis, total in zip(bases, streamed.sums, strict=True)])
        means = sums.double() / streamed.counts.clamp_min(1)[:, None]  # (P, k_max)
    return [_Solution(basis[:k], values[:k], share, count, mean[:k].float())
            for basis, k, values, share, count, mean in zip(
                bases, ks, singular_values, shares, dropped, means, strict=True)]


def _cholesky_qr_factors(raw: list[torch.Tensor], zero_rows: torch.Tensor) -> torch.Tensor:
    """L⁻¹ with L Lᵀ = U Uᵀ for each `(k, n)` U: `L⁻¹ U` has orthonormal rows (one CholeskyQR pass).

    U = Λ^{-1/2} Vᵀ G is orthonormal only up to float32 rounding amplified by σ_max²/σ_k² (measured 1e-4);
    one pass brings it to 1e-7. Zero rows (directions below the noise floor) stay zero.
    """
    gram = torch.stack([basis @ basis.T for basis in raw]).double()  # (P, k, k), ≈ I
    gram = gram + torch.diag_embed(zero_rows.double())
    lower = torch.linalg.cholesky(gram)
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    return torch.linalg.solve_triangular(lower, identity, upper=False).to(raw[0].dtype).contiguous()


def _finite_grams(matrices: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Gram matrices `(S, S)`; a sample holding NaN/Inf (its squared norm is not finite) is zeroed, which
    removes it from the subspace exactly as dropping it would, while S stays equal across the group."""
    grams = [matrix @ matrix.T for matrix in matrices]  # (S, S) each
    finite = torch.isfinite(torch.stack([gram.diagonal() for gram in grams]))  # (P, S): one check, one sync
    dropped = (~finite).sum(-1).tolist()
    for index in (i for i, count in enumerate(dropped) if count):
        keep = finite[index][:, None]  # (S, 1)
        matrices[index] = torch.where(keep, matrices[index], 0.0)
        grams[index] = matrices[index] @ matrices[index].T
    return matrices, grams, dropped


def _directions_for_energy(eigenvalues: torch.Tensor, real: torch.Tensor, max_directions: int, energy: float,
                           totals: torch.Tensor | None = None) -> torch.Tensor:
    """k per row: fewest directions reaching `energy` of the total, capped by the cap and the real rank.
    `totals` (P,): the samples' squared norm when the eigenvalues are a sketch's (lower bounds)."""
    cumulative = eigenvalues.cumsum(-1)  # (P, S)
    total = cumulative[:, -1:] if totals is None else totals[:, None]
    target = total * energy * (1 - 1e-12)
    reached = (cumulative < target).sum(-1) + 1  # first index reaching the target, 1-based
    rank = real.sum(-1)
    return torch.minimum(torch.minimum(reached, rank), torch.full_like(rank, max_directions))


def _tensors_json(tensors: Mapping[str, torch.Tensor]) -> str:
    return json.dumps({name: [round(float(x), 8) for x in values] for name, values in tensors.items()})


def _tensors_from_json(text: str) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in json.loads(text).items()}


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ValueError(f"{path}: subspace file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({error}); re-create it") from error
    return header, tensors


def _check_basis(path: Path, name: str, basis: torch.Tensor) -> None:
    if basis.dim() != 2 or basis.dtype != torch.float32:
        raise ValueError(f"{path}: basis {name!r} must be a 2-D float32 tensor (k, n), "
                         f"got {basis.dtype} {tuple(basis.shape)}")
    if not torch.isfinite(basis).all():
        raise ValueError(f"{path}: basis {name!r} holds NaN/Inf; the file is corrupt")
    if basis.shape[0]:
        gram = basis.double() @ basis.double().T
        error = float((gram - torch.eye(basis.shape[0], dtype=torch.float64)).abs().max())
        if error > ORTHONORMAL_TOLERANCE:
            raise ValueError(f"{path}: basis {name!r} rows are not orthonormal (max |UUᵀ - I| = {error:.2e}); "
                             "the file is corrupt or not a basis")


def _check_recorded_k(path: Path, basis_by_name: Mapping[str, torch.Tensor], *recorded: Mapping[str, torch.Tensor]
                      ) -> None:
    """Every basis has as many rows (k) as the singular values and mean coefficients recorded with it."""
    for name, basis in basis_by_name.items():
        for values in recorded:
            if name in values and values[name].numel() != basis.shape[0]:
                raise ValueError(f"{path}: basis {name!r} has k = {basis.shape[0]} directions, the values recorded "
                                 f"with it {values[name].numel()}; the file was altered — it is not the subspace "
                                 "this run computed")


def _check_names(path: Path, basis_by_name: Mapping[str, torch.Tensor], numel_by_name: Mapping[str, int]) -> None:
    missing = sorted(set(numel_by_name) - set(basis_by_name))
    extra = sorted(set(basis_by_name) - set(numel_by_name))
    if missing or extra:
        raise ValueError(f"{path}: subspace does not match the model's LoRA tensors "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); was it saved for another adapter?")
    for name, numel in numel_by_name.items():
        if basis_by_name[name].shape[1] != numel:
            raise ValueError(f"{path}: basis {name!r} has {basis_by_name[name].shape[1]} columns, "
                             f"the tensor has {numel} entries; was it saved for another adapter?")
