"""Class targets in the forms an expert passes them: numpy arrays, lists of 0-d tensors, any integer dtype.

Every other form is one :class:`TargetError` that says what was wrong, never a raw torch error
(meta and sparse tensors included).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from models import PReLUNet
from torch import Tensor, nn

from naflow_fx import ClassTarget, TargetError, compile_naflow
from naflow_fx.targets import resolve_target

SIZE = 16
CLASSES = 5


def batch(b: int = 3, seed: int = 0) -> Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits(b: int = 3) -> Tensor:
    return torch.randn(b, CLASSES, generator=torch.Generator().manual_seed(1), requires_grad=True)


def classes_of(target: object, b: int = 3) -> list[int]:
    """The class indices ``target`` selects on a batch of ``b`` logits (and its scores are those logits)."""
    out = logits(b)
    scores, classes = resolve_target(target, out)
    assert classes is not None and classes.dtype == torch.long
    torch.testing.assert_close(scores, out[torch.arange(b), classes])
    return classes.tolist()


@pytest.fixture(scope="module")
def nf():
    return compile_naflow(PReLUNet.build(num_classes=CLASSES, size=SIZE), batch(1))


def assert_same_flow(a, b) -> None:
    torch.testing.assert_close(a.classes, b.classes)
    for name in a.layers:
        torch.testing.assert_close(a.maps[name], b.maps[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- numpy targets


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint64])
def test_integer_numpy_arrays_are_class_targets(dtype):
    assert classes_of(np.array([4, 0, 2], dtype=dtype)) == [4, 0, 2]
    assert classes_of(np.array(3, dtype=dtype)) == [3, 3, 3]  # 0-d: one class for the batch
    assert classes_of(np.array([1], dtype=dtype)) == [1, 1, 1]
    assert classes_of(ClassTarget(np.array([4, 0, 2], dtype=dtype))) == [4, 0, 2]


def test_numpy_arrays_give_the_same_flow_as_the_equivalent_tensor(nf):
    x = batch()
    ref = nf(x, torch.tensor([4, 0, 2]))
    for target in (np.array([4, 0, 2]), list(np.array([4, 0, 2])), [np.array(4), np.array(0), np.array(2)]):
        assert_same_flow(nf(x, target), ref)
    assert_same_flow(nf(x, np.array(3)), nf(x, 3))
    assert_same_flow(nf.gradcam(x, np.array([4, 0, 2])), nf.gradcam(x, [4, 0, 2]))


def test_numpy_arrays_are_refused_as_the_equivalent_tensor_is():
    for dtype, hint in ((np.float32, r"\.astype\(int\).*\.argmax"), (np.bool_, "not a mask")):
        with pytest.raises(TargetError, match=rf"class targets must be integers.*{np.dtype(dtype)} array.*{hint}"):
            classes_of(np.array([0, 1, 1], dtype=dtype))
        with pytest.raises(TargetError, match=r"class targets must be integers"):
            classes_of(torch.tensor([0, 1, 1]).numpy().astype(dtype))
    with pytest.raises(TargetError, match=r"class targets must be integers.*float64 array"):
        classes_of(np.array(2.0))
    with pytest.raises(TargetError, match=r"class names"):
        classes_of(np.array(["cat", "dog", "cat"]))
    with pytest.raises(TargetError, match=r"object array.*\.astype\(int\)"):
        classes_of(np.array([0, 1, 2], dtype=object))
    # rank: what a tensor of that shape does, the array does too
    for shape in ((2, 3), (3, 5)):
        for make in (np.zeros, lambda s, dtype: torch.zeros(s, dtype=torch.long)):
            with pytest.raises(
                TargetError,
                match=r"one class index per sample \(shape \[B\] = \[3\]\), got shape " + re.escape(str(shape)),
            ):
                classes_of(make(shape, dtype=np.int64))
    with pytest.raises(TargetError, match=r"output's shape \[B, classes\]; for one-hot labels or scores pass \.argmax"):
        classes_of(np.eye(CLASSES, dtype=np.int64)[[1, 2, 3]])
    assert classes_of(np.array([[4], [0], [2]])) == classes_of(torch.tensor([[4], [0], [2]])) == [4, 0, 2]
    with pytest.raises(TargetError, match="out of range"):
        classes_of(np.array([0, 5, 1]))
    with pytest.raises(TargetError, match="out of range"):
        classes_of(np.array([0, -1, 1], dtype=np.int8))
    with pytest.raises(TargetError, match=r"class target 18446744073709551615 is out of range"):
        classes_of(np.array([0, 2**64 - 1, 1], dtype=np.uint64))  # not wrapped around to -1
    with pytest.raises(TargetError, match="got 2 class targets for a batch of 3"):
        classes_of(np.array([0, 1]))


def test_numpy_scalars():
    assert classes_of(np.int64(2)) == classes_of([np.int32(2)] * 3) == [2, 2, 2]
    with pytest.raises(TargetError, match=r"class targets must be integers.*float64 numpy scalar"):
        classes_of(np.float64(2.0))
    with pytest.raises(TargetError, match=r"targets\[1\] is a bool numpy scalar.*not a mask"):
        classes_of([np.int64(0), np.bool_(True), np.int64(1)])


# ------------------------------------------------------------------------------ lists of 0-d tensors


def test_a_list_of_0d_integer_tensors_is_a_list_of_ints(nf):
    labels = torch.tensor([4, 0, 2])
    assert classes_of(list(labels)) == classes_of(tuple(labels)) == classes_of(ClassTarget(list(labels))) == [4, 0, 2]
    assert classes_of([4, torch.tensor(0), np.int64(2)]) == [4, 0, 2]  # mixed
    assert classes_of(list(labels[:, None])) == [4, 0, 2]  # one-element tensors from a [B, 1] tensor
    assert classes_of([torch.tensor(1, dtype=torch.uint8)] * 3) == [1, 1, 1]
    assert classes_of(torch.tensor(3)) == [3, 3, 3]
    x = batch()
    assert_same_flow(nf(x, list(labels)), nf(x, labels))


def test_0d_float_and_bool_tensors_stay_refused():
    for target in (torch.tensor(1.0), list(torch.tensor([0.0, 1.0, 2.0]))):
        with pytest.raises(TargetError, match=r"class targets must be integers.*torch\.float32 tensor.*\.long\(\)"):
            classes_of(target)
    # bools are not class indices, alone or in a list, as a Python bool or a tensor (as before)
    for target in (True, [True, False, True], torch.tensor(True), list(torch.tensor([True, False, True]))):
        with pytest.raises(TargetError, match=r"class targets must be integers.*bool"):
            classes_of(target)
    with pytest.raises(TargetError, match=r"targets\[1\] is a torch\.float32 tensor"):
        classes_of([torch.tensor(0), torch.tensor(1.0), torch.tensor(2)])
    with pytest.raises(TargetError, match=r"one class index per sample; got targets\[0\] = tensor\(\[1, 2\]\)"):
        classes_of([torch.tensor([1, 2])] * 3)
    with pytest.raises(TargetError, match=r"one class index per sample; got targets\[2\] = 'cat' \(str\)"):
        classes_of([0, 1, "cat"])


def test_per_sample_lists_take_the_same_class_indices(nf):
    x = batch(2)
    ref = nf(x, [3, 1])
    for target in (
        [ClassTarget(torch.tensor(3)), torch.tensor(1)],
        [ClassTarget(np.array(3)), np.int64(1)],
        [ClassTarget(np.array([3])), lambda out: out[1]],
    ):
        flow = nf(x, target)
        torch.testing.assert_close(flow.scores, ref.scores)
    with pytest.raises(TargetError, match=r"class targets must be integers, but targets\[0\] is a torch\.float32"):
        nf(x, [ClassTarget(torch.tensor(3.0)), lambda out: out[1]])
    with pytest.raises(TargetError, match=r"targets\[0\] = 'cat': in a list of per-sample targets"):
        nf(x, ["cat", lambda out: out[1]])


# ------------------------------------------------------------------------- integer dtypes, devices


@pytest.mark.parametrize(
    "dtype",
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
    + [getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)],
)
def test_integer_tensors_of_any_dtype(dtype):
    assert classes_of(torch.tensor([4, 0, 2], dtype=dtype)) == [4, 0, 2]
    assert classes_of(torch.tensor(2, dtype=dtype)) == [2, 2, 2]
    assert classes_of(list(torch.tensor([4, 0, 2], dtype=dtype))) == [4, 0, 2]


def test_integer_dtypes_give_the_same_flow(nf):
    x = batch()
    ref = nf(x, torch.tensor([4, 0, 2]))
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert_same_flow(nf(x, torch.tensor([4, 0, 2], dtype=dtype)), ref)


def test_non_integer_tensors_are_refused():
    with pytest.raises(TargetError, match=r"class targets must be integers.*complex64 tensor"):
        classes_of(torch.tensor([1, 2, 3], dtype=torch.complex64))
    with pytest.raises(TargetError, match=r"class targets must be integers.*bool tensor.*not a mask"):
        classes_of(torch.tensor([True, False, True]))
    with pytest.raises(TargetError, match=r"class target -1 is out of range"):
        classes_of(torch.tensor([0, -1, 2], dtype=torch.int8))
    with pytest.raises(TargetError, match=r"output's shape \[B, classes\]; for one-hot labels"):
        classes_of(torch.eye(CLASSES, dtype=torch.long)[[1, 2, 3]])
    with pytest.raises(TargetError, match=r"got 5 class targets for a batch of 1.*output's shape \[B, classes\]"):
        classes_of(torch.eye(CLASSES, dtype=torch.long)[[1]], b=1)


def test_a_meta_target_tensor_is_a_target_error(nf):
    for target in (
        torch.tensor([4, 0, 2], device="meta"),
        torch.tensor(1, device="meta"),
        ClassTarget(torch.empty(3, dtype=torch.long, device="meta")),
    ):
        with pytest.raises(
            TargetError, match=r"the class target is a torch\.int64 tensor on the meta device.*no values"
        ):
            classes_of(target)
    with pytest.raises(TargetError, match=r"targets\[0\] is a torch\.int64 tensor on the meta device"):
        classes_of(list(torch.tensor([4, 0, 2], device="meta")))
    x = batch(2)
    with pytest.raises(TargetError, match=r"targets\[1\] is a torch\.int64 tensor on the meta device"):
        nf(x, [ClassTarget(1), ClassTarget(torch.tensor(1, device="meta"))])
    with pytest.raises(TargetError, match="meta device"):
        nf(x, torch.tensor([0, 1], device="meta"))


def test_sparse_target_tensors_are_read_as_dense(nf):
    labels = torch.tensor([4, 0, 2])
    assert classes_of(labels.to_sparse()) == [4, 0, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = labels[None].to_sparse_csr()
    assert classes_of(csr) == [4, 0, 2]
    with pytest.raises(TargetError, match="class targets must be integers"):
        classes_of(labels.float().to_sparse())
    x = batch()
    assert_same_flow(nf(x, labels.to_sparse()), nf(x, labels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_target_on_another_device_is_moved_to_the_output():  # pragma: no cover - no GPU in CI
    out = logits().detach()
    cuda = out.cuda()
    for target in (torch.tensor([4, 0, 2]), np.array([4, 0, 2]), list(torch.tensor([4, 0, 2]))):
        idx = ClassTarget(target).indices(cuda)
        assert idx.device == cuda.device and idx.tolist() == [4, 0, 2]
    assert ClassTarget(torch.tensor([4, 0, 2]).cuda()).indices(out).device == out.device


def test_an_exotic_unreadable_tensor_is_a_target_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        nested = torch.nested.nested_tensor([torch.tensor([0, 1]), torch.tensor([2])])
    with pytest.raises(
        TargetError,
        match="cannot read class indices from the class target, a nested torch.int64 tensor.*plain dense LongTensor",
    ):
        classes_of(nested)


def test_model_level_errors_are_never_raw_torch_errors(nf):
    """Every refused form reaches the user through ``nf(x, target)`` as one TargetError."""
    x = batch(2)
    for target in (
        np.array([0.5, 1.5]),
        np.zeros((2, 2), dtype=np.int64),
        torch.tensor([1 + 0j, 2 + 0j]),
        torch.tensor([0, 1], device="meta"),
        [torch.tensor(0.0), torch.tensor(1.0)],
        nn.Identity,  # a class, i.e. a callable: failing inside is the target's error
    ):
        with pytest.raises(TargetError):
            nf(x, target)
