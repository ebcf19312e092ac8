"""Charged n-body simulation (Kipf et al. 2018; the 3D setting of Satorras et al. 2021).

Physics (docs/SPEC.md, "n-body data"): ``n`` particles of unit mass in 3D, charges uniform in
{-1, +1}, positions ~ N(0, 1) per coordinate, velocities ~ N(0, 1) rescaled to norm 0.5 per particle.
The force on particle i is ``F_i = s * sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3`` (``s`` the
interaction strength, 1), each component clipped to ``[-max_force, max_force]`` (100), which is
``-grad U`` of ``U = s * sum_{i<j} q_i q_j / |x_i - x_j|`` while no component is clipped.
Integration is leapfrog (kick-drift-kick velocity Verlet, symplectic, second order) with
``dt = 0.001``; there is no box.

Sampling follows Kipf et al.'s simulator: a trajectory of ``n_steps`` (5000) steps is recorded
every ``sample_every`` (100) steps, and sample ``s`` is the state after ``(s + 1) * sample_every``
steps (the initial state is not a sample), so there are ``n_steps / sample_every - 1`` samples.
The task maps sample 30 (positions and velocities) to the positions at sample 40, 1000 steps
later. Unlike that simulator, whose first kick is a full step so its stored velocities lag half
a step, velocities here are synchronised with positions; the difference is ``dt/2 * F``.

Clipping makes the dynamics non-conservative during close encounters (|x_i - x_j| below about
0.1): trajectories where it fires do not conserve energy, and with these parameters that is
about half of them over 5000 steps. :func:`nbody_energy_drift` reports both groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ._cache import CacheDir, cached_arrays
from .batch import DenseBatch, GraphSample
from .dataset import DenseDataset, Splits, TaskInfo

GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
DEFAULT_SIZES = {"train": 3000, "val": 2000, "test": 2000}


@dataclass(frozen=True)
class NBodyConfig:
    """Parameters of the charged n-body task (defaults: docs/SPEC.md, "n-body data").

    Attributes:
        n_particles: particles per system.
        position_std: std of the initial positions.
        velocity_norm: norm of every initial velocity.
        interaction_strength: ``s`` in the force law.
        max_force: clip of each force component.
        dt: integration step.
        n_steps: trajectory length in steps (samples must lie inside it).
        sample_every: steps between samples.
        input_sample: sample whose positions and velocities are the input.
        target_sample: sample whose positions are the target.
    """

    n_particles: int = 5
    position_std: float = 1.0
    velocity_norm: float = 0.5
    interaction_strength: float = 1.0
    max_force: float = 100.0
    dt: float = 0.001
    n_steps: int = 5000
    sample_every: int = 100
    input_sample: int = 30
    target_sample: int = 40

    def __post_init__(self):
        available = self.n_steps // self.sample_every - 1
        if not 0 <= self.input_sample < self.target_sample < available:
            raise ValueError(
                f"NBodyConfig: need 0 <= input_sample < target_sample < {available} "
                f"(n_steps / sample_every - 1), got {self.input_sample}, {self.target_sample}"
            )


def initial_conditions(
    count: int, seed: int, stream: int = 0, config: NBodyConfig = NBodyConfig()
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random initial states, ``(positions (N, n, 3), velocities (N, n, 3), charges (N, n))``.

    System ``i`` draws from its own generator seeded by ``(seed, stream, i)``, so a smaller
    ``count`` gives a prefix of a larger one and streams (splits) are independent.
    """
    n = config.n_particles
    positions = np.empty((count, n, 3))
    velocities = np.empty((count, n, 3))
    charges = np.empty((count, n))
    for system in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, system)))
        charges[system] = rng.choice(np.array([-1.0, 1.0]), size=n)
        positions[system] = rng.standard_normal((n, 3)) * config.position_std
        velocity = rng.standard_normal((n, 3))
        velocities[system] = velocity * (config.velocity_norm / np.linalg.norm(velocity, axis=1, keepdims=True))
    return positions, velocities, charges


