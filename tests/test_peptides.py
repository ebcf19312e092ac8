"""Molecular graphs from SMILES, the LRGB peptide files, average precision, and the peptide
tasks trained through the command line on a small fixture in the published format."""

from __future__ import annotations

import csv
import gzip
import json
import pickle

import numpy as np
import pytest
import torch

from lps_fast.train.vit_ps import (AP_BINS, AP_LOGIT_RANGE, average_precision, histogram_average_precision,
                                   logit_histogram)

# real peptides (met- and leu-enkephalin, angiotensin II, substance P, oxytocin's chain, ...)
SEQUENCES = ("YGGFM", "YGGFL", "DRVYIHPF", "RPKPQQFFGLM", "GGG", "ACDEF", "KLVFF", "WAGGDASGE", "HSDAVFTD",
             "GIGAVLKV", "CYIQNCPLG", "PHPFHL")
STRUCT_COLUMNS = ("Inertia_mass_a", "Inertia_mass_b", "Inertia_mass_c", "Inertia_valence_a", "Inertia_valence_b",
                  "Inertia_valence_c", "length_a", "length_b", "length_c", "Spherocity", "Plane_best_fit")
SPLITS = {"train": np.arange(8), "val": np.array([8, 9]), "test": np.array([10, 11])}


@pytest.fixture(scope="module")
def lrgb_dir(tmp_path_factory):
    """Both tasks' CSVs and split pickles, as LRGB publishes them, for 12 peptides."""
    chem = pytest.importorskip("rdkit.Chem")
    folder = tmp_path_factory.mktemp("lrgb")
    rng = np.random.default_rng(0)
    smiles = [chem.MolToSmiles(chem.MolFromSequence(sequence)) for sequence in SEQUENCES]
    labels = rng.integers(0, 2, size=(len(smiles), 10))
    labels[:, 3] = 0  # one label without positives: left out of the average precision
    with gzip.open(folder / "peptide_multi_class_dataset.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "sequence", "labels"])
        for text, sequence, row in zip(smiles, SEQUENCES, labels):
            writer.writerow([text, sequence, str([int(value) for value in row])])
    targets = rng.normal(3.0, 2.0, size=(len(smiles), len(STRUCT_COLUMNS)))
    with gzip.open(folder / "peptide_structure_dataset.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "sequence"] + list(STRUCT_COLUMNS))
        for text, sequence, row in zip(smiles, SEQUENCES, targets):
            writer.writerow([text, sequence] + [repr(float(value)) for value in row])
    for name in ("splits_random_stratified_peptide.pickle", "splits_random_stratified_peptide_structure.pickle"):
        with open(folder / name, "wb") as handle:
            pickle.dump(SPLITS, handle)
    return {"dir": folder, "smiles": smiles, "labels": labels, "targets": targets}


# ---------------------------------------------------------------------------------------------
# Molecules


def test_atom_and_bond_features_follow_ogb():
    pytest.importorskip("rdkit")
    from lps_fast.data.molecules import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, smiles_to_graph

    assert ATOM_FEATURE_DIMS == (119, 5, 12, 12, 10, 6, 6, 2, 2) and BOND_FEATURE_DIMS == (5, 6, 2)
    acetate = smiles_to_graph("CC(=O)[O-]")
    # atomic number - 1, chirality, total degree, charge + 5, total H, radicals, hybridization (the
    # carboxylate oxygens are conjugated: SP2), aromatic, ring
    assert acetate.node_features.tolist() == [[5, 0, 4, 5, 3, 0, 2, 0, 0], [5, 0, 3, 5, 0, 0, 1, 0, 0],
                                              [7, 0, 1, 5, 0, 0, 1, 0, 0], [7, 0, 1, 4, 0, 0, 1, 0, 0]]
    assert acetate.edge_index.tolist() == [[0, 1, 1, 2, 1, 3], [1, 0, 2, 1, 3, 1]]
    assert acetate.edge_features.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]]
    benzene = smiles_to_graph("c1ccccc1")
    assert benzene.node_features[:, 6:].tolist() == [[1, 1, 1]] * 6  # SP2, aromatic, in a ring
    assert benzene.edge_features.tolist() == [[3, 0, 1]] * 12  # aromatic, no stereo, conjugated
    alanine = smiles_to_graph("C[C@@H](N)C(=O)O")
    assert alanine.node_features[1, 1] in (1, 2)  # a tetrahedral chirality tag
    with pytest.raises(ValueError, match="cannot parse"):
        smiles_to_graph("C1CC(")


