"""Similarity targets, few-shot episodes, retrieval and kNN on bad or unusual input: one clear naflow_fx
error (what was wrong, what to do) instead of a raw torch / matplotlib trace or a silently wrong result,
and never a stray or half-written figure.

Tiny random-weight encoders on 12×12 images; nothing is downloaded.
"""

from __future__ import annotations

import errno
import os
import warnings

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from models import seeded
from torch import Tensor, nn

from naflow_fx import (
    ConfigError,
    InputError,
    InputTypeError,
    SimilarityTarget,
    TargetError,
    ZeroMapsWarning,
    compile_naflow,
)
from naflow_fx.fewshot import explain_episode
from naflow_fx.knn import KNNTarget, explain_knn
from naflow_fx.retrieval import explain_match
from naflow_fx.similarity import METRICS, register_metric

SIZE = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(b: int, seed: int, size: int = SIZE) -> Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pooled_encoder(bias: bool = True) -> nn.Module:
    """conv → ReLU → pool → conv → ReLU → GAP → flatten: embeddings [B, 8]. Without biases an all-zero
    image embeds to the zero vector."""
    return seeded(
        0,
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ),
    ).eval()


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return pooled_encoder()


@pytest.fixture(scope="module")
def nf(encoder):
    return compile_naflow(encoder, images(1, 0))


@pytest.fixture(scope="module")
def nf_no_bias():
    return compile_naflow(pooled_encoder(bias=False), images(1, 0))


@pytest.fixture(scope="module")
def nf_linear():
    """An encoder ending in Flatten → Linear: it only accepts the compiled image size."""
    model = seeded(1, lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 6)))
    return compile_naflow(model.eval(), images(1, 0))


