"""The streaming Frequent Directions sketch of the reference gradients (`sketch.GradientSketch`).

Exactness: with S ≤ ℓ samples nothing is shrunk and the bases are `compute_subspace`'s on all samples.
Beyond ℓ: the Frequent Directions guarantee, and the energy the top-k directions capture against the exact
top-k, on constructed spectra (numbers in `test_captured_energy_on_constructed_spectra`).
"""

import pytest
import torch

from lora_ogpsa import OGPSAConfig, compute_subspace
from lora_ogpsa.core.sketch import GradientSketch


def _projector_distance(first, second):
    """‖P1 − P2‖_F of the orthogonal projectors onto the row spans (bases are only defined up to rotation)."""
    first, second = first.double(), second.double()
    return float((first.T @ first - second.T @ second).norm())


def _with_spectrum(singular_values, n, seed=0):
    """An (S, n) float64 matrix whose singular values are exactly `singular_values`."""
    generator = torch.Generator().manual_seed(seed)
    count = len(singular_values)
    left = torch.linalg.qr(torch.randn(count, count, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, count, generator=generator, dtype=torch.float64))[0].T
    return (left * torch.tensor(singular_values, dtype=torch.float64)) @ right


def _low_rank(samples, *shape, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    return (torch.randn(samples, rank, generator=generator) @ torch.randn(rank, n, generator=generator)).reshape(
        samples, *shape)


def _sketch(samples_by_name, *, rows, block):
    sketch = GradientSketch({name: value[0] for name, value in samples_by_name.items()}, rows=rows)
    total = len(next(iter(samples_by_name.values())))
    for start in range(0, total, block):
        sketch.add_({name: value[start:start + block] for name, value in samples_by_name.items()})
    return sketch


def _captured(matrix, basis):
    """Share of ‖A‖²_F that the rows of `basis` capture."""
    return float((matrix @ basis.double().T).square().sum() / matrix.square().sum())


@pytest.mark.parametrize(("samples", "block"), [(32, 8), (20, 8), (32, 16), (7, 3)])
def test_equals_compute_subspace_when_samples_fit(samples, block):
    values = {"a.lora_A.weight": _low_rank(samples, 6, 50, rank=5, seed=0),
              "a.lora_B.weight": _low_rank(samples, 50, 6, rank=40, seed=1),
              "b.lora_A.weight": _low_rank(samples, 7, 3, rank=3, seed=2),
              "zero": torch.zeros(samples, 4, 5)}
    values["a.lora_B.weight"][2] = float("nan")
    values["b.lora_A.weight"][-1, 0, 0] = float("inf")
    sketch = _sketch(values, rows=32, block=block)
    for energy in (0.9, 1.0):
        streamed = sketch.subspace(max_directions=8, energy=energy)
        exact = compute_subspace(values, max_directions=8, energy=energy)
        assert sketch.shrinks == 0 and list(streamed.basis_by_name) == list(values)
        for name in values:
            assert streamed.basis_by_name[name].shape == exact.basis_by_name[name].shape, name
            assert _projector_distance(streamed.basis_by_name[name], exact.basis_by_name[name]) <= 1e-5, name
            assert streamed.energy_by_name[name] == pytest.approx(exact.energy_by_name[name], abs=1e-7)
            assert torch.allclose(streamed.singular_values_by_name[name], exact.singular_values_by_name[name])
            assert torch.allclose(streamed.mean_coefficients_by_name[name], exact.mean_coefficients_by_name[name],
                                  atol=1e-5)
        assert streamed.dropped_by_name == exact.dropped_by_name == {
            "a.lora_A.weight": 0, "a.lora_B.weight": 1, "b.lora_A.weight": 1, "zero": 0}
    assert streamed.directions_by_name["zero"] == 0
    assert streamed.metadata["sketch_shrinks"] == "0" and streamed.metadata["sketch_error"] == "0"


def test_frequent_directions_guarantee_beyond_the_sketch():
    # A decaying spectrum with a long tail: S = 256 samples through a sketch of ℓ = 32 rows, blocks of 8.
    matrix = _with_spectrum([(i + 1) ** -0.5 for i in range(256)], 800)
    rows, block = 32, 8
    sketch = _sketch({"a": matrix.float()}, rows=rows, block=block)
    sketched = sketch.rows_by_name()["a"].double()  # (ℓ, n)
    assert sketched.shape == (rows, 800) and sketch.shrinks == (256 - rows) // block
    delta = float(sketch._groups[0].error[0])
    probes = torch.nn.functional.normalize(torch.randn(200, 800, dtype=torch.float64), dim=1)
    gap = (probes @ matrix.T).square().sum(1) - (probes @ sketched.T).square().sum(1)  # ‖Ax‖² − ‖Bx‖²
    assert float(gap.min()) >= -1e-5 and float(gap.max()) <= delta * (1 + 1e-4)
    singular = torch.linalg.svdvals(matrix).square()
    for j in (0, 4, 8, 16):
        assert delta <= float(singular[j:].sum()) / (rows - block + 1 - j)
    assert sketch.relative_error() == pytest.approx(delta / float(matrix.square().sum()), rel=1e-5)


# Measured (S = 256 samples of n = 3000 entries, blocks of 8, k = 8; the shortfall is exact top-k energy minus
# the sketch's, as shares of ‖A‖²_F):
#   spectrum σ_i                          ℓ = 16           ℓ = 32 (default)    ℓ = 64
#   1/i                                   0.0071 (0.8 %)   0.00001 (0.001 %)   2e-7
#   0.9^i                                 0.011 (1.3 %)    7e-8                9e-8
#   i^-1/2 (long heavy tail)              0.10 (23 %)      0.014 (3.2 %)       0.0007 (0.16 %)
#   8 strong (10/i) over a flat tail of 1 0.057 (15 %)     0.026 (6.9 %)       0.0097 (2.5 %)
# (relative shortfall in brackets). The tolerances below sit just above these; the guarantee is k·Δ/‖A‖²_F.
@pytest.mark.parametrize(("spectrum", "rows", "tolerance"), [
    ([(i + 1) ** -1.0 for i in range(256)], 32, 1e-4),
    ([0.9 ** i for i in range(256)], 32, 1e-5),
    ([(i + 1) ** -0.5 for i in range(256)], 32, 0.035),
    ([(i + 1) ** -0.5 for i in range(256)], 64, 0.003),
    ([10.0 / (i + 1) for i in range(8)] + [1.0] * 248, 32, 0.075),
])
def test_captured_energy_on_constructed_spectra(spectrum, rows, tolerance):
    matrix = _with_spectrum(spectrum, 3000)
    sketch = _sketch({"a": matrix.float()}, rows=rows, block=8)
    streamed = sketch.subspace(max_directions=8, energy=1.0)
    exact = _captured(matrix, compute_subspace({"a": matrix.float()}, max_directions=8, energy=1.0).basis_by_name["a"])
    captured = _captured(matrix, streamed.basis_by_name["a"])
    assert exact - captured <= tolerance * exact
    assert exact - captured <= 8 * sketch.relative_error() + 1e-6  # the Frequent Directions guarantee
    # the energy it reports is a lower bound of what its directions capture
    assert streamed.energy_by_name["a"] <= captured + 1e-6


def test_means_and_energy_threshold_beyond_the_sketch():
    matrix = _with_spectrum([10.0, 5.0, 3.0] + [0.05] * 97, 400, seed=3).float() + 0.01
    sketch = _sketch({"a": matrix}, rows=16, block=8)
    assert sketch.shrinks > 0
    streamed = sketch.subspace(max_directions=8, energy=0.95)
    basis = streamed.basis_by_name["a"]
    assert streamed.directions_by_name["a"] == 3  # as compute_subspace on all 100 samples
    assert torch.allclose(streamed.mean_coefficients_by_name["a"], basis @ matrix.mean(0), atol=1e-6)
    assert float((basis.double() @ basis.double().T - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-6
    exact = compute_subspace({"a": matrix}, max_directions=8, energy=0.95).basis_by_name["a"]
    assert _projector_distance(basis, exact) <= 1e-3


def test_zero_and_nan_samples_beyond_the_sketch():
    values = {"zero": torch.zeros(40, 3, 4), "live": _low_rank(40, 3, 4, rank=12, seed=5)}
    values["live"][[3, 30]] = float("nan")
    sketch = _sketch(values, rows=8, block=4)
    subspace = sketch.subspace(max_directions=4, energy=1.0)
    assert subspace.directions_by_name == {"zero": 0, "live": 4}
    assert subspace.dropped_by_name == {"zero": 0, "live": 2}
    assert all(torch.isfinite(basis).all() for basis in subspace.basis_by_name.values())


def test_stacked_sketches_fold_into_one():
    matrix = _with_spectrum([(i + 1) ** -1.0 for i in range(96)], 300, seed=4).float()
    whole = _sketch({"a": matrix}, rows=16, block=8)
    # samples already counted in the moments, fed in the same blocks: the very same sketch (the DDP exact path)
    refilled = _sketch({"a": matrix[:8]}, rows=16, block=8)
    for tensor, total in zip(refilled.moments(), whole.moments(), strict=True):
        tensor.copy_(total)
    refilled._groups[0].error.zero_()  # as on ranks that never shrank
    refilled.refill_({"a": block} for block in matrix.split(8))
    assert torch.equal(refilled.rows_by_name()["a"], whole.rows_by_name()["a"])
    assert torch.equal(refilled._groups[0].error, whole._groups[0].error)
    # two halves sketched apart, their rows folded: within the (summed) guarantee
    halves = [_sketch({"a": half}, rows=16, block=8) for half in matrix.split(48)]
    folded = halves[0]
    for tensor, other in zip(folded.moments(), halves[1].moments(), strict=True):
        tensor += other
    rows = torch.cat([half.rows_by_name()["a"].clone() for half in halves])
    folded.refill_({"a": block} for block in rows.split(8))
    exact = compute_subspace({"a": matrix}, max_directions=4, energy=1.0).basis_by_name["a"]
    captured = _captured(matrix.double(), folded.subspace(max_directions=4, energy=1.0).basis_by_name["a"])
    assert captured >= _captured(matrix.double(), exact) - 4 * folded.relative_error() - 1e-6
    assert folded._groups[0].counts.item() == 96


def test_memory_is_rows_times_entries():
    like = {"a": torch.zeros(16, 576), "b": torch.zeros(576, 16), "c": torch.zeros(16, 1536)}
    sketch = GradientSketch(like, rows=32)
    assert sketch.nbytes == 32 * (3 * 9216 + 24576 - 9216) * 4
    assert len(sketch._groups) == 2  # equal sizes share one (P, ℓ, n) buffer


@pytest.mark.parametrize(("rows", "filled", "block", "message"), [
    (1, 0, 1, r"`sketch_rows` must be an integer >= 2, got 1"),
    (True, 0, 1, "sketch_rows"),
    (8, 0, 9, r"a block of 9 samples does not fit a sketch of 8 rows"),
    (8, 4, 5, r"a block of 5 samples does not fit a sketch of 8 rows \(at most half of them once it is full\)"),
    (8, 0, 0, "a block of 0 samples"),
])
def test_rejects_bad_sizes(rows, filled, block, message):
    with pytest.raises(ValueError, match=message):
        sketch = GradientSketch({"a": torch.zeros(2, 3)}, rows=rows)
        if filled:
            sketch.add_({"a": torch.ones(filled, 2, 3)})
        sketch.block_(block)


def test_holds_only_the_samples_when_there_are_fewer_than_rows(tiny_model_dir, data_files):
    from lora_ogpsa.signals.reference import collect_reference_sketch, make_batches

    model, parameters = _tiny_model(tiny_model_dir)
    batch = make_batches([_example()] * 3, batch_size=3, pad_token_id=0)
    sketch, losses = collect_reference_sketch(model, batch, parameters, rows=32, progress=False)
    assert sketch.rows == 3 and sketch.nbytes == 3 * sum(p.numel() for p in parameters.values()) * 4
    assert losses.shape == (3,)


def _example():
    from lora_ogpsa.data.rows import TokenizedExample

    return TokenizedExample([5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 1, 1])


def test_config_validates_sketch_rows():
    assert OGPSAConfig().sketch_size == 16  # 2k at the default k = 8
    assert OGPSAConfig(max_directions=32).sketch_size == 64
    assert OGPSAConfig(max_directions=2).sketch_size == 16  # at least 2 × the default reference_batch_size 8
    assert OGPSAConfig(max_directions=2, reference_batch_size=2).sketch_size == 4
    assert OGPSAConfig(sketch_rows=40).sketch_size == 40
    with pytest.raises(ValueError, match=r"`sketch_rows` must be at least 2 × `reference_batch_size` = 16"):
        OGPSAConfig(sketch_rows=12)
    with pytest.raises(ValueError, match=r"`sketch_rows` must be an integer >= 2"):
        OGPSAConfig(sketch_rows=1.5)
    assert OGPSAConfig(sketch_rows=8, reference_batch_size=4).sketch_size == 8


def _tiny_model(model_dir):
    from lora_ogpsa.models.loading import attach_lora, load_base_model, lora_config, lora_parameters
    from lora_ogpsa.testing.tiny import randomise_lora_b_

    model = attach_lora(load_base_model(model_dir, quantize=False), lora_config(r=4, dropout=0.1), seed=0,
                        gradient_checkpointing=False)
    model.train()
    parameters = lora_parameters(model)
    randomise_lora_b_(parameters)  # so that lora_A has a reference gradient too
    return model, parameters


def test_real_collection_equals_the_exact_path(tiny_model_dir, data_files):
    from lora_ogpsa.data.rows import read_rows, tokenize_rows
    from lora_ogpsa.models.loading import load_tokenizer
    from lora_ogpsa.signals.reference import collect_reference_samples, collect_reference_sketch, make_batches

    tokenizer = load_tokenizer(tiny_model_dir)
    examples = tokenize_rows(tokenizer, read_rows(data_files["reference"], "sft").rows, max_length=48)
    batches = make_batches(examples, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    model, parameters = _tiny_model(tiny_model_dir)
    samples, losses = collect_reference_samples(model, batches, parameters, progress=False)
    sketch, sketch_losses = collect_reference_sketch(model, batches, parameters, rows=len(examples), progress=False)
    assert torch.equal(losses, sketch_losses) and sketch.shrinks == 0
    assert all(torch.equal(sketch.rows_by_name()[name], samples[name]) for name in samples)
    exact = compute_subspace(samples, max_directions=8, energy=0.95)
    streamed = sketch.subspace(max_directions=8, energy=0.95)
    assert streamed.directions_by_name == exact.directions_by_name
    assert max(_projector_distance(streamed.basis_by_name[name], exact.basis_by_name[name])
               for name in samples) <= 1e-5
    # 12 samples through 8 rows (blocks of 4): measured shortfall of the top-2 energy ≤ 1.2 % of the exact
    small, _ = collect_reference_sketch(model, batches, parameters, rows=8, progress=False)
    assert small.shrinks == 1
    shrunk = small.subspace(max_directions=2, energy=1.0)
    top2 = compute_subspace(samples, max_directions=2, energy=1.0)
    for name, value in samples.items():
        matrix = value.reshape(len(value), -1).double()
        if matrix.norm() == 0:
            continue
        exact_share = _captured(matrix, top2.basis_by_name[name])
        assert exact_share - _captured(matrix, shrunk.basis_by_name[name]) <= 0.02 * exact_share, name


def _fold_worker(rank, world, init_file, rows, output):
    """One rank of a 2-process gloo group: sketch its round-robin share of 12 micro-batches of 4, then fold."""
    import torch.distributed as dist

    from lora_ogpsa.signals import distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        samples = _low_rank(48, 6, 20, rank=30, seed=7)
        mine = list(range(12))[rank::world]
        sketch = GradientSketch({"a": samples[0]}, rows=max(min(rows, 4 * len(mine)), 2))
        for batch in mine:
            sketch.add_({"a": samples[4 * batch:4 * batch + 4]})
        losses = torch.tensor([float(4 * batch + i) for batch in mine for i in range(4)])
        folded = distributed.gather_sketches(sketch, [4] * 12, losses, rows=rows)
        if rank == 0:
            sketch, order = folded
            torch.save({"rows": sketch.rows_by_name()["a"].clone(), "losses": order, "shrinks": sketch.shrinks,
                        "moments": [tensor.clone() for tensor in sketch.moments()],
                        "basis": sketch.subspace(max_directions=4, energy=1.0).basis_by_name["a"],
                        "error": sketch.relative_error()}, output)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rows", [64, 16])
def test_ranks_sketches_fold_on_rank_0(tmp_path, rows):
    import torch.multiprocessing as mp

    mp.spawn(_fold_worker, args=(2, str(tmp_path / "group"), rows, str(tmp_path / "out.pt")), nprocs=2)
    folded = torch.load(tmp_path / "out.pt")
    samples = _low_rank(48, 6, 20, rank=30, seed=7)
    single = _sketch({"a": samples}, rows=min(rows, 48), block=4)
    assert torch.equal(folded["losses"], torch.arange(48.0))
    assert folded["moments"][1].item() == 48  # samples counted once, over both ranks
    assert torch.allclose(folded["moments"][0], single.moments()[0], atol=1e-4)  # their sum
    if rows >= 24:  # no rank shrank: the samples themselves, in reference order, exactly one process's sketch
        assert folded["shrinks"] == 0 and torch.equal(folded["rows"], single.rows_by_name()["a"])
    else:  # stacked sketches: within the summed Frequent Directions guarantee
        matrix = samples.reshape(48, -1).double()
        exact = _captured(matrix, compute_subspace({"a": samples}, max_directions=4, energy=1.0).basis_by_name["a"])
        assert folded["shrinks"] > 0 and folded["rows"].shape == (16, 6, 20)
        assert _captured(matrix, folded["basis"]) >= exact - 4 * folded["error"] - 1e-6