def charged_nbody_energy(
    positions: np.ndarray, velocities: np.ndarray, charges: np.ndarray, interaction_strength: float = 1.0
) -> Tuple[np.ndarray, np.ndarray]:
    """Kinetic ``sum_i |v_i|^2 / 2`` and potential ``s * sum_{i<j} q_i q_j / |x_i - x_j|`` energy.

    Args:
        positions, velocities: ``(..., n, 3)``.
        charges: ``(..., n)``.

    Returns:
        ``(kinetic, potential)``, each of shape ``(...)``.
    """
    kinetic = 0.5 * (velocities ** 2).sum(axis=(-1, -2))
    first, second = np.triu_indices(positions.shape[-2], 1)
    distance = np.linalg.norm(positions[..., first, :] - positions[..., second, :], axis=-1)
    potential = interaction_strength * (charges[..., first] * charges[..., second] / distance).sum(axis=-1)
    return kinetic, potential


@dataclass
class Trajectories:
    """Output of :func:`simulate_charged_nbody`.

    Attributes:
        positions, velocities: ``(S, N, n, 3)``; sample ``s`` is the state after
            ``(s + 1) * sample_every`` steps.
        clipped: ``(N,)`` bool, True when a force component of that system was ever clipped.
    """

    positions: np.ndarray
    velocities: np.ndarray
    clipped: np.ndarray


def simulate_charged_nbody(
    positions: np.ndarray,
    velocities: np.ndarray,
    charges: np.ndarray,
    n_samples: int,
    config: NBodyConfig = NBodyConfig(),
) -> Trajectories:
    """Integrate ``N`` systems at once with leapfrog for ``n_samples * sample_every`` steps.

    Args:
        positions, velocities: ``(N, n, 3)`` initial state (float64 recommended).
        charges: ``(N, n)``.
        n_samples: samples to record.
        config: physics and sampling parameters.
    """
    count, n, _ = positions.shape
    # systems on the last axis: every per-step op is a wide vectorised loop over systems, and the
    # pair differences are one small matrix product (pairs x particles) @ (particles x 3N)
    x = np.ascontiguousarray(np.transpose(positions, (1, 2, 0)), dtype=np.float64)
    v = np.ascontiguousarray(np.transpose(velocities, (1, 2, 0)), dtype=np.float64)
    first, second = np.triu_indices(n, 1)
    pairs = len(first)
    incidence = np.zeros((pairs, n))
    incidence[np.arange(pairs), first] = 1.0
    incidence[np.arange(pairs), second] = -1.0
    incidence_t = np.ascontiguousarray(incidence.T)
    charge_products = config.interaction_strength * (charges[:, first] * charges[:, second]).T  # [P, N]
    clipped = np.zeros(count, dtype=bool)

    def force(x: np.ndarray) -> np.ndarray:
        difference = (incidence @ x.reshape(n, 3 * count)).reshape(pairs, 3, count)  # x_i - x_j
        squared = np.einsum("pcn,pcn->pn", difference, difference)
        scale = charge_products / (squared * np.sqrt(squared))
        total = (incidence_t @ (difference * scale[:, None, :]).reshape(pairs, 3 * count)).reshape(n, 3, count)
        np.logical_or(clipped, np.abs(total).max(axis=(0, 1)) > config.max_force, out=clipped)
        return np.clip(total, -config.max_force, config.max_force, out=total)

    out_positions = np.empty((n_samples, count, n, 3))
    out_velocities = np.empty((n_samples, count, n, 3))
    half_dt = 0.5 * config.dt
    current = force(x)
    for step in range(1, n_samples * config.sample_every + 1):
        v += half_dt * current
        x += config.dt * v
        current = force(x)
        v += half_dt * current
        if step % config.sample_every == 0:
            sample = step // config.sample_every - 1
            out_positions[sample] = np.transpose(x, (2, 0, 1))
            out_velocities[sample] = np.transpose(v, (2, 0, 1))
    return Trajectories(out_positions, out_velocities, clipped)