def embed(encoder: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return encoder(x)


@pytest.fixture
def custom_metric():
    """Register metrics for one test and remove them afterwards."""
    names = []

    def register(name, fn):
        names.append(name)
        return register_metric(name, fn)

    yield register
    for name in names:
        METRICS.pop(name, None)


# ------------------------------------------------------------------------------------ SimilarityTarget


@pytest.mark.parametrize("metric", [["cosine"], None, len], ids=["list", "None", "function"])
def test_a_metric_that_is_not_a_name_is_a_type_error_that_says_how_to_register_one(metric):
    with pytest.raises(InputTypeError, match=r"metric must be the name \(a str\).*register_metric\(name"):
        SimilarityTarget(torch.randn(5), metric=metric)


def test_a_reference_that_overflows_the_models_dtype_is_refused_instead_of_giving_nan():
    target = SimilarityTarget(torch.full((5,), 1e300, dtype=torch.float64))
    for fn in (target, target.similarity, target.weights):
        with pytest.raises(TargetError, match=r"overflows the model's torch.float32 .*1e\+300.*rescale"):
            fn(torch.randn(2, 5))
    torch.testing.assert_close(  # a float64 reference that fits is used as before
        SimilarityTarget(torch.ones(5, dtype=torch.float64)).similarity(torch.ones(1, 5)), torch.ones(1)
    )


def test_an_integer_model_output_is_a_target_error():
    with pytest.raises(TargetError, match=r"floating-point embeddings.*torch.int64"):
        SimilarityTarget(torch.randn(5))(torch.ones(2, 5, dtype=torch.long))


def test_register_metric_checks_its_arguments_before_registering():
    before = dict(METRICS)
    with pytest.raises(InputTypeError, match=r"metric name must be a str, got int 3"):
        register_metric(3, lambda q, s: q * s)
    with pytest.raises(ConfigError, match=r"metric name is empty"):
        register_metric("", lambda q, s: q * s)
    with pytest.raises(InputTypeError, match=r"contributions must be a function .* got int"):
        register_metric("not_callable_metric", 3)
    assert METRICS == before


def test_a_custom_metric_of_the_wrong_shape_is_named(nf, custom_metric):
    custom_metric("summed_metric_test", lambda q, s: (q * s).sum(1))
    target = SimilarityTarget(torch.randn(8), metric="summed_metric_test")
    message = r"metric 'summed_metric_test' returned \(2,\); .* Tensor \[B, D\] = \[2, 8\]"
    with pytest.raises(TargetError, match=message):
        target.similarity(torch.randn(2, 8))
    with pytest.raises(TargetError, match=message):
        nf(images(2, 1), target)


def test_a_zero_similarity_says_which_vector_is_the_problem():
    out = torch.tensor([[1.0, 2.0, 3.0]])
    with pytest.raises(TargetError, match=r"similarity of sample 0 .* is 0.*reference embedding is all zeros"):
        SimilarityTarget(torch.zeros(3))(out)
    with pytest.raises(TargetError, match=r"sample 1 .*embeds this input to the zero vector.*check the input"):
        SimilarityTarget(torch.ones(3), metric="dot")(torch.cat([out, torch.zeros(1, 3)]))
    with pytest.raises(TargetError, match=r"euclidean similarity .* query embedding equals the reference"):
        SimilarityTarget(out[0], metric="euclidean")(out)
    with pytest.raises(TargetError, match=r"is 0.*choose another reference"):  # orthogonal: the old advice stays
        SimilarityTarget(torch.tensor([3.0, 0.0, -1.0]))(out)


def test_a_euclidean_reference_within_rounding_of_the_query_is_refused(nf):
    """The same image embedded in another batch moves by ~1e-6; ω would explain that rounding."""
    out = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    noise = torch.tensor([2e-6, -1e-6, 0.0])
    with pytest.raises(TargetError, match=r"sample 1 .*within float rounding of the reference \(distance 2.2e-06"):
        SimilarityTarget(torch.stack([out[0] + 1.0, out[1] + noise]), metric="euclidean")(out)
    near = SimilarityTarget(out[0] + 1e-3, metric="euclidean")  # a genuinely different embedding
    torch.testing.assert_close(near.weights(out).sum(1), -torch.ones(2))
    x = images(2, 1)
    reference = nf.graph_module(x).detach()[1] + 1e-6  # the second query, re-embedded
    with pytest.raises(TargetError, match="within float rounding"):
        nf(x, SimilarityTarget(reference, metric="euclidean"))


# ------------------------------------------------------------------------------------------- KNNTarget


def test_knn_target_checks_its_neighbours_and_weights():
    with pytest.raises(TargetError, match=r"neighbours must be floating-point embeddings, got torch.int64"):
        KNNTarget(torch.ones(1, 2, 3, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(TargetError, match=r"weights must be real numbers, got torch.bool"):
        KNNTarget(torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TargetError, match=r"the weights of a KNNTarget contain NaN"):
        KNNTarget(torch.randn(1, 2, 3), torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(TargetError, match=r"the neighbours of a KNNTarget contain NaN"):
        KNNTarget(torch.tensor([[[float("inf"), 1.0, 1.0]]]), torch.ones(1, 1))
    with pytest.raises(TargetError, match=r"all its neighbour weights are 0: give at least one"):
        KNNTarget(torch.randn(1, 2, 3), torch.zeros(1, 2))(torch.randn(1, 3))
    # integer weights are fine (as before): they are cast to the neighbours' dtype
    t = KNNTarget(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[2, 1]]))
    torch.testing.assert_close(t.similarity(torch.tensor([[3.0, 4.0]])), torch.tensor([2.0]))


# ----------------------------------------------------------------------------------------- explain_knn

BANK = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
BANK_LABELS = [0, 1] * 5


def test_knn_accepts_numpy_numbers_like_python_ones(nf):
    x = images(2, 4)
    ref = explain_knn(nf, x, BANK, BANK_LABELS, k=3, tau=0.1, num_classes=2)
    got = explain_knn(nf, x, BANK, BANK_LABELS, k=np.int64(3), tau=np.float32(0.1), num_classes=np.int64(2))
    assert got.neighbours.tolist() == ref.neighbours.tolist()
    torch.testing.assert_close(got.class_scores, ref.class_scores)
    torch.testing.assert_close(got.flow.maps["4"], ref.flow.maps["4"])
    as_tensors = explain_knn(nf, x, BANK, BANK_LABELS, k=torch.tensor(3), tau=torch.tensor(0.1), num_classes=2)
    torch.testing.assert_close(as_tensors.class_scores, ref.class_scores)  # one-element tensors are numbers too
    with pytest.raises(TargetError, match=r"k must be an int .*got tensor\(3\.\)"):
        explain_knn(nf, x, BANK, BANK_LABELS, k=torch.tensor(3.0))
    support, query = images(4, 1), images(1, 2)
    ten = explain_episode(nf, support, [0, 0, 1, 1], query, temperature=torch.tensor(10.0), explain_support=False)
    torch.testing.assert_close(
        ten.logits, explain_episode(nf, support, [0, 0, 1, 1], query, explain_support=False).logits
    )


def test_knn_ties_keep_the_banks_order_as_retrieval_does(nf):
    x = images(1, 4)
    e = nf.graph_module(images(1, 5)).detach()
    got = explain_knn(nf, x, torch.cat([e] * 6), [2, 1, 0, 1, 2, 2], k=3, num_classes=3)
    assert got.neighbours.tolist() == [[0, 1, 2]]  # six equal similarities: the lowest indices
    assert got.prediction.tolist() == [0]  # a three-way tie of classes 2, 1, 0: the lower class


@pytest.mark.parametrize("num_classes", [True, 2.0, 0, "2"])
def test_knn_num_classes_must_be_a_positive_int(nf, num_classes):
    with pytest.raises(TargetError, match=r"num_classes must be a positive int \(or None\), got"):
        explain_knn(nf, images(1, 4), BANK, [0] * 10, k=3, num_classes=num_classes)


def test_knn_refuses_a_class_count_whose_scores_would_not_fit(nf):
    labels = [0] * 9 + [10**9]  # before: a [2, 10⁹] float64 score matrix, 16 GB
    with pytest.raises(
        TargetError, match=r"1000000001 classes would make class_scores \[2, 1000000001\] take 14.9 GiB"
    ):
        explain_knn(nf, images(2, 4), BANK, labels, k=3)
    with pytest.raises(TargetError, match=r"torch.unique\(bank_labels, return_inverse=True\)"):
        explain_knn(nf, images(1, 4), BANK, BANK_LABELS, k=3, num_classes=2**28)


def test_knn_refuses_a_tau_whose_votes_overflow_or_underflow(nf, encoder):
    x = images(2, 4)
    with pytest.raises(ConfigError, match=r"tau=0.0001 is too small .*overflow float64.*use tau >= "):
        explain_knn(nf, x, BANK, BANK_LABELS, k=6, tau=1e-4)  # before: inf scores, a tie broken arbitrarily
    opposite = -embed(encoder, x[:1]).repeat(10, 1) + 0.01 * BANK  # every neighbour has s_j ≈ -1
    with pytest.raises(ConfigError, match=r"underflow float64.*use tau >= "):
        explain_knn(nf, x[:1], opposite, [1] * 10, k=3, tau=1e-4)
    explain_knn(nf, x, BANK, BANK_LABELS, k=6, tau=0.01)  # small but representable: fine


def test_knn_bank_with_nan_zero_or_overflowing_rows_is_an_input_error(nf):
    x = images(1, 4)
    nan = BANK.clone()
    nan[2, 1] = float("nan")
    with pytest.raises(InputError, match=r"the bank contains NaN or Inf values \(row\(s\) \[2\]\)"):
        explain_knn(nf, x, nan, BANK_LABELS, k=10)
    zero = BANK.clone()
    zero[::2] = 0  # e.g. a memory bank that was never filled
    with pytest.raises(InputError, match=r"bank row\(s\) \[0, 2, 4, 6, 8\] are all zeros.*fill them"):
        explain_knn(nf, x, zero, BANK_LABELS, k=10)
    with pytest.raises(InputError, match=r"the bank overflows the model's torch.float32"):
        explain_knn(nf, x, BANK.double() * 1e300, BANK_LABELS, k=3)


# ---------------------------------------------------------------- all three helpers: the model's embeddings


def _call(helper: str, nf, x: Tensor):
    if helper == "episode":
        return explain_episode(nf, x, [0, 1], x)
    if helper == "match":
        return explain_match(nf, x, x, k=1)
    return explain_knn(nf, x, torch.randn(4, 6), [0, 1, 0, 1], k=2)


@pytest.mark.parametrize("helper", ["episode", "match", "knn"])
def test_images_the_model_cannot_embed_are_an_input_error_not_a_torch_trace(nf_linear, helper):
    with pytest.raises(InputError, match=r"model failed on the .*images \(shape \(2, 3, 16, 16\); it was compiled "):
        _call(helper, nf_linear, images(2, 5, size=16))


@pytest.mark.parametrize("helper", ["episode", "match", "knn"])
def test_a_nan_embedding_is_an_input_error_naming_the_images(helper):
    model = pooled_encoder()
    nf = compile_naflow(model, images(1, 0))
    with torch.no_grad():
        model[3].bias[0] = float("nan")  # every image now embeds to NaN
    with pytest.raises(InputError, match=r"embedding of the .*images \[0, 1\] contains NaN or Inf.*weights"):
        _call(helper, nf, images(2, 5))


def test_images_refused_by_the_input_checks_are_named_by_their_set_and_row(nf):
    """A helper embeds several sets of images; a NaN, a dtype or a channel count names the set (and the rows)."""
    x, gallery = images(2, 5), images(6, 6)
    gallery[4, 0, 1, 1] = float("nan")
    with pytest.raises(InputError, match=r"^gallery images \[4\]: the input contains NaN or Inf values; "):
        explain_match(nf, x[0], gallery, k=1, batch_size=2)  # row 4 is in the third chunk
    with pytest.raises(InputError, match=r"^support images \[1\]: the input contains NaN"):
        explain_episode(nf, torch.cat([x[:1], gallery[4:5]]), [0, 1], x)
    with pytest.raises(InputError, match=r"^query images: the input is torch.float64 but the model computes in"):
        explain_episode(nf, x, [0, 1], x.double())


def test_a_query_that_embeds_to_zero_is_named(nf_no_bias):
    blank = torch.zeros(1, 3, SIZE, SIZE)
    support = images(4, 6)
    with pytest.raises(TargetError, match=r"embeds query images \[0\] to the zero vector.*blank"):
        explain_episode(nf_no_bias, support, [0, 0, 1, 1], blank)
    with pytest.raises(TargetError, match=r"embeds query images \[0\] to the zero vector"):
        explain_match(nf_no_bias, blank, support)
    with pytest.raises(TargetError, match=r"embeds images \[0\] to the zero vector"):
        explain_knn(nf_no_bias, blank, torch.randn(4, 8), [0, 1, 0, 1], k=2)


def test_an_episode_class_whose_prototype_is_zero_is_named(nf_no_bias):
    support = torch.cat([images(2, 6), torch.zeros(2, 3, SIZE, SIZE)])
    with pytest.raises(TargetError, match=r"prototype of class\(es\) \[1\] .* is the zero vector"):
        explain_episode(nf_no_bias, support, [0, 0, 1, 1], images(1, 7))


def test_a_blank_gallery_image_among_the_matches_is_named(nf_no_bias):
    gallery = torch.cat([images(2, 6), torch.zeros(1, 3, SIZE, SIZE)])
    with pytest.raises(TargetError, match=r"embeds gallery image\(s\) \[2\] to the zero vector.*lower k"):
        explain_match(nf_no_bias, images(1, 7), gallery, k=3)
    assert explain_match(nf_no_bias, images(1, 7), gallery, k=2).indices.tolist() == [[0, 1]]  # ranked last: fine


# ------------------------------------------------------------------------------------------ explain_match


def test_gallery_embeddings_are_checked(nf, encoder):
    q, g = images(2, 8), images(4, 9)
    e = embed(encoder, g)
    with pytest.raises(InputTypeError, match=r"gallery_embeddings must be a Tensor \[G, D\] .* got list"):
        explain_match(nf, q, g, gallery_embeddings=e.tolist())
    with pytest.raises(InputTypeError, match=r"got ndarray"):
        explain_match(nf, q, g, gallery_embeddings=e.numpy())
    for dtype in (torch.long, torch.complex64):  # before: silently cast (complex lost its imaginary part)
        with pytest.raises(InputError, match=f"gallery_embeddings must be floating-point embeddings, got {dtype}"):
            explain_match(nf, q, g, gallery_embeddings=(e * 10).to(dtype))
    nan = e.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(InputError, match=r"gallery_embeddings row\(s\) \[1\] contain NaN or Inf"):
        explain_match(nf, q, g, gallery_embeddings=nan)
    zero = e.clone()
    zero[3] = 0
    with pytest.raises(InputError, match=r"gallery_embeddings row\(s\) \[3\] are all zeros"):
        explain_match(nf, q, g, gallery_embeddings=zero)
    with pytest.raises(InputError, match=r"gallery_embeddings overflow the model's torch.float32"):
        explain_match(nf, q, g, gallery_embeddings=e.double() * 1e300)


def test_an_index_of_embeddings_only_ranks_and_explains_the_query(nf, encoder):
    """gallery=None with gallery_embeddings and explain_matches=False: the images are not needed."""
    q, g = images(2, 8), images(4, 9)
    e = embed(encoder, g)
    want = explain_match(nf, q, g, k=2, gallery_embeddings=e, explain_matches=False)
    got = explain_match(nf, q, None, k=2, gallery_embeddings=e, explain_matches=False)
    assert torch.equal(got.indices, want.indices) and got.gallery is None and got.match_flow is None
    assert all(torch.equal(got.query_flow.maps[n], want.query_flow.maps[n]) for n in nf.layers)
    assert got.plot(1).axes  # the query rows only
    plt.close("all")
    for kwargs in ({}, {"gallery_embeddings": e}, {"explain_matches": False}):
        with pytest.raises(InputError, match=r"gallery=None needs gallery_embeddings .* and explain_matches=False"):
            explain_match(nf, q, None, **kwargs)
    with pytest.raises(InputError, match=r"gallery_embeddings must be Tensor\[G, D\], got shape \(0, 8\)"):
        explain_match(nf, q, None, gallery_embeddings=e[:0], explain_matches=False)
    with pytest.raises(TargetError, match=r"k must be an int between 1 and the gallery size 4"):
        explain_match(nf, q, None, k=5, gallery_embeddings=e, explain_matches=False)


def test_match_accepts_numpy_k_and_indices_and_refuses_a_bool_batch_size(nf):
    q, g = images(2, 8), images(4, 9)
    m = explain_match(nf, q, g, k=np.int64(2))
    assert m.k == 2 and m.indices.shape == (2, 2)
    qf, mf = m.pair(np.int64(1), torch.tensor(1))
    torch.testing.assert_close(qf.maps["4"], m.pair(1, 1)[0].maps["4"])
    with pytest.raises(TargetError, match=r"pair\(0, 2\) is out of range"):
        m.pair(0, 2)
    with pytest.raises(ConfigError, match=r"batch_size must be a positive int or None, got True"):
        explain_match(nf, q, g, batch_size=True)


# ------------------------------------------------------------------------------------------ explain_episode


def test_episode_labels_numpy_ints_are_labels_and_bad_shapes_say_how_to_flatten(nf):
    s, q = images(4, 10), images(2, 11)
    ref = explain_episode(nf, s, [0, 0, 1, 1], q, explain_support=False)
    got = explain_episode(nf, s, [np.int64(v) for v in (0, 0, 1, 1)], q, explain_support=False)
    torch.testing.assert_close(got.logits, ref.logits)
    with pytest.raises(InputError, match=r"flat list of class labels.*reshape\(-1\)"):
        explain_episode(nf, s, [[0, 0], [1, 1]], q)
    with pytest.raises(InputError, match=r"shape \(2, 2\) but there are 4 support images.*support_labels.reshape"):
        explain_episode(nf, s, torch.tensor([[0, 0], [1, 1]]), q)
    for labels in (np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1], dtype=np.uint8)):
        torch.testing.assert_close(explain_episode(nf, s, labels, q, explain_support=False).logits, ref.logits)
    with pytest.raises(InputError, match=r"got a numpy float64 array; use support_labels.astype\(int\)"):
        explain_episode(nf, s, np.array([0.0, 0, 1, 1]), q)
    with pytest.raises(InputError, match=r"got a numpy <U1 array; use np.unique\(labels, return_inverse=True\)\[1\]"):
        explain_episode(nf, s, np.array(list("aabb")), q)
    with pytest.raises(InputTypeError, match=r"got dict; convert it with torch.as_tensor"):
        explain_episode(nf, s, {0: 0, 1: 0, 2: 1, 3: 1}, q)
    with pytest.raises(InputError, match=r"got \(2, 2, 3, 12, 12\); .*support.flatten\(0, 1\)"):
        explain_episode(nf, s.reshape(2, 2, 3, SIZE, SIZE), [0, 0, 1, 1], q)


