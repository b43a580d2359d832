"""Tracing leaves the user's model alone and refuses what it cannot see through with one clear error:
wrappers anywhere inside the model (TorchScript, ``torch.compile``, torch.export), forwards that do not
take one image tensor, arguments a flow cannot give; nothing tracing makes is left on the model, and
its ``train()`` is never called."""

from __future__ import annotations

import operator
import subprocess
import sys

import pytest
import torch
from models import tiny_cnn
from torch import nn

from naflow_fx import ConfigError, InputTypeError, NAFlowError, UnsupportedModelError, compile_naflow
from naflow_fx.tracing import trace


def images(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cnn() -> nn.Module:
    return tiny_cnn(num_classes=2)


class Norm(nn.Module):
    def forward(self, x):
        return x * 2.0 - 1.0


def state(model: nn.Module) -> dict:
    """Every module's attribute names (and identities), parameter/buffer/sub-module names, and flag."""
    return {
        name: (
            {k: id(v) for k, v in vars(m).items()},
            [k for k, _ in m._parameters.items()],
            [k for k, _ in m._buffers.items()],
            [k for k, _ in m._modules.items()],
            m.training,
        )
        for name, m in model.named_modules()
    }


# ------------------------------------------------------------------- wrappers inside the model


def _script(m):
    return torch.jit.script(m)


def _jit_trace(m):
    return torch.jit.trace(m, images(1))


def _export(m):
    return torch.export.export(m, (images(1),)).module()


@pytest.mark.parametrize(
    ("wrap", "kind", "advice"),
    [
        (_script, "RecursiveScriptModule", r"put the nn\.Module before torch\.jit\.script/trace \(the Sequential"),
        (_jit_trace, "TopLevelTracedModule", r"put the nn\.Module before torch\.jit\.script/trace"),
        (torch.compile, "OptimizedModule", r"put the module you compiled \(model\.get_submodule\('1'\)\._orig_mod\)"),
        (_export, "GraphModule", r"put the original nn\.Module you gave torch\.export\.export in its place"),
    ],
)
def test_a_wrapper_inside_the_model_is_refused_naming_it(wrap, kind, advice):
    """Before: a scripted sub-module became one opaque call and the flow silently explained only the
    normalisation before it; a compiled or exported one gave an unrelated trace error."""
    inner = cnn()
    model = nn.Sequential(Norm(), wrap(inner))  # not .eval(): torch.export's module refuses it
    before = state(model)
    with pytest.raises(UnsupportedModelError) as err:
        compile_naflow(model, images(1))
    message = str(err.value)
    assert f"its sub-module '1' ({kind}) is opaque to fx" in message
    assert "layers before it" in message and "model.set_submodule('1', " in message
    assert __import__("re").search(advice, message), message
    assert state(model) == before
    fixed = nn.Sequential(Norm(), inner).eval()  # as the message says: the original in its place
    x = images(2)
    torch.testing.assert_close(compile_naflow(fixed, x[:1])(x).output, fixed(x))


def test_a_deeper_wrapper_is_named_by_its_qualified_name():
    model = nn.Sequential(Norm(), nn.Sequential(nn.Identity(), torch.compile(cnn()))).eval()
    with pytest.raises(UnsupportedModelError, match=r"sub-module '1\.1' \(OptimizedModule\).*leaf_modules=\['1\.1'\]"):
        compile_naflow(model, images(1))


def test_a_sub_module_compiled_in_place_is_traced_through():
    """nn.Module.compile() sets the module's call to dynamo's, which fx cannot trace: before, a model
    with one compiled sub-module was refused with an error about "a tensor's values"."""
    model, plain = nn.Sequential(Norm(), cnn()).eval(), nn.Sequential(Norm(), cnn()).eval()
    model[1].compile(backend="eager")
    model[1][0].compile(backend="eager")  # a conv, a leaf of the trace
    before = state(model)
    x = images(2)
    a, b = compile_naflow(model, x[:1])(x), compile_naflow(plain, x[:1])(x)
    assert a.layers == b.layers
    for name in a.layers:
        torch.testing.assert_close(a.maps[name], b.maps[name])
    assert state(model) == before and model[1]._compiled_call_impl is not None  # still compiled


class Checkpointed(nn.Module):
    """Gradient checkpointing when the input requires grad, as torchvision's DenseNet with
    memory_efficient=True does; the parameter's flag picks a (here equivalent) spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cnn()

    def forward(self, x):
        if x.requires_grad:
            return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)
        if self.body[0].weight.requires_grad:
            return self.body(x)
        return self.body(x + 1.0)


def test_a_branch_on_requires_grad_is_traced_as_in_inference():
    """Before: fx cannot branch on a proxy, and the model was refused with an error about "a tensor's
    values". Now a computed tensor's .requires_grad is False and a parameter's is its own."""
    model = Checkpointed().eval()
    x = images(2)
    flow = compile_naflow(model, x[:1])
    added = lambda nf: any(n.target is operator.add for n in nf.graph_module.graph.nodes)  # noqa: E731
    assert not added(flow) and not flow.fixed_shape  # the weight requires grad: that branch
    plain = compile_naflow(model.body, x[:1])
    a, b = flow(x), plain(x)
    for name in b.layers:
        torch.testing.assert_close(a.maps[f"body.{name}"], b.maps[name])
    model.body[0].weight.requires_grad_(False)
    assert added(compile_naflow(model, x[:1]))


class DictInput(nn.Module):
    """A forward that takes a batch dict, as many training pipelines' models do."""

    def __init__(self, how: str = "index") -> None:
        super().__init__()
        self.body, self.how = cnn(), how

    def forward(self, batch):
        image = batch.get("image") if self.how == "get" else batch["image"]
        if self.how == "shape" and image.shape[-1] % 2:  # a branch on the shape: the trace fails there
            image = image[..., :-1]
        return self.body(image)


def test_a_forward_that_takes_a_dict_is_told_how_to_wrap_it():
    """Before: "failed on the example input ... IndexError: too many indices", with advice about the
    example's channels and size; and a dict example only heard that it must be a tensor."""
    x = images(2)
    for how in ("index", "get", "shape"):
        with pytest.raises(UnsupportedModelError, match=r"reads its input as a dict \(input\['image'\]\)") as err:
            compile_naflow(DictInput(how).eval(), x[:1])
        assert "def forward(self, x): return self.model({'image': x})" in str(err.value), how
    with pytest.raises(InputTypeError, match=r"got dict\. .*if its forward takes a dict, wrap it") as err:
        compile_naflow(DictInput().eval(), {"image": x[:1]})
    assert "def forward(self, x): return self.model({'image': x})" in str(err.value)  # the same wrapper

    class Explained(nn.Module):  # the message's wrapper, as written there
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model({"image": x})

    model = DictInput().eval()
    torch.testing.assert_close(compile_naflow(Explained(model), x[:1])(x).output, model({"image": x}))


def test_a_scripted_leaf_is_kept_opaque_on_request():
    act = torch.jit.script(nn.Tanh())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(UnsupportedModelError, match=r"sub-module '1' \(RecursiveScriptModule\)"):
        compile_naflow(model, images(1))
    flow = compile_naflow(model, images(1), leaf_modules=["1"], fallback="linearize")
    assert "1" in flow.layers  # named as a leaf: one step, linearised
    x = images(2)
    torch.testing.assert_close(flow(x).output, model(x))


@pytest.mark.parametrize("unflatten", [False, True])
def test_an_exported_module_as_the_model_is_refused_with_the_original_to_pass(unflatten):
    program = torch.export.export(cnn(), (images(1),))
    model = torch.export.unflatten(program) if unflatten else program.module()
    with pytest.raises(
        UnsupportedModelError, match=r"cannot trace \w+: torch\.export's .*pass the original nn\.Module"
    ):
        compile_naflow(model, images(1))  # before: "NotImplementedError: Calling eval() is not supported yet"


def test_trace_tells_what_to_pass_for_an_exported_program_or_a_class():
    program = torch.export.export(cnn(), (images(1),))
    with pytest.raises(
        InputTypeError, match=r"got ExportedProgram.*pass the original nn\.Module you gave torch\.export"
    ):
        trace(program)
    with pytest.raises(InputTypeError, match=r"got type \(the class itself\): pass an instance, Norm\(\.\.\.\)"):
        trace(Norm)


# ------------------------------------------------------------ nothing is added to the model


class Constants(nn.Module):
    """Normalises with tensors made in forward: fx stores each on its root as ``_tensor_constant<i>``."""

    def __init__(self, fixed_shapes: bool = False) -> None:
        super().__init__()
        self.fixed_shapes = fixed_shapes
        self.body = cnn()

    def forward(self, x):
        mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
        std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.fixed_shapes and x.shape[-1] % 2:  # a branch on the shape: traced again with ShapeTracer
            x = x[..., :-1]
        self.seen = x  # a forward that caches on self: a proxy while tracing
        return self.body(x)


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_tracing_adds_nothing_to_the_model_and_the_flow_keeps_its_constants(fixed_shapes):
    model = Constants(fixed_shapes).eval()
    before = state(model)
    flow = compile_naflow(model, images(1))
    assert state(model) == before  # before: _tensor_constant0 and _tensor_constant1 (and `seen`) on the model
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    assert (flow.fixed_shape is not None) == fixed_shapes
    x = images(2)
    torch.testing.assert_close(flow(x).output, model(x))  # the graph module holds its own constants


def test_a_failed_trace_leaves_nothing_either():
    class Fails(Constants):
        def forward(self, x):
            x = x / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
            if x.sum() > 0:  # a branch on values: refused
                x = -x
            return self.body(x)

    model = Fails().eval()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match="depends on more than the shape"):
        compile_naflow(model, images(1))
    assert state(model) == before


