"""Backbones: shapes, padding, the ViT's image and checkpoint loading, and the plain GIN's limits."""

from __future__ import annotations

import pytest
import torch

import lps_fast
from lps_fast import backbones as BB
from lps_fast import distributions as D
from lps_fast import groups as G
from lps_fast.testing import assert_equivariant

from helpers import assert_close


def _graphs(sizes, n, node_dim=2, edge_dim=1, channels=2, dtype=torch.float64, seed=0):
    """Padded random graphs as the views a backbone receives (real nodes first)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    mask = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    pairs = mask[:, :, None] & mask[:, None, :]
    edges = (torch.rand(batch, n, n, edge_dim, generator=gen) < 0.4).to(dtype)
    edges = (edges + edges.transpose(1, 2)).clamp_max(1) * pairs[..., None]
    nodes = torch.randn(batch, n, node_dim, generator=gen, dtype=dtype) * mask[..., None]
    points = torch.randn(batch, n, 3, channels, generator=gen, dtype=dtype) * mask[..., None, None]
    return {"nodes": nodes, "edges": edges, "points": points, "mask": mask}


def _single(views, b, size):
    return {key: (value[b:b + 1, :size, :size] if key == "edges" else value[b:b + 1, :size])
            for key, value in views.items()}


def _tiny_vit(**kwargs):
    pytest.importorskip("timm")
    defaults = dict(max_nodes=7, node_dim=2, edge_dim=1, out_dim=3, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    defaults.update(kwargs)
    return BB.ViT(**defaults)


def _backbones():
    return {
        "mlp-invariant": lambda: BB.MLP(7, node_dim=2, edge_dim=1, point_channels=2, hidden=(32,), out_dim=3),
        "mlp-node": lambda: BB.MLP(7, node_dim=2, edge_dim=1, hidden=(32,), out_dim=3, output="node"),
        "mlp-edge": lambda: BB.MLP(7, node_dim=2, edge_dim=1, hidden=(32,), out_dim=3, output="edge"),
        "mlp-vector": lambda: BB.MLP(7, point_channels=2, hidden=(32,), out_dim=3, output="vector"),
        "ginid-invariant": lambda: BB.GINID(7, node_dim=2, edge_dim=1, hidden=16, layers=2, out_dim=3),
        "ginid-node": lambda: BB.GINID(7, node_dim=2, edge_dim=1, hidden=16, layers=2, out_dim=3, output="node"),
        "transformer-node": lambda: BB.Transformer(7, node_dim=2, edge_dim=1, point_channels=2, d_model=16, heads=2,
                                                   layers=2, out_dim=3),
        "transformer-vector": lambda: BB.Transformer(7, point_channels=2, d_model=16, heads=2, layers=1, out_dim=3,
                                                     output="vector"),
        "transformer-invariant": lambda: BB.Transformer(7, node_dim=2, d_model=16, heads=2, layers=1, out_dim=3,
                                                        output="invariant"),
        "vit-edge": lambda: _tiny_vit(),
        "vit-invariant": lambda: _tiny_vit(output="invariant"),
    }


EXPECTED_SHAPES = {"invariant": lambda n: (3,), "node": lambda n: (n, 3), "edge": lambda n: (n, n, 3),
                   "vector": lambda n: (n, 3, 3)}


@pytest.mark.parametrize("name", list(_backbones()))
def test_backbone_shapes_and_padding(name):
    """Same output for a graph alone and padded inside a batch; nothing written on padding."""
    torch.manual_seed(0)
    model = _backbones()[name]().double().eval()
    output = name.split("-")[1]
    sizes = [5, 7, 3]
    views = _graphs(sizes, n=7)
    with torch.no_grad():
        batched = model(views)
        assert batched.shape == (3, *EXPECTED_SHAPES[output](7))
        for b, size in enumerate(sizes):
            alone = model(_single(views, b, size))
            if output == "invariant":
                assert_close(alone[0], batched[b], atol=1e-10, rtol=1e-9, name=name)
            else:
                assert_close(alone[0], batched[b, :size, :size] if output == "edge" else batched[b, :size],
                             atol=1e-10, rtol=1e-9, name=name)
                if size < 7:
                    assert float(batched[b, size:].abs().max()) == 0.0
    assert torch.isfinite(batched).all()


def test_backbones_are_not_equivariant_on_their_own():
    """The backbones see node order (positions, identifiers, pixels): symmetrization is needed."""
    views = _graphs([6, 6], n=6)
    model = BB.MLP(6, node_dim=2, edge_dim=1, hidden=(16,), out_dim=2, output="node").double()
    inputs = {key: views[key] for key in ("nodes", "edges")}
    for backbone in (model, BB.GINID(6, node_dim=2, edge_dim=1, hidden=16, layers=2, out_dim=2, output="node").double(),
                     BB.Transformer(6, node_dim=2, edge_dim=1, d_model=16, heads=2, layers=1, out_dim=2).double()):
        wrapper = _ViewsModel(backbone)
        with pytest.raises(AssertionError, match="not equivariant"):
            assert_equivariant(wrapper, inputs, G.Sn(), output="node")


class _ViewsModel(torch.nn.Module):
    """Call a backbone on raw inputs (mask added), for checking it without symmetrization."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, inputs):
        views = dict(inputs)
        first = next(iter(views.values()))
        views.setdefault("mask", torch.ones(first.shape[:2], dtype=torch.bool))
        return self.backbone(views)


