"""The learned distribution as the paper builds it: the residual outside the average, added
noise, the batch-norm GIN and the vector-neuron DGCNN, and the concentration diagnostic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lps_fast
from lps_fast import backbones as BB
from lps_fast import distributions as D
from lps_fast import groups as G
from lps_fast.diagnostics import concentration, permutation_concentration, rotation_concentration
from lps_fast.nn import VNDGCNN, BatchNormGIN, MaskedBatchNorm, knn_neighbours
from lps_fast.testing import assert_equivariant

from test_symmetrize import make_inputs

N = 6


def particle_inputs(batch=4, n=5, dtype=torch.float64, seed=0, masked=False):
    gen = torch.Generator().manual_seed(seed)
    charges = torch.randint(0, 2, (batch, n, 1), generator=gen).to(dtype) * 2 - 1
    points = torch.randn(batch, n, 3, 2, generator=gen, dtype=dtype)
    edges = torch.cat([charges * charges.transpose(1, 2),
                       (points[:, :, None, :, 0] - points[:, None, :, :, 0]).pow(2).sum(-1)], dim=-1)[..., None]
    inputs = {"nodes": charges, "edges": edges.reshape(batch, n, n, 2), "points": points}
    if masked:
        sizes = torch.tensor([n, n - 1, 3, n][:batch])
        mask = torch.arange(n)[None, :] < sizes[:, None]
        pairs = mask[:, :, None] & mask[:, None, :]
        inputs = {"nodes": inputs["nodes"] * mask[..., None], "edges": inputs["edges"] * pairs[..., None],
                  "points": inputs["points"] * mask[..., None, None], "mask": mask}
    return inputs


def particle_model(group, distribution="learned", network="vn-dgcnn", residual=True, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    backbone = BB.Transformer(5, node_dim=1, edge_dim=2, point_channels=2, d_model=16, heads=2, layers=1,
                              output="vector")
    if distribution in ("learned", "canonical"):
        kwargs = dict(dict(node_dim=1, edge_dim=2, point_channels=2, hidden=24, network=network), **kwargs)
    dist = D.create(distribution, **kwargs)
    model = lps_fast.Symmetrize(backbone, group, dist, n_samples=3, output="vector",
                                residual=lps_fast.InputResidual("points", (0,)) if residual else None)
    return model.to(dtype)


class ResidualInside(nn.Module):
    """The residual added inside the backbone view: the wrong way, kept to show what the test catches."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, views):
        return views["points"][..., 0:1] + self.backbone(views)


def _zero_backbone_gradients(model, inputs):
    for parameter in model.backbone.parameters():
        nn.init.zeros_(parameter)
    model.zero_grad()
    out, _ = model(inputs)  # the task loss only: the entropy term is the distribution's own
    target = torch.randn_like(out, generator=torch.Generator().manual_seed(5))
    (out - target).pow(2).mean().backward()
    return {name: p.grad for name, p in model.distribution.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The residual outside the average


@pytest.mark.parametrize("group", ["SnxE3", "E3", "SnxO3"])
@pytest.mark.parametrize("distribution", ["learned", "canonical"])
@pytest.mark.parametrize("network", ["vn", "vn-dgcnn"])
def test_zero_backbone_sends_exactly_zero_gradient_to_the_distribution(group, distribution, network):
    model = particle_model(group, distribution, network)
    inputs = particle_inputs()
    model.train()
    gradients = _zero_backbone_gradients(model, inputs)
    assert gradients, "the distribution has parameters"
    for name, grad in gradients.items():
        assert grad is None or bool((grad == 0).all()), f"{name} got a gradient from a zero backbone"
    # The output is exactly the input positions.
    with torch.no_grad():
        out, _ = model(inputs)
    assert torch.equal(out, inputs["points"][..., 0:1])


@pytest.mark.parametrize("group", ["SnxE3", "SnxO3"])
def test_residual_inside_the_backbone_leaks_a_gradient(group):
    """The check above can fail: with the residual inside the views, the straight-through
    permutation (not orthogonal, unlike the Gram-Schmidt frame) sends the distribution a gradient."""
    model = particle_model(group, "learned", "vn-dgcnn", residual=False)
    model.backbone = ResidualInside(model.backbone)
    gradients = _zero_backbone_gradients(model, particle_inputs())
    total = sum(float(g.abs().sum()) for g in gradients.values() if g is not None)
    assert total > 1e-6


def test_zero_backbone_gradient_for_graphs_with_a_node_residual():
    torch.manual_seed(0)
    model = lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1, hidden=(8,), out_dim=2, output="node"), "Sn",
                                D.Learned(node_dim=2, edge_dim=1, hidden=16, network="gin-bn"), n_samples=3,
                                output="node", residual=lps_fast.InputResidual("nodes")).double()
    gradients = _zero_backbone_gradients(model, make_inputs(keys=("nodes", "edges")))
    assert all(g is None or bool((g == 0).all()) for g in gradients.values())