@dataclass
class EnergyDriftReport:
    """Energy conservation of the integrator over whole trajectories.

    ``drift`` of a system is ``max_s |E_s - E_0| / (K_0 + |U_0|)`` over its samples (``E = K + U``;
    the denominator avoids dividing by a total energy near zero).

    Attributes:
        drift: ``(N,)`` per-system relative drift.
        clipped: ``(N,)`` whether force clipping fired in that system.
        clipped_fraction: fraction of systems with clipping.
        median_unclipped, max_unclipped: drift over systems without clipping (the integrator's
            own error; second order in ``dt``).
        median_clipped: drift over systems with clipping (not conserved by construction).
    """

    drift: np.ndarray
    clipped: np.ndarray
    clipped_fraction: float
    median_unclipped: float
    max_unclipped: float
    median_clipped: float

    def __str__(self) -> str:
        return (
            f"energy drift over {len(self.drift)} systems: unclipped median "
            f"{self.median_unclipped:.2e}, max {self.max_unclipped:.2e}; force clipping fired in "
            f"{self.clipped_fraction:.0%} of systems (median drift there {self.median_clipped:.2e})"
        )


def nbody_energy_drift(
    n_systems: int = 200, seed: int = 0, config: NBodyConfig = NBodyConfig()
) -> EnergyDriftReport:
    """Simulate ``n_systems`` full trajectories (``config.n_steps`` steps) and measure how well
    total energy is conserved; see :class:`EnergyDriftReport`."""
    positions, velocities, charges = initial_conditions(n_systems, seed, stream=0, config=config)
    n_samples = config.n_steps // config.sample_every - 1
    trajectories = simulate_charged_nbody(positions, velocities, charges, n_samples, config)
    kinetic, potential = charged_nbody_energy(positions, velocities, charges, config.interaction_strength)
    energy = charged_nbody_energy(
        trajectories.positions, trajectories.velocities, charges[None], config.interaction_strength
    )
    total = energy[0] + energy[1]  # [S, N]
    drift = np.abs(total - (kinetic + potential)).max(axis=0) / (kinetic + np.abs(potential))
    clipped = trajectories.clipped

    def median(values: np.ndarray) -> float:
        return float(np.median(values)) if values.size else float("nan")

    return EnergyDriftReport(
        drift=drift,
        clipped=clipped,
        clipped_fraction=float(clipped.mean()),
        median_unclipped=median(drift[~clipped]),
        max_unclipped=float(drift[~clipped].max()) if (~clipped).any() else float("nan"),
        median_clipped=median(drift[clipped]),
    )


def generate_nbody_split(count: int, seed: int, stream: int, config: NBodyConfig = NBodyConfig()) -> dict:
    """Arrays of one split: ``positions``, ``velocities`` (input sample), ``target_positions``,
    ``target_velocities`` (target sample), all ``(N, n, 3)``; ``charges`` ``(N, n)``;
    ``clipped`` ``(N,)`` (clipping fired before the target sample)."""
    positions, velocities, charges = initial_conditions(count, seed, stream, config)
    trajectories = simulate_charged_nbody(positions, velocities, charges, config.target_sample + 1, config)
    return {
        "positions": trajectories.positions[config.input_sample],
        "velocities": trajectories.velocities[config.input_sample],
        "target_positions": trajectories.positions[config.target_sample],
        "target_velocities": trajectories.velocities[config.target_sample],
        "charges": charges,
        "clipped": trajectories.clipped,
    }


def nbody_info(config: NBodyConfig = NBodyConfig()) -> TaskInfo:
    return TaskInfo(
        name="nbody",
        kind="regression",
        metric="MSE of positions after 1000 steps",
        node_feature_dim=1,
        edge_feature_dim=1,
        point_channels=2,
        max_nodes=config.n_particles,
        description=(
            f"charged n-body: {config.n_particles} particles, positions and velocities at sample "
            f"{config.input_sample} -> positions at sample {config.target_sample}"
        ),
    )