# -------------------------------------------------------------------- train() is not called


class CountsTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.body = cnn()
        self.drop = nn.Dropout(0.5)

    def train(self, mode: bool = True):
        self.calls += 1  # a side effect (freezing BN, logging) the user wants only when they call it
        return super().train(mode)

    def forward(self, x):
        return self.body(self.drop(x) if self.training else x)


@pytest.mark.parametrize("training", [False, True])
def test_tracing_sets_the_flags_without_calling_train(training):
    model = CountsTrain()
    model.training = training  # directly, to start from zero calls
    model.calls = 0
    before = state(model)
    flow = compile_naflow(model, images(1))
    assert model.calls == 0  # before: model.eval() ran the override
    assert state(model) == before and model.training is training
    assert all(n.op != "call_module" or "drop" not in str(n.target) for n in flow.graph_module.graph.nodes)
    x = images(2)
    model.training = False
    torch.testing.assert_close(flow(x).output, model(x))  # eval semantics: no dropout in the graph


# --------------------------------------------------------------------------- forward signatures


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = cnn()


class Star(Head):
    def forward(self, *xs):
        return self.body(xs[0])


class Keywords(Head):
    def forward(self, **kw):
        return self.body(kw["x"])


class KeywordOnly(Head):
    def forward(self, *, image):
        return self.body(image)


