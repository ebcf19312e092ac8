"""The fused vector-neuron layer (``lps_fast::vn_layer``, compiled CPU kernel) against the
composed PyTorch formulation of the same layers, which is what runs under the reference backend
and on devices without the kernel."""

import copy

import pytest
import torch

import lps_fast
from lps_fast.nn import (VNDGCNN, MaskedBatchNorm, VNLinearLeakyReLU, fused_vn_available, knn_neighbours, vn_layer,
                         vn_score_head_composed)

pytestmark = pytest.mark.skipif(
    not fused_vn_available(torch.zeros(1)), reason="the compiled CPU extension is not loaded"
)


def _padded_points(dtype, masked, batch=6, n=7, channels=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, channels, generator=gen, dtype=dtype)
    if not masked:
        return x, None
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, 5:] = False
    mask[3, 2:] = False
    mask[4, 1:] = False  # a graph of one node
    return x * mask[..., None, None], mask


def _randomise_running_stats(net):
    gen = torch.Generator().manual_seed(3)
    for module in net.modules():
        if isinstance(module, MaskedBatchNorm):
            module.running_mean.uniform_(0.0, 1.0, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)


def _forward_backward(net, x, mask, backend):
    """Outputs, parameter gradients and buffers of ``net`` after one forward + backward."""
    gen = torch.Generator().manual_seed(1)
    with lps_fast.use_backend(backend):
        frame, scores = net(x, mask)
        loss = (frame * torch.randn(frame.shape, generator=gen, dtype=frame.dtype)).sum()
        if scores is not None:
            loss = loss + (scores * torch.randn(scores.shape, generator=gen, dtype=scores.dtype)).sum()
        loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return frame, scores, grads, buffers


def _run(net, x, mask, backend):
    """Outputs, input gradient, parameter gradients and buffers after one forward + backward."""
    x = x.clone().requires_grad_(True)
    frame, scores, grads, buffers = _forward_backward(copy.deepcopy(net), x, mask, backend)
    return frame, scores, x.grad, grads, buffers


def _assert_agree(fused, reference, dtype, what, relative=1e-4):
    """float64: elementwise; float32: relative to the tensor's scale (a gradient summed over many
    entries rounds differently in a different summation order)."""
    if dtype == torch.float64:
        torch.testing.assert_close(fused, reference, atol=1e-10, rtol=1e-9, msg=lambda m: f"{what}: {m}")
        return
    error = float((fused - reference).abs().max().detach())
    scale = float(reference.abs().max().detach())
    assert error <= relative * scale + 1e-6, f"{what}: max error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scores", [True, False])
def test_vn_dgcnn_fused_matches_the_composed_layers(dtype, training, masked, scores):
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=30, neighbours=4, dropout=0.0, scores=scores).to(dtype).train(training)
    if not training:
        _randomise_running_stats(net)
    x, mask = _padded_points(dtype, masked)
    reference = _run(net, x, mask, "reference")
    fused = _run(net, x, mask, None)
    _assert_agree(fused[0], reference[0], dtype, "frame")
    if scores:
        _assert_agree(fused[1], reference[1], dtype, "scores")
    _assert_agree(fused[2], reference[2], dtype, "d/dpoints")
    assert bool(torch.isfinite(fused[2]).all()), "padded (zero) vectors must not give NaN gradients"
    for name, grad in reference[3].items():
        if grad is None:  # the max-pool directions only select: no gradient on either path
            assert fused[3][name] is None, name
        else:
            _assert_agree(fused[3][name], grad, dtype, f"d/d{name}")
    for name, buffer in reference[4].items():
        _assert_agree(fused[4][name], buffer, dtype, f"buffer {name}")


