"""SIGReg against REFERENCE.md's values, an independent quadrature, the exact integral, gradients,
memory, and exactness under data parallelism."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leworld import LeworldError
from leworld.sigreg import SIGReg, epps_pulley


def slices(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expected_statistic(cf: np.ndarray, n: int) -> float:
    """E[EP] under the [0, 3] quadrature for a symmetric law with characteristic function cf(t):
    N (ψ − φ)² is the population term, 1 − ψ² the sampling noise of the empirical ψ_N."""
    t = np.linspace(0, 3, 17)
    w = np.full(17, 2 * 3 / 16)
    w[[0, -1]] = 3 / 16
    phi = np.exp(-(t**2) / 2)
    psi = cf(t)
    return float(np.sum(w * phi * (n * (psi - phi) ** 2 + 1 - psi**2)))


@pytest.mark.parametrize("n", [16, 64, 256, 1024])
def test_gaussian_floor(n):
    # 16384 independent Gaussian slices: the standard error of the mean is below 0.01.
    value = epps_pulley(slices(n, 16384, seed=n)).mean().item()
    assert 1.03 <= value <= 1.07


def test_sigreg_module_on_gaussian_embeddings_sits_on_the_floor():
    sigreg = SIGReg(num_slices=1024)
    values = [sigreg(slices(512, 512, seed=s)).item() for s in range(8)]
    assert 0.98 <= np.mean(values) <= 1.12


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_collapse_scores_about_0_4_n(n):
    value = SIGReg(num_slices=256)(torch.zeros(n, 32)).item()
    assert value == pytest.approx(0.40 * n, rel=0.03)
    assert SIGReg(num_slices=256)(torch.full((n, 32), 0.7)).item() > value


def test_reference_table_n256():
    n = 256
    assert SIGReg(num_slices=256)(torch.zeros(n, 32)).item() == pytest.approx(103, rel=0.02)
    assert epps_pulley(0.1 * slices(n, 4096)).mean().item() == pytest.approx(99, rel=0.02)
    assert epps_pulley(3 * slices(n, 4096)).mean().item() == pytest.approx(133, rel=0.02)
    assert epps_pulley(1 + slices(n, 4096)).mean().item() == pytest.approx(113, rel=0.03)


def test_uniform_matches_expectation():
    """REFERENCE.md lists ≈4.2 for unit-variance uniform data at N=256: that is the population
    term N·∫(ψ_U − φ)²φ (4.12). A finite sample adds its own noise floor on top (≈1.1 here)."""
    n = 256
    u = (torch.rand(n, 16384, generator=torch.Generator().manual_seed(1)) * 2 - 1) * math.sqrt(3)
    psi_uniform = lambda t: np.sinc(np.sqrt(3) * t / np.pi)  # sin(√3 t) / (√3 t)
    expected = expected_statistic(psi_uniform, n)
    noise_floor = expected_statistic(psi_uniform, 0)
    value = epps_pulley(u).mean().item()
    assert value == pytest.approx(expected, rel=0.03)
    assert value - noise_floor == pytest.approx(4.2, rel=0.05)


def exact_epps_pulley(x: torch.Tensor) -> torch.Tensor:
    """Closed form of the integral over all of ℝ, O(N²) per slice: x (N, M) -> (M,)."""
    n = x.shape[0]
    diff = x[:, None, :] - x[None, :, :]
    pair = torch.exp(-(diff**2) / 2).sum((0, 1))
    single = torch.exp(-(x**2) / 4).sum(0)
    return math.sqrt(2 * math.pi) / n * pair - 2 * math.sqrt(math.pi) * single + n * math.sqrt(2 * math.pi / 3)


@pytest.mark.parametrize(
    "name, sample",
    [
        ("gaussian", lambda g: torch.randn(256, 64, generator=g, dtype=torch.float64)),
        ("uniform", lambda g: (torch.rand(256, 64, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3)),
        ("shifted", lambda g: 0.5 + torch.randn(256, 64, generator=g, dtype=torch.float64)),
        ("laplace", lambda g: torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample((256, 64)).double()),
    ],
)
def test_quadrature_close_to_exact_integral(name, sample):
    torch.manual_seed(0)
    x = sample(torch.Generator().manual_seed(0))
    assert epps_pulley(x).mean().item() == pytest.approx(exact_epps_pulley(x).mean().item(), rel=0.03)


def test_one_dimensional_input_equals_independent_quadrature():
    # With D = 1 every direction is ±1, and the statistic is even in the sign.
    x = np.random.default_rng(0).normal(0.3, 1.4, size=100)
    t = np.linspace(0, 3, 17)
    dt = t[1] - t[0]
    trapezoid = np.array([dt] + [2 * dt] * 15 + [dt])
    ecf = np.exp(1j * t[:, None] * x[None, :]).mean(1)
    expected = len(x) * np.sum(trapezoid * np.exp(-(t**2) / 2) * np.abs(ecf - np.exp(-(t**2) / 2)) ** 2)
    value = SIGReg(num_slices=16)(torch.tensor(x, dtype=torch.float64)[:, None]).item()
    assert value == pytest.approx(expected, rel=1e-9)


def test_gradcheck_float64():
    x = slices(12, 5, seed=3).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: epps_pulley(v), (x,))
    z = slices(10, 4, seed=4).double().requires_grad_()
    sigreg = SIGReg(num_slices=6).eval()  # eval: the same directions at every gradcheck call
    assert torch.autograd.gradcheck(sigreg, (z,))


@pytest.mark.parametrize("fill", [0.0, 1.0, -3.0])
def test_constant_input_has_finite_gradients(fill):
    z = torch.full((64, 16), fill, requires_grad=True)
    SIGReg(num_slices=32)(z).backward()
    assert torch.isfinite(z.grad).all()


def test_leading_dims_are_averaged():
    sigreg = SIGReg(num_slices=64).eval()
    z = slices(3, 50, 8, seed=5)  # (V, N, D)
    per_view = torch.stack([sigreg(v) for v in z])
    assert sigreg(z).item() == pytest.approx(per_view.mean().item(), rel=1e-6)


def test_directions_follow_the_step_counter():
    z = slices(128, 16, seed=6)
    sigreg = SIGReg(num_slices=32)
    first, second = sigreg(z).item(), sigreg(z).item()
    assert first != second  # re-drawn every training call
    assert int(sigreg.state_dict()["step"]) == 2

    restored = SIGReg(num_slices=32)
    restored.load_state_dict({"step": torch.tensor(1)})
    assert restored(z).item() == second  # the draw a resumed run would make

    sigreg.eval()
    assert sigreg(z).item() == sigreg(z).item()  # eval does not advance
    assert int(sigreg.step) == 2


def test_float32_inside_autocast():
    z = slices(64, 16, seed=7).bfloat16()
    sigreg = SIGReg(num_slices=32).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sigreg(z)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(sigreg(z.float()).item(), rel=1e-6)


def test_backward_keeps_no_n_m_t_tensor():
    """Autograd saves only (N, M)-sized tensors; the plain (N, M, T) expression saves more."""
    n, m, knots = 64, 48, 17

    def largest_saved(fn, x):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x).sum()
        return max(sizes)

    def plain(x):
        t = torch.linspace(0, 3, knots)
        tx = x[..., None] * t  # (N, M, T)
        return (tx.cos().mean(0) - torch.exp(-(t**2) / 2)) ** 2 + tx.sin().mean(0) ** 2

    x = slices(n, m).requires_grad_()
    assert largest_saved(plain, x) >= n * m * knots  # the check can see the naive cost
    assert largest_saved(epps_pulley, x) <= n * m


def test_sigreg_alone_whitens_a_degenerate_cloud():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(512, 1, generator=g)
    points = torch.cat([u, 0.1 * u + 0.01 * torch.randn(512, 1, generator=g)], 1).requires_grad_()
    sigreg = SIGReg(num_slices=32)
    opt = torch.optim.Adam([points], lr=0.02)
    for _ in range(1000):
        opt.zero_grad()
        sigreg(points).backward()
        opt.step()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(points.detach().T))
    assert eigenvalues.min() >= 0.8 and eigenvalues.max() <= 1.2


# ---- data parallelism: two gloo processes against one process on the concatenated batch ----

DIM, ROWS = 8, (40, 40)


def _data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(sum(ROWS), DIM, generator=g) * 1.3 + 0.2


def _model():
    torch.manual_seed(12)
    return nn.Linear(DIM, DIM)


def _worker(rank, world, init_file, rows, subspaces, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z = _data().split(list(rows))[rank].clone().requires_grad_()
    model = DistributedDataParallel(_model())
    value = SIGReg(num_slices=64, subspaces=subspaces)(model(z))
    value.backward()  # DDP averages the parameter gradients over the processes
    out[rank] = {"value": value.item(), "weight_grad": model.module.weight.grad.clone(), "z_grad": z.grad.clone()}
    dist.destroy_process_group()


@pytest.mark.parametrize("rows, subspaces", [((40, 40), 0), ((48, 32), 0), ((48, 32), 4)],
                         ids=["equal", "unequal", "unequal-subspaces"])
def test_exact_under_data_parallelism(tmp_path, rows, subspaces):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, tmp_path / "init", rows, subspaces, out), nprocs=2, join=True)
        out = dict(out)

    z = _data().requires_grad_()
    model = _model()
    value = SIGReg(num_slices=64, subspaces=subspaces)(model(z))
    value.backward()

    for rank in range(2):
        assert out[rank]["value"] == pytest.approx(value.item(), rel=1e-5)
        torch.testing.assert_close(out[rank]["weight_grad"], model.weight.grad, rtol=1e-5, atol=1e-6)
    # Each process back-propagates the same global loss, so the autograd all-reduce hands every
    # process the sum of 2 identical contributions; DDP's averaging of parameter gradients (above)
    # divides that back, which is what makes the update exact.
    local_grads = torch.cat([out[0]["z_grad"], out[1]["z_grad"]]) / 2
    torch.testing.assert_close(local_grads, z.grad, rtol=1e-5, atol=1e-7)


def test_a_compiled_training_step_draws_new_directions_without_recompiling():
    torch._dynamo.reset()
    torch.manual_seed(0)
    sigreg = SIGReg(num_slices=8).train()
    eager = SIGReg(num_slices=8).train()
    compiled = torch.compile(lambda z: sigreg(z).square())
    z = torch.randn(32, 4)
    compiled(z)  # compiles
    eager(z)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile at any later step fails here
        for _ in range(3):
            assert torch.allclose(compiled(z), eager(z).square(), rtol=1e-5)
    assert sigreg._step == eager._step == 4 and int(sigreg.step) == 4


# ---- SIGReg in subspaces (Sub-JEPA) ----

def test_subspace_directions_lie_in_frozen_orthogonal_subspaces():
    sigreg = SIGReg(num_slices=24, subspaces=4)
    first = sigreg.directions(12, "cpu")
    rotation = sigreg.rotation(12, "cpu")
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.norm(dim=0), torch.ones(24))
    # in the rotated frame, the 6 slices of group s have coordinates only in dimensions 3s..3s+2
    coords = (rotation.T @ first).abs() > 1e-5  # (12, 24)
    owner = torch.arange(12)[:, None] // 3 == torch.arange(24)[None] // 6
    assert coords[~owner].sum() == 0 and coords[owner].float().mean() > 0.99
    sigreg(torch.randn(50, 12))  # one training step: new directions, the same subspaces
    second = sigreg.directions(12, "cpu")
    assert not torch.allclose(first, second)
    torch.testing.assert_close(sigreg.rotation(12, "cpu"), rotation)
    assert not ((rotation.T @ second).abs() > 1e-5)[~owner].any()


def test_subspace_value_is_epps_pulley_of_its_slices_and_gradchecks():
    sigreg = SIGReg(num_slices=8, subspaces=2).eval()
    z = slices(40, 6, seed=21).double()
    expected = epps_pulley(z @ sigreg.directions(6, "cpu").double()).mean()
    assert sigreg(z).item() == pytest.approx(expected.item(), rel=1e-9)
    assert torch.autograd.gradcheck(sigreg, (slices(10, 4, seed=22).double().requires_grad_(),))
    assert SIGReg(num_slices=256, subspaces=8)(torch.randn(4096, 32)).item() == pytest.approx(1.06, abs=0.15)


def test_subspaces_that_do_not_divide_are_one_line():
    with pytest.raises(LeworldError, match="slices \\(30\\) to be a multiple"):
        SIGReg(num_slices=30, subspaces=4)
    with pytest.raises(LeworldError, match="latent width \\(10\\) to be a multiple"):
        SIGReg(num_slices=32, subspaces=4)(torch.randn(20, 10))
