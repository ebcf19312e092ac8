"""Tests of lps_fast.data: loaders of the provided files, the generators and their
self-checks, caching, dense batching, and PyTorch Geometric interop (when installed)."""

import concurrent.futures
import functools
import importlib.util
import itertools
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lps_fast.data as data
from lps_fast.data import _cache, nbody, pattern
from lps_fast.data.dataset import pack_adjacency, unpack_adjacency

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXP_FILE = SHARED_DATA / "exp.npz"
GRAPH8C_FILE = SHARED_DATA / "graph8c.g6"

needs_exp = pytest.mark.skipif(not EXP_FILE.is_file(), reason=f"{EXP_FILE} not present")
needs_graph8c = pytest.mark.skipif(not GRAPH8C_FILE.is_file(), reason=f"{GRAPH8C_FILE} not present")


def random_graph(rng, n, density=0.4):
    upper = np.triu(rng.random((n, n)) < density, 1)
    return upper | upper.T


def node_signature_key(adjacency):
    """An isomorphism invariant made of exact integers: the multiset of per-node signatures
    (degree, closed 3-walks, sorted row of A^2, sorted neighbour degrees) and tr(A^k), k <= n.
    Different keys prove two graphs non-isomorphic."""
    a = adjacency.astype(np.int64)
    degree = a.sum(-1)
    squared = a @ a
    cubed = squared @ a
    per_node = np.concatenate(
        [degree[:, None], np.diag(cubed)[:, None], np.sort(squared, -1), np.sort(a * degree[None, :], -1)],
        axis=-1,
    )
    power, traces = np.eye(len(a), dtype=np.int64), []
    for _ in range(len(a)):
        power = power @ a
        traces.append(int(np.trace(power)))
    return tuple(sorted(map(tuple, per_node.tolist()))) + tuple(traces)


def wl_colors_equal(first, second, first_features, second_features, rounds):
    """Whether 1-WL colour refinement, run jointly on both graphs, ends with equal colour
    histograms (then 1-WL cannot distinguish them)."""
    sizes = [len(first), len(second)]
    adjacency = np.zeros((sum(sizes), sum(sizes)), dtype=bool)
    adjacency[: sizes[0], : sizes[0]] = first
    adjacency[sizes[0]:, sizes[0]:] = second
    colors = list(np.concatenate([first_features, second_features]))
    neighbours = [np.flatnonzero(row) for row in adjacency]
    for _ in range(rounds):
        signatures = [(colors[v], tuple(sorted(colors[u] for u in neighbours[v]))) for v in range(len(colors))]
        palette = {signature: index for index, signature in enumerate(sorted(set(signatures)))}
        colors = [palette[signature] for signature in signatures]
    return Counter(colors[: sizes[0]]) == Counter(colors[sizes[0]:])


# --- graph6 -----------------------------------------------------------------------------------


def edges_to_adjacency(n, edges):
    adjacency = np.zeros((n, n), dtype=bool)
    for u, v in edges:
        adjacency[u, v] = adjacency[v, u] = True
    return adjacency


@pytest.mark.parametrize(
    "text, n, edges",
    [
        ("?", 0, []),
        ("@", 1, []),
        ("A?", 2, []),
        ("A_", 2, [(0, 1)]),
        ("Bw", 3, [(0, 1), (0, 2), (1, 2)]),
        ("Bg", 3, [(0, 1), (1, 2)]),
        # the example of the format description: edges 0-2, 0-4, 1-3, 3-4 on 5 nodes
        ("DQc", 5, [(0, 2), (0, 4), (1, 3), (3, 4)]),
    ],
    ids=["empty", "n1", "n2-no-edge", "n2-edge", "triangle", "path", "spec-example"],
)
def test_graph6_hand_written(text, n, edges):
    expected = edges_to_adjacency(n, edges)
    np.testing.assert_array_equal(data.decode_graph6(text), expected)
    assert data.encode_graph6(expected) == text


