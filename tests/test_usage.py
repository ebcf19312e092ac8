"""What a user meets wrapping a model of their own: torch.compile, autocast, dtypes, empty and
degenerate input, NaN, seeded evaluation and the data conversions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lps_fast
from lps_fast import distributions as D
from lps_fast import groups as G
from lps_fast import reference as ref
from lps_fast.testing import assert_equivariant

from helpers import assert_close

KINDS = ("invariant", "node", "edge", "diagonal", "vector", "position")
GROUPS = ("Sn", "O3", "SO3", "E3", "SE3", "SnxE3")


class AllKinds(nn.Module):
    """A tiny backbone returning one output of every kind (no symmetry of its own)."""

    def __init__(self, node_dim=2, edge_dim=1, channels=2, hidden=8):
        super().__init__()
        self.embed = nn.Linear(node_dim + edge_dim + 3 * channels, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, views):
        points = views["points"]
        h = torch.tanh(self.embed(torch.cat([views["nodes"], views["edges"].mean(2), points.flatten(2)], -1)))
        pair = h[:, :, None, :2] * h[:, None, :, :2]
        return {"invariant": self.head(h).sum(1), "node": self.head(h), "edge": pair, "diagonal": pair,
                "vector": points * h[:, :, None, :1], "position": points + h[:, :, None, 1:2]}


def inputs(batch=2, n=5, masked=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {"nodes": torch.randn(batch, n, 2, generator=gen),
           "edges": (torch.rand(batch, n, n, 1, generator=gen) < 0.5).float(),
           "points": torch.randn(batch, n, 3, 2, generator=gen)}
    if masked:
        out["mask"] = torch.arange(n)[None, :] < torch.tensor([n] + [n - 1] * (batch - 1))[:, None]
    return out


def model(group, kinds=KINDS, backend="fast", distribution=None, **kwargs):
    torch.manual_seed(0)
    distribution = distribution or D.Learned(node_dim=2, edge_dim=1, point_channels=2, hidden=8, layers=1)
    return lps_fast.Symmetrize(AllKinds(), G.parse(group), distribution, n_samples=2,
                               output={kind: kind for kind in kinds}, backend=backend, **kwargs)


def total(out, aux):
    return sum(value.float().sum() for value in out.values()) + sum(aux.values())


# ---------------------------------------------------------------------------------------------
# torch.compile


def _grads(m):
    return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


def _compile_matches_eager(m, x, backend, **compile_kwargs):
    noise = m.draw_noise(x)
    expected, expected_aux = m(x, noise=noise)
    total(expected, expected_aux).backward()
    eager_grads = _grads(m)
    m.zero_grad()
    compiled = torch.compile(m, backend=backend, **compile_kwargs)
    out, aux = compiled(x, noise=noise)
    total(out, aux).backward()
    for name in expected:
        assert_close(out[name], expected[name], atol=1e-5, rtol=1e-5, name=name)
    compiled_grads = _grads(m)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-4, name=f"d/d{name}")


@pytest.mark.parametrize("group", GROUPS)
def test_learned_model_compiles_fullgraph_for_every_output_kind(group):
    torch._dynamo.reset()
    _compile_matches_eager(model(group), inputs(), "aot_eager", fullgraph=True)


def test_compiled_frame_without_jitter_passes_inductor_stride_asserts():
    """Without frame jitter the frame vectors reach gram_schmidt as a transposed view; the fake
    kernel used to keep those strides, which inductor's generated code asserts against."""
    torch._dynamo.reset()
    distribution = D.Learned(point_channels=2, node_dim=2, edge_dim=1, hidden=8, layers=1, frame_jitter=0.0)
    m = model("SO3", kinds=("vector",), distribution=distribution)
    x = inputs()
    noise = m.draw_noise(x)
    # The forward graph alone (inductor compiles slowly on small CPUs), compiled afresh: a cached
    # graph would not notice a change of fake kernel.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        expected, _ = m(x, noise=noise)
        out, _ = torch.compile(m, backend="inductor", fullgraph=True)(x, noise=noise)
    assert_close(out["vector"], expected["vector"], atol=1e-5, rtol=1e-5)


def test_dynamic_compile_across_input_sizes_with_caller_noise():
    torch._dynamo.reset()
    m = model("Sn", kinds=("invariant", "node", "edge"))
    compiled = torch.compile(m, backend="aot_eager")
    for n in (5, 6, 8):
        x = inputs(n=n)
        noise = m.draw_noise(x)
        out, aux = compiled(x, noise=noise)
        expected, _ = m(x, noise=noise)
        total(out, aux).backward()
        for name in expected:
            assert_close(out[name], expected[name], atol=1e-5, rtol=1e-5, name=f"{name} n={n}")