def test_episode_temperature_must_be_finite_and_may_be_a_numpy_number(nf):
    s, q = images(4, 10), images(2, 11)
    for bad in (float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match=r"temperature must be a positive finite number"):
            explain_episode(nf, s, [0, 0, 1, 1], q, temperature=bad)
    ref = explain_episode(nf, s, [0, 0, 1, 1], q, explain_support=False, temperature=5.0)
    got = explain_episode(nf, s, [0, 0, 1, 1], q, explain_support=False, temperature=np.float32(5.0))
    torch.testing.assert_close(got.logits, ref.logits)


def test_episode_classes_are_checked_before_any_work(encoder, monkeypatch):
    import naflow_fx.fewshot as fewshot

    monkeypatch.setattr(fewshot, "compile_naflow", lambda *a, **k: pytest.fail("compiled before checking classes"))
    s, q = images(4, 10), images(2, 11)
    cases = {
        2.0: r"classes must be 'all', a class label or a list of class labels, got float 2.0",
        torch.tensor([1.7]): r"classes must be integer class labels, got a torch.float32 tensor",  # was truncated to 1
        True: r"got bool True",
        ("a",): r"a class must be an int label, got 'a'",
        (0, 5): r"class 5 is not in this episode; its classes are \[0, 1\]",
    }
    for classes, match in cases.items():
        with pytest.raises(TargetError, match=match):
            explain_episode(encoder, s, [0, 0, 1, 1], q, classes=classes)