def test_graph6_round_trip_and_long_size_field():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 7, 8, 13, 62, 63, 64, 100]:
        adjacency = random_graph(rng, n)
        text = data.encode_graph6(adjacency)
        if n >= 63:  # sizes past 62 use the 126-prefixed 18-bit field
            assert text[0] == "~" and len(text) == 4 + (n * (n - 1) // 2 + 5) // 6
        np.testing.assert_array_equal(data.decode_graph6(text), adjacency)
    assert data.encode_graph6(np.zeros((63, 63)))[:4] == "~??~"


def test_graph6_file_parsing_and_errors(tmp_path):
    path = tmp_path / "few.g6"
    path.write_text(">>graph6<<DQc\n\nBw\nA_\n")
    graphs = data.read_graph6(path)
    assert [len(graph) for graph in graphs] == [5, 3, 2]
    assert len(data.parse_graph6(">>graph6<<\nBw\n")) == 1  # header on a line of its own
    with pytest.raises(ValueError, match="sparse6"):
        data.decode_graph6(":Fa@x^")
    with pytest.raises(ValueError, match="edge bytes"):
        data.decode_graph6("DQ")
    with pytest.raises(ValueError, match="line 2"):
        data.parse_graph6("Bw\nB\x7f\n")


# --- provided files -----------------------------------------------------------------------------


@needs_exp
def test_exp_iso_contents():
    splits = data.load_exp_iso(SHARED_DATA)
    assert splits.train is None and splits.val is None
    exp = splits.test
    assert len(exp) == 1200 and exp.info.kind == "isomorphism"
    np.testing.assert_array_equal(exp.pairs, np.arange(1200).reshape(600, 2))
    assert set(np.unique(exp.node_features)) == {0, 1}
    assert exp.num_nodes.max() <= 64
    # each pair: one satisfiable and one unsatisfiable formula
    assert (exp.target[0::2] != exp.target[1::2]).all()
    with np.load(EXP_FILE) as raw:
        assert (exp.num_nodes == raw["num_nodes"]).all()
        undirected_edges = np.array([exp.adjacency(i).sum() for i in range(len(exp))])
        np.testing.assert_array_equal(undirected_edges, raw["num_edges"])
    for index in range(0, 1200, 97):
        sample = exp[index]
        assert torch.equal(sample.adjacency, sample.adjacency.t())
        assert not sample.adjacency.diagonal().any()
        assert sample.node_features.dtype == torch.int64 and sample.target.dtype == torch.int64


@needs_exp
def test_exp_pairs_are_1wl_indistinguishable():
    exp = data.read_exp(EXP_FILE)
    for first, second in exp.pairs[::20]:
        assert wl_colors_equal(
            exp.adjacency(first), exp.adjacency(second),
            exp.node_array("node_features", first), exp.node_array("node_features", second),
            rounds=int(exp.num_nodes[first]),
        )
    # control: the check does separate two same-sized graphs from different pairs
    assert exp.num_nodes[0] == exp.num_nodes[50]
    assert not wl_colors_equal(
        exp.adjacency(0), exp.adjacency(50),
        exp.node_array("node_features", 0), exp.node_array("node_features", 50), rounds=52,
    )


@needs_exp
def test_exp_classify_splits():
    splits = data.load_exp_classify(EXP_FILE)
    everything = data.read_exp(EXP_FILE)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 200)
    assert splits.info.kind == "graph_classification" and splits.info.num_classes == 2
    for dataset, start in [(splits.val, 0), (splits.test, 200), (splits.train, 400)]:
        for offset in [0, 1, len(dataset) - 1]:
            np.testing.assert_array_equal(dataset.adjacency(offset), everything.adjacency(start + offset))
            np.testing.assert_array_equal(
                dataset.node_array("node_features", offset), everything.node_array("node_features", start + offset)
            )
            assert dataset.target[offset] == everything.target[start + offset]


@needs_graph8c
def test_graph8c_connected_and_pairwise_non_isomorphic():
    graph8c = data.load_graph8c(GRAPH8C_FILE).test
    assert len(graph8c) == 11117 and (graph8c.num_nodes == 8).all()
    adjacency = np.stack(graph8c.graphs()).astype(np.int64)
    reach = np.linalg.matrix_power(adjacency + np.eye(8, dtype=np.int64), 7)
    assert (reach > 0).all(), "every graph is connected"
    keys = [node_signature_key(graph) for graph in adjacency]
    # distinct exact invariants prove every pair non-isomorphic
    assert len(set(keys)) == len(keys)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(adjacency), 20, replace=False):  # the key is a real invariant
        order = rng.permutation(8)
        assert node_signature_key(adjacency[index][np.ix_(order, order)]) == keys[index]