@pytest.mark.parametrize("group", ["SnxE3", "SE3", "SnxO3"])
@pytest.mark.parametrize("masked", [False, True])
def test_residual_model_is_equivariant(group, masked):
    model = particle_model(group).eval()
    assert_equivariant(model, particle_inputs(masked=masked), generator=torch.Generator().manual_seed(1))


def test_residual_errors_name_the_problem():
    model = particle_model("SnxE3", residual=False)
    model.residual = lambda inputs: inputs["points"]  # two channels: the output has one
    with pytest.raises(ValueError, match=r"residual for output must have the shape .*\(4, 5, 3, 1\)"):
        model(particle_inputs())
    with pytest.raises(TypeError, match="residual must be a callable"):
        lps_fast.Symmetrize(nn.Identity(), "Sn", residual=3)
    with pytest.raises(ValueError, match="out of range"):
        lps_fast.InputResidual("points", (4,))(particle_inputs())
    with pytest.raises(ValueError, match="do not have"):
        lps_fast.InputResidual("globals")(particle_inputs())


def test_residual_of_padded_nodes_is_zero():
    model = particle_model("SnxE3").eval()
    inputs = particle_inputs(masked=True)
    inputs["points"] = inputs["points"] + 1.0  # padded nodes hold garbage positions
    out, _ = model(inputs)
    assert bool((out[~inputs["mask"]] == 0).all())


# ---------------------------------------------------------------------------------------------
# Added noise


def test_noise_is_added_to_the_network_input_by_default():
    model = particle_model("SnxE3")
    inputs = particle_inputs()
    specs = model.noise_spec(inputs)
    assert specs["points"].shape == (4, 3, 5, 3, 2) and specs["points"].law == "normal"
    graph = lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1), "Sn", D.Learned(node_dim=2, edge_dim=1), n_samples=3)
    # [x, degree] gets U(0, 1) noise of the same width
    assert graph.noise_spec(make_inputs(keys=("nodes", "edges")))["nodes"].shape == (3, 3, N, 3)
    assert graph.distribution.noise_mode == "add"


def test_added_noise_changes_the_samples_and_concat_stays_available():
    inputs = make_inputs(keys=("nodes", "edges"))
    for mode in ("add", "concat"):
        torch.manual_seed(0)
        model = lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1), "Sn",
                                    D.Learned(node_dim=2, edge_dim=1, hidden=16, noise=mode, tie_break=0.0),
                                    n_samples=8).double()
        noise = model.draw_noise(inputs, generator=torch.Generator().manual_seed(0))
        sample, _ = model.sample(inputs, noise)
        zero = {name: torch.zeros_like(value) for name, value in noise.items()}
        fixed, _ = model.sample(inputs, zero)
        assert not torch.equal(sample.perm, fixed.perm)
        # Without noise every sample is the same permutation.
        assert bool((fixed.perm == fixed.perm[:, :1]).all())
    with pytest.raises(ValueError, match="noise_dim applies to noise='concat' only"):
        D.Learned(node_dim=2, noise_dim=3)
    with pytest.raises(ValueError, match="noise must be one of"):
        D.Learned(noise="multiply")


@pytest.mark.parametrize("network", ["gin", "gin-bn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_graph_networks_are_exactly_equivariant(network, mode):
    torch.manual_seed(0)
    model = lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1, hidden=(16,), output="node"), "Sn",
                                D.Learned(node_dim=2, edge_dim=1, hidden=16, network=network), n_samples=3,
                                output="node")
    model.train(mode == "train")
    assert_equivariant(model, make_inputs(keys=("nodes", "edges")), generator=torch.Generator().manual_seed(2),
                       check_aux=True)