def test_episode_classes_and_indices_may_be_numpy_or_tensor_integers(nf):
    s, q = images(4, 10), images(2, 11)
    ep = explain_episode(nf, s, [0, 0, 1, 1], q, classes=np.int64(1), explain_support=False)
    assert list(ep.class_flows) == [1]
    assert ep.query_flow(np.int64(1)) is ep.class_flows[1]
    by_numpy = ep.support_flow(np.int64(1))
    assert ep.support_flow(torch.tensor(1)) is by_numpy is ep.support_flow(1)
    with pytest.raises(TargetError, match=r"query index 2 is out of range: the episode has 2 queries \(0..1\)"):
        ep.support_flow(2)


# ---------------------------------------------------------------------------------- plots: paths and layers


@pytest.fixture
def lazy_episode(nf):
    return explain_episode(nf, images(4, 10), [0, 0, 1, 1], images(2, 11), explain_support=False)


@pytest.fixture(scope="module")
def match(nf):
    return explain_match(nf, images(2, 8), images(4, 9), k=2)


def _plot(which: str, lazy_episode, match):
    return lazy_episode.plot if which == "episode" else match.plot


BAD_PATHS = {
    "parent is a file": (lambda d: d / "file" / "grid.png", InputError, r"file is a file, not a folder"),
    "folder": (lambda d: d, InputError, r"is a folder; pass a file inside it"),
    "extension": (lambda d: d / "grid.pgn", InputError, r"'\.pgn' is not a supported format"),
    "not a path": (lambda d: 3, InputTypeError, r"path must be a file path"),
}