def test_plain_gin_is_permutation_equivariant_and_bounded_by_1wl():
    torch.manual_seed(0)
    gin = BB.GIN(8, node_dim=0, edge_dim=1, hidden=16, layers=3, out_dim=4).double()
    # Two 1-WL-equivalent graphs: a 6-cycle and two triangles (every node has degree 2).
    cycle = torch.zeros(1, 6, 6, dtype=torch.float64)
    triangles = torch.zeros(1, 6, 6, dtype=torch.float64)
    for i in range(6):
        cycle[0, i, (i + 1) % 6] = cycle[0, (i + 1) % 6, i] = 1
    for a, b in [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)]:
        triangles[0, a, b] = triangles[0, b, a] = 1
    with torch.no_grad():
        out_cycle = _ViewsModel(gin)({"edges": cycle})
        out_triangles = _ViewsModel(gin)({"edges": triangles})
    assert_close(out_cycle, out_triangles, atol=1e-10, rtol=1e-10, name="1-WL-equivalent graphs")
    assert_equivariant(_ViewsModel(gin), {"edges": cycle}, G.Sn(), output="invariant")
    # With identifiers the two graphs differ.
    ginid = BB.GINID(8, node_dim=0, edge_dim=1, hidden=16, layers=3, out_dim=4).double()
    with torch.no_grad():
        assert float((_ViewsModel(ginid)({"edges": cycle}) - _ViewsModel(ginid)({"edges": triangles})).abs().max()) > 1e-4


def test_mlp_rejects_graphs_larger_than_max_nodes():
    model = BB.MLP(4, edge_dim=1, hidden=(8,))
    with pytest.raises(ValueError, match="max_nodes=4"):
        model(_graphs([5], n=5, dtype=torch.float32))
    with pytest.raises(ValueError, match="output must be one of"):
        BB.MLP(4, edge_dim=1, output="pairs")


# ---------------------------------------------------------------------------------------------
# ViT


def test_vit_image_layout():
    model = _tiny_vit()
    assert (model.img_size, model.patch, model.in_chans) == (8, 4, 4)
    views = _graphs([3], n=3)
    image = model.image({k: v.float() if v.is_floating_point() else v for k, v in views.items()})
    assert image.shape == (1, 4, 8, 8)
    assert torch.equal(image[0, 0, :3, :3], views["edges"][0, ..., 0].float())
    assert torch.equal(torch.diagonal(image[0, 1:3, :3, :3], dim1=1, dim2=2), views["nodes"][0].T.float())
    assert torch.equal(image[0, 3, :3, :3], torch.ones(3, 3)) and float(image[0, :, 3:].abs().sum()) == 0.0
    assert float(image[0, 1:3].sum()) == float(views["nodes"][0].sum().float())