@pytest.mark.parametrize("group", ["SnxE3", "E3", "SnxSO3", "O3"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vn_dgcnn_is_exactly_equivariant(group, mode):
    model = particle_model(group, dropout=0.0)
    model.train(mode == "train")
    assert_equivariant(model, particle_inputs(masked=True), generator=torch.Generator().manual_seed(3),
                       check_aux=True)


def test_networks_are_checked_against_the_group():
    with pytest.raises(ValueError, match="network in"):
        lps_fast.Symmetrize(nn.Identity(), "Sn", D.Learned(node_dim=1, network="vn-dgcnn"))
    with pytest.raises(ValueError, match="network in"):
        lps_fast.Symmetrize(nn.Identity(), "O3", D.Learned(point_channels=1, network="gin-bn"))
    with pytest.raises(ValueError, match="network must be one of"):
        D.Learned(network="resnet")


# ---------------------------------------------------------------------------------------------
# The layers


def test_masked_batch_norm_matches_batch_norm_and_ignores_padding():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    ours, theirs = MaskedBatchNorm(4).double(), nn.BatchNorm1d(4).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1, 1)
        theirs.load_state_dict(ours.state_dict(), strict=False)
    expected = theirs(x.reshape(-1, 4)).reshape(x.shape)
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # Padded entries (any value) do not move the statistics of the real ones.
    mask = torch.rand(6, 5) < 0.6
    a, b = MaskedBatchNorm(4).double(), MaskedBatchNorm(4).double()
    garbage = torch.where(mask[..., None], x, torch.full_like(x, 1e6))
    torch.testing.assert_close(a(x, mask)[mask], b(garbage, mask)[mask])
    torch.testing.assert_close(a.running_mean, b.running_mean)
    ours.eval()
    torch.testing.assert_close(ours(x), (x - ours.running_mean) / torch.sqrt(ours.running_var + 1e-5) * ours.weight
                               + ours.bias)


def test_knn_takes_the_node_itself_and_never_padding():
    points = torch.tensor([[0.0, 1.0, 3.0, 100.0]])[..., None, None].expand(1, 4, 3, 1)
    mask = torch.tensor([[True, True, True, False]])
    index = knn_neighbours(points, 3, mask)
    assert index[0, :3, 0].tolist() == [0, 1, 2]  # itself first
    assert not bool((index[0, :3] == 3).any())  # padding is never a neighbour
    assert sorted(index[0, 0].tolist()) == [0, 1, 2]
    index = knn_neighbours(points, 4, mask)  # more neighbours than real nodes: the node itself repeats
    assert index[0, 2].tolist().count(2) == 2


def test_batch_norm_gin_virtual_node_reads_the_whole_graph():
    torch.manual_seed(0)
    gin = BatchNormGIN(2, 1, hidden=8, layers=2).eval().double()  # in, then out of the virtual node
    x = torch.randn(1, 4, 2, dtype=torch.float64)
    edges = torch.zeros(1, 4, 4, 1, dtype=torch.float64)  # no edges: only the virtual node links nodes
    base = gin(x, edges, None)
    moved = x.clone()
    moved[0, 3] += 1.0
    changed = gin(moved, edges, None)
    assert not torch.allclose(base[0, 0], changed[0, 0])  # node 0 sees node 3 through the virtual node
    no_virtual = BatchNormGIN(2, 1, hidden=8, layers=2, virtual_node=False).eval().double()
    torch.testing.assert_close(no_virtual(x, edges, None)[0, 0], no_virtual(moved, edges, None)[0, 0])


def test_vn_dgcnn_shapes_and_dropout_is_off_in_eval():
    net = VNDGCNN(2, hidden=24, dropout=0.5).double()
    v = torch.randn(7, 5, 3, 2, dtype=torch.float64)
    frame, scores = net(v)
    assert frame.shape == (7, 3, 3) and scores.shape == (7, 5)
    net.eval()
    torch.testing.assert_close(net(v)[0], net(v)[0])


def test_vector_dropout_drops_whole_vectors_at_its_rate_and_rescales_the_rest():
    from lps_fast.nn import _vector_dropout
    torch.manual_seed(0)
    v = torch.rand(200, 10, 3, 16, dtype=torch.float64) + 1.0
    out = _vector_dropout(v, 0.25, training=True)
    factor = out / v  # [N, n, 3, C]: one factor per 3-vector, 0 or 1 / 0.75
    torch.testing.assert_close(factor, factor[..., :1, :].expand_as(factor))
    values = factor[..., 0, :]
    assert torch.all((values == 0) | torch.isclose(values, torch.tensor(1 / 0.75, dtype=torch.float64)))
    assert abs(float((values == 0).double().mean()) - 0.25) < 0.01
    assert _vector_dropout(v, 0.25, training=False) is v


@pytest.mark.parametrize("masked", [False, True])
def test_vn_dgcnn_scores_are_the_score_head_on_pooled_and_per_node_coordinates(masked):
    """The score head is one linear layer on [max over nodes of the coordinates of x in each
    node's frame, the coordinates of x12 in that frame], coordinates ordered (channel, frame
    vector); the network evaluates it in a cheaper order, which must not change the function."""
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=24, dropout=0.0).double().eval()
    v = torch.randn(6, 5, 3, 2, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]] * 3) if masked else None
    _, scores = net(v, mask)

    x1 = net._edge_conv(v, mask, net.conv1, net.pool1)
    x2 = net._edge_conv(x1, mask, net.conv2, net.pool2)
    x12 = torch.cat([x1, x2], dim=-1)
    x = net.conv3(x12, mask)
    node_mask = torch.ones(6, 5, dtype=torch.bool) if mask is None else mask
    weights = node_mask[..., None, None].double()
    context = (x * weights).sum(1) / weights.sum(1)
    x = torch.cat([x, context[:, None].expand_as(x)], dim=-1)
    local = net.std_frame(net.std2(net.std1(x, mask), mask))
    coordinates = torch.einsum("niac,niae->nice", x, local).flatten(-2)
    pooled = coordinates.masked_fill(~node_mask[..., None], float("-inf")).max(dim=1).values
    pair = torch.einsum("niac,niae->nice", x12, local).flatten(-2)
    expected = net.score_head(torch.cat([pooled[:, None].expand(-1, 5, -1), pair], dim=-1))[..., 0]
    expected = expected * node_mask.double()
    torch.testing.assert_close(scores, expected, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Concentration


def test_concentration_of_deterministic_and_uniform_samples():
    perm = torch.arange(5).expand(3, 20, 5)
    assert float(permutation_concentration(perm)) == 1.0
    gen = torch.Generator().manual_seed(0)
    uniform = torch.argsort(torch.rand(200, 400, 5, generator=gen), dim=-1)
    assert abs(float(permutation_concentration(uniform)) - 0.2) < 0.04
    identity = torch.eye(3, dtype=torch.float64).expand(4, 10, 3, 3)
    assert abs(float(rotation_concentration(identity)) - 1.0) < 1e-6
    haar = G.O3().sample_rotations(torch.randn(64, 400, 3, 3, generator=gen, dtype=torch.float64))
    assert float(rotation_concentration(haar)) < 0.1
    mask = torch.tensor([[True, True, False, False, False]]).expand(3, 5)
    assert float(permutation_concentration(perm, mask)) == 1.0


def test_concentration_reads_a_model_sample():
    model = particle_model("SnxE3")
    sample, _ = model.sample(particle_inputs())
    values = concentration(sample)
    assert set(values) == {"permutation", "rotation"} and all(0 < v <= 1 for v in values.values())


# ---------------------------------------------------------------------------------------------
# Robustness of the learned distributions


def test_noise_drawn_inside_forward_compiles_across_input_sizes():
    torch.manual_seed(0)
    model = lps_fast.Symmetrize(BB.Transformer(12, node_dim=2, d_model=16, heads=2, layers=1, output="node"), "Sn",
                                D.Learned(node_dim=2, hidden=16), n_samples=2, output="node").eval()
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing, without a compiler's cost
    for n in (8, 10, 12):
        out, _ = compiled({"nodes": torch.randn(3, n, 2)})
        assert out.shape == (3, n, 1) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("network", ["gin", "gin-bn"])
def test_learned_on_an_empty_batch(network):
    model = lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1, hidden=(8,)), "Sn",
                                D.Learned(node_dim=2, edge_dim=1, hidden=8, network=network), n_samples=2).eval()
    out, _ = model({"nodes": torch.zeros(0, N, 2), "edges": torch.zeros(0, N, N)})
    assert out.shape == (0, 1)