@pytest.mark.parametrize("which", ["episode", "match"])
@pytest.mark.parametrize("case", list(BAD_PATHS), ids=list(BAD_PATHS))
def test_plot_checks_the_path_before_computing_or_drawing(which, case, lazy_episode, match, tmp_path):
    (tmp_path / "file").write_text("x")
    make, exc, message = BAD_PATHS[case]
    figures = plt.get_fignums()
    fn = "EpisodeExplanation.plot" if which == "episode" else "MatchExplanation.plot"
    with pytest.raises(exc, match=message) as info:
        _plot(which, lazy_episode, match)(0, make(tmp_path))
    assert str(info.value).startswith(f"{fn}: ")
    assert lazy_episode._support_cache == {}  # no support flow was computed for a figure that cannot be saved
    assert plt.get_fignums() == figures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("which", ["episode", "match"])
def test_plot_layers_and_query_index_are_checked_first(which, lazy_episode, match):
    plot = _plot(which, lazy_episode, match)
    fn = "EpisodeExplanation.plot" if which == "episode" else "MatchExplanation.plot"
    with pytest.raises(InputError, match=rf"^{fn}: unknown layer\(s\) \['zz'\]"):
        plot(0, layers=["zz"])
    with pytest.raises(InputTypeError, match=rf"^{fn}: layers must be a list of layer names, got the str '4'"):
        plot(0, layers="4")
    with pytest.raises(TargetError, match=r"query index 5 is out of range"):
        plot(5)
    assert lazy_episode._support_cache == {}