# ---------------------------------------------------------------------------------------------
# Average precision


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.3, 0.5], [0.8, 0.2, 0.5], [0.7, 0.1, 0.2], [0.6, 0.4, 0.1]])
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]])
    # label 0: ranks 1 (hit) 2 3 (hit) 4 -> (1/2)(1/1) + (1/2)(2/3) = 5/6
    # label 1: no positive -> left out
    # label 2: the top two tie (one hit: precision 1/2 over recall 1/2), the last hit at rank 4 -> 1/4 + 1/4
    assert average_precision(scores, labels) == pytest.approx((5 / 6 + 1 / 2) / 2, abs=1e-12)
    labels[1, 0] = float("nan")  # unlabelled: dropped from label 0 -> 1 and 2/2 -> AP 1
    assert average_precision(scores, labels) == pytest.approx((1.0 + 1 / 2) / 2, abs=1e-12)
    assert np.isnan(average_precision(scores, torch.zeros(4, 3)))
    with pytest.raises(ValueError, match=r"\(G, L\)"):
        average_precision(scores, labels[:, :2])


def test_histogram_average_precision_is_exact_on_separated_logits():
    generator = torch.Generator().manual_seed(0)
    width = 2 * AP_LOGIT_RANGE / AP_BINS
    # logits at bin centres, distinct bins per label: the histogram keeps every ordering
    bins = torch.stack([torch.randperm(AP_BINS, generator=generator)[:40] for _ in range(5)], dim=1)
    logits = AP_LOGIT_RANGE - (bins.double() + 0.5) * width
    labels = (torch.rand(40, 5, generator=generator) < 0.3).double()
    halves = logit_histogram(logits[:25], labels[:25]) + logit_histogram(logits[25:], labels[25:])
    assert histogram_average_precision(halves) == pytest.approx(average_precision(logits, labels), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The LRGB files


def test_load_peptides_func(lrgb_dir):
    from lps_fast.data import load_task
    from lps_fast.data.molecules import smiles_to_graph
    from lps_fast.data.peptides import molecule_inputs

    splits = load_task("peptides-func", data=lrgb_dir["dir"])
    info = splits.info
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    assert (info.num_classes, info.node_feature_dim, info.edge_feature_dim) == (10, 174, 13)
    sample = splits.test[1]  # graph 11 of the file
    graph = smiles_to_graph(lrgb_dir["smiles"][11])
    assert info.max_nodes == max(smiles_to_graph(text).num_nodes for text in lrgb_dir["smiles"])
    assert torch.equal(sample.node_features, torch.from_numpy(graph.node_features))
    assert torch.equal(sample.target, torch.tensor(lrgb_dir["labels"][11], dtype=torch.float32))
    source, target = graph.edge_index
    assert int(sample.adjacency.sum()) == len(source) and bool(sample.adjacency[source, target].all())
    assert torch.equal(sample.edge_features[source, target], torch.from_numpy(graph.edge_features) + 1)
    batch = splits.train.batch([0, 4])  # 5 and 3 residues: padded
    inputs = molecule_inputs(batch)
    n = batch.max_nodes
    assert inputs["nodes"].shape == (2, n, 174) and inputs["edges"].shape == (2, n, n, 14)
    assert torch.equal(inputs["nodes"].sum(-1), 9.0 * batch.mask)  # one hot per atom feature
    bonded = inputs["edges"][..., 0] > 0
    assert torch.equal(inputs["edges"][..., 1:].sum(-1), 3.0 * bonded)  # one hot per bond feature
    assert torch.equal(bonded, batch.adjacency > 0)


def test_load_peptides_struct_standardises_targets(lrgb_dir):
    from lps_fast.data import load_task

    splits = load_task("peptides-struct", data=lrgb_dir["dir"])
    assert splits.info.kind == "regression"
    targets = torch.stack([splits[name][i].target for name in ("train", "val", "test")
                           for i in range(len(splits[name]))]).double()
    raw = torch.tensor(lrgb_dir["targets"])
    expected = (raw - raw.mean(0)) / raw.std(0)  # sample standard deviation, as LRGB
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)