def _run_on_data(net, x, mask, backend=None, whole_network=True, seed=5):
    """Like _run for an input that needs no gradient (the learned distribution's noisy points):
    the case the whole-network kernel serves; ``whole_network=False`` runs the network layer by
    layer instead. Dropout draws from the global generator, seeded alike for every run."""
    net = copy.deepcopy(net)
    if not whole_network:
        net._whole_network_serves = lambda *args: False
    torch.manual_seed(seed)
    return _forward_backward(net, x, mask, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scores", [True, False])
def test_whole_network_kernel_matches_the_network_layer_by_layer(dtype, training, masked, scores):
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=30, neighbours=4, dropout=0.25, scores=scores).to(dtype).train(training)
    _randomise_running_stats(net)
    for module in net.modules():  # affine batch-norm parameters away from (1, 0)
        if isinstance(module, MaskedBatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    x, mask = _padded_points(dtype, masked)
    expected = {"layered": _run_on_data(net, x, mask, whole_network=False)}
    if dtype == torch.float64:  # the composed reference too (no kernel at all)
        expected["reference"] = _run_on_data(net, x, mask, backend="reference")
    whole = _run_on_data(net, x, mask)
    assert (whole[1] is None) == (not scores)
    for path, reference in expected.items():
        _assert_agree(whole[0], reference[0], dtype, f"frame vs {path}")
        if scores:
            _assert_agree(whole[1], reference[1], dtype, f"scores vs {path}")
        for name, grad in reference[2].items():
            if grad is None:  # the pool directions only select; without scores conv2 is unused
                assert whole[2][name] is None, name
            else:
                _assert_agree(whole[2][name], grad, dtype, f"d/d{name} vs {path}")
        for name, buffer in reference[3].items():
            _assert_agree(whole[3][name], buffer, dtype, f"buffer {name} vs {path}")


# input_grad: the fused layers one by one, else the whole-network kernel; backward_inside: the
# backward pass inside the autocast region too (PyTorch advises against it; the whole-network
# kernel's backward turns autocast off all the same)
@pytest.mark.parametrize("input_grad, backward_inside", [(False, False), (True, False), (False, True)])
def test_vn_dgcnn_under_autocast_runs_in_its_input_dtype(input_grad, backward_inside):
    # Under autocast the heads and the kNN distances would hand the float32 kernels bfloat16
    # values (an error from inside the kernels): the network computes as without autocast.
    net = VNDGCNN(2, hidden=24, dropout=0.0).train()
    x, mask = _padded_points(torch.float32, masked=True)
    results = []
    for autocast in (False, True):
        model = copy.deepcopy(net)
        inputs = x.clone().requires_grad_(input_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            frame, scores = model(inputs, mask)
            loss = (frame * torch.linspace(-1, 1, frame.numel()).view(frame.shape)).sum() + scores.pow(2).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        assert frame.dtype == scores.dtype == torch.float32
        results.append([frame, scores] + [p.grad for p in model.parameters()] + ([inputs.grad] if input_grad else []))
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_whole_network_kernel_serves_inputs_without_gradient_on_the_default_backend(monkeypatch):
    calls = []
    kernel = torch.ops.lps_fast.vn_dgcnn
    monkeypatch.setitem(lps_fast.nn._fused_vn_kernels, "network", lambda *args: calls.append(1) or kernel(*args))
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    net(x, mask)
    assert calls == [1]
    net(x.clone().requires_grad_(True), mask)  # an input gradient: layer by layer
    with lps_fast.use_backend("reference"):
        net(x, mask)
    net.float()(x.float(), mask)
    assert calls == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_whole_network_kernel_matches_the_layers_on_exact_ties(dtype, training):
    """A lattice: equal kNN distances and equal pool scores in exact arithmetic. Both paths order
    equal distances by node index and compute the distances and scores by the same expression."""
    lattice = torch.tensor([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                           dtype=dtype)
    x = torch.stack([lattice, lattice[torch.tensor([3, 0, 6, 1, 5, 2, 4])]])[..., None]  # (2, 7, 3, 1)
    torch.manual_seed(0)
    net = VNDGCNN(1, hidden=30, neighbours=4, dropout=0.0).to(dtype).train(training)
    _randomise_running_stats(net)
    whole, layered = _run_on_data(net, x, None), _run_on_data(net, x, None, whole_network=False)
    _assert_agree(whole[0], layered[0], dtype, "frame")
    _assert_agree(whole[1], layered[1], dtype, "scores")
    # Built without AVX-512, BLAS forms the weight gradients, in other summation orders for the two
    # paths' operand shapes; on this lattice conv1's direction gradient is a difference of near-equal
    # sums (float32: 9.5e-4 of its scale 0.04 apart, 2e-6 of the layer's linear gradient's 49; every
    # other gradient within 5e-6). A node picked otherwise on a tie would be off by its whole scale.
    relative = 1e-4 if lps_fast.backend_info()["cpu_extension"].get("avx512") else 2e-3
    for name, grad in layered[2].items():
        if grad is not None:
            _assert_agree(whole[2][name], grad, dtype, f"d/d{name}", relative)


@pytest.mark.parametrize("dtype, spread", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_whole_network_frame_pool_keeps_the_layers_node_on_near_ties(dtype, spread):
    """Nodes a few rounding steps apart score within an ulp of each other in the frame pool: the
    whole-network loop must form the scores exactly as VNMaxPool's ATen expression does (every
    product rounded, no FMA), or it keeps another node than the layered path in some channels."""
    torch.manual_seed(0)
    net = VNDGCNN(1, hidden=192, neighbours=8, dropout=0.0, scores=False).to(dtype).eval()
    _randomise_running_stats(net)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(32, 1, 3, 1, generator=gen, dtype=dtype)
    x = base + spread * torch.randn(32, 64, 3, 1, generator=gen, dtype=dtype)
    with torch.no_grad():
        whole = copy.deepcopy(net)(x)[0]
        layered_net = copy.deepcopy(net)
        layered_net._whole_network_serves = lambda *args: None
        layered = layered_net(x)[0]
    assert torch.equal(whole, layered)


@pytest.mark.parametrize("output", ["frame", "scores"])
def test_whole_network_leaves_parameters_only_an_unused_output_reaches_without_gradient(output):
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    grads = []
    for whole_network in (True, False):
        module = copy.deepcopy(net)
        if not whole_network:
            module._whole_network_serves = lambda *args: False
        frame, scores = module(x, mask)
        (frame if output == "frame" else scores).sum().backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    assert {n for n, g in grads[0].items() if g is None} == {n for n, g in grads[1].items() if g is None}
    for name, grad in grads[1].items():
        if grad is not None:
            _assert_agree(grads[0][name], grad, torch.float64, f"d/d{name}")


def test_whole_network_kernel_steps_aside_where_it_does_not_serve(monkeypatch):
    """An empty batch, a torch.func transform and a hook on a layer run the network layer by layer."""
    calls = []
    kernel = torch.ops.lps_fast.vn_dgcnn
    monkeypatch.setitem(lps_fast.nn._fused_vn_kernels, "network", lambda *args: calls.append(1) or kernel(*args))
    net = VNDGCNN(2, hidden=24, dropout=0.0).double().eval()
    x, mask = _padded_points(torch.float64, masked=False)
    frame, scores = net(x[:0], None)
    assert frame.shape == (0, 3, 3) and scores.shape == (0, x.shape[1])
    batched = torch.func.vmap(lambda points: net(points, None))(x[None].expand(2, *x.shape))
    torch.testing.assert_close(batched[0][1], net(x, None)[0])
    assert calls == [1]  # the last call only
    handle = net.conv3.register_forward_hook(lambda *args: calls.append("hook"))
    net(x, None)
    handle.remove()
    assert calls == [1, "hook"]


@pytest.mark.parametrize("scores", [True, False])
def test_whole_network_kernel_opcheck(scores):
    """Schema (the running statistics are declared mutated) and fake kernels of both directions."""
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=24, dropout=0.0, scores=scores).double()
    x, mask = _padded_points(torch.float64, masked=True)
    keep = torch.rand(*x.shape[:2], 1, 8, dtype=torch.float64).lt_(0.8).double()
    params = [p.detach() for p in net._whole_network_params()]
    args = (x, mask, params, [b.clone() for b in net._running_buffers()], [keep, keep], 4, 0.2, 1e-5, 0.1, True, scores)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lps_fast.vn_dgcnn.default, args, test_utils=checks)
    frame, node_scores, saved = torch.ops.lps_fast.vn_dgcnn(*args)
    backward_args = (torch.randn_like(frame), torch.randn_like(node_scores), x, mask, params, [keep, keep], saved, 4,
                     0.2, 1e-5, True, scores)
    torch.library.opcheck(torch.ops.lps_fast.vn_dgcnn_backward.default, backward_args, test_utils=checks)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "params must hold"),
    (lambda a: a.__setitem__(0, a[0].float()), TypeError, "dtype of points"),
    (lambda a: a.__setitem__(1, torch.ones(6, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "dropout must hold"),
    (lambda a: a.__setitem__(4, [torch.ones(6, 7, 1, 8), a[4][1]]), TypeError, "dropout mask must have the dtype"),
    (lambda a: a.__setitem__(5, 0), ValueError, "neighbours must be at least 1"),
    (lambda a: a[2].__setitem__(2, a[2][2][:1]), ValueError, "norm weight must have shape"),
    (lambda a: a[2].__setitem__(25, a[2][25][:, :3]), ValueError, "score_head's weight must have shape"),
    (lambda a: a[3].__setitem__(0, a[3][0][:1]), ValueError, "running statistic must have shape"),
])
def test_whole_network_kernel_refuses_bad_arguments(change, error, match):
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    empty = x.new_empty((0,))
    args = [x, mask, net._whole_network_params(), net._running_buffers(), [empty, empty], 4, 0.2, 1e-5, 0.1, True,
            True]
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.lps_fast.vn_dgcnn(*args)


@pytest.mark.parametrize("corrupt, match", [
    (lambda saved: saved.pop(), "saved must be the list"),
    (lambda saved: saved[4].add_(100), "neighbours must lie in"),  # conv1's kNN indices
    (lambda saved: saved.__setitem__(2, saved[2][:1]), "frame pool index must be int64 of shape"),
])
def test_whole_network_backward_refuses_a_foreign_saved_list(corrupt, match):
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    empty = x.new_empty((0,))
    params = net._whole_network_params()
    frame, scores, saved = torch.ops.lps_fast.vn_dgcnn(x, mask, params, net._running_buffers(), [empty, empty], 4,
                                                       0.2, 1e-5, 0.1, True, True)
    corrupt(saved)
    with pytest.raises(ValueError, match=match):
        torch.ops.lps_fast.vn_dgcnn_backward(torch.ones_like(frame), torch.ones_like(scores), x, mask, params,
                                             [empty, empty], saved, 4, 0.2, 1e-5, True, True)


@pytest.mark.parametrize("shared_direction", [False, True])
def test_vn_linear_leaky_relu_with_leading_dims_and_a_broadcast_mask(shared_direction):
    torch.manual_seed(0)
    layer = VNLinearLeakyReLU(5, 4, shared_direction=shared_direction).double()
    v = torch.randn(2, 3, 6, 3, 5, dtype=torch.float64)
    mask = torch.rand(2, 3) > 0.3  # the leading dims, broadcast over the rest
    results = []
    for backend in ("reference", None):
        copy_ = copy.deepcopy(layer)
        x = v.clone().requires_grad_(True)
        with lps_fast.use_backend(backend):
            out = copy_(x, mask)
            out.pow(2).sum().backward()
        results.append((out, x.grad, copy_.linear.weight.grad, copy_.direction.weight.grad,
                        copy_.norm.norm.running_var.clone()))
    for fused, reference in zip(results[1], results[0]):
        torch.testing.assert_close(fused, reference, atol=1e-10, rtol=1e-9)


def _edge_args(dtype=torch.float64, masked=True, seed=0, channels=5, shared=False, neighbours_per_node=3):
    gen = torch.Generator().manual_seed(seed)
    N, n, K, C = 3, 6, neighbours_per_node, channels
    D = 1 if shared else C
    p, pc = (torch.randn(N, n, 3, C, generator=gen, dtype=dtype) for _ in range(2))
    d, dc = (torch.randn(N, n, 3, D, generator=gen, dtype=dtype) for _ in range(2))
    neighbours = torch.rand(N, n, n, generator=gen).argsort(dim=-1)[..., :K]  # distinct: no tied scores
    pool = torch.randn(C, C, generator=gen, dtype=dtype)
    mask = torch.rand(N, n, generator=gen) > 0.3 if masked else None
    weight = torch.rand(C, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(C, generator=gen, dtype=dtype)
    return p, d, pc, dc, neighbours, pool, mask, weight, bias


def _layer_args(mode, training, shared):
    """float64 arguments of an edge convolution or a per-node layer, in training (batch
    statistics) or eval (running statistics)."""
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args(shared=shared)
    if mode == "nodes":
        pc = dc = neighbours = pool = None
    elif mode == "nodes with centre terms":  # p + pc and d + dc of the node itself
        neighbours = pool = None
    gen = torch.Generator().manual_seed(4)
    running = (None, None) if training else (torch.rand(5, generator=gen, dtype=torch.float64),
                                             torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
    return (p, d, pc, dc, neighbours, pool, mask, weight, bias, *running, 1e-5, 0.2)


@pytest.mark.parametrize("mode", ["edges", "nodes", "nodes with centre terms"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_vn_layer_gradcheck(mode, training, shared):
    p, d, pc, dc, neighbours, pool, mask, weight, bias, *running, _, _ = _layer_args(mode, training, shared)
    inputs = [t.requires_grad_(True) for t in (p, d, weight, bias)]
    centres = [] if pc is None else [pc.requires_grad_(True), dc.requires_grad_(True)]

    def f(p, d, weight, bias, *centre):
        pc_, dc_ = centre if centre else (None, None)
        out, _, _ = torch.ops.lps_fast.vn_layer(p, d, pc_, dc_, neighbours, pool, mask, weight, bias, *running, 1e-5, 0.2)
        return out

    assert torch.autograd.gradcheck(f, (*inputs, *centres), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["edges", "nodes"])
def test_vn_layer_opcheck(mode):
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args(dtype=torch.float32)
    if mode == "nodes":
        pc = dc = neighbours = pool = None
    elif mode == "nodes with centre terms":  # p + pc and d + dc of the node itself
        neighbours = pool = None
    for t in (p, d, weight, bias) + (() if pc is None else (pc, dc)):
        t.requires_grad_(True)
    for running in ((None, None), (torch.zeros(5), torch.ones(5))):
        torch.library.opcheck(torch.ops.lps_fast.vn_layer.default,
                              (p, d, pc, dc, neighbours, pool, mask, weight, bias, *running, 1e-5, 0.2))


def test_vn_layer_reads_strided_column_blocks():
    """The edge convolution passes column blocks of one matmul output, which are not contiguous."""
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args()
    stacked = torch.cat([p, pc, d, dc], dim=-1)
    views = stacked.split([5, 5, 5, 5], dim=-1)
    assert not views[0].is_contiguous()
    strided, _, _ = torch.ops.lps_fast.vn_layer(views[0], views[2], views[1], views[3], neighbours, pool, mask, weight,
                                                bias, None, None, 1e-5, 0.2)
    dense, _, _ = torch.ops.lps_fast.vn_layer(p, d, pc, dc, neighbours, pool, mask, weight, bias, None, None, 1e-5, 0.2)
    torch.testing.assert_close(strided, dense, atol=0, rtol=0)


def test_vn_layer_agrees_with_its_definition_on_one_entry():
    """A direct transcription of the formula in lps_fast.nn.vn_layer, node by node."""
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args(masked=False)
    out, selected, stats = torch.ops.lps_fast.vn_layer(p, d, pc, dc, neighbours, pool, None, weight, bias, None, None,
                                                       1e-5, 0.2)
    rows = torch.arange(p.shape[0])[:, None, None]
    pe, de = p[rows, neighbours] + pc[:, :, None], d[rows, neighbours] + dc[:, :, None]  # [N, n, K, 3, C]
    length = pe.norm(dim=-2) + 1e-6
    mean, var = length.mean(dim=(0, 1, 2)), length.var(dim=(0, 1, 2), unbiased=False)
    torch.testing.assert_close(stats, torch.stack([mean, var]))
    q = pe * (((length - mean) / torch.sqrt(var + 1e-5) * weight + bias) / length)[..., None, :]
    dot = (q * de).sum(-2, keepdim=True)
    o = q - 0.8 * torch.clamp(dot, max=0) / ((de * de).sum(-2, keepdim=True) + 1e-6) * de
    score = (o * torch.einsum("ce,...ae->...ac", pool, o)).sum(-2)  # [N, n, K, C]
    torch.testing.assert_close(selected, score.argmax(dim=2))
    expected = torch.gather(o, 2, selected[:, :, None, None, :].expand(-1, -1, 1, 3, -1)).squeeze(2)
    torch.testing.assert_close(out, expected)


def _edge_layer_by_definition(p, d, pc, dc, neighbours, pool, mask, weight, bias):
    """The training-mode edge convolution transcribed from lps_fast.nn.vn_layer's docstring with
    tensor ops (statistics over the real nodes' entries, padded nodes 0), differentiable."""
    rows = torch.arange(p.shape[0])[:, None, None]
    pe, de = p[rows, neighbours] + pc[:, :, None], d[rows, neighbours] + dc[:, :, None]  # [N, n, K, 3, C]
    length = pe.norm(dim=-2) + 1e-6  # [N, n, K, C]
    real = length[mask]  # [real nodes, K, C]
    mean, var = real.mean(dim=(0, 1)), real.var(dim=(0, 1), unbiased=False)
    q = pe * (((length - mean) / torch.sqrt(var + 1e-5) * weight + bias) / length)[..., None, :]
    dot = (q * de).sum(-2, keepdim=True)
    o = q - 0.8 * torch.clamp(dot, max=0) / ((de * de).sum(-2, keepdim=True) + 1e-6) * de
    score = (o * torch.einsum("ce,...ae->...ac", pool, o)).sum(-2)  # [N, n, K, C]
    selected = score.detach().argmax(dim=2)
    out = torch.gather(o, 2, selected[:, :, None, None, :].expand(-1, -1, 1, 3, -1)).squeeze(2)
    return out * mask[:, :, None, None], selected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 8, 13, 21, 24, 40, 72])
@pytest.mark.parametrize("K", [1, 3, 6])
def test_edge_layer_matches_its_definition_at_every_vector_layout(dtype, channels, K):
    """Channel counts that take each of the kernels' vector layouts: the pool scores' whole and
    half vectors (or the plain loop), scored in groups of 1 to 4 entries (K neighbours: a single
    entry, a part-filled group, whole and part-filled groups), and one or several lane blocks in
    the backward's gather and scatter of each channel's kept neighbour; forward, selection and
    every gradient."""
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args(dtype=dtype, channels=channels, seed=channels,
                                                                    neighbours_per_node=K)
    inputs = [t.requires_grad_(True) for t in (p, d, pc, dc, weight, bias)]
    out, selected, _ = torch.ops.lps_fast.vn_layer(p, d, pc, dc, neighbours, pool, mask, weight, bias, None, None,
                                                   1e-5, 0.2)
    expected, expected_selected = _edge_layer_by_definition(p, d, pc, dc, neighbours, pool, mask, weight, bias)
    real = mask[:, :, None].expand(selected.shape)
    assert torch.equal(selected[real], expected_selected[real])
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out, expected, **tolerance)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **tolerance)


def _node_layer_by_definition(p, d, pc, dc, mask, weight, bias):
    """The training-mode per-node layer transcribed from lps_fast.nn.vn_layer's docstring (each
    node its own entry, with its centre terms where given; statistics over the real nodes)."""
    pe, de = (p, d) if pc is None else (p + pc, d + dc)
    length = pe.norm(dim=-2) + 1e-6  # [N, n, C]
    real = length[mask]
    mean, var = real.mean(dim=0), real.var(dim=0, unbiased=False)
    q = pe * (((length - mean) / torch.sqrt(var + 1e-5) * weight + bias) / length)[..., None, :]
    dot = (q * de).sum(-2, keepdim=True)
    return q - 0.8 * torch.clamp(dot, max=0) / ((de * de).sum(-2, keepdim=True) + 1e-6) * de


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 13, 21, 40, 72])
@pytest.mark.parametrize("centre", [False, True])
def test_node_layer_matches_its_definition_at_every_vector_layout(dtype, channels, centre):
    """A per-node layer at channel counts of one to several lane blocks (and past the kernels'
    register forms), with and without centre terms, padded nodes masked: forward and every
    gradient."""
    p, d, pc, dc, _, _, mask, weight, bias = _edge_args(dtype=dtype, channels=channels, seed=channels)
    if not centre:
        pc = dc = None
    inputs = [t.requires_grad_(True) for t in (p, d, weight, bias) + ((pc, dc) if centre else ())]
    out, _, _ = torch.ops.lps_fast.vn_layer(p, d, pc, dc, None, None, mask, weight, bias, None, None, 1e-5, 0.2)
    expected = _node_layer_by_definition(p, d, pc, dc, mask, weight, bias)
    real = mask[:, :, None, None]
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out * real, expected * real, **tolerance)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * real
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.__setitem__(0, a[0][..., :2, :]), ValueError, r"p must have shape \(N, n, 3, C\)"),
        (lambda a: a.__setitem__(1, a[1][..., :2]), ValueError, r"d must have shape \(N, n, 3, 1\) or \(N, n, 3, C\)"),
        (lambda a: a.__setitem__(4, a[4] + 100), ValueError, r"neighbours must lie in \[0, 6\)"),
        (lambda a: a.__setitem__(4, a[4].int()), TypeError, r"neighbours must be int64"),
        (lambda a: a.__setitem__(5, None), ValueError, r"neighbours and pool go together"),
        (lambda a: a.__setitem__(6, a[6].float()), TypeError, r"mask must be a bool tensor"),
        (lambda a: a.__setitem__(7, a[7][:2]), ValueError, r"weight must have shape \(C,\)"),
        (lambda a: a.__setitem__(0, a[0].half()), TypeError, r"p must be float32 or float64"),
    ],
)
def test_vn_layer_refuses_bad_arguments(change, error, match):
    args = list(_edge_args())
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.lps_fast.vn_layer(*args, None, None, 1e-5, 0.2)


