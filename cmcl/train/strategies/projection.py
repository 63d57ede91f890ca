"""Null-space projectors built from uncentred covariances, stored in factored form.

A projector onto the span of a covariance's leading eigenvectors is kept as its orthonormal basis
``U`` (d x k), or as the basis ``V`` of its orthogonal complement when k > d/2, so applying it to a
(B x d) or (d x d) matrix costs O(B·d·k) or O(d²·k) instead of a dense d x d product. The identity
and the zero projector are special-cased and cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Projector:
    """Orthogonal projector P on R^d.

    Attributes:
        dim: d.
        rank: rank of P.
        basis: (d, k) orthonormal basis of range(P) when ``complement`` is False, of its
            orthogonal complement when True; ``None`` for the zero and identity projectors.
        complement: see ``basis``.
    """

    dim: int
    rank: int
    basis: torch.Tensor | None = None
    complement: bool = False

    @classmethod
    def zero(cls, dim: int) -> "Projector":
        """P = 0 (nothing to protect)."""
        return cls(dim, 0)

    @classmethod
    def identity(cls, dim: int) -> "Projector":
        """P = I."""
        return cls(dim, dim)

    @classmethod
    def from_basis(cls, basis: torch.Tensor) -> "Projector":
        """P = U Uᵀ for an orthonormal (d, k) ``basis``; stored by its complement when k > d/2."""
        d, k = basis.shape
        if k == 0:
            return cls.zero(d)
        if k == d:
            return cls.identity(d)
        if k > d // 2:
            # Orthonormal complement from a full QR of the basis.
            q, _ = torch.linalg.qr(basis.to(torch.float64), mode="complete")
            return cls(d, k, q[:, k:].to(basis.dtype).contiguous(), complement=True)
        return cls(d, k, basis.contiguous())

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_identity(self) -> bool:
        return self.rank == self.dim

    @property
    def cost_rank(self) -> int:
        """Columns touched when applying P (0 for zero/identity)."""
        return 0 if self.basis is None else int(self.basis.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Projector":
        """Move the basis."""
        basis = None if self.basis is None else self.basis.to(device=device, dtype=dtype)
        return Projector(self.dim, self.rank, basis, self.complement)

    def right(self, m: torch.Tensor) -> torch.Tensor:
        """``m @ P`` for m of shape (r, d)."""
        if self.is_zero:
            return torch.zeros_like(m)
        if self.is_identity:
            return m
        u = self.basis
        low = (m @ u) @ u.T
        return m - low if self.complement else low

    def right_complement(self, m: torch.Tensor) -> torch.Tensor:
        """``m @ (I - P)`` for m of shape (r, d), with the subtraction fused into the product."""
        if self.is_zero:
            return m
        if self.is_identity:
            return torch.zeros_like(m)
        prepare, finish = self.complement_parts()
        return finish(m, prepare(m))

    def complement_parts(self) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                        Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """``m @ (I - P)`` as ``finish(m, prepare(m))``, both row-wise: ``prepare(m) = m B``
        (r × k, B the stored basis) and ``finish`` the rest (``m - mB Bᵀ``, or ``mB Bᵀ`` for a
        complement basis). :meth:`right_complement` is exactly this; for projectors with a basis."""
        if self.basis is None:
            raise ValueError("the zero and identity projectors have no basis to factor by")
        u = self.basis

        def prepare(m: torch.Tensor) -> torch.Tensor:
            return m @ u

        if self.complement:
            return prepare, lambda m, mu: mu @ u.T
        return prepare, lambda m, mu: torch.addmm(m, mu, u.T, alpha=-1)

    def left(self, m: torch.Tensor) -> torch.Tensor:
        """``P @ m`` for m of shape (d, r)."""
        return self.right(m.T).T

    def dense(self) -> torch.Tensor:
        """P as a dense (d, d) matrix (tests and diagnostics only)."""
        eye = torch.eye(self.dim, dtype=self.basis.dtype if self.basis is not None else torch.float32)
        if self.basis is not None:
            eye = eye.to(self.basis.device)
        return self.right(eye)


def projector_from_covariance(cov: torch.Tensor, *, threshold: float = 0.0,
                              energy: float | None = None) -> Projector:
    """Projector onto the leading eigen-directions of a symmetric PSD covariance.

    Args:
        cov: (d, d) uncentred covariance.
        threshold: keep directions whose eigenvalue exceeds ``threshold`` (the paper's
            ``lambda_min``, an absolute eigenvalue). ``threshold <= 0`` keeps every direction,
            which is what the authors' code does in practice for its left projectors (every
            singular value of a float covariance is numerically positive, method.md finding 1).
        energy: if given, instead keep the fewest leading directions holding at least this
            fraction of the total eigenvalue mass (scale-free alternative).
    """
    d = cov.shape[0]
    if energy is None and threshold <= 0:
        return Projector.identity(d)
    # float32 resolves eigenvalues to ~1e-7 of the largest (<= 1 for unit-norm inputs), ample for
    # thresholds >= 1e-5 and three times faster; tiny thresholds get float64.
    dtype = torch.float64 if energy is None and threshold < 1e-5 else torch.float32
    evals, evecs = torch.linalg.eigh(cov.to(dtype))
    evals = evals.to(torch.float64)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        mass = evals.clamp(min=0)
        total = float(mass.sum())
        if total <= 0:
            return Projector.zero(d)
        cdf = torch.cumsum(mass, 0) / total
        k = int(torch.searchsorted(cdf, torch.tensor(energy, dtype=cdf.dtype, device=cdf.device)) + 1)
        k = min(k, d)
    else:
        k = int((evals > threshold).sum())
    return Projector.from_basis(evecs[:, :k].to(torch.float32))


def project_out(grad: torch.Tensor, left: Projector, right: Projector, *,
                x: torch.Tensor | None = None, delta: torch.Tensor | None = None,
                scale: float | None = None, subtract: bool = False) -> torch.Tensor:
    """``left @ grad @ right``, the part of a gradient DNS removes, computed cheaply.

    Three exact routes, chosen by flop count:

    * from ``grad`` alone: ``P_l ((G U) Uᵀ)``, O(d²·k) for projector ranks k;
    * from the rank-B structure ``G = scale · deltaᵀ x`` of a linear layer's weight gradient
      (``x``: (B, d) inputs, ``delta``: (B, d) output gradients, method.md finding 4):
      ``scale · (P_l deltaᵀ)(x P_r)``, O(B·d²) whatever the ranks;
    * both at once when ``P_r = U Uᵀ`` has rank k < B: ``scale · ((P_l deltaᵀ)(x U)) Uᵀ``,
      O(d²·k + B·d·k).

    Args:
        grad: (d_out, d_in) gradient.
        left, right: projectors on the output and input side.
        x, delta, scale: the rank-B factors, when known.
        subtract: instead of returning the part, subtract it from ``grad`` in place (fused into
            the last matrix product where possible) and return ``grad``.
    """
    if left.is_zero or right.is_zero:
        return grad if subtract else torch.zeros_like(grad)
    d_out, d_in = grad.shape
    kr, kl = right.cost_rank, left.cost_rank
    routes = {"grad": 4 * d_out * d_in * (kr + kl)}
    if x is not None and delta is not None and scale is not None:
        b = x.shape[0]
        routes["rank_b"] = 2 * b * d_out * d_in + 4 * b * d_in * kr + 4 * b * d_out * kl
        if right.basis is not None and not right.complement:
            routes["low_rank"] = 2 * d_out * d_in * kr + 4 * b * d_in * kr + 4 * b * d_out * kl
    route = min(routes, key=routes.get)
    if route == "low_rank":
        u = right.basis
        a, b_ = left.left(delta.T) @ (x @ u), u.T        # (d_out, k) and (k, d_in)
    elif route == "rank_b":
        a, b_ = left.left(delta.T), right.right(x)       # (d_out, B) and (B, d_in)
    else:
        part = left.left(right.right(grad))
        return grad.sub_(part) if subtract else part
    if subtract:
        return grad.addmm_(a, b_, alpha=-scale)
    return (a * scale) @ b_
