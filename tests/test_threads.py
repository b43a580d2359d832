"""Compiles and flows in several threads (NOTE [threads] in naflow_fx/api.py, docs/naflow.md decision 40).

torch.fx patches ``nn.Module`` process-wide while it traces, so a flow that ran during another
thread's compile went through the tracer and failed (``TraceError``, ``NameError``, or a buffer
"removed since compile"). The library's tracers now give other threads the plain module call, so
flows neither wait for a compile nor hold one back.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch import nn

from naflow_fx import compile_naflow

TIMEOUT = 60.0


def _run(*targets):
    """Run each target in a daemon thread; their exceptions, in order, once all have ended."""
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(i, f):
        try:
            f()
        except BaseException as exc:  # reported to the test
            errors[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, f), daemon=True) for i, f in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    return errors


class _Held(nn.Module):
    """A small CNN that sets ``started`` when its forward runs (traced or not) and, if ``gate`` is
    given, waits for it there: a compile of it can be held in the middle of its trace."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.started, self.gate = threading.Event(), gate
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.head = nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(TIMEOUT)
        x = self.conv2(self.bn(self.conv1(x)).relu()).relu()
        return self.head(x.mean((2, 3)))


def _small():
    torch.manual_seed(0)
    model = _Held().eval()
    x = torch.randn(2, 3, 8, 8)
    return model, x, compile_naflow(model, x)


@pytest.mark.parametrize("same_model", [False, True], ids=["other-model", "same-model"])
def test_flows_and_model_runs_in_other_threads_work_while_a_compile_is_inside_its_trace(same_model):
    """The compile is held inside fx's trace (its patches in place) while another thread runs a flow,
    Grad-CAM and the model itself: each must give what it gives without the compile."""
    model, x, nf = _small()
    expected, cam, logits = nf(x).maps, nf.gradcam(x).maps, model(x)
    gate, seen = threading.Event(), {}
    traced = _Held(gate).eval()
    if same_model:  # the same weights, in a model held mid-trace
        traced.load_state_dict(model.state_dict())
    call = nn.Module.__call__

    def compile_():
        compile_naflow(traced, x)

    def others():
        try:
            assert traced.started.wait(TIMEOUT)  # the compile is inside its trace, held at the gate
            seen["patched"] = nn.Module.__call__ is not call
            seen["maps"], seen["cam"], seen["logits"] = nf(x).maps, nf.gradcam(x).maps, model(x)
        finally:
            gate.set()

    assert _run(compile_, others) == [None, None]
    assert seen["patched"]  # the situation under test: fx's patches were in place
    torch.testing.assert_close(seen["logits"], logits)
    for name in expected:
        torch.testing.assert_close(seen["maps"][name], expected[name])
        torch.testing.assert_close(seen["cam"][name], cam[name])


def test_a_compile_from_a_flows_progress_callback_and_one_handed_to_another_thread_work():
    """A callback that compiles, in its thread or in a worker it waits for, must not deadlock."""
    model, x, nf = _small()
    made = []

    def in_thread(_record):
        if not made:
            made.append(compile_naflow(_Held().eval(), x))

    def in_worker(_record):
        if len(made) == 1:
            worker = threading.Thread(target=lambda: made.append(compile_naflow(_Held().eval(), x)), daemon=True)
            worker.start()
            worker.join(TIMEOUT)
            assert not worker.is_alive(), "the compile in the worker is stuck"

    for hold in (in_thread, in_worker):
        assert set(nf(x, progress=hold).maps) == set(nf.layers)
    assert len(made) == 2 and all(m.layers == nf.layers for m in made)


@pytest.mark.parametrize("same_model", [True, False], ids=["same-model", "other-model"])
def test_flows_during_repeated_compiles_in_another_thread_all_succeed(same_model):
    """The reviewer's loop: before, about 1 flow in 8 failed this way."""
    model, x, nf = _small()
    expected = nf(x).maps
    other = model if same_model else _Held().eval()
    stop, results = threading.Event(), []

    def compiles():
        while not stop.is_set():
            compile_naflow(other, x[:1])

    def flows():
        try:
            for _ in range(6):
                results.append(nf(x).maps)
        finally:
            stop.set()

    assert _run(compiles, flows) == [None, None]
    for maps in results:
        for name in expected:
            torch.testing.assert_close(maps[name], expected[name])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_compiles_can_compile_and_explain():
    """The compile lock, held by a thread that does not exist in a forked child, would make the
    child's compile wait forever (DataLoader workers, multiprocessing's fork)."""
    model, x, _ = _small()
    gate = threading.Event()
    held = _Held(gate).eval()
    worker = threading.Thread(target=lambda: compile_naflow(held, x), daemon=True)
    worker.start()
    try:
        assert held.started.wait(TIMEOUT)  # inside its trace, the lock held
        pid = os.fork()
        if pid == 0:  # the child: compile and explain, then leave at once
            code = 1
            try:
                signal.alarm(60)
                maps = compile_naflow(model, x)(x).maps
                code = 0 if set(maps) and all(bool(torch.isfinite(m).all()) for m in maps.values()) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        gate.set()
        worker.join(TIMEOUT)
    assert os.waitstatus_to_exitcode(status) == 0