def test_missing_files_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no geng either
    with pytest.raises(FileNotFoundError, match="shared/data") as missing:
        data.load_exp_classify(tmp_path)
    assert "GNN-RNI" in str(missing.value) and str(tmp_path / "exp.npz") in str(missing.value)
    with pytest.raises(FileNotFoundError, match="geng") as missing:
        data.load_graph8c(tmp_path / "graph8c.g6")
    assert "users.cecs.anu.edu.au" in str(missing.value)
    with pytest.raises(FileNotFoundError, match="nauty"):
        data.load_graph8c(source="geng")


def test_data_directory_from_environment(tmp_path, monkeypatch):
    (tmp_path / "graph8c.g6").write_text("A_\nBw\n")
    monkeypatch.setenv("LPS_FAST_DATA", str(tmp_path))
    assert data.find_data_file("graph8c.g6") == tmp_path / "graph8c.g6"
    assert len(data.load_graph8c().test) == 2


@pytest.mark.skipif(data.find_geng() is None, reason="nauty's geng is not installed")
@needs_graph8c
def test_geng_matches_file():
    generated = data.load_graph8c(source="geng").test
    from_file = data.load_graph8c(GRAPH8C_FILE).test
    assert Counter(map(node_signature_key, generated.graphs())) == Counter(
        map(node_signature_key, from_file.graphs())
    )


# --- caching ------------------------------------------------------------------------------------


def test_cache_directory_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LPS_FAST_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LPS_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "lps_fast"
    assert _cache.resolve_cache_dir(False) is None


def test_cache_keys_cover_every_parameter():
    base = _cache.cache_key("nbody", 1, {"seed": 0, "count": 10})
    assert base == _cache.cache_key("nbody", 1, {"count": 10, "seed": 0})
    assert base != _cache.cache_key("nbody", 1, {"seed": 1, "count": 10})
    assert base != _cache.cache_key("nbody", 2, {"seed": 0, "count": 10})


def test_cache_concurrent_writers_and_corrupt_file(tmp_path):
    calls = []

    def generate():
        calls.append(1)
        time.sleep(0.05)
        return {"values": np.arange(1000.0)}

    run = functools.partial(_cache.cached_arrays, "race", 1, {"a": 1}, generate, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run(), range(4)))
    for result in results:
        np.testing.assert_array_equal(result["values"], np.arange(1000.0))
    assert [path.suffix for path in tmp_path.iterdir()] == [".npz"]  # no temporary files left
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        np.testing.assert_array_equal(run()["values"], np.arange(1000.0))
    calls.clear()
    run()
    assert calls == []  # the rewritten file is read back


# --- n-body -------------------------------------------------------------------------------------


def reference_simulation(positions, velocities, charges, steps, config):
    """Straightforward per-system leapfrog with explicit particle loops."""
    x, v = positions.copy(), velocities.copy()
    n = len(charges)

    def force(x):
        total = np.zeros_like(x)
        for i in range(n):
            for j in range(n):
                if i != j:
                    difference = x[i] - x[j]
                    total[i] += charges[i] * charges[j] * difference / np.linalg.norm(difference) ** 3
        return np.clip(total, -config.max_force, config.max_force)

    for _ in range(steps):
        v = v + 0.5 * config.dt * force(x)
        x = x + config.dt * v
        v = v + 0.5 * config.dt * force(x)
    return x, v


def test_nbody_simulator_matches_plain_loops():
    config = data.NBodyConfig()
    positions, velocities, charges = nbody.initial_conditions(3, seed=1, config=config)
    small = data.NBodyConfig(sample_every=100)
    result = data.simulate_charged_nbody(positions, velocities, charges, n_samples=2, config=small)
    for system in range(3):
        x, v = reference_simulation(positions[system], velocities[system], charges[system], 200, config)
        np.testing.assert_allclose(result.positions[1, system], x, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.velocities[1, system], v, rtol=1e-9, atol=1e-12)


