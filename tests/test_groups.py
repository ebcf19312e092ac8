"""Groups: names, Haar samples, the actions on every type, and the frames.

The actions go through the public ops; here they are checked against the definitions written
out with plain indexing, so a convention error in either place shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from lps_fast import groups as G
from lps_fast.distributions import Frame, pca_frames, wl_colors
from lps_fast.groups import GroupElement, GroupSample, Inputs

from helpers import assert_close

ALL_GROUPS = [G.Sn(), G.O3(), G.SO3(), G.E3(), G.SE3(), G.Sn() * G.O3(), G.Sn() * G.SO3(), G.Sn() * G.E3(),
              G.Sn() * G.SE3()]


def _ids(groups):
    return [repr(g).replace(" ", "") for g in groups]


def _padded_inputs(sizes, n, channels=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    mask = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    nodes = torch.randn(batch, n, 3, generator=gen, dtype=dtype) * mask[..., None]
    edges = torch.randn(batch, n, n, 2, generator=gen, dtype=dtype) * (mask[:, :, None] & mask[:, None, :])[..., None]
    points = torch.randn(batch, n, 3, channels, generator=gen, dtype=dtype) * mask[..., None, None]
    return {"nodes": nodes, "edges": edges, "points": points, "mask": mask}


# ---------------------------------------------------------------------------------------------
# Names and structure


@pytest.mark.parametrize(
    "name, expected",
    [("Sn", G.Sn()), ("O3", G.O3()), ("so3", G.SO3()), ("E3", G.E3()), ("SE3", G.SE3()),
     ("SnxO3", G.Sn() * G.O3()), ("Sn x SO3", G.Sn() * G.SO3()), ("Sn*E3", G.Sn() * G.E3()),
     ("snxse3", G.Product(G.Sn(), G.SE3()))],
)
def test_parse_names(name, expected):
    group = G.parse(name)
    assert group == expected
    assert G.parse(repr(group)) == group


def test_product_structure_and_errors():
    group = G.E3(position_channels=(1,)) * G.Sn()
    assert (group.permutation, group.rotation, group.translation, group.position_channels) == (True, "O3", True, (1,))
    assert repr(group) == "Sn x E3(position_channels=(1,))"
    with pytest.raises(ValueError, match="one permutation group with one Euclidean group"):
        G.Sn() * G.Sn()
    with pytest.raises(ValueError, match="one permutation group with one Euclidean group"):
        G.O3() * G.SO3()
    with pytest.raises(ValueError, match="unknown group"):
        G.parse("Sn x U1")


def test_inputs_validation():
    with pytest.raises(ValueError, match="unknown input keys"):
        Inputs.from_dict({"nodes": torch.zeros(1, 3, 2), "adjacency": torch.zeros(1, 3, 3)})
    with pytest.raises(ValueError, match=r"points.*\(B, n, 3, C\)"):
        Inputs.from_dict({"points": torch.zeros(1, 3, 2, 1)})
    with pytest.raises(ValueError, match="has 4 nodes, expected 3"):
        Inputs.from_dict({"nodes": torch.zeros(1, 3, 2), "edges": torch.zeros(1, 4, 4)})
    with pytest.raises(ValueError, match="mask"):
        Inputs.from_dict({"nodes": torch.zeros(1, 3, 2), "mask": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="points"):
        G.O3().check_inputs(Inputs.from_dict({"nodes": torch.zeros(1, 3, 2)}))
    with pytest.raises(ValueError, match="position_channels"):
        G.E3(position_channels=(2,)).check_inputs(Inputs.from_dict({"points": torch.zeros(1, 3, 3, 2)}))
    # Integer adjacency becomes the floating dtype of the other inputs.
    batch = Inputs.from_dict({"nodes": torch.zeros(1, 3, 2, dtype=torch.float64),
                              "edges": torch.zeros(1, 3, 3, dtype=torch.int64)})
    assert batch.edges.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# The action g . x against its definition


def _reference_act(g: GroupElement, value: torch.Tensor, kind: str, position_channels=(0,)) -> torch.Tensor:
    """``g . value`` written with plain indexing: ``x'[perm[i]] = x[i]``, ``v' = R v + t``."""
    out = value
    if g.perm is not None and kind not in ("invariant",):
        perm = g.perm[:, 0]
        inverse = torch.argsort(perm, dim=-1)  # x'[j] = x[inverse[j]]
        rows = torch.arange(value.shape[0])[:, None]
        out = out[rows, inverse]
        if kind == "edge":
            out = out[rows[:, :, None], torch.arange(value.shape[1])[None, :, None], inverse[:, None, :]]
    if kind in ("vector", "position", "points") and g.rotation is not None:
        out = torch.einsum("bam,bnmc->bnac", g.rotation[:, 0], out)
    if g.translation is not None and kind in ("position", "points"):
        channels = range(out.shape[-1]) if kind == "position" else position_channels
        out = out.clone()
        for c in channels:
            out[..., c] = out[..., c] + g.translation[:, None, :]
    return out


@pytest.mark.parametrize("group", ALL_GROUPS, ids=_ids(ALL_GROUPS))
@pytest.mark.parametrize("kind", ["invariant", "node", "edge", "vector", "position", "points"])
def test_act_matches_definition(group, kind):
    batch, n = 3, 6
    gen = torch.Generator().manual_seed(1)
    inputs = {"points": torch.randn(batch, n, 3, 2, generator=gen, dtype=torch.float64)}
    g = group.random_element(inputs, generator=gen)
    shapes = {"invariant": (batch, 4), "node": (batch, n, 4), "edge": (batch, n, n, 2),
              "vector": (batch, n, 3, 2), "position": (batch, n, 3, 2), "points": (batch, n, 3, 2)}
    value = torch.randn(*shapes[kind], generator=gen, dtype=torch.float64)
    expected = _reference_act(g, value, kind, group.position_channels)
    assert_close(group.act(g, value, kind), expected, atol=1e-12, rtol=1e-12, name=kind)
    if kind in ("node", "edge") and group.permutation:
        assert not torch.equal(expected, value), "the random element must move something"


@pytest.mark.parametrize("group", [G.Sn(), G.Sn() * G.E3()], ids=["Sn", "SnxE3"])
def test_act_on_noise_kinds(group):
    batch, n, k = 2, 5, 3
    gen = torch.Generator().manual_seed(2)
    g = group.random_element({"points": torch.randn(batch, n, 3, 1, dtype=torch.float64)}, generator=gen)
    node_noise = torch.randn(batch, k, n, 2, generator=gen, dtype=torch.float64)
    point_noise = torch.randn(batch, k, n, 3, 2, generator=gen, dtype=torch.float64)
    frame_noise = torch.randn(batch, k, 3, 3, generator=gen, dtype=torch.float64)
    for j in range(k):
        assert_close(group.act(g, node_noise, "sample_node")[:, j], _reference_act(g, node_noise[:, j], "node"),
                     atol=1e-12, rtol=0)
        # Noise vectors rotate and permute but never translate.
        assert_close(group.act(g, point_noise, "sample_point")[:, j], _reference_act(g, point_noise[:, j], "vector"),
                     atol=1e-12, rtol=1e-12)
    if group.rotation is not None:
        expected = torch.einsum("bam,bjmc->bjac", g.rotation[:, 0], frame_noise)
        assert_close(group.act(g, frame_noise, "sample_frame"), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("group", ALL_GROUPS, ids=_ids(ALL_GROUPS))
def test_random_element_keeps_padding(group):
    inputs = _padded_inputs([3, 6, 1, 4], n=6)
    # Interleaved padding too: the element must map real slots to real slots.
    inputs["mask"][3] = torch.tensor([True, False, True, False, True, True])
    inputs["nodes"] = inputs["nodes"] * inputs["mask"][..., None]
    inputs["points"] = inputs["points"] * inputs["mask"][..., None, None]
    gen = torch.Generator().manual_seed(3)
    g = group.random_element(inputs, generator=gen)
    if group.permutation:
        perm = g.perm[:, 0]
        assert torch.equal(torch.sort(perm, dim=-1).values, torch.arange(6).expand(4, 6))
        mask = inputs["mask"]
        assert torch.equal(torch.gather(mask, 1, perm), mask), "real nodes must stay on real slots"
        padded = ~mask
        assert torch.equal(perm[padded], torch.arange(6).expand(4, 6)[padded]), "padded nodes stay put"
        assert torch.equal(group.act(g, mask, "mask"), mask)
    moved = group.act_inputs(g, inputs)
    for key in ("nodes", "points"):
        assert float(moved[key][~inputs["mask"]].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# Haar samples


def test_uniform_permutations_are_uniform_over_real_nodes():
    group = G.Sn()
    mask = torch.tensor([[True, True, True, False]])
    keys = torch.rand(1, 6000, 4, generator=torch.Generator().manual_seed(4))
    perm = group.sample_permutations(keys, mask)[0]
    assert torch.equal(perm[:, 3], torch.full((6000,), 3)), "the padded node sorts last"
    orders, counts = torch.unique(perm[:, :3], dim=0, return_counts=True)
    assert orders.shape[0] == math.factorial(3)
    expected = 6000 / 6
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 25.0, f"orderings far from uniform: counts {counts.tolist()}"


@pytest.mark.parametrize("group", [G.O3(), G.SO3()], ids=["O3", "SO3"])
def test_haar_rotations(group):
    gaussian = torch.randn(20000, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    R = group.sample_rotations(gaussian)
    eye = torch.eye(3, dtype=torch.float64)
    # Classical Gram-Schmidt loses a little orthogonality on the rare ill-conditioned draw.
    assert_close(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=1e-8, rtol=0)
    det = torch.linalg.det(R)
    if group.proper:
        assert_close(det, torch.ones_like(det), atol=1e-8, rtol=0)
    else:
        assert abs(float((det > 0).double().mean()) - 0.5) < 0.02
    # Haar: every entry has mean 0 and variance 1/3; the first axis points everywhere alike.
    assert float(R.mean(0).abs().max()) < 0.02
    assert_close(R.pow(2).mean(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)


# ---------------------------------------------------------------------------------------------
# g^-1 on inputs, then g back on outputs: the identity backbone must give back the input


@pytest.mark.parametrize("group", ALL_GROUPS, ids=_ids(ALL_GROUPS))
def test_transform_round_trip(group):
    inputs = Inputs.from_dict(_padded_inputs([5, 3], n=5))
    batch, n, k = 2, 5, 4
    gen = torch.Generator().manual_seed(6)
    sample = GroupSample(k=k, center=group.center(inputs))
    if group.permutation:
        sample.perm = group.sample_permutations(torch.rand(batch, k, n, generator=gen), inputs.mask)
    if group.rotation is not None:
        sample.rotation = group.sample_rotations(torch.randn(batch, k, 3, 3, generator=gen, dtype=torch.float64))
    views = group.transform_inputs(sample, inputs)
    assert views["mask"].shape == (batch, k, n)
    if group.permutation:
        # Real nodes first in every sample, padded ones after.
        n_real = inputs.mask.sum(-1)
        assert torch.equal(views["mask"], (torch.arange(n)[None, None, :] < n_real[:, None, None]).expand(batch, k, n))
    assert_close(group.transform_output(sample, views["nodes"], "node", inputs.mask), inputs.nodes, atol=1e-12, rtol=0)
    assert_close(group.transform_output(sample, views["edges"], "edge", inputs.mask), inputs.edges, atol=1e-12, rtol=0)
    diagonal = torch.diagonal(inputs.edges, dim1=1, dim2=2).movedim(-1, 1)
    assert_close(group.transform_output(sample, views["edges"], "diagonal", inputs.mask), diagonal, atol=1e-12, rtol=0)
    # Positions come back with the translation; other channels of the points are plain vectors.
    positions = group.transform_output(sample, views["points"][..., :1], "position", inputs.mask)
    assert_close(positions, inputs.points[..., :1], atol=1e-12, rtol=1e-12)
    vectors = group.transform_output(sample, views["points"][..., 1:], "vector", inputs.mask)
    assert_close(vectors, inputs.points[..., 1:], atol=1e-12, rtol=1e-12)
    if group.rotation is not None:
        # The views really are rotated (and centered) copies, not the inputs themselves.
        assert float((views["points"][:, 0] - inputs.points).abs().max()) > 1e-3
    if group.translation:
        real = views["mask"][..., None, None].expand_as(views["points"])
        centered_mean = (views["points"][..., 0] * real[..., 0]).sum(2) / real[..., 0].sum(2)
        assert float(centered_mean.abs().max()) < 1e-12, "views are centered at the origin"


def test_invariant_output_is_the_sample_mean():
    group = G.Sn() * G.O3()
    y = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_close(group.transform_output(GroupSample(k=5), y, "invariant"), y.mean(1), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="output kind"):
        group.transform_output(GroupSample(k=5), y, "tensor")


# ---------------------------------------------------------------------------------------------
# Frames


@pytest.mark.parametrize("proper", [False, True], ids=["O3", "SO3"])
def test_pca_frames(proper):
    gen = torch.Generator().manual_seed(7)
    points = torch.randn(3, 8, 3, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0],
                                                                                       dtype=torch.float64)[:, None]
    frames = pca_frames(points, None, proper)
    assert frames.shape == (3, 4 if proper else 8, 3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert_close(frames.transpose(-1, -2) @ frames, eye.expand_as(frames), atol=1e-12, rtol=0)
    det = torch.linalg.det(frames)
    if proper:
        assert_close(det, torch.ones_like(det), atol=1e-12, rtol=0)
    else:
        assert torch.equal((det > 0).sum(-1), torch.full((3,), 4))
    # Frames of a rotated cloud are the rotated frames (as a set: compare sorted entries).
    R = G.O3().sample_rotations(torch.randn(3, 3, 3, generator=gen, dtype=torch.float64))
    rotated = pca_frames(torch.einsum("bam,bnmc->bnac", R, points), None, proper)
    expected = torch.einsum("bam,bjmc->bjac", R, frames)
    key = lambda f: torch.sort(f.flatten(-2), dim=1).values  # noqa: E731
    assert_close(key(rotated), key(expected), atol=1e-9, rtol=0)


def test_wl_colors_equivariant_and_discriminating():
    # A path 0-1-2-3 plus an isolated node 4: end points, inner points and the isolated node differ.
    adjacency = torch.zeros(1, 5, 5, dtype=torch.float64)
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        adjacency[0, i, j] = adjacency[0, j, i] = 1
    colors = wl_colors(Inputs(edges=adjacency))[0]
    assert colors[0] == colors[3] and colors[1] == colors[2]
    assert len({int(colors[0]), int(colors[1]), int(colors[4])}) == 3
    # Relabelling permutes the colours bit for bit.
    group = G.Sn()
    g = group.random_element({"edges": adjacency}, generator=torch.Generator().manual_seed(8))
    moved = group.act(g, adjacency, "edges")
    assert torch.equal(wl_colors(Inputs(edges=moved))[0], group.act(g, colors[None].double(), "node")[0].long())
    # Padded nodes get -1 and do not change the colours of real ones.
    padded = torch.zeros(1, 7, 7, dtype=torch.float64)
    padded[:, :5, :5] = adjacency
    mask = torch.arange(7)[None] < 5
    colors_padded = wl_colors(Inputs(edges=padded, mask=mask))[0]
    assert torch.equal(colors_padded[:5], colors) and torch.equal(colors_padded[5:], torch.tensor([-1, -1]))


def test_frame_sn_orders_by_signature_and_samples_ties():
    adjacency = torch.zeros(1, 5, 5, dtype=torch.float64)
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        adjacency[0, i, j] = adjacency[0, j, i] = 1
    frame = Frame().bind(G.Sn())
    inputs = Inputs(edges=adjacency)
    sample, _ = frame(inputs, frame.draw_noise(inputs, 64, generator=torch.Generator().manual_seed(9)), 64)
    colors = wl_colors(inputs)[0]
    ordered = colors[sample.perm[0]]  # [k, n]
    assert torch.all(ordered[:, :-1] >= ordered[:, 1:]), "every sample sorts the signature"
    assert torch.unique(sample.perm[0], dim=0).shape[0] == 4, "ties (0<->3, 1<->2) are enumerated by the noise"