@pytest.mark.parametrize("which", ["episode", "match"])
def test_a_failed_figure_write_names_the_users_file_and_leaves_nothing(
    which, lazy_episode, match, tmp_path, monkeypatch
):
    def full_disk(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")  # half-written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    figures = plt.get_fignums()
    path = tmp_path / "grid.png"
    with pytest.raises(OSError) as info:
        _plot(which, lazy_episode, match)(1, path, layers=["4"])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "cannot write the figure" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no half-written figure, no temporary
    assert plt.get_fignums() == figures


@pytest.mark.parametrize("which", ["episode", "match"])
def test_plot_with_numpy_query_index_writes_the_figure(which, lazy_episode, match, tmp_path):
    path = tmp_path / "sub" / "grid.png"
    _plot(which, lazy_episode, match)(np.int64(1), path, layers=["4"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]


def test_compile_options_that_compile_naflow_does_not_take_are_named(encoder):
    support, query = images(4, 1), images(1, 2)
    with pytest.raises(
        ConfigError, match=r"compile_options has \['foo'\], which compile_naflow does not take; .*'damping'"
    ):
        explain_episode(encoder, support, [0, 0, 1, 1], query, compile_options={"foo": 1})
    with pytest.raises(InputTypeError, match=r"compile_options must be a dict .* got list"):
        explain_match(encoder, query, support, compile_options=["x"])


def test_a_cosine_self_match_is_refused_instead_of_explaining_rounding(nf, encoder):
    """At cosine 1 the gradient of the cosine is 0: the maps of a query against itself would be float noise."""
    x = images(3, 4)
    own = nf.graph_module(x).detach()
    with pytest.raises(TargetError, match=r"cosine similarity of sample 0 .* ±1 up to float rounding"):
        nf(x[:1], SimilarityTarget(own[0], metric="cosine"))
    with pytest.raises(TargetError, match=r"gallery image 2 matches query 0 with cosine .*leave the query out"):
        explain_match(encoder, x[2], x, k=2)
    match = explain_match(encoder, x[2], x[:2], k=1)  # without itself, the query is explained against a neighbour
    assert match.query_flow.maps[match.naflow.last_layer].abs().max() > 1e-6


def _channel_encoder() -> nn.Module:
    """Embeds an image to the positive part of its mean colour: one-hot colours have orthogonal embeddings."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
        conv.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _colour(*values: float) -> Tensor:
    """An image of one colour, embedded by ``_channel_encoder`` to ``relu(values)``."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None].expand(3, SIZE, SIZE).clone()


@pytest.mark.filterwarnings("ignore::naflow_fx.ZeroMapsWarning")  # the toy encoder's match flows: see the test
def test_a_pair_with_zero_cosine_names_the_support_or_gallery_image():
    enc = _channel_encoder()
    query = _colour(1, -1, 0.5)  # embedded (1, 0, 0.5)
    support = torch.stack([_colour(-1, -1, 1), _colour(-1, -1, 1), _colour(1, -1, -1), _colour(-1, 1, -1)])
    # class 0's prototype (0.5, 0.5, 0) is the nearest; its support image 3, (0, 1, 0), is orthogonal to the query
    with pytest.raises(TargetError, match=r"support image 3 \(class 0\) has cosine 0 with query 0: .*orthogonal"):
        explain_episode(enc, support, [1, 1, 0, 0], query)
    assert explain_episode(enc, support, [1, 1, 0, 0], query, explain_support=False).prediction.tolist() == [0]
    gallery = torch.stack([_colour(1, -1, 0.3), _colour(-1, 1, -1), _colour(-1, -1, 1)])
    with pytest.raises(TargetError, match=r"gallery image 1, match 3 of query 0, has cosine 0 .*lower k"):
        explain_match(enc, query, gallery, k=3)
    assert explain_match(enc, query, gallery, k=2).indices.tolist() == [[0, 2]]


@pytest.mark.filterwarnings("ignore::naflow_fx.ZeroMapsWarning")  # the toy encoder zeroes negative colours
def test_distinct_images_with_a_cosine_near_1_are_explained_and_copies_are_named():
    """Self-matches are told apart from close neighbours by the distance of the unit embeddings (decision 23).

    The two colours below differ by 0.0025 in one channel: cosine 1 − 2e-6, which the earlier test
    ``1 − |cos| ≤ 100 eps`` (1.2e-5 in float32) refused as "the query itself", though their
    unit embeddings are 2e-3 apart and the cosine's gradient is well defined.
    """
    enc = _channel_encoder()
    query, near = _colour(1, 0.5, 0.25), _colour(1, 0.5, 0.2525)
    cos = float(torch.nn.functional.cosine_similarity(embed(enc, query[None]), embed(enc, near[None])))
    assert 0 < 1 - cos < 100 * torch.finfo(torch.float32).eps
    match = explain_match(enc, query, near[None], k=1)  # refused before
    assert match.query_flow.scores.tolist() == [1.0] and match.match_flow.scores.tolist() == [1.0]
    episode = explain_episode(enc, torch.stack([near, _colour(0, 1, 0)]), [0, 1], query)
    assert episode.prediction.tolist() == [0]
    # the query itself as its class's only support image: named as such, not as "sample 0 to its reference"
    with pytest.raises(
        TargetError, match=r"query image 1 has cosine \S+ with the prototype of class 7 \(the mean of its 1 "
    ):
        explain_episode(enc, torch.stack([near, query]), [3, 7], torch.stack([near * 0.5 + 0.1, query]))
    # a copy of the query among another class's supports, explained on demand
    episode = explain_episode(
        enc, torch.stack([near, query, _colour(0, 1, 0)]), [0, 1, 1], query, explain_support=False
    )
    assert episode.prediction.tolist() == [0]
    with pytest.raises(TargetError, match=r"support image 1 \(class 1\) has cosine 1 with query 0: .*is the query"):
        episode.support_flow(0, 1)


def test_a_self_match_stored_in_bfloat16_is_still_refused(nf, encoder):
    """A bfloat16 index holds each embedding about 2e-3 from the model's own: the self-match test
    takes the stored precision into account (decision 23)."""
    x = images(3, 12)
    index = embed(encoder, x).bfloat16()
    with pytest.raises(TargetError, match=r"gallery image 1 matches query 0 .*the query itself or a copy"):
        explain_match(nf, x[1], None, gallery_embeddings=index, explain_matches=False)
    with pytest.raises(TargetError, match=r"sample 0 to its reference .*±1 up to float rounding"):
        nf(x[1:2], SimilarityTarget(index[1]))


def test_knn_refuses_a_query_that_is_its_own_only_neighbour(nf, encoder):
    """KNNTarget's score is ‖r‖·cos(v, r): at v ∥ r its gradient is 0, as for a cosine self-match."""
    x = images(4, 6)
    bank, labels = embed(encoder, x), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TargetError, match=r"sample 0 points along the weighted mean of its neighbours .*own row"):
        explain_knn(nf, x[1], bank, labels, k=1)
    knn = explain_knn(nf, x[1], bank[[0, 2, 3]], labels[[0, 2, 3]], k=1)  # without its own row
    assert knn.flow.maps[nf.last_layer].abs().max() > 1e-6


def test_references_made_under_inference_mode_work_for_every_metric(nf, encoder):
    """A flow runs outside the caller's inference mode; a reference made inside it is an inference tensor,
    which autograd cannot save for the backward pass of a dot product."""
    x = images(3, 7)
    with torch.inference_mode():
        ref = encoder(x[1:2])[0]
    assert ref.is_inference()
    plain = embed(encoder, x[1:2])[0]
    for metric in ("cosine", "dot", "euclidean"):
        got, want = nf(x[:1], SimilarityTarget(ref, metric=metric)), nf(x[:1], SimilarityTarget(plain, metric=metric))
        assert all(torch.equal(got.maps[k], want.maps[k]) for k in nf.layers)
    with torch.inference_mode():
        knn = explain_knn(nf, x[0], encoder(x[1:]), [0, 1], k=2)
    want = explain_knn(nf, x[0], embed(encoder, x[1:]), [0, 1], k=2)
    assert all(torch.equal(knn.flow.maps[k], want.flow.maps[k]) for k in nf.layers)


def test_warnings_from_the_helpers_point_at_the_users_call():
    """A flow run inside explain_match warns at the caller's line, not at the library's call of nf(...)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gallery = torch.stack([_colour(1, -1, 0.3), _colour(-1, -1, 1)])  # the second: no positive Λ·BPFM
        explain_match(_channel_encoder(), _colour(1, -1, 0.5), gallery, k=2)
    zero = [w for w in caught if w.category is ZeroMapsWarning]
    assert zero and all(w.filename == __file__ for w in zero)
