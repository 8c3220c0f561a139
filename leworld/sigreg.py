"""SIGReg: Sketched Isotropic Gaussian Regularization (LeJEPA).

Embeddings z (N, D) are projected on M random unit directions; each projected slice is compared to
a standard normal by the Epps–Pulley statistic, a weighted L2 distance between the empirical
characteristic function ψ_N(t) = mean_j exp(i t x_j) and the Gaussian one φ(t) = exp(-t²/2):

    EP = N · ∫ |ψ_N(t) − φ(t)|² φ(t) dt,   |ψ_N − φ|² = (mean cos(t x) − φ)² + (mean sin(t x))²

The integrand is even in t, so it is integrated on [0, t_max] with trapezoid weights doubled. A
standard normal sample scores ≈ 1.06 (the floor, never 0); a collapsed one ≈ 0.4·N.

With `subspaces` = S > 0 (Sub-JEPA, arXiv 2605.09241) the latent is cut into S subspaces of D/S
dimensions by a frozen random rotation, and each direction lies in one of them: the slices test the
small marginals densely instead of the whole space thinly. It is the same statistic on directions
drawn differently, so its value, gradient and data-parallel exactness are those above.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from leworld import LeworldError


def quadrature(knots: int, t_max: float, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Knots t (T,) on [0, t_max], their weights (T,) with the window φ folded in, and φ(t) (T,)."""
    t = torch.linspace(0.0, t_max, knots, device=device, dtype=torch.float64)
    dt = t_max / (knots - 1)
    trapezoid = torch.full_like(t, 2 * dt)  # doubled: the integral runs over [-t_max, t_max]
    trapezoid[0] = trapezoid[-1] = dt
    phi = torch.exp(-0.5 * t**2)
    return t.to(dtype), (trapezoid * phi).to(dtype), phi.to(dtype)