def test_torch_func_grad_runs_the_reference_ops_and_matches_autograd():
    """torch.func refuses the compiled providers' torch.library autograd; by default the ops step
    over to the reference provider inside its transforms, whose gradients autograd's equal."""
    m = model("SnxE3", kinds=("node", "vector"))
    params = dict(m.named_parameters())
    x = inputs()
    noise = m.draw_noise(x, generator=torch.Generator().manual_seed(0))

    def loss(p):
        out, aux = torch.func.functional_call(m, p, (x,), {"noise": noise})
        return total(out, aux)

    grads = torch.func.grad(loss)(params)
    with lps_fast.use_backend("reference"):
        loss(params).backward()
    assert any(name.startswith("distribution.") for name in grads)
    for name, p in params.items():
        assert_close(grads[name], p.grad if p.grad is not None else torch.zeros_like(p), rtol=0, atol=0, name=name)
    # a provider forced by name is kept, and torch.func refuses it as before
    perm = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(6)]).view(2, 3, 5)
    soft = torch.rand(2, 3, 5, 5)
    f = lambda s: lps_fast.ops.permute_nodes(x["nodes"], perm, s).pow(2).sum()  # noqa: E731
    assert torch.func.grad(f)(soft).abs().sum() > 0
    if "cpp" in lps_fast.backend_info()["providers"]:
        with lps_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(f)(soft)


