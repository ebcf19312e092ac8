"""Particles over S_n x E(3): predict where every particle will be, as a residual model.

A plain transformer over the particles (it knows nothing about permutations, rotations or
translations) predicts a *displacement*; the model's answer is the input position plus the
symmetrized displacement. The input positions are added by ``Symmetrize(residual=...)``, after
the average over the sampled group elements, never inside the backbone's view: there they would
pass through the sampled permutations twice, and the straight-through estimator would send the
distribution a gradient even from a backbone that outputs zero. The script checks the exact
S_n x E(3) equivariance of the result, and that a zero backbone sends the learned distribution
exactly zero gradient, then fits the positions of a few springs-and-charges systems.

    python examples/particles_snxe3.py           # 300 steps (about a minute on 2 CPU cores)
    python examples/particles_snxe3.py --tiny    # smallest sizes (what the tests run)
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import lps_fast
from lps_fast import backbones, distributions, groups
from lps_fast.testing import assert_equivariant


def particle_system(batch: int, n: int, generator: torch.Generator, dt: float = 0.05, steps: int = 10):
    """Charged particles on springs to their centroid, integrated for ``steps`` leapfrog steps:
    inputs ``points (B, n, 3, 2)`` = [position, velocity], ``nodes (B, n, 1)`` = charge, ``edges
    (B, n, n, 1)`` = q_i q_j; target: the positions at the end (equivariant by construction)."""
    x = torch.randn(batch, n, 3, generator=generator)
    v = 0.5 * torch.randn(batch, n, 3, generator=generator)
    q = torch.randint(0, 2, (batch, n, 1), generator=generator).float() * 2 - 1
    inputs = {"points": torch.stack([x, v], dim=-1), "nodes": q, "edges": (q * q.transpose(1, 2))[..., None]}
    for _ in range(steps):
        difference = x[:, :, None] - x[:, None]  # [B, n, n, 3]
        distance = difference.norm(dim=-1, keepdim=True).clamp_min(0.3)
        coulomb = (q[:, :, None] * q[:, None] * difference / distance ** 3).sum(2)
        force = coulomb - (x - x.mean(1, keepdim=True))
        v = v + dt * force
        x = x + dt * v
    return inputs, x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smallest sizes, for a quick check")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    n, batch, width = (4, 8, 16) if args.tiny else (5, 64, 64)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 300)
    torch.manual_seed(0)

    model = lps_fast.Symmetrize(
        backbone=backbones.Transformer(n, node_dim=1, edge_dim=1, point_channels=2, d_model=width, heads=4,
                                       layers=2, output="vector"),                  # a displacement per particle
        group=groups.Sn() * groups.E3(),                                             # E(3) about the centroid
        distribution=distributions.Learned(node_dim=1, edge_dim=1, point_channels=2, network="vn-dgcnn",
                                           hidden=24 if args.tiny else 48, dropout=0.0),
        n_samples=4,
        output="vector",
        residual=lps_fast.InputResidual("points", channels=(0,)),                  # + the input positions
    )
    print(f"model output kind: {model.output_kinds} (a vector output plus positions is a position)")

    # Exact equivariance in float64: permuting, rotating and translating the particles (and the
    # noise with them) moves the prediction the same way.
    generator = torch.Generator().manual_seed(1)
    inputs, _ = particle_system(2, n, generator)
    deviation = assert_equivariant(model.eval(), inputs, generator=generator)
    print("equivariance error (float64):", ", ".join(f"{k} {v:.1e}" for k, v in deviation.items()))

    # A backbone that outputs zero predicts "nothing moves" whatever g is drawn: the distribution
    # gets no gradient at all from the task loss.
    zero = copy.deepcopy(model).train()
    for parameter in zero.backbone.parameters():
        nn.init.zeros_(parameter)
    out, _ = zero(inputs)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    leak = max(float(p.grad.abs().max()) for p in zero.distribution.parameters() if p.grad is not None)
    print(f"gradient reaching the distribution from a zero backbone: {leak:.1e}")
    assert leak == 0.0

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        inputs, target = particle_system(batch, n, generator)
        out, aux = model(inputs)  # out: (B, n, 3, 1) positions
        loss = nn.functional.mse_loss(out[..., 0], target)
        optimizer.zero_grad()
        (loss + sum(aux.values())).backward()
        optimizer.step()
        if step == 1 or step == steps or step % 50 == 0:
            still = nn.functional.mse_loss(inputs["points"][..., 0], target).item()
            print(f"step {step:4d}  mse {loss.item():.4f}  (predicting no motion: {still:.4f})")


if __name__ == "__main__":
    main()
