"""Bad input gets a clear ValueError/TypeError naming the argument, on every path."""

import pytest
import torch
from helpers import random_perm, random_soft

import lps_fast
from lps_fast import reference as ref

B, K, N = 2, 3, 5
PERM = random_perm(B, K, N)
X = torch.randn(B, N, 4)
E = torch.randn(B, N, N, 2)
Y = torch.randn(B, K, N, 4)
YE = torch.randn(B, K, N, N, 2)
P3 = torch.randn(B, N, 3, 2)
YP3 = torch.randn(B, K, N, 3, 2)
R = torch.eye(3).expand(B, K, 3, 3).contiguous()
SOFT = random_soft(B, K, N)
SCORES = torch.randn(B, K, N)

# (name, op name, args, kwargs, exception, message fragment)
CASES = [
    ("x not a tensor", "permute_nodes", ([1.0], PERM), {}, TypeError, "x must be a torch.Tensor"),
    ("x rank", "permute_nodes", (torch.randn(N), PERM), {}, ValueError, "x must have shape (B, n, *F)"),
    ("perm dtype", "permute_nodes", (X, PERM.int()), {}, TypeError, "perm must be an int64"),
    ("perm rank", "permute_nodes", (X, PERM[0]), {}, ValueError, "perm must have shape (B, k, n)"),
    ("perm n", "permute_nodes", (X, random_perm(B, K, N + 1)), {}, ValueError, "perm must have shape"),
    ("perm batch", "permute_nodes", (X, random_perm(B + 1, K, N)), {}, ValueError, "perm must have shape"),
    ("perm duplicate", "permute_nodes", (X, torch.zeros(B, K, N, dtype=torch.long)), {}, ValueError,
     "permutation of 0..4"),
    ("perm range", "permute_nodes", (X, PERM + 1), {}, ValueError, "permutation of 0..4"),
    ("soft shape", "permute_nodes", (X, PERM, SOFT[:, :, :-1]), {}, ValueError, "soft must have shape (B, k, n, n)"),
    ("soft dtype", "permute_nodes", (X, PERM, SOFT.long()), {}, TypeError, "soft must be a floating-point"),
    ("soft with int x", "permute_nodes", (X.long(), PERM, SOFT), {}, TypeError, "x must be floating-point when soft"),
    ("e not square", "permute_edges", (torch.randn(B, N, N + 1), PERM), {}, ValueError, "two equal node dims"),
    ("e rank", "permute_edges", (X[..., 0], PERM), {}, ValueError, "e must have shape (B, n, n, *F)"),
    ("y int", "unpermute_mean", (Y.long(), PERM), {}, TypeError, "y must be a floating-point"),
    ("y k mismatch", "unpermute_mean", (Y[:, :2], PERM), {}, ValueError, "perm must have shape"),
    ("y no samples", "unpermute_mean", (Y[:, :0], PERM[:, :0]), {}, ValueError, "at least one sample"),
    ("ye not square", "unpermute_edges_mean", (torch.randn(B, K, N, N + 1), PERM), {}, ValueError,
     "two equal node dims"),
    ("diagonal type", "unpermute_edges_mean", (YE, PERM), {"diagonal": 1}, TypeError, "diagonal must be a bool"),
    ("frame x shape", "frame_apply", (torch.randn(B, N, 2, 2), R), {}, ValueError, "x must have shape (B, n, 3, C)"),
    ("R shape", "frame_apply", (P3, torch.randn(B, K, 2, 3)), {}, ValueError, "R must have shape (B, k, 3, 3)"),
    ("R dtype", "frame_apply", (P3, R.double()), {}, TypeError, "R must have the dtype of x"),
    ("center shape", "frame_apply", (P3, R), {"center": torch.randn(B, 3)}, ValueError,
     "center must have shape (B, 3, C)"),
    ("soft without perm", "frame_apply", (P3, R), {"soft": SOFT}, ValueError, "soft was given without perm"),
    ("frame perm k", "frame_unapply_mean", (YP3, R), {"perm": random_perm(B, K + 1, N)}, ValueError,
     "perm must have shape"),
    ("frame R k", "frame_unapply_mean", (YP3, R[:, :2]), {}, ValueError, "R must have shape (B, k, 3, 3)"),
    ("scores rank", "sinkhorn_sort", (SCORES[0], 0.1), {}, ValueError, "scores must have shape (B, k, n)"),
    ("scores int", "sinkhorn_sort", (SCORES.long(), 0.1), {}, TypeError, "scores must be a floating-point"),
    ("tau zero", "sinkhorn_sort", (SCORES, 0.0), {}, ValueError, "tau must be a finite positive"),
    ("tau type", "sinkhorn_sort", (SCORES, "0.1"), {}, TypeError, "tau must be a Python float"),
    ("n_iter negative", "sinkhorn_sort", (SCORES, 0.1, -1), {}, ValueError, "n_iter must be >= 0"),
    ("mask dtype", "sinkhorn_sort", (SCORES, 0.1), {"mask": torch.ones(B, N)}, TypeError, "mask must be a bool"),
    ("mask shape", "sinkhorn_sort", (SCORES, 0.1), {"mask": torch.ones(B, N + 1, dtype=torch.bool)}, ValueError,
     "mask must have shape (B, n)"),
    ("entropy shape", "permutation_entropy", (SOFT[..., :-1],), {}, ValueError, "soft must have shape (B, k, n, n)"),
    ("V shape", "gram_schmidt", (torch.randn(4, 3, 2),), {}, ValueError, "V must have shape (..., 3, 3)"),
    ("V int", "gram_schmidt", (torch.ones(3, 3, dtype=torch.long),), {}, TypeError, "V must be a floating-point"),
]