@pytest.mark.parametrize("network", ["vn", "vn-dgcnn"])
@pytest.mark.parametrize("points", ["one", "zero"])
def test_canonical_frames_of_degenerate_point_sets_stay_finite(network, points):
    torch.manual_seed(0)
    n = 1 if points == "one" else 4
    inputs = {"points": torch.zeros(2, n, 3, 1) if points == "zero" else torch.randn(2, n, 3, 1)}
    backbone = BB.MLP(4, point_channels=1, hidden=(8,), output="vector")
    for group in ("E3", "O3"):
        model = lps_fast.Symmetrize(backbone, group, D.Canonical(point_channels=1, hidden=12, network=network),
                                    output="vector").eval()
        out, _ = model(inputs)
        assert bool(torch.isfinite(out).all())
        if points == "zero" or group == "E3":
            # centred, every point is 0: every rotation fixes the input, so the equivariant answer is 0
            assert torch.allclose(out, torch.zeros_like(out))
        # One point about the origin (O3) gives a rank-1 frame: its first axis is the point, the
        # others come from rounding residues, so the answer is finite but not exactly equivariant.


def test_unknown_noise_entries_are_refused():
    model = particle_model("SnxE3")
    inputs = particle_inputs()
    noise = model.draw_noise(inputs)
    noise["point"] = noise.pop("points")
    with pytest.raises(ValueError, match=r"draws no noise \['point'\]; its noise entries: \['frame_jitter', 'points', "
                                         r"'tie_break'\]"):
        model(inputs, noise=noise)


def test_one_distribution_cannot_serve_two_models():
    distribution = D.Learned(node_dim=2, edge_dim=1, hidden=8)
    lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1), "Sn", distribution)
    with pytest.raises(ValueError, match="already belongs to another Symmetrize"):
        lps_fast.Symmetrize(BB.MLP(N, node_dim=2, edge_dim=1), "Sn", distribution)