def test_nbody_physics_sanity():
    config = data.NBodyConfig()
    positions, velocities, charges = nbody.initial_conditions(200, seed=0, config=config)
    assert set(np.unique(charges)) == {-1.0, 1.0}
    assert 0.35 < (charges > 0).mean() < 0.65
    np.testing.assert_allclose(np.linalg.norm(velocities, axis=-1), 0.5, rtol=1e-12)
    assert abs(positions.std() - 1.0) < 0.05 and abs(positions.mean()) < 0.05
    trajectories = data.simulate_charged_nbody(positions, velocities, charges, config.target_sample + 1, config)
    assert trajectories.positions.shape == (41, 200, 5, 3)
    # pairwise antisymmetric forces conserve total momentum while no component is clipped
    unclipped = ~trajectories.clipped
    momentum = trajectories.velocities[:, unclipped].sum(axis=-2)
    np.testing.assert_allclose(momentum, np.broadcast_to(velocities[unclipped].sum(-2), momentum.shape), atol=1e-10)
    # the centre of mass then moves in a straight line: after (s + 1) * 100 steps of dt
    elapsed = (config.target_sample + 1) * config.sample_every * config.dt
    centre = positions[unclipped].mean(-2) + elapsed * velocities[unclipped].mean(-2)
    np.testing.assert_allclose(trajectories.positions[-1, unclipped].mean(-2), centre, atol=1e-9)


def test_nbody_energy_drift_is_small_and_second_order():
    report = data.nbody_energy_drift(n_systems=64, seed=0)
    assert report.median_unclipped < 1e-4 and report.max_unclipped < 1e-2, str(report)
    assert 0.2 < report.clipped_fraction < 0.8, str(report)  # the spec's clip fires often
    coarse = data.nbody_energy_drift(
        n_systems=64, seed=0,
        config=data.NBodyConfig(dt=0.002, n_steps=2500, sample_every=50, input_sample=15, target_sample=20),
    )
    both = ~report.clipped & ~coarse.clipped
    ratio = np.median(coarse.drift[both]) / np.median(report.drift[both])
    assert 3.0 < ratio < 5.0, f"doubling dt should quadruple the drift, got x{ratio:.2f}"


def test_nbody_determinism_prefix_and_cache(tmp_path, monkeypatch):
    first = data.load_nbody(n_train=12, n_val=4, n_test=4, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("nbody-*.npz"))) == 3  # one file per split
    again = data.load_nbody(n_train=12, n_val=4, n_test=4, seed=3, cache_dir=False)
    shorter = data.load_nbody(n_train=5, n_val=4, n_test=4, seed=3, cache_dir=False)
    other = data.load_nbody(n_train=12, n_val=4, n_test=4, seed=4, cache_dir=False)
    for key, value in first.train.arrays.items():
        np.testing.assert_array_equal(value, again.train.arrays[key])
        np.testing.assert_array_equal(value[:5], shorter.train.arrays[key])
    assert not np.array_equal(first.train.arrays["positions"], other.train.arrays["positions"])
    assert not np.array_equal(first.train.arrays["positions"][:4], first.val.arrays["positions"])

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(nbody, "generate_nbody_split", fail)
    cached = data.load_nbody(n_train=12, n_val=4, n_test=4, seed=3, cache_dir=tmp_path)
    for split in ("train", "val", "test"):
        for key, value in first[split].arrays.items():
            np.testing.assert_array_equal(value, cached[split].arrays[key])


def test_nbody_samples_and_batches():
    splits = data.load_nbody(n_train=10, n_val=2, n_test=2, seed=0, cache_dir=False)
    dataset = splits.train
    info = splits.info
    assert (info.kind, info.point_channels, info.edge_feature_dim, info.node_feature_dim) == ("regression", 2, 1, 1)
    sample = dataset[3]
    arrays = dataset.arrays
    assert sample.points.shape == (5, 3, 2) and sample.points.dtype == torch.float32
    np.testing.assert_allclose(sample.points[..., 0], arrays["positions"][3], rtol=1e-6)
    np.testing.assert_allclose(sample.points[..., 1], arrays["velocities"][3], rtol=1e-6)
    np.testing.assert_allclose(sample.target, arrays["target_positions"][3], rtol=1e-6)
    charges = arrays["charges"][3]
    expected_edges = np.outer(charges, charges) * (1 - np.eye(5))
    np.testing.assert_array_equal(sample.edge_features[..., 0].numpy(), expected_edges)
    assert sample.adjacency.sum() == 20 and not sample.adjacency.diagonal().any()

    indices = [7, 0, 3]
    fast = dataset.batch(indices)
    slow = data.collate_dense([dataset[i] for i in indices])
    for name in ("points", "edge_features", "target", "node_features", "adjacency", "mask", "num_nodes", "index"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.points.shape == (3, 5, 3, 2) and fast.target.shape == (3, 5, 3)

    batches = list(dataset.loader(batch_size=4, shuffle=True, seed=1))
    assert [batch.batch_size for batch in batches] == [4, 4, 2]
    assert sorted(torch.cat([batch.index for batch in batches]).tolist()) == list(range(10))
    repeat = list(dataset.loader(batch_size=4, shuffle=True, seed=1))
    assert all(torch.equal(a.index, b.index) for a, b in zip(batches, repeat))
    # a DataLoader with the plain collate function gives the same batches
    plain = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=data.collate_dense)))
    assert torch.equal(plain.points, dataset.batch(range(4)).points)