class NBodyDataset(DenseDataset):
    """Charged n-body systems as complete graphs (float32 tensors).

    A sample has ``points`` ``(n, 3, 2)`` (channel 0 position, 1 velocity), ``node_features``
    ``(n, 1)`` charges, ``edge_features`` ``(n, n, 1)`` = ``q_i q_j`` (0 on the diagonal), a
    complete ``adjacency`` without self loops, and node-level ``target`` ``(n, 3)`` positions.
    :meth:`batch` builds batches without per-sample work, and :meth:`loader` uses it.

    Attributes:
        arrays: the split's arrays (see :func:`generate_nbody_split`).
    """

    def __init__(self, arrays: dict, info: TaskInfo):
        self.arrays = arrays
        self.info = info
        self._points = torch.from_numpy(
            np.stack([arrays["positions"], arrays["velocities"]], axis=-1).astype(np.float32)
        )
        self._charges = torch.from_numpy(arrays["charges"].astype(np.float32))
        self._target = torch.from_numpy(arrays["target_positions"].astype(np.float32))
        n = self._charges.shape[1]
        self._adjacency = ~torch.eye(n, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self._charges.shape[0])

    def _edge_features(self, charges: torch.Tensor) -> torch.Tensor:
        products = charges.unsqueeze(-1) * charges.unsqueeze(-2)
        return (products * self._adjacency).unsqueeze(-1)

    def __getitem__(self, index: int) -> GraphSample:
        index = int(index)
        if index < 0:
            index += len(self)
        charges = self._charges[index]
        return GraphSample(
            adjacency=self._adjacency.clone(),
            node_features=charges.unsqueeze(-1).clone(),
            target=self._target[index].clone(),
            target_level="node",
            edge_features=self._edge_features(charges),
            points=self._points[index].clone(),
            index=index,
        )

    def batch(self, indices: Sequence[int], pad_to: Optional[int] = None) -> DenseBatch:
        if pad_to is not None and pad_to != self._charges.shape[1]:
            return super().batch(indices, pad_to=pad_to)
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        charges = self._charges[index]
        count, n = charges.shape
        return DenseBatch(
            node_features=charges.unsqueeze(-1),
            adjacency=self._adjacency.to(torch.float32).expand(count, n, n).clone(),
            mask=torch.ones(count, n, dtype=torch.bool),
            target=self._target[index],
            target_level="node",
            num_nodes=torch.full((count,), n, dtype=torch.int64),
            index=index,
            edge_features=self._edge_features(charges),
            points=self._points[index],
        )


def load_nbody(
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    cache_dir: CacheDir = None,
    config: NBodyConfig = NBodyConfig(),
) -> Splits:
    """The charged n-body task, generated (or loaded from the cache).

    Args:
        n_train, n_val, n_test: systems per split (3000 / 2000 / 2000 in the paper). Each split
            has its own random stream, and a smaller size gives a prefix of a larger one.
        seed: dataset seed.
        cache_dir: cache directory; None = ``$LPS_FAST_CACHE`` or ``~/.cache/lps_fast``;
            False disables caching.
        config: physics and sampling parameters.

    Returns:
        :class:`Splits` of :class:`NBodyDataset`; ``meta["config"]`` is ``config``.
    """
    info = nbody_info(config)
    datasets = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        params = dict(vars(config), split=split, count=count, seed=seed)
        arrays = cached_arrays(
            "nbody",
            GENERATOR_VERSION,
            params,
            lambda count=count, split=split: generate_nbody_split(count, seed, SPLIT_CODES[split], config),
            cache_dir,
        )
        datasets[split] = NBodyDataset(arrays, info)
    return Splits(datasets["train"], datasets["val"], datasets["test"], info, meta={"config": config})
