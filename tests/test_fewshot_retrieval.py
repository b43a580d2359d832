"""Few-shot episodes, retrieval and kNN explanations: predictions against brute force, flows, errors, examples."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from models import conv4
from torch import Tensor, nn

import naflow_fx.fewshot as fewshot_module
from naflow_fx import ConfigError, InputError, InputTypeError, SimilarityTarget, TargetError, compile_naflow
from naflow_fx.fewshot import EpisodeExplanation, explain_episode
from naflow_fx.knn import KNNExplanation, KNNTarget, explain_knn
from naflow_fx.retrieval import MatchExplanation, explain_match

SIZE = 16
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def images(b: int, seed: int) -> Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return conv4(hidden=8, size=SIZE)  # flattened embedding [B, 8]


@pytest.fixture(scope="module")
def nf(encoder):
    return compile_naflow(encoder, images(1, 0))


def embed(encoder: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return encoder(x)


def assert_finite_flow(flow, nf, batch: int) -> None:
    assert flow.layers == nf.layers
    for name in nf.layers:
        m = flow.maps[name]
        assert m.shape[0] == batch, name
        assert bool(torch.isfinite(m).all()), name
        assert bool(torch.isfinite(flow.bpfm[name]).all()), name


# ------------------------------------------------------------------------------------------ episodes

# a 3-way 2-shot episode with non-contiguous labels given in a shuffled order
LABELS = torch.tensor([7, 2, 7, 5, 2, 5])


@pytest.fixture(scope="module")
def episode(nf) -> EpisodeExplanation:
    return explain_episode(nf, images(6, 1), LABELS, images(3, 2))


def hand_logits(encoder, support, labels, query, temperature=10.0):
    s, q = embed(encoder, support), embed(encoder, query)
    classes = sorted(set(labels.tolist()))
    protos = torch.stack([s[labels == c].mean(0) for c in classes])
    logits = torch.tensor(
        [[temperature * float(F.cosine_similarity(q[i], p, dim=0)) for p in protos] for i in range(len(q))]
    )
    return classes, protos, logits


def test_episode_prediction_matches_hand_computed_prototypes(episode, encoder):
    classes, protos, logits = hand_logits(encoder, images(6, 1), LABELS, images(3, 2))
    assert episode.classes.tolist() == classes == [2, 5, 7]
    torch.testing.assert_close(episode.prototypes, protos)
    torch.testing.assert_close(episode.logits, logits, rtol=1e-5, atol=1e-5)
    assert episode.prediction.tolist() == [classes[i] for i in logits.argmax(1).tolist()]
    torch.testing.assert_close(episode.query_embeddings, embed(encoder, images(3, 2)))


def test_temperature_scales_the_logits_only(nf, episode):
    other = explain_episode(nf, images(6, 1), LABELS.tolist(), images(3, 2), temperature=2.5, explain_support=False)
    torch.testing.assert_close(other.logits, episode.logits / 4, rtol=1e-5, atol=1e-6)
    assert other.prediction.tolist() == episode.prediction.tolist()
    assert other.support_flows == []


def test_query_flow_scores_equal_the_similarity_target_on_the_prototype(episode):
    cols = [episode.classes.tolist().index(int(c)) for c in episode.prediction]
    target = SimilarityTarget(episode.prototypes[cols])
    emb = episode.query_embeddings
    torch.testing.assert_close(episode.flow.output, emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(episode.flow.scores, target(emb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(episode.flow.scores.abs(), torch.ones(3))
    assert episode.query_flow() is episode.flow


def test_every_layer_gets_finite_maps_for_query_and_support_flows(nf, episode):
    assert_finite_flow(episode.flow, nf, 3)
    assert len(episode.support_flows) == 3
    for q, (idx, flow) in enumerate(zip(episode.support_indices, episode.support_flows)):
        assert idx.tolist() == (LABELS == episode.prediction[q]).nonzero()[:, 0].tolist()
        assert_finite_flow(flow, nf, 2)
        target = SimilarityTarget(episode.query_embeddings[q])
        torch.testing.assert_close(flow.scores, target(episode.support_embeddings[idx]), rtol=1e-5, atol=1e-6)
    # the batched support flows equal one call per query
    alone = nf(episode.support[episode.support_indices[0]], SimilarityTarget(episode.query_embeddings[0]))
    for name in nf.layers:
        torch.testing.assert_close(episode.support_flows[0].maps[name], alone.maps[name], rtol=1e-4, atol=1e-5)


def test_requesting_another_prototype(nf, episode):
    other = next(c for c in episode.classes.tolist() if c != int(episode.prediction[0]))
    flow = episode.query_flow(other)
    assert episode.query_flow(other) is flow  # cached
    col = episode.classes.tolist().index(other)
    target = SimilarityTarget(episode.prototypes[col])
    torch.testing.assert_close(flow.scores, target(episode.query_embeddings), rtol=1e-5, atol=1e-6)
    assert_finite_flow(flow, nf, 3)
    sup = episode.support_flow(0, other)
    assert_finite_flow(sup, nf, 2)
    assert episode.support_flow(0) is episode.support_flows[0]
    with pytest.raises(TargetError, match="not in this episode"):
        episode.query_flow(3)
    everything = explain_episode(nf, images(6, 1), LABELS, images(3, 2), classes="all", explain_support=False)
    assert sorted(everything.class_flows) == [2, 5, 7]


def test_a_compiled_naflow_is_never_recompiled(nf, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("compile_naflow called")

    monkeypatch.setattr(fewshot_module, "compile_naflow", boom)
    ep = explain_episode(nf, images(4, 3), [0, 0, 1, 1], images(1, 4))
    assert ep.naflow is nf
    assert explain_match(nf, images(1, 4), images(3, 5)).naflow is nf
    assert explain_knn(nf, images(1, 4), torch.randn(4, 8), [0, 1, 0, 1], k=2).naflow is nf


def test_an_encoder_module_is_compiled_with_the_requested_layers(encoder):
    ep = explain_episode(encoder, images(2, 3), [0, 1], images(1, 4)[0], layers="blocks")
    assert ep.naflow.layers == ["features.3", "features.7", "features.11", "features.14"]
    assert ep.flow.layers == ep.naflow.layers and ep.logits.shape == (1, 2)


# ------------------------------------------------------------------------------------------ retrieval


def test_retrieval_top_k_equals_brute_force_cosine_ranking(nf, encoder):
    query, gallery = images(2, 6), images(7, 7)
    m = explain_match(nf, query, gallery, k=3, batch_size=3)
    assert isinstance(m, MatchExplanation)
    q, g = embed(encoder, query), embed(encoder, gallery)
    sims = torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in g] for a in q])
    expected = [sorted(range(7), key=lambda j, i=i: -float(sims[i, j]))[:3] for i in range(2)]
    assert m.indices.tolist() == expected
    torch.testing.assert_close(m.similarities, sims.gather(1, m.indices), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.gallery_embeddings, g)
    # flows for both sides, one row per (query, rank) pair
    assert_finite_flow(m.query_flow, nf, 6)
    assert_finite_flow(m.match_flow, nf, 6)
    flat = m.indices.reshape(-1)
    torch.testing.assert_close(m.query_flow.scores, SimilarityTarget(g[flat])(q.repeat_interleave(3, 0)))
    torch.testing.assert_close(m.match_flow.output, g[flat], rtol=1e-5, atol=1e-6)
    # each match is explained towards its own query (its score Σω is ±1 whatever the pairing: compare the maps)
    own = nf(gallery[flat], SimilarityTarget(q.repeat_interleave(3, 0)))
    for name in nf.layers:
        torch.testing.assert_close(m.match_flow.maps[name], own.maps[name])
    assert not torch.equal(
        own.maps[nf.last_layer], nf(gallery[flat], SimilarityTarget(q.repeat(3, 1))).maps[nf.last_layer]
    )
    qf, mf = m.pair(1, 2)
    torch.testing.assert_close(qf.maps[nf.last_layer], m.query_flow.maps[nf.last_layer][5:6])
    torch.testing.assert_close(mf.maps[nf.last_layer], m.match_flow.maps[nf.last_layer][5:6])
    again = explain_match(nf, query, gallery, k=3, gallery_embeddings=g, explain_matches=False)
    assert again.indices.tolist() == expected and again.match_flow is None


# ------------------------------------------------------------------------------------------ kNN


def test_knn_prediction_equals_brute_force_weighted_vote(nf, encoder):
    x = images(3, 8)
    bank = embed(encoder, images(12, 9)) + 0.05 * torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2] * 4)
    k, tau = 5, 0.1
    res = explain_knn(nf, x, bank, labels, k=k, tau=tau)
    assert isinstance(res, KNNExplanation)
    emb = embed(encoder, x)
    for b in range(3):
        sims = [float(F.cosine_similarity(emb[b], bank[j], dim=0)) for j in range(12)]
        top = sorted(range(12), key=lambda j: -sims[j])[:k]
        weight = {j: torch.exp(torch.tensor(sims[j] / tau, dtype=torch.float64)) for j in top}
        votes = [sum(weight[j] for j in top if labels[j] == c) for c in range(3)]
        assert res.neighbours[b].tolist() == top
        expected = torch.stack([torch.as_tensor(v) for v in votes]).double()
        torch.testing.assert_close(res.class_scores[b], expected, rtol=1e-5, atol=0)
        assert int(res.prediction[b]) == max(range(3), key=lambda c: float(votes[c]))
    assert_finite_flow(res.flow, nf, 3)
    torch.testing.assert_close(res.flow.scores, torch.ones(3))


def test_knn_target_is_the_normalised_weighted_similarity(nf, encoder):
    """∇ KNNTarget = ∇ [Σ_{j ∈ topK ∩ ĉ} w_j cos(v, b_j)] / |score| with w_j = exp(s_j/τ) unshifted."""
    x = images(2, 10)
    bank, labels, tau = torch.randn(10, 8, generator=torch.Generator().manual_seed(2)), torch.arange(10) % 2, 0.05
    res = explain_knn(nf, x, bank, labels, k=4, tau=tau)
    v = embed(encoder, x).requires_grad_(True)
    grad = torch.autograd.grad(res.target(v).sum(), v)[0]
    vv = v.detach().clone().requires_grad_(True)
    cos = F.cosine_similarity(vv[:, None, :], bank[res.neighbours], dim=-1)  # [B, k]
    w = torch.exp(cos.detach().double() / tau).float() * (res.neighbour_labels == res.prediction[:, None])
    score = (w * cos).sum(1)
    expected = torch.autograd.grad((score / score.detach().abs()).sum(), vv)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert "KNNTarget" in repr(res.target)
    assert isinstance(res.target, KNNTarget)


# ------------------------------------------------------------------------------------------ errors


def test_error_messages_are_actionable(nf):
    s, q = images(4, 11), images(2, 12)
    with pytest.raises(InputError, match="one label per image"):
        explain_episode(nf, s, [0, 0, 1], q)
    with pytest.raises(InputError, match="integer class labels"):
        explain_episode(nf, s, torch.tensor([0.0, 0.0, 1.0, 1.0]), q)
    with pytest.raises(InputError, match="same"):
        explain_episode(nf, s, [0, 0, 1, 1], torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match="empty"):
        explain_episode(nf, s[:0], [], q)
    with pytest.raises(ConfigError, match="temperature"):
        explain_episode(nf, s, [0, 0, 1, 1], q, temperature=0)
    with pytest.raises(ConfigError, match="already compiled"):
        explain_episode(nf, s, [0, 0, 1, 1], q, layers="blocks")
    with pytest.raises(InputTypeError):
        explain_episode("encoder", s, [0, 0, 1, 1], q)
    with pytest.raises(TargetError, match=r"outputs embeddings \[B, D\]|embeddings \[B, D\]"):
        explain_episode(nn.Conv2d(3, 4, 3), s, [0, 0, 1, 1], q)

    with pytest.raises(InputError, match="gallery is empty"):
        explain_match(nf, q, s[:0])
    with pytest.raises(TargetError, match="between 1 and the gallery size 4"):
        explain_match(nf, q, s, k=5)
    with pytest.raises(TargetError, match="between 1"):
        explain_match(nf, q, s, k=0)
    with pytest.raises(InputError, match=r"gallery_embeddings has shape \(4, 3\)"):
        explain_match(nf, q, s, gallery_embeddings=torch.randn(4, 3))

    bank = torch.randn(6, 8)
    with pytest.raises(InputError, match="5 dimensions but the model embeds into 8"):
        explain_knn(nf, q, torch.randn(6, 5), [0, 1] * 3, k=2)
    with pytest.raises(InputError, match="one label per image"):
        explain_knn(nf, q, bank, [0, 1], k=2)
    with pytest.raises(TargetError, match="lower k"):
        explain_knn(nf, q, bank, [0, 1] * 3, k=7)
    with pytest.raises(InputError, match="non-empty"):
        explain_knn(nf, q, bank[:0], [], k=1)
    with pytest.raises(ConfigError, match="tau"):
        explain_knn(nf, q, bank, [0, 1] * 3, k=2, tau=-1.0)
    with pytest.raises(TargetError, match="num_classes"):
        explain_knn(nf, q, bank, [0, 1] * 3, k=2, num_classes=1)
    with pytest.raises(TargetError, match=r"bank_labels must be class indices ≥ 0; got -5: number the bank's classes"):
        explain_knn(nf, q, bank, [-5, -4] * 3, k=2)


# ------------------------------------------------------------------------------------------ examples


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"naflow_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_pngs(paths, folder) -> None:
    assert paths and all(os.path.dirname(p) == str(folder) for p in paths)
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fewshot_example_runs(tmp_path, capsys):
    """The random-weight set-up (conv4, synthetic coloured shapes) at a tiny size."""
    main = load_example("fewshot").main
    args = ["--out", str(tmp_path), "--arch", "conv4", "--ways", "2", "--shots", "2", "--size", "16", "--plot", "1"]
    paths = main(args)
    assert_pngs(paths, tmp_path)
    out = capsys.readouterr().out
    assert f"wrote {paths[0]}" in out and "random-weight conv4" in out


def test_retrieval_example_runs(tmp_path, capsys):
    """The random-weight set-up (conv4, synthetic coloured shapes) at a tiny size."""
    main = load_example("retrieval").main
    args = ["--out", str(tmp_path), "--arch", "conv4", "--classes", "2", "--per-class", "2", "--queries", "1"]
    paths = main([*args, "--k", "2", "--size", "16"])
    assert_pngs(paths, tmp_path)
    out = capsys.readouterr().out
    assert f"wrote {paths[0]}" in out and "random-weight conv4" in out


def test_fewshot_example_with_the_trained_shapes_model(tmp_path, capsys):
    """The default encoder is the embedded trained model on its dataset: its prediction is right."""
    from naflow_fx.data.shapes import CLASSES

    main = load_example("fewshot").main
    paths = main(["--out", str(tmp_path), "--ways", "2", "--shots", "1", "--plot", "1"])
    assert_pngs(paths, tmp_path)
    out = capsys.readouterr().out
    assert "trained shapes model" in out and "at 96 px" in out
    line = next(row for row in out.splitlines() if row.startswith("query 0:"))
    true, predicted = line.split("true ")[1].split(",")[0], line.split("predicted ")[1].split(",")[0]
    assert true in CLASSES and predicted == true, line


def test_retrieval_example_with_the_trained_shapes_model(tmp_path, capsys):
    """The default encoder is the embedded trained model: the top matches are of the query's class."""
    from naflow_fx.data.shapes import CLASSES

    main = load_example("retrieval").main
    args = ["--out", str(tmp_path), "--classes", "2", "--per-class", "3", "--queries", "1", "--k", "2"]
    paths = main(args)
    assert_pngs(paths, tmp_path)
    out = capsys.readouterr().out
    assert "trained shapes model" in out and "matches of the query's class: 2/2" in out
    line = next(row for row in out.splitlines() if row.startswith("query 0 ("))
    assert line.split("(")[1].split(")")[0] in CLASSES


@pytest.mark.parametrize("name", ["fewshot", "retrieval"])
def test_the_shapes_examples_need_the_model_size(name, capsys):
    module = load_example(name)
    with pytest.raises(SystemExit):
        module.parse_args(["--size", "48"])
    assert "needs --size 96" in capsys.readouterr().err
    assert module.parse_args([]).size == 96 and module.parse_args(["--arch", "conv4"]).size == 48


def test_the_examples_pick_shapes_images_by_class_deterministically():
    from naflow_fx.data.shapes import make_shapes

    synthetic = load_example("_synthetic")
    classes = synthetic.pick_classes(3, seed=5)
    assert classes == synthetic.pick_classes(3, seed=5) and len(set(classes)) == 3
    grid, indices = synthetic.shapes_by_class(classes, 2, seed=7, chunk=8)
    assert grid.shape == (3, 2, 3, 96, 96) and grid.dtype == torch.uint8
    for row, c, idx in zip(grid, classes, indices):
        batch = make_shapes(1, seed=7, start=idx[1])
        assert batch.labels.tolist() == [c] and bool((batch.images[0] == row[1]).all())
        assert idx == sorted(idx) and len(idx) == 2