@pytest.mark.parametrize(
    ("cls", "how", "call"),
    [
        (Star, "as *xs", "self.model(x)"),
        (Keywords, "as **kw", "self.model(x=x)"),
        (KeywordOnly, "by keyword only", "self.model(image=x)"),
    ],
)
def test_a_forward_without_a_positional_image_is_told_how_to_wrap_it(cls, how, call):
    """Before: *xs gave a raw AttributeError ('NoneType' object has no attribute 'shape') from partition.py;
    **kw blamed the example input."""
    model = cls().eval()
    before = state(model)
    with pytest.raises(UnsupportedModelError) as err:
        compile_naflow(model, images(1))
    message = str(err.value)
    assert f"{cls.__name__}.forward takes its inputs {how}" in message and "one image tensor" in message
    assert f"def forward(self, x): return {call}" in message
    assert state(model) == before
    scope = {"torch": torch}
    exec("class Explained" + message.split("class Explained", 1)[1].split("\nthen")[0], scope)  # as written
    wrapped = scope["Explained"](model)
    x = images(2)
    torch.testing.assert_close(compile_naflow(wrapped, x[:1])(x).output, model.body(x))


def test_a_forward_without_arguments_is_refused():
    class Nothing(Head):
        def forward(self):
            return self.body(images(1))

    with pytest.raises(UnsupportedModelError, match=r"Nothing\.forward takes no argument.*images as its first"):
        compile_naflow(Nothing().eval(), images(1))
    with pytest.raises(UnsupportedModelError, match=r"Head defines no forward"):
        compile_naflow(Head().eval(), images(1))  # nn.Module's own forward(*input) is not "inputs as *input"