def test_nbody_full_size_generation_time():
    start = time.perf_counter()
    splits = data.load_nbody(cache_dir=False)
    elapsed = time.perf_counter() - start
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3000, 2000, 2000)
    assert elapsed < 60, f"full n-body generation took {elapsed:.1f} s"


# --- PATTERN ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pattern():
    return data.load_pattern(n_train=150, n_val=20, n_test=20, seed=0, cache_dir=False)


def test_pattern_community_statistics(small_pattern):
    config = data.PatternConfig()
    statistics = data.sbm_statistics(small_pattern.train)
    assert abs(statistics.intra - config.p_intra) < 0.01, str(statistics)
    assert abs(statistics.inter - config.p_inter) < 0.01, str(statistics)
    assert abs(statistics.pattern_rest - config.p_pattern_rest) < 0.01, str(statistics)
    shared = small_pattern.meta["pattern"]
    assert statistics.pattern_internal == pytest.approx(shared[np.triu_indices(20, 1)].mean())
    assert abs(statistics.pattern_internal - config.p_pattern) < 0.15  # one draw of 190 pairs
    assert 45 <= statistics.min_nodes and statistics.max_nodes <= 190


def test_pattern_graphs_plant_the_same_pattern(small_pattern):
    shared, shared_features = small_pattern.meta["pattern"], small_pattern.meta["pattern_features"]
    for split, dataset in small_pattern.items():
        for index in range(0, len(dataset), 7):
            adjacency = dataset.adjacency(index)
            community = dataset.node_array("community", index)
            labels = dataset[index].target.numpy()
            np.testing.assert_array_equal(labels, community == 5)
            members = np.flatnonzero(labels == 1)
            assert len(members) == 20
            planted = adjacency[np.ix_(members, members)]
            assert node_signature_key(planted) == node_signature_key(shared)
            features = dataset.node_array("node_features", index)
            assert Counter(features[members].tolist()) == Counter(shared_features.tolist())
            assert set(np.unique(features)) <= {0, 1, 2}
            sizes = np.bincount(community, minlength=6)[:5]
            assert ((sizes >= 5) & (sizes <= 34)).all()


def test_pattern_determinism_prefix_and_cache(tmp_path, small_pattern):
    cached = data.load_pattern(n_train=150, n_val=20, n_test=20, seed=0, cache_dir=tmp_path)
    shorter = data.load_pattern(n_train=30, n_val=0, n_test=0, seed=0, cache_dir=tmp_path)
    reread = data.load_pattern(n_train=150, n_val=20, n_test=20, seed=0, cache_dir=tmp_path)
    other = data.load_pattern(n_train=30, n_val=0, n_test=0, seed=1, cache_dir=False)
    assert len(shorter.val) == 0
    for key, value in small_pattern.train.arrays().items():
        np.testing.assert_array_equal(value, cached.train.arrays()[key])
        np.testing.assert_array_equal(value, reread.train.arrays()[key])
    for index in range(30):
        np.testing.assert_array_equal(shorter.train.adjacency(index), small_pattern.train.adjacency(index))
    assert not np.array_equal(other.meta["pattern"], small_pattern.meta["pattern"])


def test_pattern_batches_pad_node_targets(small_pattern):
    dataset = small_pattern.val
    batch = dataset.batch(range(6))
    sizes = dataset.num_nodes[:6]
    assert batch.adjacency.shape == (6, sizes.max(), sizes.max())
    assert batch.target.shape == (6, sizes.max()) and batch.target_level == "node"
    assert (batch.target[~batch.mask] == data.IGNORE_INDEX).all()
    assert (batch.target[batch.mask] >= 0).all()
    assert batch.mask.sum(1).tolist() == sizes.tolist()
    loss = torch.nn.functional.cross_entropy(torch.zeros(6, 2, sizes.max()), batch.target)
    assert torch.isfinite(loss)