@pytest.mark.parametrize("path", ["reference", "public"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, path):
    _, op, args, kwargs, exception, fragment = case
    fn = getattr(ref if path == "reference" else lps_fast, op)
    with pytest.raises(exception) as info:
        fn(*args, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_public_ops_check_perm_values_on_every_cpu_backend(backend):
    provider = lps_fast._backend.providers.get(backend)
    if provider is None or "permute_nodes" not in provider.ops:
        pytest.skip(f"{backend} kernels not built")
    bad = PERM.clone()
    bad[1, 2, 0] = bad[1, 2, 1]
    with lps_fast.use_backend(backend):
        with pytest.raises(ValueError, match="perm"):
            lps_fast.permute_nodes(X, bad)
        with pytest.raises(ValueError, match="perm"):
            lps_fast.unpermute_mean(Y, bad)


def test_devices_must_match():
    meta_perm = PERM.to("meta")
    with pytest.raises(ValueError, match="perm is on meta but x is on cpu"):
        ref.permute_nodes(X, meta_perm)
    with pytest.raises(ValueError, match="R is on meta"):
        lps_fast.frame_apply(P3, R.to("meta"))


def test_perm_check_policy_switch():
    bad = torch.zeros(B, K, N, dtype=torch.long)
    lps_fast.set_perm_check("never")
    try:
        ref.permute_nodes(X, bad)  # no value check: a gather of node 0 everywhere
    finally:
        lps_fast.set_perm_check("auto")
    with pytest.raises(ValueError):
        lps_fast.set_perm_check("sometimes")


def test_validation_is_on_by_default_and_bad_input_raises():
    assert lps_fast._checks.config.validate
    bad = torch.zeros(B, K, N, dtype=torch.long)
    with pytest.raises(ValueError, match="must hold a permutation"):
        ref.permute_nodes(X, bad)
    with pytest.raises(ValueError, match="perm"):
        lps_fast.permute_nodes(X, bad)
    with pytest.raises(ValueError, match="x must have shape"):
        lps_fast.permute_nodes(X[0, 0], PERM)


def test_validation_switch_skips_checks_for_trusted_inputs(monkeypatch):
    """validation(False): no value check (a repeated index gathers), the previous setting comes
    back on exit; the compiled kernels still refuse a bad perm and bad shapes themselves."""
    bad = torch.zeros(B, K, N, dtype=torch.long)
    with lps_fast.validation(False):
        assert not lps_fast._checks.config.validate
        out = ref.permute_nodes(X, bad)
        assert torch.equal(out, X[:, None, :1].expand_as(out))
        if "permute_nodes" in lps_fast._backend.providers.get("cpp", lps_fast._backend.Provider("x", ())).ops:
            with lps_fast.use_backend("cpp"):
                with pytest.raises((ValueError, RuntimeError), match="perm"):
                    lps_fast.permute_nodes(X, bad)
                with pytest.raises((ValueError, RuntimeError), match="x must have shape"):
                    lps_fast.permute_nodes(X[0, 0], PERM)
    assert lps_fast._checks.config.validate
    lps_fast.set_validation(False)
    try:
        ref.permute_nodes(X, bad)
    finally:
        lps_fast.set_validation(True)
    for value, expected in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("LPS_FAST_VALIDATE", value)
        assert lps_fast._checks._validation_from_env() is expected


def test_group_transforms_skip_the_per_op_checks(monkeypatch):
    """Symmetrize checks its inputs once; the ops inside the group transforms do not check again."""
    calls = []
    original = lps_fast._checks.check_perm_values
    monkeypatch.setattr(lps_fast._checks, "check_perm_values", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = lps_fast.Symmetrize(lps_fast.backbones.MLP(max_nodes=N, node_dim=X.shape[-1], edge_dim=0, hidden=(8,),
                                                       out_dim=1),
                                "Sn", lps_fast.distributions.create("uniform"), n_samples=K, output="invariant",
                                backend="reference")
    model({"nodes": X})
    assert calls == []
    ref.permute_nodes(X, PERM)
    assert calls == [1]