def test_missing_and_bad_files_say_what_to_do(lrgb_dir, tmp_path):
    from lps_fast.data.peptides import load_peptides

    with pytest.raises(FileNotFoundError) as error:
        load_peptides("peptides-func", data=tmp_path)
    message = str(error.value)
    for text in ("peptide_multi_class_dataset.csv.gz", "splits_random_stratified_peptide.pickle", "--data",
                 str(tmp_path)):
        assert text in message
    # LRGB's own layout is found too
    nested = tmp_path / "peptides_functional"
    (nested / "raw").mkdir(parents=True)
    (nested / "raw" / "peptide_multi_class_dataset.csv.gz").write_bytes(
        (lrgb_dir["dir"] / "peptide_multi_class_dataset.csv.gz").read_bytes())
    with open(nested / "splits_random_stratified_peptide.pickle", "wb") as handle:
        pickle.dump({"train": np.arange(3), "val": np.arange(3, 20), "test": np.arange(2)}, handle)
    with pytest.raises(ValueError, match=r"val indices must lie in \[0, 12\)"):
        load_peptides("peptides-func", data=tmp_path, cache_dir=False)
    with open(nested / "splits_random_stratified_peptide.pickle", "wb") as handle:
        pickle.dump({"train": print}, handle)  # not an index array: never called, refused
    with pytest.raises(ValueError, match="not a split file"):
        load_peptides("peptides-func", data=tmp_path, cache_dir=False)


# ---------------------------------------------------------------------------------------------
# Training


def _tiny_model_options(out):
    return ["--width", "32", "--layers", "1", "--heads", "2", "--vit-grid", "3", "--batch-size", "4",
            "--eval-samples", "2", "--dist-width", "16", "--dist-layers", "2", "--threads", "1", "--quiet",
            "--out", str(out)]


@pytest.mark.parametrize("task,metric", [("peptides-func", "average_precision"), ("peptides-struct", "mae")])
def test_train_through_the_cli(lrgb_dir, tmp_path, task, metric, capsys):
    from lps_fast.cli import main

    out = tmp_path / "run"
    code = main(["train", task, "--data", str(lrgb_dir["dir"]), "--epochs", "2"] + _tiny_model_options(out))
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    value = metrics["test"][metric]
    assert metrics["metric"] == metric and metrics["backbone"] == "vit-ps" and metrics["steps"] == 4
    assert (0.0 <= value <= 1.0) if metric == "average_precision" else value > 0.0
    config = json.loads((out / "config.json").read_text())
    assert config["pad_mode"] == ("reflect" if task == "peptides-func" else "circular") and config["centering"]
    code = main(["eval", str(out / "best.pt"), "--data", str(lrgb_dir["dir"]), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["test"][metric] == pytest.approx(value, rel=1e-9)


def test_paper_preset_for_peptides():
    from lps_fast.train import TrainConfig, resolve

    assert resolve(TrainConfig(task="peptides-func")).limit == 1000  # the CPU-sized default
    resolved = resolve(TrainConfig(task="peptides-func", preset="paper", lr=3e-5))
    assert resolved.lr == 3e-5  # an explicit option wins over the preset
    assert resolved.limit is None  # every graph
    assert (resolved.backbone, resolved.vit_model, resolved.width, resolved.vit_grid) == (
        "vit-ps", "vit_base_patch16_224", 768, 14)
    assert (resolved.samples, resolved.eval_samples, resolved.batch_size, resolved.weight_decay) == (1, 10, 128, 0.1)
    assert (resolved.epochs, resolved.warmup, resolved.schedule, resolved.patch_dropout) == (589, 0.1, "linear", 0.5)
    assert (resolved.pad_mode, resolved.centering, resolved.tau) == ("reflect", True, 0.01)
    struct = resolve(TrainConfig(task="peptides-struct", preset="paper"))
    assert (struct.pad_mode, struct.random_patch_dropout) == ("circular", True)
    with pytest.raises(ValueError, match="no paper setting for task csl"):
        resolve(TrainConfig(task="csl", preset="paper"))


def test_missing_data_through_the_cli(tmp_path, capsys):
    from lps_fast.cli import main

    assert main(["train", "peptides-struct", "--data", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "peptide_structure_dataset.csv.gz" in err and "splits_random_stratified_peptide_structure.pickle" in err


def test_tasks_lists_the_peptides_with_the_paper_figures():
    from lps_fast.cli import _tasks_table

    table = _tasks_table()
    for text in ("peptides-func", "AP 0.6575", "peptides-struct", "MAE 0.2559", "average_precision", "mae"):
        assert text in table