class Timestep(Head):
    def forward(self, x, t, scale=1.0):
        return self.body(x) * t * scale


def test_an_argument_without_default_is_named_with_the_concrete_args_to_give():
    """Before: "the model failed on the example input ... Pass an example input the model accepts"."""
    model = Timestep().eval()
    before = state(model)
    with pytest.raises(ConfigError, match=r"Timestep\.forward needs 't' after the images, with no default") as err:
        compile_naflow(model, images(1))
    assert "concrete_args={'t': value}" in str(err.value) and "example input" not in str(err.value)
    assert state(model) == before
    with pytest.raises(ConfigError, match=r"needs 't'"):
        compile_naflow(model, images(1), concrete_args={"scale": 2.0})  # the default one only
    x = images(2)
    for t in (3.0, torch.tensor(3.0)):  # a number, or a tensor (kept by the graph, not left on the model)
        flow = compile_naflow(model, x[:1], concrete_args={"t": t, "scale": 2.0})
        torch.testing.assert_close(flow(x).output, model(x, t, 2.0))
        assert state(model) == before


class Variadic(Head):
    """Takes and usually ignores more: ``forward(self, x, *args, **kwargs)``."""

    def forward(self, x, *rest, **kw):
        if rest or kw.get("mask") is not None:  # a proxy for rest or mask would take these branches
            x = torch.zeros_like(x)
        return self.body(x) * kw.get("scale", 1.0)


def test_args_and_kwargs_after_the_images_are_bound_as_model_x_binds_them():
    """Before: "naflow_fx explains models with one image input; this one takes 3 (x, _rest, _kw)"."""
    model = Variadic().eval()
    before = state(model)
    x = images(2)
    flow = compile_naflow(model, x[:1])
    assert [n.op for n in flow.graph_module.graph.nodes].count("placeholder") == 1
    torch.testing.assert_close(flow(x).output, model(x))
    assert flow(x).output.abs().sum() > 0  # not the zeroed branch
    scaled = compile_naflow(model, x[:1], concrete_args={"scale": 3.0})  # **kw takes any name
    torch.testing.assert_close(scaled(x).output, model(x, scale=3.0))
    assert state(model) == before


def test_concrete_args_names_are_checked_when_only_args_could_take_them():
    class Rest(Head):
        def forward(self, x, *rest):
            return self.body(x)

    with pytest.raises(ConfigError, match=r"'bogus', which is not an argument of Rest\.forward"):
        compile_naflow(Rest().eval(), images(1), concrete_args={"bogus": 1})
    compile_naflow(Rest().eval(), images(1))


