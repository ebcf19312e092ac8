"""ViT-PS: the graph image and its patch projections, local pretrained weights, exact
equivariance once symmetrized, patch dropout, and the PATTERN path through the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lps_fast
from lps_fast import backbones as BB
from lps_fast import distributions as D
from lps_fast import groups as G
from lps_fast.testing import assert_equivariant

timm = pytest.importorskip("timm")

TINY = dict(model_name="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)


def _views(sizes, n, node_dim=3, edge_dim=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    pairs = (mask[:, :, None] & mask[:, None, :])[..., None]
    edges = (torch.rand(len(sizes), n, n, edge_dim, generator=gen) < 0.4).to(dtype)
    edges = (edges + edges.transpose(1, 2)).clamp_max(1) * pairs
    nodes = torch.randn(len(sizes), n, node_dim, generator=gen, dtype=dtype) * mask[..., None]
    return {"nodes": nodes, "edges": edges, "mask": mask}


def _tiny(max_nodes=9, **kwargs):
    options = dict(TINY, node_dim=3, edge_dim=2, out_dim=2, grid_size=3)
    options.update(kwargs)
    return BB.ViTPS(max_nodes, **options)


@pytest.mark.parametrize("pad_mode,centering", [("zero", False), ("reflect", True), ("circular", True),
                                                ("replicate", False)])
def test_tokens_equal_the_conv_of_the_dense_image(pad_mode, centering):
    torch.manual_seed(0)
    model = _tiny(max_nodes=10, patch_size=4, pad_mode=pad_mode, centering=centering).double()
    assert (model.grid, model.patch, model.img_size) == (3, 4, 12)
    views = _views([7, 5], n=7)
    image = model.image(views)
    before = model.pad[0]
    assert image.shape == (2, 5, 12, 12) and model.pad == ((1, 1) if centering else (0, 2))
    inner = image[:, :, before:before + 7, before:before + 7]
    assert torch.equal(inner[:, :2].permute(0, 2, 3, 1), views["edges"])
    assert torch.equal(torch.diagonal(inner[:, 2:], dim1=2, dim2=3).transpose(1, 2), views["nodes"])
    assert int((inner[:, 2:] != 0).sum()) == int((views["nodes"] != 0).sum())  # nothing off the diagonal
    dense = F.conv2d(image, model.proj.weight, model.proj.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.tokens(views), dense, rtol=0, atol=1e-12)


def test_output_shapes_and_padding():
    views = _views([6, 4], n=6, dtype=torch.float32)
    for output, shape in (("node", (2, 6, 2)), ("edge", (2, 6, 6, 2)), ("invariant", (2, 2))):
        out = _tiny(output=output)(views).detach()
        assert out.shape == shape
        if output == "node":
            assert float(out[1, 4:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="max_nodes"):
        _tiny(max_nodes=4)(views)
    with pytest.raises(ValueError, match="smaller than max_nodes"):
        _tiny(max_nodes=10, patch_size=3)
    with pytest.raises(ValueError, match="pad_mode"):
        _tiny(pad_mode="mirror")
    with pytest.raises(ValueError, match="patch_dropout needs output='invariant'"):
        _tiny(output="node", patch_dropout=0.5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_local_pretrained_weights(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, embed_dim=32, depth=1,
                               num_heads=2)  # a 4 x 4 grid, with its 1000-class head
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(source.state_dict(), str(path))
    model = _tiny(checkpoint=str(path))  # a 3 x 3 grid
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "cls_token", "norm.weight"):
        assert torch.equal(model.vit.state_dict()[name], source.state_dict()[name]), name
    resampled = timm.layers.resample_abs_pos_embed(source.pos_embed, (3, 3), num_prefix_tokens=1)
    assert model.vit.pos_embed.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(model.vit.pos_embed, resampled)
    assert isinstance(model.vit.patch_embed, torch.nn.Identity)  # the RGB patch embedding is not used
    assert model.proj.in_channels == 5 and model.proj.kernel_size == (3, 3)
    fresh = _tiny()
    assert not torch.equal(fresh.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="checkpoint file"):
        _tiny(checkpoint=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("output,distribution", [("node", "learned"), ("invariant", "uniform"),
                                                 ("invariant", "learned"), ("edge", "uniform")])
def test_symmetrized_vit_ps_is_exactly_equivariant(output, distribution):
    torch.manual_seed(1)
    backbone = _tiny(output=output, pad_mode="reflect", centering=True,
                     patch_dropout=0.5 if output == "invariant" else 0.0)
    dist = (D.Learned(node_dim=3, edge_dim=2, hidden=16, layers=2) if distribution == "learned" else D.Uniform())
    model = lps_fast.Symmetrize(backbone, G.Sn(), dist, n_samples=2, output=output).eval()
    inputs = _views([9, 6], n=9, dtype=torch.float32)
    report = assert_equivariant(model, inputs)
    assert report["output"] < 1e-9


def test_patch_dropout_only_in_training():
    torch.manual_seed(0)
    views = _views([9], n=9, dtype=torch.float32)
    model = _tiny(output="invariant", patch_dropout=0.5, grid_size=4, drop_rate=0.0)
    kept = []
    model.vit.blocks.register_forward_hook(lambda module, args, out: kept.append(out.shape[1]))
    model.train()(views)
    model.eval()
    first, second = model(views), model(views)
    assert torch.equal(first, second)
    assert kept == [1 + 8, 1 + 16, 1 + 16]  # half of the 16 patch tokens in training, all in evaluation
    model = _tiny(output="invariant", patch_dropout=0.5, random_patch_dropout=True, grid_size=4).train()
    kept.clear()
    model.vit.blocks.register_forward_hook(lambda module, args, out: kept.append(out.shape[1]))
    for _ in range(6):
        model(views)
    assert all(9 <= count <= 17 for count in kept) and len(set(kept)) > 1


def test_pattern_trains_with_vit_ps(tmp_path):
    from lps_fast.train import TrainConfig, resolve, train

    config = TrainConfig(task="pattern", backbone="vit-ps", width=32, layers=1, heads=2, vit_grid=4, epochs=1,
                         n_train=6, n_val=2, n_test=2, batch_size=3, eval_samples=1, threads=1, quiet=True,
                         out=str(tmp_path / "run"))
    resolved = resolve(config)
    assert (resolved.pad_mode, resolved.patch_size) == (None, None)
    result = train(config)
    backbone = result.model.backbone
    assert isinstance(backbone, BB.ViTPS) and backbone.output == "node"
    # the adjacency and 3 node categories: the n x n x 4 image, n the largest PATTERN graph possible
    assert backbone.proj.in_channels == 1 + 3
    assert (backbone.grid, backbone.patch) == (4, -(-backbone.max_nodes // 4))
    assert 0.0 <= result.metrics["test"]["weighted_accuracy"] <= 1.0


def test_paper_preset_for_pattern():
    from lps_fast.train import TrainConfig, resolve

    resolved = resolve(TrainConfig(task="pattern", preset="paper"))
    assert (resolved.backbone, resolved.vit_model, resolved.width, resolved.layers, resolved.heads) == (
        "vit-ps", "vit_base_patch16_224", 768, 12, 12)
    assert (resolved.samples, resolved.eval_samples, resolved.lr, resolved.weight_decay, resolved.batch_size) == (
        1, 10, 1e-5, 0.01, 128)
    assert (resolved.epochs, resolved.warmup, resolved.vit_grid, resolved.n_train) == (320, 0.2, 14, 10000)
    with pytest.raises(ValueError, match="--patch-dropout applies to graph-level tasks"):
        resolve(TrainConfig(task="pattern", backbone="vit-ps", patch_dropout=0.5))