# --- CSL ----------------------------------------------------------------------------------------


def test_csl_class_structure():
    splits = data.load_csl(fold=0, seed=0, cache_dir=False)
    everything = data.GraphDataset.from_arrays(data.csl.generate_csl(seed=0), splits.info)
    assert len(everything) == 150 and (np.bincount(everything.target) == 15).all()
    spectra = {}
    for index in range(len(everything)):
        adjacency = everything.adjacency(index)
        assert (adjacency.sum(1) == 4).all()
        skip = data.CSL_SKIPS[everything.target[index]]
        position = everything.node_array("cycle_position", index)
        # relabeled node r sits at cycle position position[r]: the map is an isomorphism onto the base
        np.testing.assert_array_equal(adjacency, data.circular_skip_link(41, skip)[np.ix_(position, position)])
        rows, cols = np.nonzero(adjacency)
        gaps = Counter(((position[rows] - position[cols]) % 41).tolist())
        assert gaps == {1: 41, 40: 41, skip: 41, 41 - skip: 41}
        spectrum = np.round(np.linalg.eigvalsh(adjacency.astype(float)), 6)
        spectra.setdefault(int(everything.target[index]), set()).add(tuple(spectrum))
    # one spectrum per class (relabelings), and a different one for every class
    assert all(len(values) == 1 for values in spectra.values())
    assert len({next(iter(values)) for values in spectra.values()}) == 10


def test_csl_folds_are_stratified_and_disjoint():
    test_sets = []
    for fold in range(5):
        splits = data.load_csl(fold=fold, seed=0, cache_dir=False)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 30, 30)
        for _, dataset in splits.items():
            counts = np.bincount(dataset.target, minlength=10)
            assert (counts == counts[0]).all()
        keys = {name: {data.encode_graph6(g) for g in dataset.graphs()} for name, dataset in splits.items()}
        assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
        test_sets.append(keys["test"])
    assert len(set.union(*test_sets)) == 150
    with pytest.raises(ValueError, match="fold"):
        data.load_csl(fold=5, cache_dir=False)


# --- batching -----------------------------------------------------------------------------------


def make_samples(sizes, level="graph", rng=None):
    rng = rng or np.random.default_rng(0)
    samples = []
    for index, n in enumerate(sizes):
        adjacency = torch.from_numpy(random_graph(rng, n))
        target = torch.tensor(index % 2) if level == "graph" else torch.arange(n) % 2
        samples.append(data.GraphSample(adjacency, torch.randint(0, 3, (n,)), target, level, index=index))
    return samples


@pytest.mark.parametrize("sizes", [[1], [5, 37, 1], [63, 188]], ids=["n1", "n5-37-1", "n63-188"])
def test_collate_pads_and_masks(sizes):
    samples = make_samples(sizes, level="node")
    batch = data.collate_dense(samples)
    n = max(sizes)
    assert batch.adjacency.shape == (len(sizes), n, n) and batch.adjacency.dtype == torch.float32
    assert batch.mask.tolist() == [[r < size for r in range(n)] for size in sizes]
    for position, sample in enumerate(samples):
        size = sizes[position]
        assert torch.equal(batch.adjacency[position, :size, :size], sample.adjacency.float())
        assert batch.adjacency[position, size:].abs().sum() == 0 and batch.adjacency[position, :, size:].abs().sum() == 0
        assert torch.equal(batch.node_features[position, :size], sample.node_features)
        assert (batch.node_features[position, size:] == 0).all()
        assert torch.equal(batch.target[position, :size], sample.target)
        assert (batch.target[position, size:] == data.IGNORE_INDEX).all()
    padded = data.collate_dense(samples, pad_to=200)
    assert padded.adjacency.shape == (len(sizes), 200, 200) and padded.mask.sum() == sum(sizes)


