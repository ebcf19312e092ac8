"""Symmetrize: exact equivariance for every group x distribution x type, padding, Monte Carlo
behaviour, fast == reference, gradients, state, and two learning smoke tests."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lps_fast
from lps_fast import backbones as BB
from lps_fast import distributions as D
from lps_fast import groups as G
from lps_fast.groups import GroupSample
from lps_fast.testing import assert_equivariant

from helpers import assert_close

N_MAX = 6
NODE_DIM, EDGE_DIM, CHANNELS = 2, 1, 2

PERMUTATION_GROUPS = {"Sn": G.Sn()}
EUCLIDEAN_GROUPS = {"O3": G.O3(), "SO3": G.SO3(), "E3": G.E3(), "SE3": G.SE3(), "SnxO3": G.Sn() * G.O3(),
                    "SnxSO3": G.Sn() * G.SO3(), "SnxE3": G.Sn() * G.E3(), "SnxSE3": G.Sn() * G.SE3()}
ALL_GROUPS = {**PERMUTATION_GROUPS, **EUCLIDEAN_GROUPS}
DISTRIBUTIONS = ("uniform", "learned", "frame", "canonical")


def make_distribution(name, **kwargs):
    if name in ("learned", "canonical"):
        kwargs = dict(dict(node_dim=NODE_DIM, edge_dim=EDGE_DIM, point_channels=CHANNELS, hidden=16, layers=2), **kwargs)
    return D.create(name, **kwargs)


def make_inputs(sizes=(5, 6, 4), n=N_MAX, dtype=torch.float64, seed=0, keys=("nodes", "edges", "points"), mask=True):
    """Random graphs with node features, a symmetric adjacency and 3-vector points, padded to n."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    real = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    pairs = real[:, :, None] & real[:, None, :]
    adjacency = (torch.rand(batch, n, n, generator=gen) < 0.5).to(dtype)
    adjacency = torch.triu(adjacency, 1)
    inputs = {
        "nodes": torch.randn(batch, n, NODE_DIM, generator=gen, dtype=dtype) * real[..., None],
        "edges": ((adjacency + adjacency.transpose(1, 2)) * pairs)[..., None],
        "points": torch.randn(batch, n, 3, CHANNELS, generator=gen, dtype=dtype) * real[..., None, None],
    }
    inputs = {key: inputs[key] for key in keys}
    if mask:
        inputs["mask"] = real
    return inputs


def mlp_backbone(output, keys=("nodes", "edges", "points"), out_dim=3):
    """A plain MLP on everything: no built-in symmetry, so only the symmetrization can make it equivariant."""
    mlp_output = {"diagonal": "edge", "position": "vector"}.get(output, output)
    return BB.MLP(N_MAX, node_dim=NODE_DIM if "nodes" in keys else 0, edge_dim=EDGE_DIM if "edges" in keys else 0,
                  point_channels=CHANNELS if "points" in keys else 0, hidden=(16,), out_dim=out_dim, output=mlp_output)


def make_model(group, distribution, output, n_samples=3, keys=("nodes", "edges", "points"), **distribution_kwargs):
    torch.manual_seed(0)
    return lps_fast.Symmetrize(mlp_backbone(output, keys), group, make_distribution(distribution, **distribution_kwargs),
                               n_samples=n_samples, output=output)


# ---------------------------------------------------------------------------------------------
# Exact equivariance: every group x distribution x output type