def test_vn_layer_updates_the_running_statistics_over_real_entries():
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _edge_args(dtype=torch.float32)
    norm = MaskedBatchNorm(5)
    vn_layer(p, d, norm, mask, 0.2, pc, dc, neighbours, pool)
    rows = torch.arange(p.shape[0])[:, None, None]
    length = (p[rows, neighbours] + pc[:, :, None]).norm(dim=-2) + 1e-6  # [N, n, K, C]
    real = length[mask].reshape(-1, 5)  # [entries, C]
    expected_var = 0.9 + 0.1 * real.var(dim=0, unbiased=True)
    torch.testing.assert_close(norm.running_mean, 0.1 * real.mean(dim=0))
    torch.testing.assert_close(norm.running_var, expected_var)


def test_vn_dgcnn_compiles_fullgraph_with_the_fused_layer():
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    eager = net(x, mask)
    compiled = torch.compile(copy.deepcopy(net), backend="aot_eager", fullgraph=True)(x, mask)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The score head (lps_fast::vn_score_head) against its composed formulation


def _score_head_args(dtype=torch.float64, masked=True, batch=6, n=5, width=7, pair_width=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, width, generator=gen, dtype=dtype)
    frame = torch.randn(batch, n, 3, 3, generator=gen, dtype=dtype)
    pair = torch.randn(batch, n, 3, pair_width, generator=gen, dtype=dtype)
    weight = torch.randn(3 * (width + pair_width), generator=gen, dtype=dtype)
    bias = torch.randn(1, generator=gen, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(batch, n, dtype=torch.bool)
        mask[1, 3:] = False
        mask[2, 1:] = False  # a graph of one node
        mask[-1] = False  # a graph without nodes: pooled coordinates 0, scores 0
    return x, frame, pair, mask, weight, bias


def _score_head_and_grads(head, args, seed=2):
    x, frame, pair, mask, weight, bias = [a.clone().requires_grad_(True) if a is not None and a.is_floating_point()
                                          else a for a in args]
    scores = head(x, frame, pair, mask, weight, bias)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed), dtype=scores.dtype)
    return (scores, *torch.autograd.grad(scores, (x, frame, pair, weight, bias), upstream))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_vn_score_head_matches_the_composed_formulation(dtype, masked):
    args = _score_head_args(dtype, masked)
    fused = _score_head_and_grads(torch.ops.lps_fast.vn_score_head, args)
    composed = _score_head_and_grads(vn_score_head_composed, args)
    for what, a, b in zip(("scores", "x", "frame", "pair", "weight", "bias"), fused, composed):
        _assert_agree(a, b, dtype, what)
    if masked:
        assert torch.all(fused[0][~args[3]] == 0) and torch.all(fused[1][~args[3]] == 0)
        assert torch.isfinite(composed[0]).all()