def test_collate_graph_targets_options_and_errors():
    samples = make_samples([4, 6, 5])
    batch = data.collate_dense(samples)
    assert batch.target.tolist() == [0, 1, 0] and batch.target_level == "graph"
    assert batch.edge_features is None and batch.points is None
    assert batch.to("cpu").adjacency.shape == (3, 6, 6) and batch.batch_size == 3 and batch.max_nodes == 6
    with pytest.raises(ValueError, match="pad_to"):
        data.collate_dense(samples, pad_to=5)
    with pytest.raises(ValueError, match="target levels"):
        data.collate_dense(samples[:1] + make_samples([3], level="node"))
    with pytest.raises(ValueError, match="empty"):
        data.collate_dense([])
    unlabelled = [data.GraphSample(s.adjacency, s.node_features) for s in samples]
    assert data.collate_dense(unlabelled).target is None


def test_graph_dataset_storage_round_trip():
    rng = np.random.default_rng(1)
    for n in [0, 1, 2, 9, 64, 190]:
        adjacency = random_graph(rng, n)
        np.testing.assert_array_equal(unpack_adjacency(pack_adjacency(adjacency), n), adjacency)
    graphs = [random_graph(rng, n) for n in [3, 10, 1, 7]]
    info = data.TaskInfo(name="toy", kind="graph_classification", metric="accuracy", num_classes=2)
    features = [rng.integers(0, 2, len(graph)) for graph in graphs]
    dataset = data.GraphDataset.from_adjacency(graphs, features, info, target=np.array([0, 1, 1, 0]))
    rebuilt = data.GraphDataset.from_arrays(dataset.arrays(), info)
    picked = rebuilt.subset([3, 1])
    for source, index in [(0, 0), (3, -1)]:
        np.testing.assert_array_equal(rebuilt.adjacency(index), graphs[source])
    np.testing.assert_array_equal(picked.adjacency(0), graphs[3])
    np.testing.assert_array_equal(picked.node_array("node_features", 1), features[1])
    assert picked.target.tolist() == [0, 1]
    with pytest.raises(IndexError):
        dataset[4]
    loader = dataset.loader(batch_size=3)
    assert [batch.max_nodes for batch in loader] == [10, 7]


def test_load_task_names_and_errors(tmp_path):
    assert set(data.TASKS) == {"exp-iso", "exp-classify", "graph8c", "nbody", "pattern", "csl", "peptides-func",
                               "peptides-struct"}
    splits = data.load_task("csl", cache_dir=tmp_path, fold=2)
    assert splits.info.name == "csl" and len(splits.test) == 30
    splits = data.load_task("nbody", n_train=4, n_val=2, n_test=2, cache_dir=False)
    assert [len(dataset) for _, dataset in splits.items()] == [4, 2, 2]
    with pytest.raises(ValueError, match="unknown task"):
        data.load_task("mnist")
    with pytest.raises(ValueError, match="fixed splits"):
        data.load_task("csl", n_train=10)
    with pytest.raises(ValueError, match="generated"):
        data.load_task("pattern", data=tmp_path)
    if EXP_FILE.is_file():
        assert data.load_task("EXP_classify", data=SHARED_DATA).info.kind == "graph_classification"


# --- PyTorch Geometric --------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is not None, reason="torch_geometric is installed")
def test_pyg_missing_gives_clear_error():
    from lps_fast.data import pyg

    assert not pyg.pyg_available()
    with pytest.raises(ImportError, match="pip install torch_geometric"):
        pyg.to_pyg(make_samples([3])[0])


def test_pyg_round_trip():
    pytest.importorskip("torch_geometric")
    from lps_fast.data import pyg

    graphs = make_samples([4, 7, 1])
    restored = [pyg.from_pyg(pyg.to_pyg(sample)) for sample in graphs]
    for original, back in zip(graphs, restored):
        assert torch.equal(original.adjacency, back.adjacency)
        assert torch.equal(original.node_features, back.node_features)
        assert torch.equal(original.target, back.target) and back.target_level == "graph"
    dense = pyg.dense_batch_from_pyg(pyg.to_pyg_batch(graphs))
    expected = data.collate_dense(graphs)
    for name in ("adjacency", "node_features", "mask", "target"):
        assert torch.equal(getattr(dense, name), getattr(expected, name)), name

    systems = data.load_nbody(n_train=3, n_val=1, n_test=1, cache_dir=False).train
    dense = pyg.dense_batch_from_pyg(pyg.to_pyg_batch(systems))
    expected = systems.batch(range(3))
    for name in ("adjacency", "node_features", "edge_features", "points", "target"):
        assert torch.equal(getattr(dense, name), getattr(expected, name)), name
    assert dense.target_level == "node"