# ------------------------------------------------------------------ NOTE [faithful trace]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class _TensorsOnly(nn.Module):
    """Scales real tensors only: fx's proxy is not a Tensor, so tracing would skip the step."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = _cnn()

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            x = x * 2
        return self.cnn(x)


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = _cnn()

    def forward(self, x):
        return self.cnn(x + 0.01 * torch.randn_like(x))


def test_a_graph_that_skips_a_step_of_the_model_is_refused():
    from torchvision.transforms import v2

    x = torch.rand(1, 3, 16, 16)
    model = nn.Sequential(v2.Normalize([0.5] * 3, [0.2] * 3), _cnn()).eval()
    with pytest.raises(UnsupportedModelError, match=r"does not compute what the model computes.*transforms.v2 .*'0'"):
        compile_naflow(model, x)
    with pytest.raises(UnsupportedModelError, match=r"_TensorsOnly does not compute .*isinstance\(x, torch.Tensor\)"):
        compile_naflow(_TensorsOnly(), x)


def test_a_model_that_draws_random_numbers_is_compared_at_the_same_seed():
    model, x = _Noisy().eval(), torch.rand(1, 3, 16, 16)
    state = torch.random.get_rng_state()
    trace(model, example=x)  # graph and model draw the same noise: not refused
    assert torch.equal(torch.random.get_rng_state(), state)  # the comparison leaves the caller's random stream
    compile_naflow(model, x)


def test_compiling_does_not_import_torch_dynamo():
    """The check for torch.export's modules imported ``torch._dynamo`` (about 900 modules, a second,
    and ``TORCHINDUCTOR_CACHE_DIR`` set in the environment) on every first compile."""
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import naflow_fx\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
        "naflow_fx.compile_naflow(m, torch.randn(1, 3, 8, 8))(torch.randn(2, 3, 8, 8))\n"
        "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]


class _Counted(nn.Module):
    """Updates its own buffers in place even in eval: a call counter, and a running mean of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        self.calls.add_(1)
        self.mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)))
        return x


class _CountedNet(nn.Module):
    def __init__(self, branch_on_size: bool) -> None:
        super().__init__()
        self.branch_on_size = branch_on_size
        self.a, self.counted, self.b, self.fc = (
            nn.Conv2d(3, 4, 3, padding=1),
            _Counted(),
            nn.Conv2d(4, 4, 1),
            nn.Linear(4, 2),
        )

    def forward(self, x):
        if self.branch_on_size and x.shape[-1] % 2:  # plain fx fails: traced again with the sizes fixed
            x = x[..., :-1]
        return self.fc(torch.relu(self.b(self.counted(torch.relu(self.a(x))))).mean((2, 3)))


@pytest.mark.parametrize("branch_on_size", [False, True], ids=["fx", "fixed-shape"])
def test_buffers_a_forward_updates_in_place_are_left_as_they_were(branch_on_size):
    """fx runs in-place updates of real buffers while it traces: compiling counted a call and moved the
    running mean of the user's model (NOTE [the model is not changed])."""
    torch.manual_seed(0)
    model, x = _CountedNet(branch_on_size).eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nf = compile_naflow(model, x[:1])
    assert (nf.fixed_shape is not None) == branch_on_size
    nf(x), nf.gradcam(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]


class _InPlaceSigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid_(x)  # not rewritten out of place by normalize: a leaf of the fallback


def test_a_model_that_writes_into_its_input_leaves_the_callers_images_alone():
    """The example, and image 0 of a flow's batch (the batch-independence probe), were overwritten
    by a forward that writes into its input in place, even when the call then failed."""
    torch.manual_seed(0)
    model = nn.Sequential(_InPlaceSigmoid(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model = nn.Sequential(*model, nn.Flatten(), nn.Linear(4, 2)).eval()
    example, x = torch.randn(1, 3, 8, 8), torch.randn(3, 3, 8, 8)
    saved = example.clone(), x.clone()
    nf = compile_naflow(model, example, fallback="linearize")
    for call in (nf, nf.gradcam):
        try:
            call(x)
        except NAFlowError:  # autograd refuses the in-place write on the flow's own copy: fine
            pass
    assert torch.equal(example, saved[0]) and torch.equal(x, saved[1])


class _Noisy(nn.Module):
    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)  # noise kept in eval


def test_compiling_a_forward_that_draws_random_numbers_keeps_the_callers_random_stream():
    """Shape propagation ran the forward on the caller's random state (the faithful check already
    did not): the caller's next draws changed with each compile."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Noisy(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    compile_naflow(model, (1, 3, 8, 8), fallback="linearize")
    assert torch.equal(torch.rand(4), expected)