def test_vn_score_head_shares_the_max_gradient_between_tied_nodes():
    """Nodes with equal coordinates tie for every max: amax splits the gradient equally."""
    x, frame, pair, _, weight, bias = _score_head_args(masked=False)
    x[:, 1], frame[:, 1] = x[:, 0], frame[:, 0]
    fused = _score_head_and_grads(torch.ops.lps_fast.vn_score_head, (x, frame, pair, None, weight, bias))
    composed = _score_head_and_grads(vn_score_head_composed, (x, frame, pair, None, weight, bias))
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_vn_score_head_gradcheck(masked):
    x, frame, pair, mask, weight, bias = _score_head_args(masked=masked, batch=4, n=4, width=3, pair_width=2)
    inputs = [t.requires_grad_(True) for t in (x, frame, pair, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda x, f, p, w, b: torch.ops.lps_fast.vn_score_head(x, f, p, mask, w, b), inputs)


def test_vn_score_head_opcheck():
    x, frame, pair, mask, weight, bias = _score_head_args(torch.float32)
    for t in (x, frame, pair, weight, bias):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.lps_fast.vn_score_head.default, (x, frame, pair, mask, weight, bias))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.__setitem__(0, a[0][..., :2, :]), ValueError, r"x must have shape \(N, n, 3, W\)"),
        (lambda a: a.__setitem__(1, a[1][:, :, :, :2]), ValueError, r"frame must have shape \(N, n, 3, 3\)"),
        (lambda a: a.__setitem__(2, a[2][:2]), ValueError, r"pair must have shape \(N, n, 3, V\)"),
        (lambda a: a.__setitem__(3, a[3].float()), TypeError, r"mask must be a bool tensor"),
        (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, r"weight must have shape \(3 \* \(W \+ V\),\) = \(33,\)"),
        (lambda a: a.__setitem__(1, a[1].float()), TypeError, r"frame must have the dtype of x"),
        (lambda a: a.__setitem__(5, a[5].expand(2)), ValueError, r"bias must hold one value"),
    ],
)
def test_vn_score_head_refuses_bad_arguments(change, error, match):
    args = list(_score_head_args())
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.lps_fast.vn_score_head(*args)