class _CharacteristicSums(torch.autograd.Function):
    """Σ_j cos(t x_j) and Σ_j sin(t x_j) over the N rows, for every knot t.

    Autograd on the plain expression would keep (N, M, T) cos and sin tensors alive until backward.
    Here both passes go one knot at a time and backward recomputes them from x, so memory stays at
    a few (N, M) tensors whatever the number of knots.
    """

    @staticmethod
    def forward(ctx, x: Tensor, knots: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        # x (..., N, M) -> cos_sum, sin_sum (..., M, T)
        ctx.save_for_backward(x)
        ctx.knots = knots
        cos_sum = x.new_empty(*x.shape[:-2], x.shape[-1], len(knots))
        sin_sum = torch.empty_like(cos_sum)
        for k, t in enumerate(knots):
            tx = t * x
            sin_sum[..., k] = tx.sin().sum(-2)
            cos_sum[..., k] = tx.cos_().sum(-2)  # in place: tx is not needed any more
        return cos_sum, sin_sum

    @staticmethod
    def backward(ctx, grad_cos: Tensor, grad_sin: Tensor):
        # d/dx cos(t x) = -t sin(t x);  d/dx sin(t x) = t cos(t x)
        (x,) = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        for k, t in enumerate(ctx.knots):
            tx = t * x
            sin = tx.sin()
            cos = tx.cos_()
            # (..., 1, M) weights broadcast over the N rows inside addcmul: no (N, M) temporaries
            grad_x.addcmul_(cos, t * grad_sin[..., None, :, k])
            grad_x.addcmul_(sin, -t * grad_cos[..., None, :, k])
        return grad_x, None


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epps_pulley(x: Tensor, knots: int = 17, t_max: float = 3.0, sync: bool = True) -> Tensor:
    """N-scaled Epps–Pulley statistic of every slice: x (..., N, M) -> (..., M), in float32
    (float64 stays float64, for gradcheck).

    With torch.distributed initialised (and sync=True) the N rows are the union of every process's
    rows: the per-slice sums of cos and sin, and the row count, are all-reduced by an autograd-aware
    collective whose result is used, so value and gradient are those of the global batch. Sums and
    counts rather than means keep it exact even when processes hold different numbers of rows.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    t, weights, phi = quadrature(knots, t_max, x.device, x.dtype)
    cos_sum, sin_sum = _CharacteristicSums.apply(x, tuple(t.tolist()))  # (..., M, T) each
    n = x.new_tensor(float(x.shape[-2]))
    if sync and _is_distributed():
        packed = torch.cat([cos_sum.flatten(), sin_sum.flatten(), n[None]])
        packed = dist_nn.all_reduce(packed)  # sums over processes; backward all-reduces the grads
        cos_sum, sin_sum = packed[:-1].view(2, *cos_sum.shape).unbind(0)
        n = packed[-1].detach()
    cos_mean, sin_mean = cos_sum / n, sin_sum / n
    return n * ((cos_mean - phi) ** 2 + sin_mean**2) @ weights


class SIGReg(nn.Module):
    """SIGReg loss: z (..., N, D) -> scalar, the Epps–Pulley statistic averaged over M random
    slices and all leading dims.

    Directions are re-drawn at every training call from a generator seeded by `step`, a buffer
    saved in the state dict: every process draws the same directions, and a resumed run draws the
    ones it would have drawn. In eval mode the step does not advance, so evaluation is repeatable.
    """

    def __init__(self, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0, seed: int = 0, subspaces: int = 0):
        super().__init__()
        self.num_slices, self.knots, self.t_max, self.seed = num_slices, knots, t_max, seed
        self.subspaces, self._rotation = subspaces, None
        if subspaces and num_slices % subspaces:
            raise LeworldError(f"SIGReg in {subspaces} subspaces needs the slices ({num_slices}) to be a multiple of it; "
                               "change sigreg.subspaces or sigreg.num_slices")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step = 0  # host copy of `step`: reading the buffer on a GPU would sync every call

    def check_width(self, dim: int) -> None:
        if self.subspaces and dim % self.subspaces:
            raise LeworldError(f"SIGReg in {self.subspaces} subspaces needs the latent width ({dim}) to be a multiple "
                               "of it; change sigreg.subspaces or the latent width")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)

    def directions(self, dim: int, device) -> Tensor:
        """(D, M) unit-norm directions for the current step."""
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self._step)
        if not self.subspaces:
            a = torch.randn(dim, self.num_slices, generator=generator, device=device)
            return a / a.norm(dim=0, keepdim=True)
        self.check_width(dim)
        width, per = dim // self.subspaces, self.num_slices // self.subspaces
        a = torch.randn(self.subspaces, width, per, generator=generator, device=device)
        a = a / a.norm(dim=1, keepdim=True)  # (S, D/S, M/S): unit directions inside each subspace
        return self.rotation(dim, device) @ torch.block_diag(*a)  # block s of the M columns lies in subspace s

    def rotation(self, dim: int, device) -> Tensor:
        """(D, D) orthogonal: its columns, in S groups of D/S, span the subspaces. Drawn from the seed
        alone, so it is frozen through training and the same in every process and every resume."""
        if self._rotation is None or self._rotation.shape[0] != dim or self._rotation.device != torch.device(device):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
            q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
            self._rotation = (q * r.diagonal().sign()).to(device, torch.float32)  # signs fixed: Haar-distributed
        return self._rotation

    @torch.compiler.disable
    def _next_directions(self, dim: int, device) -> Tensor:
        """This step's directions, then the step advanced (training). Left out of torch.compile:
        the step is a Python int that changes every call, which would recompile every step."""
        directions = self.directions(dim, device)
        if self.training:
            self._step += 1
            self.step.fill_(self._step)
        return directions

    def forward(self, z: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(torch.promote_types(z.dtype, torch.float32))  # (..., N, D)
            slices = z @ self._next_directions(z.shape[-1], z.device).to(z.dtype)  # (..., N, M)
            return epps_pulley(slices, self.knots, self.t_max).mean()

    def extra_repr(self) -> str:
        subspaces = f", subspaces={self.subspaces}" if self.subspaces else ""
        return f"num_slices={self.num_slices}, knots={self.knots}, t_max={self.t_max}{subspaces}"