def test_vit_loads_local_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                               depth=2, embed_dim=32, num_heads=2)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    model = _tiny_vit(checkpoint=str(path), max_nodes=10)  # 3-channel weights into a 4-channel, 12x12 ViT
    assert torch.equal(model.vit.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    assert model.vit.patch_embed.proj.weight.shape == (32, 4, 4, 4)
    assert model.vit.pos_embed.shape == (1, 1 + 9, 32)  # resized from the 4 x 4 grid to 3 x 3
    fresh = _tiny_vit(max_nodes=10)
    assert not torch.equal(fresh.vit.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_projection_is_the_convolution_forward_and_backward(channels_last, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=(2, 3), stride=(2, 3), bias=bias).double()
    projection = BB.PatchProjection.replacing(conv)
    assert isinstance(projection, BB.PatchProjection) and projection.weight is conv.weight
    assert projection.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 4, 9, 3, dtype=torch.float64)  # [N, H, W, C]: the ViT's channels-last image
    x = x.permute(0, 3, 1, 2) if channels_last else x.permute(0, 3, 1, 2).contiguous()
    x = x.requires_grad_(True)
    out = projection(x)
    assert_close(out, conv(x), atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(out)
    params = [projection.weight] + ([projection.bias] if bias else [])
    ours = torch.autograd.grad(out, [x] + params, grad)
    theirs = torch.autograd.grad(conv(x), [x] + params, grad)
    for a, b in zip(ours, theirs):
        assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *p: BB._PatchProjectionFunction.apply(x, *p, *([] if bias else [None])),
                                    (x, *params))
    # the weight alone (an input that needs no gradient)
    (weight_grad,) = torch.autograd.grad(projection(x.detach()), [projection.weight], grad)
    assert_close(weight_grad, theirs[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("node_dim, edge_dim", [(2, 1), (0, 2), (3, 0)])
def test_vit_image_is_its_definition_forward_and_backward(node_dim, edge_dim):
    """Edge channels, node features on the diagonal, a real-pair channel, zero padding to the
    image size: against a concatenation and a pad with autograd's own gradients."""
    vit = _tiny_vit(node_dim=node_dim, edge_dim=edge_dim, max_nodes=10).double()
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    inputs = {"mask": mask}
    gen = torch.Generator().manual_seed(4)
    if node_dim:
        inputs["nodes"] = torch.randn(2, 6, node_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    if edge_dim:
        inputs["edges"] = torch.randn(2, 6, 6, edge_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [value for key, value in inputs.items() if key != "mask"]
    image = vit.image(inputs)
    assert image.shape == (2, node_dim + edge_dim + 1, 12, 12)
    pairs = (mask[:, :, None] & mask[:, None, :]).double()
    channels = []
    if edge_dim:
        channels.append(inputs["edges"] * pairs[..., None])
    if node_dim:
        channels.append(torch.diag_embed((inputs["nodes"] * mask[..., None]).transpose(1, 2)).permute(0, 2, 3, 1))
    channels.append(pairs[..., None])
    expected = torch.nn.functional.pad(torch.cat(channels, dim=-1), (0, 0, 0, 6, 0, 6)).permute(0, 3, 1, 2)
    assert torch.equal(image, expected)
    upstream = torch.randn(image.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(image, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("node_dim, edge_dim", [(2, 1), (0, 2), (3, 0)])
def test_vit_image_gradient_from_the_graph_pixels_is_the_dense_gradient(node_dim, edge_dim):
    """ViT tells its patch projection which image pixels depend on the inputs (the edge channels
    over the graph, the node channels' diagonal); the gradients must equal those of the plain
    convolution's dense image gradient."""
    import copy
    torch.manual_seed(0)
    vit = _tiny_vit(node_dim=node_dim, edge_dim=edge_dim, max_nodes=10).double()
    dense = copy.deepcopy(vit)
    proj = dense.vit.patch_embed.proj
    conv = torch.nn.Conv2d(proj.in_channels, proj.out_channels, proj.kernel_size, stride=proj.stride).double()
    conv.load_state_dict(proj.state_dict())
    dense.vit.patch_embed.proj = conv
    views = _graphs([6, 3], n=6, node_dim=max(node_dim, 1), edge_dim=max(edge_dim, 1))  # 6 nodes: 2 x 2 patches of 4
    inputs = {"mask": views["mask"]}
    if node_dim:
        inputs["nodes"] = torch.randn(2, 6, node_dim, dtype=torch.float64, requires_grad=True)
    if edge_dim:
        inputs["edges"] = torch.randn(2, 6, 6, edge_dim, dtype=torch.float64, requires_grad=True)
    leaves = [value for key, value in inputs.items() if key != "mask"]
    out, expected = vit(inputs), dense(inputs)
    assert_close(out, expected, atol=1e-12, rtol=1e-12)
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves + list(vit.parameters()), upstream)
    theirs = torch.autograd.grad(expected, leaves + list(dense.parameters()), upstream)
    for a, b in zip(ours, theirs):
        assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert float(ours[0].abs().max()) > 0
    assert vit.vit.patch_embed.proj.gradient_layout is None  # set for the call only


def test_patch_projection_keeps_the_convolution_where_the_patch_form_does_not_apply():
    overlapping = torch.nn.Conv2d(3, 5, kernel_size=3, stride=2)
    assert BB.PatchProjection.replacing(overlapping) is overlapping
    projection = BB.PatchProjection.replacing(torch.nn.Conv2d(3, 5, kernel_size=2, stride=2))
    x = torch.randn(1, 3, 5, 5)  # not whole patches: the convolution drops the last row and column
    out = projection(x)
    assert out.shape == (1, 5, 2, 2) and out.grad_fn.name() == "ConvolutionBackward0"
    assert _tiny_vit().vit.patch_embed.proj.__class__ is BB.PatchProjection


def test_symmetrized_vit_node_outputs_from_the_diagonal():
    torch.manual_seed(0)
    backbone = _tiny_vit(out_dim=2)
    model = lps_fast.Symmetrize(backbone, G.Sn(), D.Learned(node_dim=2, edge_dim=1, hidden=16, layers=2),
                                n_samples=3, output="diagonal")
    views = _graphs([7, 4], n=7, dtype=torch.float32)
    inputs = {key: views[key] for key in ("nodes", "edges", "mask")}
    out, aux = model(inputs)
    assert out.shape == (2, 7, 2) and float(out.detach()[1, 4:].abs().max()) == 0.0
    assert set(aux) == {"entropy"}
    report = assert_equivariant(model, inputs)
    assert report["output"] < 1e-9