def test_vn_dgcnn_runs_the_score_head_kernel_on_cpu_and_the_composed_head_under_the_reference_backend(monkeypatch):
    calls = []
    kernel = torch.ops.lps_fast.vn_score_head
    monkeypatch.setitem(lps_fast.nn._fused_vn_kernels, "score_head",
                        lambda *args: calls.append(1) or kernel(*args))
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    x.requires_grad_(True)  # layer by layer (the whole-network kernel gives no input gradient)
    net(x, mask)
    assert calls == [1]
    with lps_fast.use_backend("reference"):
        net(x, mask)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# The Triton kernel (GPUs; on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets)

ON_GPU = torch.cuda.is_available()
TRITON_READY = hasattr(torch.ops.lps_fast, "vn_layer_triton") and (
    ON_GPU or lps_fast.backend_info()["triton"]["interpret"])
triton_only = pytest.mark.skipif(not TRITON_READY, reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if ON_GPU else "cpu"


def _on(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@triton_only
@pytest.mark.parametrize("mode", ["edges", "nodes"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_triton_vn_layer_matches_the_cpu_kernel(mode, training, shared):
    """Forward (output, selected neighbours, statistics) and every gradient, in float64."""
    args = _layer_args(mode, training, shared)
    p, d, pc, dc, neighbours, pool, mask, weight, bias = args[:9]
    expected = torch.ops.lps_fast.vn_layer(*args)
    got = torch.ops.lps_fast.vn_layer_triton(*_on(DEVICE, args))
    torch.testing.assert_close(got[1].cpu(), expected[1], atol=0, rtol=0)
    for a, b in zip(got[::2], expected[::2]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=1e-10)
    grad = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    backward = (grad, p, d, pc, dc, neighbours, expected[1], mask, weight, bias, expected[2], training, 1e-5, 0.2)
    expected_grads = torch.ops.lps_fast.vn_layer_backward(*backward)
    got_grads = torch.ops.lps_fast.vn_layer_backward_triton(*_on(DEVICE, backward))
    for name, a, b in zip(("p", "d", "p_centre", "d_centre", "weight", "bias"), got_grads, expected_grads):
        torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=1e-10, msg=lambda m: f"d/d{name}: {m}")


@triton_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vn_dgcnn_on_the_triton_kernel_matches_the_composed_layers(dtype):
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=30, neighbours=4, dropout=0.0).to(dtype)
    x, mask = _padded_points(dtype, masked=True)
    reference = _run(net, x, mask, "reference")
    net, x, mask = net.to(DEVICE), x.to(DEVICE), mask.to(DEVICE)
    with lps_fast.use_backend("triton"):
        assert lps_fast.nn._fused_vn_op(x) is torch.ops.lps_fast.vn_layer_triton
    fused = _run(net, x, mask, "triton")
    for what, a, b in (("frame", fused[0], reference[0]), ("scores", fused[1], reference[1]),
                       ("d/dpoints", fused[2], reference[2])):
        _assert_agree(a.cpu(), b, dtype, what)
    for name, grad in reference[3].items():
        if grad is not None:
            _assert_agree(fused[3][name].cpu(), grad, dtype, f"d/d{name}")
    for name, buffer in reference[4].items():
        _assert_agree(fused[4][name].cpu(), buffer, dtype, f"buffer {name}")


@triton_only
def test_triton_vn_layer_opcheck():
    p, d, pc, dc, neighbours, pool, mask, weight, bias = _on(DEVICE, _edge_args(dtype=torch.float32))
    for t in (p, d, pc, dc, weight, bias):
        t.requires_grad_(True)
    # the interpreter runs kernels eagerly, so AOT dispatch (which traces the launches) needs a GPU
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if ON_GPU else ())
    torch.library.opcheck(torch.ops.lps_fast.vn_layer_triton.default,
                          (p, d, pc, dc, neighbours, pool, mask, weight, bias, None, None, 1e-5, 0.2), test_utils=utils)


# ---- vn_matmul: the layers' stacked maps ---------------------------------------------------------

def _matmul_cases(dtype):
    """(x, w): the network's shapes, tails of every width, column panels past one (> 48 float
    columns), one column, one inner dim, row counts off the row tiles, and x as a column block of a
    wider buffer or a transposed matrix (no uniform row stride: copied)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    cases = [(rand(400, 5, 3, 21), rand(21, 84)), (rand(2000, 1, 3, 42), rand(42, 22)), (rand(6000, 2), rand(2, 84)),
             (rand(37, 3), rand(3, 10)), (rand(13, 84), rand(84, 21)), (rand(9, 17), rand(17, 97)),
             (rand(5, 8), rand(8, 200)), (rand(3, 1), rand(1, 1)), (rand(11, 5), rand(5, 1))]
    wide = rand(40, 5, 3, 42)
    cases.append((wide[..., :21], rand(21, 84)))  # the first edge convolution's half of [x1, x2]
    cases.append((wide[..., 21:], rand(21, 30)))
    cases.append((rand(21, 50).t(), rand(21, 33)))
    cases.append((rand(1, 5, 1, 3, 7)[:, :, :, :, 2:], rand(5, 9)))  # size-1 dims
    cases.append((rand(4, 1, 6).expand(4, 5, 6), rand(6, 18)))  # stride-0 rows (an expand)
    cases.append((rand(6), rand(6, 20)))  # one row, as a 1-D x
    cases.append((rand(30, 4), rand(9, 4).t()))  # a transposed weight
    return cases


def _assert_accurate(got, a, b, what):
    """``got`` against the float64 product ``a @ b`` (2-D), within the rounding bound of a sum of
    ``terms`` products in got's dtype: 4 sqrt(terms) eps (|a| @ |b|), elementwise. Any two
    summation orders (this kernel's, BLAS's) stay well inside it; a wrong element does not."""
    exact = a.double() @ b.double()
    if got.numel() == 0:
        return
    eps = torch.finfo(got.dtype).eps
    bound = 4 * a.shape[-1] ** 0.5 * eps * (a.double().abs() @ b.double().abs()) + 1e-300
    excess = ((got.double().reshape(exact.shape) - exact).abs() / bound).max().item()
    assert excess <= 1, f"{what}: error {excess:.2f} x the rounding bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vn_matmul_matches_torch_matmul_forward_and_backward(dtype):
    for x, w in _matmul_cases(dtype):
        what = f"x {tuple(x.shape)} strides {x.stride()} @ w {tuple(w.shape)}"
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = torch.ops.lps_fast.vn_matmul(x, w)
        assert out.shape == (*x.shape[:-1], w.shape[1]) and out.is_contiguous(), what
        rows_x = x.detach().reshape(-1, w.shape[0])
        _assert_accurate(out, rows_x, w.detach(), what)
        grad = torch.randn(out.shape, dtype=dtype)
        out.backward(grad)
        rows_grad = grad.reshape(-1, w.shape[1])
        _assert_accurate(x.grad, rows_grad, w.detach().t(), f"d/dx {what}")
        _assert_accurate(w.grad, rows_x.t(), rows_grad, f"d/dw {what}")
        # only the weight's gradient: x's is not computed
        grad_x, grad_w = torch.ops.lps_fast.vn_matmul_backward(grad, x.detach(), w.detach(), False)
        assert grad_x.numel() == 0
        assert torch.equal(grad_w, w.grad)


def test_vn_matmul_of_empty_operands():
    for rows, inner, columns in [(0, 4, 5), (6, 0, 3), (6, 4, 0)]:
        x, w = torch.randn(rows, inner), torch.randn(inner, columns)
        torch.testing.assert_close(torch.ops.lps_fast.vn_matmul(x, w), x @ w)
        grad = torch.randn(rows, columns)
        grad_x, grad_w = torch.ops.lps_fast.vn_matmul_backward(grad, x, w, True)
        torch.testing.assert_close(grad_x, grad @ w.t())
        torch.testing.assert_close(grad_w, x.t() @ grad)


@pytest.mark.skipif(not lps_fast.backend_info()["cpu_extension"].get("avx512"),
                    reason="built without AVX-512: BLAS runs the products, its thread split is its own")
def test_vn_matmul_does_not_depend_on_the_thread_count():
    """Each output element is summed by one thread in row order."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(6000, 21, generator=gen), torch.randn(21, 84, generator=gen)
    grad = torch.randn(6000, 84, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((torch.ops.lps_fast.vn_matmul(x, w), *torch.ops.lps_fast.vn_matmul_backward(grad, x, w, True)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _knn_by_sorting(v, k, mask):
    """The kNN definition by a stable sort of the exact squared distances (float64)."""
    flat = v.double().flatten(2)
    distance = (flat[:, :, None] - flat[:, None, :]).square().sum(-1)
    n = v.shape[1]
    if mask is not None:
        distance = distance.masked_fill(~mask[:, None, :], float("inf"))
    distance = distance.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    nearest, index = (t[..., :min(k, n)] for t in torch.sort(distance, dim=-1, stable=True))
    itself = torch.arange(n)[None, :, None].expand_as(index)
    return torch.where(torch.isinf(nearest) & (nearest > 0), itself, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_vn_knn_is_the_nearest_nodes_by_feature_distance(dtype, masked, k):
    """Itself first, then by distance; padded nodes never, their slots (k beyond the real nodes)
    repeat the node. Integer features: exact distances, with ties ordered by node index."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(-2, 3, (30, 7, 3, 5), generator=gen).to(dtype)  # many exact ties
    mask = torch.rand(30, 7, generator=gen) > 0.3 if masked else None
    got = torch.ops.lps_fast.vn_knn(v, k, mask)
    assert got.dtype == torch.long and got.shape == (30, 7, min(k, 7))
    expected = _knn_by_sorting(v, k, mask)
    if mask is None:
        assert torch.equal(got, expected)
    else:  # padded nodes' own rows are not read; the real nodes' rows are the definition's
        assert torch.equal(got[mask], expected[mask])
    real = torch.randn(30, 7, 3, 5, generator=gen, dtype=dtype)
    assert torch.equal(torch.ops.lps_fast.vn_knn(real, k, None), _knn_by_sorting(real, k, None))
    assert torch.ops.lps_fast.vn_knn(v[:0], k, None).shape == (0, 7, min(k, 7))


def test_knn_neighbours_runs_the_kernel_where_the_fused_layers_serve():
    v = torch.randn(6, 5, 3, 4)
    assert torch.equal(knn_neighbours(v, 4, None), torch.ops.lps_fast.vn_knn(v, 4, None))
    with lps_fast.use_backend("reference"):
        assert torch.equal(knn_neighbours(v, 4, None), _knn_by_sorting(v, 4, None))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(5), 2, None), ValueError, r"v must have shape \(N, n, ...\)"),
    ((torch.randn(2, 5, 3).half(), 2, None), TypeError, "v must be float32 or float64"),
    ((torch.randn(2, 5, 3), 0, None), ValueError, "k must be at least 1"),
    ((torch.randn(2, 5, 3), 2, torch.ones(2, 5)), TypeError, "mask must be bool"),
    ((torch.randn(2, 5, 3), 2, torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(N, n\)"),
])
def test_vn_knn_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.lps_fast.vn_knn(*args)


def test_vn_knn_opcheck():
    v, mask = torch.randn(8, 6, 3, 4, dtype=torch.float64), torch.rand(8, 6) > 0.3
    torch.library.opcheck(torch.ops.lps_fast.vn_knn.default, (v, 4, mask),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_vn_matmul_opcheck():
    x, w = torch.randn(40, 5, 3, 21, dtype=torch.float64), torch.randn(21, 30, dtype=torch.float64)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lps_fast.vn_matmul.default, (x, w), test_utils=checks)
    torch.library.opcheck(torch.ops.lps_fast.vn_matmul_backward.default,
                          (torch.randn(40, 5, 3, 30, dtype=torch.float64), x, w, True), test_utils=checks[::2])
    inputs = (torch.randn(7, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(torch.ops.lps_fast.vn_matmul, inputs)
    assert torch.autograd.gradgradcheck(torch.ops.lps_fast.vn_matmul, inputs)  # create_graph: torch's products


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(5, 3), torch.randn(4, 2)), ValueError, r"w must have shape \(K, M\) with K = x.shape\[-1\] = 3"),
    ((torch.randn(5, 3), torch.randn(3, 2, dtype=torch.float64)), TypeError, "w must have the dtype of x"),
    ((torch.randn(5, 3).half(), torch.randn(3, 2).half()), TypeError, "x must be float32 or float64"),
    ((torch.randn(5, 3), torch.randn(3)), ValueError, r"w must have shape \(K, M\)"),
])
def test_vn_matmul_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.lps_fast.vn_matmul(*args)


def test_vn_matmul_backward_refuses_a_gradient_of_another_shape():
    x, w = torch.randn(5, 3), torch.randn(3, 2)
    with pytest.raises(ValueError, match="grad must have the shape of the output"):
        torch.ops.lps_fast.vn_matmul_backward(torch.randn(5, 3), x, w, True)


def test_the_layers_run_their_maps_through_vn_matmul(monkeypatch):
    """Layer by layer, the fused CPU layers, edge convolutions, the frame pool and the two maps to
    3 vectors use vn_matmul, as the whole-network op does: the same maps bit for bit on both paths."""
    calls = []
    kernel = torch.ops.lps_fast.vn_matmul
    monkeypatch.setitem(lps_fast.nn._vn_kernels(), "matmul", lambda *args: calls.append(args[1].shape) or kernel(*args))
    net = VNDGCNN(2, hidden=24, dropout=0.0)
    x, mask = _padded_points(torch.float32, masked=True)
    net(x.requires_grad_(True), mask)  # an input gradient: layer by layer
    # conv1, conv2 (four maps each), the frame pool's direction, frame_head, conv3, std1, std2, std_frame
    assert len(calls) == 8


def test_vn_kernels_refuse_a_double_backward_with_a_clear_error():
    """create_graph=True through the fused layer or the score head: an error naming the way out,
    not second derivatives that silently miss the kernels' own."""
    torch.manual_seed(0)
    net = VNDGCNN(2, hidden=24, dropout=0.0).double()
    x, mask = _padded_points(torch.float64, masked=True)
    x.requires_grad_(True)  # an input gradient: the layered path, through vn_layer and vn_score_head
    frame, scores = net(x, mask)
    with pytest.raises(RuntimeError, match="no second derivatives.*use_backend"):
        torch.autograd.grad(frame.sum() + scores.sum(), x, create_graph=True)
    with lps_fast.use_backend("reference"):  # the composed layers have them
        frame, scores = net(x, mask)
        (first,) = torch.autograd.grad(frame.sum() + scores.sum(), x, create_graph=True)
        assert first.requires_grad