# ---------------------------------------------------------------------------------------------
# autocast


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("group", ["Sn", "SnxE3"])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_bfloat16_forward_and_backward(kind, group, backend):
    m = model(group, kinds=(kind,), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = m(inputs())
        loss = total(out, aux)
        loss.backward()  # inside the autocast region, as a training loop written that way does
    assert torch.isfinite(out[kind]).all()
    grads = _grads(m)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(name.startswith("distribution.") for name in grads), "no gradient reached the distribution"


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_autocast_bfloat16_with_the_vn_dgcnn_distribution(backend):
    """The n-body task's network: on the fast path its kernels compute in float32 inside autocast."""
    distribution = D.Learned(node_dim=2, edge_dim=1, point_channels=2, network="vn-dgcnn", hidden=24)
    m = model("SnxE3", kinds=("vector", "position"), backend=backend, distribution=distribution)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = m(inputs())
        total(out, aux).backward()
    assert all(torch.isfinite(value).all() for value in out.values())
    grads = _grads(m)
    assert any(name.startswith("distribution.") for name in grads), "no gradient reached the distribution"
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_autocast_frame_in_bfloat16_meets_float32_points():
    """Without jitter the frame comes out of the network in bfloat16 while the points are float32."""
    distribution = D.Learned(point_channels=2, node_dim=2, edge_dim=1, hidden=8, layers=1, frame_jitter=0.0)
    m = model("SO3", kinds=("vector", "position"), distribution=distribution)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = m(inputs())
    total(out, aux).backward()
    assert out["vector"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_inputs_are_cast_to_the_model_dtype(model_dtype, input_dtype):
    m = model("Sn", kinds=("node",)).to(model_dtype)
    x = {key: value.to(input_dtype) if value.is_floating_point() else value for key, value in inputs().items()}
    out, _ = m(x)
    assert out["node"].dtype == model_dtype
    same, _ = m({key: value.to(model_dtype) if value.is_floating_point() else value for key, value in x.items()},
                noise=m.draw_noise(x, generator=torch.Generator().manual_seed(1)))
    again, _ = m(x, noise=m.draw_noise(x, generator=torch.Generator().manual_seed(1)))
    assert_close(again["node"], same["node"], exact=True)


# ---------------------------------------------------------------------------------------------
# meta tensors, empty batches


def test_ops_on_meta_and_fake_tensors_never_read_values():
    from torch._subclasses.fake_tensor import FakeTensorMode

    previous = lps_fast._checks.config.perm_policy
    try:
        lps_fast.set_perm_check("always")
        perm = torch.empty(2, 3, 5, dtype=torch.long, device="meta")
        assert lps_fast.permute_nodes(torch.empty(2, 5, 4, device="meta"), perm).shape == (2, 3, 5, 4)
        assert ref.permute_nodes(torch.empty(2, 5, 4, device="meta"), perm).shape == (2, 3, 5, 4)
        assert lps_fast.sinkhorn_sort(torch.empty(2, 3, 5, device="meta"), 0.1)[1].shape == (2, 3, 5)
        with FakeTensorMode():
            x, perm = torch.randn(2, 5, 4), torch.randperm(5).expand(2, 3, 5).contiguous()
            for backend in ("fast", "reference"):
                with lps_fast.use_backend(None if backend == "fast" else "reference"):
                    assert lps_fast.permute_nodes(x, perm).shape == (2, 3, 5, 4)
    finally:
        lps_fast.set_perm_check(previous)


def _empty_cases(batch, n):
    perm = torch.empty(batch, 2, n, dtype=torch.long)
    return {
        "permute_nodes": ((torch.randn(batch, n, 3), perm), (batch, 2, n, 3)),
        "permute_edges": ((torch.randn(batch, n, n, 1), perm), (batch, 2, n, n, 1)),
        "unpermute_mean": ((torch.randn(batch, 2, n, 3), perm), (batch, n, 3)),
        "unpermute_edges_mean": ((torch.randn(batch, 2, n, n, 3), perm), (batch, n, n, 3)),
        "frame_apply": ((torch.randn(batch, n, 3, 2), torch.randn(batch, 2, 3, 3), perm), (batch, 2, n, 3, 2)),
        "frame_unapply_mean": ((torch.randn(batch, 2, n, 3, 2), torch.randn(batch, 2, 3, 3), perm), (batch, n, 3, 2)),
        "sinkhorn_sort": ((torch.randn(batch, 2, n), 0.1), (batch, 2, n)),
        "permutation_entropy": ((torch.rand(batch, 2, n, n),), ()),
        "gram_schmidt": ((torch.randn(batch, 3, 3),), (batch, 3, 3)),
    }


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("batch, n", [(0, 4), (2, 0)], ids=["empty-batch", "no-nodes"])
def test_ops_on_empty_inputs_return_empty_results(backend, batch, n):
    if backend != "reference" and not lps_fast._backend.providers.get(backend, None):
        pytest.skip(f"no {backend} provider")
    for name, (args, shape) in _empty_cases(batch, n).items():
        with lps_fast.use_backend(backend):
            out = getattr(lps_fast, name)(*args)
        out = out[1] if isinstance(out, tuple) else out
        assert tuple(out.shape) == shape, name
        if name == "permutation_entropy":
            assert float(out) == 0.0, f"{backend}: the entropy of no graphs is 0, got {float(out)}"


@pytest.mark.parametrize("group", ["Sn", "SO3", "SnxE3"])
@pytest.mark.parametrize("batch, n", [(0, 4), (2, 0)], ids=["empty-batch", "no-nodes"])
def test_symmetrize_with_uniform_on_empty_inputs(group, batch, n):
    m = model(group, kinds=("invariant", "node", "vector"), distribution=D.Uniform())
    x = {key: value[:batch, :n] for key, value in inputs(batch=max(batch, 2), n=4).items() if key != "edges"}
    x["edges"] = torch.zeros(batch, n, n, 1)
    out, _ = m(x)
    assert out["invariant"].shape == (batch, 2)
    assert out["node"].shape == (batch, n, 2)
    assert out["vector"].shape == (batch, n, 3, 2)


# ---------------------------------------------------------------------------------------------
# NaN, degenerate input


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_sinkhorn_sort_refuses_nan_scores_on_real_nodes(backend):
    scores = torch.randn(2, 3, 5)
    scores[1, 2, 3] = float("nan")
    with lps_fast.use_backend(backend), pytest.raises(ValueError, match=r"scores\[1, 2, 3\] = nan"):
        lps_fast.sinkhorn_sort(scores, 0.1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False  # a padded node's score is never read
    with lps_fast.use_backend(backend):
        soft, perm = lps_fast.sinkhorn_sort(scores, 0.1, mask=mask)
    assert torch.isfinite(soft).all()


def _degenerate_frames():
    zero = torch.zeros(3, 3)
    v = torch.tensor([1.0, 2.0, -0.5])
    rank_one = torch.stack([v, 2 * v, -v], dim=-1)  # every column on one line
    repeated = torch.stack([v, v, torch.tensor([0.0, 1.0, 1.0])], dim=-1)  # u1 = 0 exactly
    zero_first = torch.stack([torch.zeros(3), v, torch.tensor([0.0, 1.0, 1.0])], dim=-1)
    return torch.stack([zero, rank_one, repeated, zero_first]).double()


@pytest.mark.parametrize("proper", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_gram_schmidt_of_degenerate_input_is_finite_and_agrees(backend, proper):
    if backend != "reference" and not lps_fast._backend.providers.get(backend, None):
        pytest.skip(f"no {backend} provider")
    V = _degenerate_frames().requires_grad_()
    with lps_fast.use_backend(backend):
        R = lps_fast.gram_schmidt(V, proper)
    upstream = torch.randn_like(R)
    (grad,) = torch.autograd.grad(R, V, upstream)
    assert torch.isfinite(R).all() and torch.isfinite(grad).all()
    # the documented fallback: a column with nothing left after projection is zero
    assert torch.equal(R[0], torch.zeros(3, 3, dtype=R.dtype))
    assert torch.equal(R[2][:, 1], torch.zeros(3, dtype=R.dtype))
    V_ref = V.detach().clone().requires_grad_()
    expected = ref.gram_schmidt(V_ref, proper)
    (expected_grad,) = torch.autograd.grad(expected, V_ref, upstream)
    assert_close(R, expected, name="R")
    assert_close(grad, expected_grad, name="dR/dV")


def test_invariant_output_with_a_node_dim_is_refused():
    class PerNode(nn.Module):
        def forward(self, views):
            return views["nodes"]  # (B*k, n, F): forgot to pool

    m = lps_fast.Symmetrize(PerNode(), G.Sn(), D.Uniform(), n_samples=2, output="invariant")
    with pytest.raises(ValueError, match=r"per-node output.*'invariant'"):
        m(inputs())
    node_model = lps_fast.Symmetrize(PerNode(), G.Sn(), D.Uniform(), n_samples=2, output="edge")
    with pytest.raises(ValueError, match=r"kind 'edge' must have shape \(B\*k, n, n, \*F\)"):
        node_model(inputs())


def test_assert_equivariant_reports_nan_as_a_failure():
    class Poisoned(nn.Module):
        def forward(self, views):
            return views["nodes"].sum(1) * float("nan")

    m = lps_fast.Symmetrize(Poisoned(), G.Sn(), D.Uniform(), n_samples=2)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_equivariant(m, inputs())


def test_check_finite_names_the_offending_tensor():
    m = model("Sn", kinds=("node",), check_finite=True)
    x = inputs()
    m(x)  # clean input passes
    x["points"][1, 2, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"inputs\['points'\] holds 1 NaN or Inf"):
        m(x)
    noise = m.draw_noise(inputs())
    noise["nodes"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"noise\['nodes'\]"):
        m(inputs(), noise=noise)

    class Blows(AllKinds):
        def forward(self, views):
            out = super().forward(views)
            out["node"] = out["node"] / 0.0
            return out

    blown = lps_fast.Symmetrize(Blows(), G.Sn(), D.Uniform(), n_samples=2, output={"node": "node"}, check_finite=True)
    with pytest.raises(ValueError, match="backbone node"):
        blown(inputs())


# ---------------------------------------------------------------------------------------------
# seeded evaluation


@pytest.mark.parametrize("group", ["Sn", "SnxE3"])
def test_seeded_forward_repeats_exactly(group):
    m = model(group).eval()
    x = inputs()
    first, _ = m(x, generator=torch.Generator().manual_seed(7))
    torch.rand(10)  # the global generator moves; the seeded one does not care
    second, _ = m(x, generator=torch.Generator().manual_seed(7))
    other, _ = m(x, generator=torch.Generator().manual_seed(8))
    for kind in KINDS:
        assert torch.equal(first[kind], second[kind]), kind
    assert not torch.equal(first["invariant"], other["invariant"])


# ---------------------------------------------------------------------------------------------
# data conversions


def test_dense_batch_to_inputs_matches_the_training_recipes():
    from lps_fast.data import GraphSample, collate_dense
    from lps_fast.data.dataset import TaskInfo
    from lps_fast.train.recipes import make_inputs

    samples = []
    for n in (3, 5):
        adjacency = torch.rand(n, n) < 0.5
        adjacency = (adjacency | adjacency.t()) & ~torch.eye(n, dtype=torch.bool)
        samples.append(GraphSample(adjacency=adjacency, node_features=torch.randint(0, 4, (n,)),
                                   target=torch.tensor(1), edge_features=adjacency[..., None].float() * 2))
    batch = collate_dense(samples)
    info = TaskInfo(name="toy", kind="graph_classification", metric="accuracy", num_classes=2, num_node_categories=4)
    expected = make_inputs(batch, info)
    got = batch.to_inputs(num_node_categories=4)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    out, _ = lps_fast.Symmetrize(AllKinds(node_dim=4, edge_dim=2, channels=0), G.Sn(), D.Uniform(), n_samples=2,
                                 output={"node": "node"})({**got, "points": torch.zeros(2, 5, 3, 0)})
    assert out["node"].shape == (2, 5, 2)


def test_pyg_batch_to_inputs():
    pytest.importorskip("torch_geometric")
    from lps_fast.data import GraphSample
    from lps_fast.data.pyg import inputs_from_pyg, to_pyg_batch

    adjacency = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    sample = GraphSample(adjacency=adjacency, node_features=torch.tensor([0, 1, 2]))
    x = inputs_from_pyg(to_pyg_batch([sample, sample]), num_node_categories=3)
    assert x["nodes"].shape == (2, 3, 3) and x["edges"].shape == (2, 3, 3, 1) and bool(x["mask"].all())
    assert math.isclose(float(x["edges"].sum()), 8.0)