@pytest.mark.parametrize("output", ["invariant", "node", "edge", "diagonal", "vector"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_equivariance_sn(distribution, output, masked):
    model = make_model(G.Sn(), distribution, output)
    inputs = make_inputs(mask=masked, sizes=(6, 6, 6) if not masked else (5, 6, 3))
    report = assert_equivariant(model, inputs)
    assert report["output"] < 1e-9


@pytest.mark.parametrize("output", ["invariant", "node", "edge", "vector", "position"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("group_name", list(EUCLIDEAN_GROUPS))
def test_equivariance_euclidean(group_name, distribution, output):
    model = make_model(EUCLIDEAN_GROUPS[group_name], distribution, output)
    report = assert_equivariant(model, make_inputs(), generator=torch.Generator().manual_seed(1))
    assert report["output"] < 1e-8


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("group_name", list(ALL_GROUPS))
def test_equivariance_with_padding(group_name, distribution):
    output = "node" if group_name == "Sn" else "position"
    model = make_model(ALL_GROUPS[group_name], distribution, output)
    assert_equivariant(model, make_inputs(sizes=(3, 6, 5)), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("keys", [("edges",), ("nodes",), ("points",), ("nodes", "edges")], ids=lambda k: "+".join(k))
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_equivariance_sn_input_types(keys, distribution):
    if distribution == "canonical" and keys == ("edges",):
        pytest.skip("canonicalization orders nodes the network cannot tell apart by index: not equivariant on "
                    "graphs with structurally identical nodes (a known limit, checked below)")
    dims = dict(node_dim=NODE_DIM if "nodes" in keys else 0, edge_dim=EDGE_DIM if "edges" in keys else 0,
                point_channels=CHANNELS if "points" in keys else 0)
    kwargs = dims if distribution in ("learned", "canonical") else {}
    model = make_model(G.Sn(), distribution, "node", keys=keys, **kwargs)
    assert_equivariant(model, make_inputs(keys=keys))


def test_canonical_ties_break_equivariance_but_learned_noise_does_not():
    """A 6-cycle: every node looks the same to the (1-WL-bounded) network. The canonical ordering
    then depends on node indices; the learned distribution breaks ties with its noise."""
    cycle = torch.zeros(1, 6, 6, dtype=torch.float64)
    for i in range(6):
        cycle[0, i, (i + 1) % 6] = cycle[0, (i + 1) % 6, i] = 1
    inputs = {"edges": cycle[..., None]}
    dims = dict(node_dim=0, edge_dim=1, point_channels=0)
    canonical = make_model(G.Sn(), "canonical", "node", keys=("edges",), **dims)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(canonical, inputs, generator=torch.Generator().manual_seed(0))
    learned = make_model(G.Sn(), "learned", "node", keys=("edges",), **dims)
    assert_equivariant(learned, inputs, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "group_name, distribution", [("Sn", "learned"), ("Sn", "uniform"), ("Sn", "frame"), ("SnxE3", "learned"),
                                 ("SnxSO3", "uniform"), ("E3", "frame"), ("SnxO3", "canonical")])
def test_equivariance_float32(group_name, distribution):
    output = "node" if group_name == "Sn" else "position"
    model = make_model(ALL_GROUPS[group_name], distribution, output).float()
    report = assert_equivariant(model, make_inputs(dtype=torch.float32), dtype=None, atol=1e-5, rtol=1e-5)
    assert report["output"] < 1e-5


@pytest.mark.parametrize("group_name", ["Sn", "SnxE3", "SO3"])
def test_invariant_outputs_do_not_move(group_name):
    group = ALL_GROUPS[group_name]
    model = make_model(group, "learned", "invariant").double()
    inputs = make_inputs()
    noise = model.draw_noise(inputs)
    g = group.random_element(inputs, generator=torch.Generator().manual_seed(3))
    specs = model.noise_spec(inputs)
    with torch.no_grad():
        out, aux = model(inputs, noise=noise)
        moved, moved_aux = model(group.act_inputs(g, inputs),
                                 noise={k: group.act(g, v, specs[k].kind) for k, v in noise.items()})
    assert_close(moved, out, atol=1e-10, rtol=1e-10)
    for name in aux:
        assert_close(moved_aux[name], aux[name], atol=1e-10, rtol=1e-10)
    assert float((out[0] - out[1]).abs().max()) > 1e-6, "different graphs must not share one output"


@pytest.mark.parametrize("group_name", list(ALL_GROUPS))
@pytest.mark.parametrize("output", ["invariant", "node"])
def test_checker_rejects_the_unsymmetrized_backbone(group_name, output):
    model = lps_fast.Symmetrize(mlp_backbone(output), ALL_GROUPS[group_name], None, output=output)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(model, make_inputs())


class _ForgetsToRotateBack(G.Product):
    """A mis-wired group: outputs are mapped back by the permutation only."""

    def transform_output(self, sample, y, kind, mask=None):
        return super().transform_output(GroupSample(k=sample.k, perm=sample.perm, soft=sample.soft), y, kind, mask)


class _ForgetsTheSoftInverse(G.Sn):
    """A mis-wired group: inputs are permuted by perm^-1 instead of perm."""

    def transform_inputs(self, sample, inputs):
        inverse = torch.argsort(sample.perm, dim=-1)
        return super().transform_inputs(GroupSample(k=sample.k, perm=inverse), inputs)


def test_checker_rejects_miswired_groups():
    model = lps_fast.Symmetrize(mlp_backbone("vector"), _ForgetsToRotateBack(G.Sn(), G.O3()),
                                make_distribution("uniform"), output="vector")
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(model, make_inputs())
    model = lps_fast.Symmetrize(mlp_backbone("node"), _ForgetsTheSoftInverse(), make_distribution("uniform"),
                                output="node")
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(model, make_inputs(mask=False, sizes=(6, 6, 6)))


def test_equivariance_with_dict_outputs_and_transformer():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = BB.Transformer(N_MAX, node_dim=NODE_DIM, edge_dim=EDGE_DIM, point_channels=CHANNELS,
                                       d_model=16, heads=2, layers=1, out_dim=2, output="vector")

        def forward(self, views):
            y = self.body(views)
            return {"positions": y[..., :1], "forces": y[..., 1:], "energy": y.pow(2).sum((1, 2, 3))[:, None]}

    torch.manual_seed(0)
    model = lps_fast.Symmetrize(TwoHeads(), G.Sn() * G.E3(), make_distribution("learned"), n_samples=4,
                                output={"positions": "position", "forces": "vector", "energy": "invariant"})
    report = assert_equivariant(model, make_inputs())
    assert set(report) == {"positions", "forces", "energy", "aux/entropy"}


# ---------------------------------------------------------------------------------------------
# Padded batches equal the graphs run one by one


def _slice_noise(noise, specs, b, size):
    return {name: value[b:b + 1, :, :size] if specs[name].kind in ("sample_node", "sample_point") else value[b:b + 1]
            for name, value in noise.items()}


def _single_graph(inputs, b, size):
    out = {}
    for key, value in inputs.items():
        if key == "mask":
            continue
        out[key] = value[b:b + 1, :size, :size] if key == "edges" else value[b:b + 1, :size]
    return out


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("group_name", list(ALL_GROUPS))
def test_padded_batch_equals_graphs_one_by_one(group_name, distribution):
    output = "node" if group_name == "Sn" else "position"
    model = make_model(ALL_GROUPS[group_name], distribution, output).double()
    sizes = (4, 6, 3)
    inputs = make_inputs(sizes=sizes)
    noise = model.draw_noise(inputs)
    specs = model.noise_spec(inputs)
    with torch.no_grad():
        batched, aux = model(inputs, noise=noise)
        singles = [model(_single_graph(inputs, b, size), noise=_slice_noise(noise, specs, b, size))
                   for b, size in enumerate(sizes)]
    for b, (size, (single, _)) in enumerate(zip(sizes, singles)):
        assert_close(batched[b, :size], single[0], atol=1e-10, rtol=1e-9, name=f"graph {b}")
        if size < N_MAX:
            assert float(batched[b, size:].abs().max()) == 0.0, "padded nodes carry no output"
    for name in aux:
        assert_close(aux[name], torch.stack([s[1][name] for s in singles]).mean(), atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Monte Carlo: the variance of the estimate falls as 1/k


@pytest.mark.parametrize("group_name, distribution, output", [("Sn", "uniform", "invariant"),
                                                              ("Sn", "learned", "node"),
                                                              ("SnxO3", "uniform", "position")])
def test_monte_carlo_variance_falls_as_one_over_k(group_name, distribution, output):
    model = make_model(ALL_GROUPS[group_name], distribution, output).double().eval()
    one_graph = make_inputs(sizes=(6,), mask=False)
    replicas = 400  # the same graph, independent draws
    inputs = {key: value.expand(replicas, *value.shape[1:]) for key, value in one_graph.items()}
    variances = {}
    with torch.no_grad():
        for k in (1, 16):
            gen = torch.Generator().manual_seed(k)
            out, _ = model(inputs, noise=model.draw_noise(inputs, n_samples=k, generator=gen))
            variances[k] = out.var(dim=0).mean().item()
    ratio = variances[1] / variances[16]
    assert variances[1] > 1e-6, "the estimate must be random with one sample"
    assert 10.0 < ratio < 25.0, f"variance ratio k=1 / k=16 is {ratio:.2f}, expected about 16"


# ---------------------------------------------------------------------------------------------
# Backends, gradients, state


def _backend_cases():
    return {
        "Sn-learned-mlp": lambda: make_model(G.Sn(), "learned", "edge"),
        "SnxE3-learned-transformer": lambda: lps_fast.Symmetrize(
            BB.Transformer(N_MAX, node_dim=NODE_DIM, edge_dim=EDGE_DIM, point_channels=CHANNELS, d_model=16, heads=2,
                           layers=1, output="vector"),
            G.Sn() * G.E3(), make_distribution("learned"), n_samples=3, output="position"),
        "SO3-uniform-mlp": lambda: make_model(G.SO3(), "uniform", "vector"),
        "Sn-learned-diagonal": lambda: make_model(G.Sn(), "learned", "diagonal"),
    }


@pytest.mark.parametrize("case", list(_backend_cases()))
def test_fast_backend_equals_reference(case):
    torch.manual_seed(0)
    fast = _backend_cases()[case]()
    reference = copy.deepcopy(fast)
    reference.backend = "reference"
    inputs = make_inputs(dtype=torch.float32, sizes=(5, 6, 4))
    inputs["points"].requires_grad_(True)
    noise = fast.draw_noise(inputs)
    grads = {}
    outputs = {}
    for name, model in (("fast", fast), ("reference", reference)):
        out, aux = model(inputs, noise=noise)
        upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        loss = (out * upstream).sum() + sum(aux.values(), torch.zeros(()))
        params = [p for p in model.parameters()]
        grads[name] = torch.autograd.grad(loss, params + [inputs["points"]], allow_unused=True)
        outputs[name] = (out.detach(), {k: v.detach() for k, v in aux.items()})
    assert_close(outputs["fast"][0], outputs["reference"][0], atol=1e-5, rtol=1e-5, name="output")
    for key in outputs["fast"][1]:
        assert_close(outputs["fast"][1][key], outputs["reference"][1][key], atol=1e-5, rtol=1e-5, name=key)
    names = [n for n, _ in fast.named_parameters()] + ["inputs.points"]
    reached = 0
    for name, a, b in zip(names, grads["fast"], grads["reference"]):
        if a is None or b is None:
            assert a is None and b is None, f"{name}: gradient on one backend only"
            continue
        reached += int(float(a.abs().max()) > 0)
        assert_close(a, b, atol=1e-4, rtol=1e-3, name=f"grad {name}")
    assert reached > 0.8 * len(names), "most parameters must get a gradient"


def test_backend_argument_forces_the_reference_ops(monkeypatch):
    model = make_model(G.Sn(), "learned", "node")
    model.backend = "reference"
    seen = []
    original = lps_fast._backend.resolve

    def spy(op, device):
        provider = original(op, device)
        seen.append(provider.name)
        return provider

    monkeypatch.setattr(lps_fast._backend, "resolve", spy)
    model(make_inputs(dtype=torch.float32))
    assert seen and set(seen) == {"reference"}
    assert lps_fast._backend.state.forced is None, "the setting is restored after the call"
    with pytest.raises(ValueError, match="backend must be"):
        lps_fast.Symmetrize(mlp_backbone("node"), G.Sn(), None, output="node", backend="gpu")


@pytest.mark.parametrize("group_name", ["Sn", "SnxO3", "SO3"])
def test_task_gradient_reaches_the_learned_distribution(group_name):
    """Through the straight-through soft permutation (S_n) and the differentiable frame (O(3))."""
    group = ALL_GROUPS[group_name]
    output = "node" if group_name == "Sn" else "vector"
    model = make_model(group, "learned", output, entropy_weight=0.0).double()
    inputs = make_inputs()
    out, aux = model(inputs)
    assert aux == {}
    out.pow(2).sum().backward()
    network = model.distribution.gin if group.rotation is None else model.distribution.vector_net
    reached = [float(p.grad.abs().max()) > 0 for p in network.parameters() if p.grad is not None]
    assert reached and sum(reached) >= 0.8 * len(list(network.parameters()))
    if group.permutation:
        # Without the soft matrix nothing would reach the scores: the straight-through path is what carries it.
        model.zero_grad()
        sample, _ = model.sample(inputs)
        assert sample.soft is not None and sample.soft.requires_grad
        views = group.transform_inputs(GroupSample(k=sample.k, perm=sample.perm, rotation=sample.rotation,
                                                   center=sample.center), model._inputs(inputs))
        assert all(not v.requires_grad for k, v in views.items() if k in ("nodes", "edges"))


def test_entropy_loss_is_weighted_and_trains_towards_hard_permutations():
    model = make_model(G.Sn(), "learned", "node", entropy_weight=0.5)
    inputs = make_inputs(dtype=torch.float32)
    noise = model.draw_noise(inputs)
    _, aux = model(inputs, noise=noise)
    sample, _ = model.sample(inputs, noise=noise)
    expected = 0.5 * lps_fast.permutation_entropy(sample.soft, inputs["mask"])
    assert_close(aux["entropy"], expected, atol=1e-6, rtol=1e-6)
    optimizer = torch.optim.Adam(model.distribution.parameters(), lr=1e-2)
    start = float(aux["entropy"].detach())
    for _ in range(30):
        optimizer.zero_grad()
        _, aux = model(inputs, noise=noise)
        aux["entropy"].backward()
        optimizer.step()
    assert float(aux["entropy"].detach()) < 0.7 * start


def test_samples_are_permutations_and_frames():
    model = make_model(G.Sn() * G.SO3(), "learned", "position")
    inputs = make_inputs(dtype=torch.float32)
    sample, _ = model.sample(inputs)
    batch, k, n = sample.perm.shape
    assert (batch, k, n) == (3, 3, N_MAX)
    assert torch.equal(torch.sort(sample.perm, -1).values, torch.arange(n).expand(batch, k, n))
    soft = sample.soft.detach()
    real = inputs["mask"][:, None, :].expand(batch, k, n)
    assert_close(soft.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-3, rtol=0)
    eye = torch.eye(3).expand(batch, k, 3, 3)
    R = sample.rotation.detach()
    assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-5, rtol=0)
    assert_close(torch.linalg.det(R), torch.ones(batch, k), atol=1e-5, rtol=0)


def test_sample_counts_and_noise_checks():
    model = make_model(G.Sn(), "learned", "node", n_samples=5)
    model.eval_n_samples = 7
    inputs = make_inputs(dtype=torch.float32)
    assert model.training, "modules start in training mode"
    assert model.draw_noise(inputs)["nodes"].shape[1] == 5
    model.eval()
    assert model.draw_noise(inputs)["nodes"].shape[1] == 7
    assert model.draw_noise(inputs, n_samples=2)["nodes"].shape[1] == 2
    noise = model.draw_noise(inputs, n_samples=2)
    out, _ = model(inputs, noise=noise)
    assert out.shape == (3, N_MAX, 3)
    with pytest.raises(ValueError, match="noise\\['nodes'\\] must have shape"):
        model(inputs, noise={**noise, "nodes": noise["nodes"][..., :1]})
    with pytest.raises(ValueError, match="needs noise\\['tie_break'\\]"):
        model(inputs, noise={"nodes": noise["nodes"]})
    frame = lps_fast.Symmetrize(mlp_backbone("vector"), G.O3(), D.Frame(), n_samples=3, output="vector")
    assert frame.num_samples() == 8 and frame.draw_noise(inputs) == {}
    canonical = make_model(G.SO3(), "canonical", "vector", n_samples=5)
    assert canonical.num_samples() == 1 and canonical.draw_noise(inputs) == {}
    with pytest.raises(TypeError, match="Canonical takes no"):
        D.Canonical(noise_scale=1.0)
    with pytest.raises(ValueError, match="Learned was built with node_dim=2"):
        model({"edges": inputs["edges"], "points": inputs["points"], "mask": inputs["mask"]})


def test_state_dict_round_trip_and_dtype_moves(tmp_path):
    model = lps_fast.Symmetrize(
        BB.Transformer(N_MAX, node_dim=NODE_DIM, edge_dim=EDGE_DIM, point_channels=CHANNELS, d_model=16, heads=2,
                       layers=1, output="vector"),
        "SnxE3", make_distribution("learned"), n_samples=3, output="position")
    inputs = make_inputs(dtype=torch.float32)
    noise = model.draw_noise(inputs)
    expected, _ = model(inputs, noise=noise)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # a differently initialised twin
    twin = lps_fast.Symmetrize(
        BB.Transformer(N_MAX, node_dim=NODE_DIM, edge_dim=EDGE_DIM, point_channels=CHANNELS, d_model=16, heads=2,
                       layers=1, output="vector"),
        "SnxE3", make_distribution("learned"), n_samples=3, output="position")
    assert float((twin(inputs, noise=noise)[0] - expected).detach().abs().max()) > 1e-4
    twin.load_state_dict(torch.load(path))
    assert torch.equal(twin(inputs, noise=noise)[0], expected)
    double = twin.to(torch.float64)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    out64, aux64 = double(inputs64, noise={k: v.double() for k, v in noise.items()})
    assert out64.dtype == torch.float64 and aux64["entropy"].dtype == torch.float64
    assert_close(out64.float(), expected, atol=1e-4, rtol=1e-4)
    # Integer adjacency is accepted and converted to the model's dtype.
    as_int = dict(inputs64, edges=inputs64["edges"].long())
    assert double(as_int, noise={k: v.double() for k, v in noise.items()})[0].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_runs_on_gpu():
    model = make_model(G.Sn() * G.E3(), "learned", "position").cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(dtype=torch.float32).items()}
    out, aux = model(inputs)
    (out.sum() + aux["entropy"]).backward()
    assert out.device.type == "cuda"
    assert_equivariant(model, inputs)


# ---------------------------------------------------------------------------------------------
# Learning smoke tests

@pytest.fixture
def single_thread():
    """The smoke tests' tensors are too small to gain from threads (on a loaded machine threads
    only wait for each other), and one thread makes their training independent of the core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


EXP_PATH = Path(os.environ.get("LPS_FAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "exp.npz"


def _exp_pairs(n_pairs, max_nodes):
    """The first ``n_pairs`` EXP pairs whose graphs have at most ``max_nodes`` nodes, as dense padded tensors."""
    if not EXP_PATH.exists():
        pytest.skip(f"EXP data not found at {EXP_PATH}")
    data = np.load(EXP_PATH)
    sizes, edge_counts = data["num_nodes"], data["num_edges"]
    node_offsets = np.concatenate([[0], np.cumsum(sizes)])
    edge_offsets = np.concatenate([[0], np.cumsum(edge_counts)])
    pairs = [p for p in range(len(sizes) // 2) if sizes[2 * p] <= max_nodes][:n_pairs]
    graphs = [2 * p + member for p in pairs for member in (0, 1)]
    nodes = torch.zeros(len(graphs), max_nodes, 2)
    adjacency = torch.zeros(len(graphs), max_nodes, max_nodes)
    mask = torch.zeros(len(graphs), max_nodes, dtype=torch.bool)
    for row, g in enumerate(graphs):
        n = int(sizes[g])
        src, dst = (torch.from_numpy(data["edge_index"][:, edge_offsets[g]:edge_offsets[g + 1]].astype(np.int64)))
        adjacency[row, src, dst] = 1.0
        labels = torch.from_numpy(data["x"][node_offsets[g]:node_offsets[g + 1]].astype(np.int64))
        nodes[row, torch.arange(n), labels] = 1.0  # one-hot of the node feature in {0, 1}
        mask[row, :n] = True
    targets = torch.from_numpy(data["y"][graphs].astype(np.float32))
    return {"nodes": nodes, "edges": adjacency, "mask": mask}, targets


def _pairs_separated(logits, targets):
    correct = (logits > 0).float() == targets
    return int(correct.view(-1, 2).all(dim=1).sum())


@pytest.mark.slow
def test_symmetrized_mlp_separates_exp_pairs_that_gin_cannot(single_thread):
    """EXP pairs are 1-WL-equivalent, one satisfiable and one not. A GIN gives both graphs of a
    pair the same output, so it separates none; an MLP on the adjacency, symmetrized with the
    learned S_n distribution, learns to classify both graphs of the training pairs, and gives
    relabelled copies (fresh noise) the same answers."""
    torch.manual_seed(0)
    inputs, targets = _exp_pairs(n_pairs=8, max_nodes=36)
    n_pairs = len(targets) // 2

    def loss_of(model):
        logits, aux = model(inputs)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets) + sum(aux.values())

    gin = lps_fast.Symmetrize(BB.GIN(36, node_dim=2, edge_dim=1, hidden=32, layers=3), G.Sn(), None)
    optimizer = torch.optim.Adam(gin.parameters(), lr=2e-3)
    for _ in range(50):
        optimizer.zero_grad()
        loss_of(gin).backward()
        optimizer.step()
    with torch.no_grad():
        gin_logits = gin.eval()(inputs)[0][:, 0]
    assert float((gin_logits[0::2] - gin_logits[1::2]).abs().max()) < 1e-4
    assert _pairs_separated(gin_logits, targets) == 0

    # One concatenated noise feature per node and no entropy term: at this small budget both make
    # the early phase of training faster (the paper adds noise and trains for 2000 epochs with
    # entropy weight 0.1).
    mlp = lps_fast.Symmetrize(
        BB.MLP(36, node_dim=2, edge_dim=1, hidden=(512, 256)), G.Sn(),
        D.Learned(node_dim=2, edge_dim=1, hidden=32, noise="concat", noise_dim=1, degree=False, entropy_weight=0.0),
        n_samples=16, eval_n_samples=32)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    relabelled = G.Sn().act_inputs(G.Sn().random_element(inputs, generator=torch.Generator().manual_seed(1)), inputs)
    # Training stops once the pairs are separated (on seeds 0-7 between steps 75 and 250).
    history, separated = [], 0
    for step in range(1, 501):
        mlp.train()
        optimizer.zero_grad()
        loss_of(mlp).backward()
        optimizer.step()
        warmup.step()
        if step % 25 == 0 and step >= 75:
            mlp.eval()
            with torch.no_grad():
                history.append((step, _pairs_separated(mlp(inputs)[0][:, 0], targets),
                                _pairs_separated(mlp(relabelled)[0][:, 0], targets)))
            separated = min(history[-1][1:])
            if separated >= n_pairs - 2:
                break
    print(f"EXP training pairs separated (step, graphs, relabelled graphs) of {n_pairs}: {history[-3:]}; GIN: 0")
    assert separated >= n_pairs - 2, f"the symmetrized MLP separated {separated} of {n_pairs} pairs: {history}"


def _e3_task(batch, generator=None):
    """Positions of 5 particles (randomly placed and oriented) -> an E(3)-equivariant displacement."""
    x = torch.randn(batch, 5, 3, generator=generator) + 2.0 * torch.randn(batch, 1, 3, generator=generator)
    diff = x[:, None, :, :] - x[:, :, None, :]  # x_j - x_i
    pull = (torch.exp(-diff.pow(2).sum(-1, keepdim=True)) * diff).sum(2)
    center = x.mean(1, keepdim=True)
    push = (x - center) * (x - center).norm(dim=-1, keepdim=True)
    return {"points": x[..., None]}, x + 0.5 * pull + 0.3 * push


@pytest.mark.slow
def test_symmetrized_transformer_fits_e3_target_better_than_plain(single_thread):
    test_inputs, test_targets = _e3_task(256, torch.Generator().manual_seed(123))
    results = {}
    for name, group, distribution in (("plain", G.Sn() * G.E3(), None),
                                      ("learned", G.Sn() * G.E3(), D.Learned(point_channels=1, hidden=32))):
        torch.manual_seed(0)
        backbone = BB.Transformer(5, point_channels=1, d_model=32, heads=4, layers=2, output="vector")
        model = lps_fast.Symmetrize(backbone, group, distribution, n_samples=4, eval_n_samples=8, output="position")
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(0)
        for _ in range(150):
            model.train()
            inputs, targets = _e3_task(32, data)
            out, aux = model(inputs)
            loss = (out[..., 0] - targets).pow(2).mean() + sum(aux.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            results[name] = float((model(test_inputs)[0][..., 0] - test_targets).pow(2).mean())
    print(f"E(3) target, test MSE after 150 steps: plain {results['plain']:.4f}, symmetrized {results['learned']:.4f}")
    assert results["learned"] < 0.3 * results["plain"]
