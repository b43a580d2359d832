"""Compiles and flows in several threads (NOTE [threads] in naflow_fx/api.py, docs/naflow.md decision 40).

torch.fx patches ``nn.Module`` process-wide while it traces, so a flow that ran during another
thread's compile went through the tracer and failed (``TraceError``, ``NameError``, or a buffer
"removed since compile"). A compile now waits for the flows under way and runs alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from naflow_fx import compile_naflow
from naflow_fx.api import _MODEL_RUNS
from naflow_fx.errors import ConfigError
from naflow_fx.tracing import CompilesExcludeFlows

TIMEOUT = 60.0


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


def _run(*targets):
    """Run each target in a daemon thread; their exceptions, in order, once all have ended."""
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(i, f):
        try:
            f()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, f), daemon=True) for i, f in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock)"
    return errors


# ---------------------------------------------------------------------------- the lock alone


def test_flows_share_and_a_compile_waits_for_them_then_holds_new_flows_back():
    lock, order = CompilesExcludeFlows(), []
    in_flow, release = threading.Event(), threading.Event()

    def flow_a():
        with lock.flow():
            in_flow.set()
            release.wait(TIMEOUT)
            order.append("flow a ends")

    def compile_():
        in_flow.wait(TIMEOUT)
        with lock.compile():
            order.append("compile")

    def flow_b():  # comes after the compile started waiting: the compile goes first
        _until(lambda: lock.waiting()[0] == 1, "the compile waits")
        with lock.flow():
            order.append("flow b")

    def releaser():
        _until(lambda: lock.waiting() == (1, 1), "the compile and flow b wait")
        release.set()

    assert _run(flow_a, compile_, flow_b, releaser) == [None] * 4
    assert order == ["flow a ends", "compile", "flow b"]
    assert lock.waiting() == (0, 0)


def test_flows_inside_flows_and_compiles_never_wait_and_the_lock_is_reentrant():
    lock, release, done = CompilesExcludeFlows(), threading.Event(), []

    def outer():
        with lock.flow():
            release.wait(TIMEOUT)  # a compile now waits, holding new flows back...
            with lock.flow():  # ...but not this thread's nested one
                done.append("nested flow")
            with lock.compile(), lock.compile(), lock.flow():  # upgraded from a flow, reentrant
                done.append("compile inside the flow")

    def compile_():
        with lock.compile():
            done.append("other compile")

    errors = _run(outer, compile_, lambda: (_until(lambda: lock.waiting()[0] == 1, "a compile waits"), release.set()))
    assert errors == [None] * 3
    assert done[:2] == ["nested flow", "compile inside the flow"] and done[2] == "other compile"


def test_two_flows_that_both_compile_from_inside_refuse_the_second_instead_of_waiting_forever():
    lock, a_in, b_in = CompilesExcludeFlows(), threading.Event(), threading.Event()
    compiled = []

    def flow_a():
        with lock.flow():
            a_in.set()
            b_in.wait(TIMEOUT)
            with lock.compile():  # waits for flow b, which is inside its own flow
                compiled.append("a")

    def flow_b():
        with lock.flow():
            a_in.wait(TIMEOUT)
            b_in.set()
            _until(lambda: lock.waiting()[0] == 1, "flow a's compile waits")
            with lock.compile():
                compiled.append("b")

    errors = _run(flow_a, flow_b)
    assert errors[0] is None and compiled == ["a"]
    assert isinstance(errors[1], ConfigError) and "progress callback" in str(errors[1])


# ---------------------------------------------------------------------------- compile_naflow and flows


class _Announcing(nn.Module):
    """A small CNN that sets ``started`` when its forward runs (traced or not) and, if ``gate`` is
    given, waits for it there: a compile of it can be held in the middle of its trace."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.started, self.gate = threading.Event(), gate
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(TIMEOUT)
        x = self.conv2(self.conv1(x).relu()).relu()
        return self.head(x.mean((2, 3)))


def _small():
    torch.manual_seed(0)
    model = _Announcing()
    x = torch.randn(2, 3, 8, 8)
    return model, x, compile_naflow(model, x)


def test_a_compile_in_another_thread_waits_for_a_flow_under_way():
    model, x, nf = _small()
    expected = nf(x).maps
    other, in_flow, seen = _Announcing(), threading.Event(), {}
    call = nn.Module.__call__

    def flow():
        def hold(_record):
            if not in_flow.is_set():
                in_flow.set()
                _until(lambda: _MODEL_RUNS.waiting()[0] == 1, "the compile waits")
                seen["traced meanwhile"] = other.started.is_set()
                seen["module patched"] = nn.Module.__call__ is not call

        seen["maps"] = nf(x, progress=hold).maps

    def compile_():
        in_flow.wait(TIMEOUT)
        seen["compiled"] = compile_naflow(other, x)

    assert _run(flow, compile_) == [None, None]
    assert seen["traced meanwhile"] is False and seen["module patched"] is False
    assert other.started.is_set() and seen["compiled"].layers
    for name in expected:
        torch.testing.assert_close(seen["maps"][name], expected[name])


def test_a_flow_waits_while_another_thread_compiles():
    model, x, nf = _small()
    expected = nf(x).maps
    gate = threading.Event()
    other, progress = _Announcing(gate), []

    def compile_():
        compile_naflow(other, x)

    def flow():
        other.started.wait(TIMEOUT)  # the compile is inside its trace, held at the gate
        progress.append(nf(x, progress=lambda rec: progress.append(rec)).maps)

    def controller():
        _until(lambda: _MODEL_RUNS.waiting()[1] == 1, "the flow waits")
        assert progress == []  # it has not started: no solve reported
        gate.set()

    assert _run(compile_, flow, controller) == [None, None, None]
    maps = progress[-1]
    for name in expected:
        torch.testing.assert_close(maps[name], expected[name])


def test_compile_naflow_from_a_flows_progress_callback_works():
    model, x, nf = _small()
    made = []

    def hold(_record):
        if not made:
            made.append(compile_naflow(_Announcing(), x))

    result = nf(x, progress=hold)
    assert made and made[0].layers == nf.layers and set(result.maps) == set(nf.layers)


@pytest.mark.parametrize("same_model", [True, False])
def test_flows_during_repeated_compiles_in_another_thread_all_succeed(same_model):
    """The reviewer's loop: before the lock, about 1 flow in 8 failed this way."""
    model, x, nf = _small()
    expected = nf(x).maps
    other = model if same_model else _Announcing()
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
