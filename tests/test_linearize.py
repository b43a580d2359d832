"""``linearize_graph``: its tangent map equals ``torch.func.jvp`` on every op family it handles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.func import jvp

import naflow_fx as nf
from naflow_fx.rules import generic
from naflow_fx.solvers.linearize import linearize_graph


def _check(gm: fx.GraphModule, point: torch.Tensor, *extras) -> None:
    t = torch.randn_like(point)
    t_before = t.clone()
    out, tangent = linearize_graph(gm, point, *extras)
    ref_out, ref = jvp(lambda x: gm(x, *extras), (point,), (t,))
    got = tangent(t)
    again = tangent(t)  # in-place steps touch temporaries only: not t, not the program's constants
    torch.testing.assert_close(t, t_before, rtol=0, atol=0)
    if isinstance(ref, torch.Tensor):
        ref, got, again, ref_out, out = (ref,), (got,), (again,), (ref_out,), (out,)
    for r, g, g2, ro, o in zip(ref, got, again, ref_out, out, strict=True):
        torch.testing.assert_close(o, ro)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g2, g, rtol=0, atol=0)
    if tangent.transposable and len(out) == 1:  # the program's vjp is the adjoint (NOTE [tangent program])
        y = torch.randn_like(out[0])
        adjoint = torch.func.vjp(tangent, torch.zeros_like(point))[1](y)[0]
        expected = torch.func.vjp(lambda x: gm(x, *extras), point)[1](y)[0]
        torch.testing.assert_close(adjoint, expected, rtol=1e-5, atol=1e-5)


class Mixed(nn.Module):
    """Every rule family: affine, batch norm, pointwise (mask and smooth), sums, products, linear, pad,
    and ops that fall back to ``jvp`` (max pool, layer norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4).eval()
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.bn2 = nn.BatchNorm2d(4).eval()  # after a sum: a per-channel scale, not folded
        self.bn2.running_var.uniform_(0.5, 2)
        self.prelu = nn.PReLU(4)
        self.lin = nn.Linear(6, 5)

    def forward(self, x, extra):
        y = self.bn(self.conv(x))
        a = F.relu(y) + torch.sigmoid(y) * y  # product of two input-dependent values
        b = torch.sub(a, extra, alpha=0.5) - 2.0 * F.silu(a)
        c = torch.cat([b, extra, F.hardtanh(b, -0.5, 0.5)], dim=1)
        d0, d1 = torch.split(c, [6, 6], dim=1)
        e = F.pad(self.prelu(d0[:, :4]), (1, 1, 1, 1), value=3.0) + F.max_pool2d(F.pad(d1[:, :4], (1, 1, 1, 1)), 1)
        f = F.interpolate(F.avg_pool2d(self.bn2(e), 2), scale_factor=2.0, mode="bilinear") * extra.mean()
        g = F.layer_norm(f.permute(0, 2, 3, 1), (4,)).flatten(1, 2)
        h = self.lin(torch.cat([g, g[..., :2]], dim=-1))
        return h.reshape(h.shape[0], -1), extra + 1  # the second output does not depend on x


def test_every_rule_family_matches_jvp():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Mixed().eval())
    _check(gm, torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6))


class InPlace(nn.Module):
    """Batch norms folded into the conv and linear layers before them, and the in-place steps of the
    tangent program (masks, derivatives, sums, negation, scales), with no ``jvp`` fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1, groups=2)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.lin, self.bn4 = nn.Linear(4, 5), nn.BatchNorm1d(5)
        for bn in (self.bn1, self.bn2, self.bn3, self.bn4):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.normal_()
        self.register_buffer("shift", torch.randn(1, 4, 6, 6))

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = torch.sub(self.bn2(self.conv2(a)), a, alpha=0.5)  # a has two readers: b is summed into
        c = torch.sub(self.shift, -F.silu(b))
        d = self.bn3(c)  # not after a conv: a scale
        return self.bn4(self.lin(d.mean((2, 3))))


def test_batch_norms_fold_and_the_program_is_its_own_adjoints_source():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(InPlace().eval())
    _check(gm, torch.randn(6, 3, 6, 6))
    _, tangent = linearize_graph(gm, torch.randn(6, 3, 6, 6))
    kinds = tangent.kinds
    assert [kinds[k] for k in ("bn1", "bn2", "bn4")] == ["folded"] * 3 and kinds["bn3"] == "scale"
    assert tangent.transposable
    # a weight with more entries than its layer's output is not copied: 5×4 against 1×5 at batch 1
    _check(gm, torch.randn(1, 3, 6, 6))
    assert linearize_graph(gm, torch.randn(1, 3, 6, 6))[1].kinds["bn4"] == "scale"


def test_constant_output_gets_zero_tangent():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Mixed().eval())
    point, extra = torch.randn(1, 3, 6, 6), torch.randn(1, 4, 6, 6)
    _, tangent = linearize_graph(gm, point, extra)
    assert torch.count_nonzero(tangent(torch.randn_like(point))[1]) == 0


def test_broadcast_against_constant_falls_back_to_jvp():
    class Broadcast(nn.Module):
        def forward(self, x, bias):
            return x + bias  # x is [B, 1, H, W], bias [1, C, H, W]: the sum broadcasts x

    gm = fx.symbolic_trace(Broadcast())
    _check(gm, torch.randn(2, 1, 4, 4), torch.randn(1, 3, 4, 4))


def test_rules_chosen_per_op():
    """The cheap rules are the ones used; only ops without one fall back to ``jvp``."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Mixed().eval())
    _, tangent = linearize_graph(gm, torch.randn(1, 3, 6, 6), torch.randn(1, 4, 6, 6))
    kinds = tangent.kinds
    assert kinds["conv"] == "affine" and kinds["lin"] == "affine"
    assert kinds["bn"] == "folded" and kinds["bn2"] == "scale"
    assert kinds["relu"] == "mask" and kinds["hardtanh"] == "mask"
    assert kinds["sigmoid"] == "derivative" and kinds["prelu"] == "derivative"
    assert kinds["mul"] == "product" and kinds["sub"] == "sum" and kinds["cat"] == kinds["interpolate"] == "linear"
    assert {kinds[k] for k in ("max_pool2d", "layer_norm")} == {"jvp"}
    assert sum(k == "jvp" for k in kinds.values()) == 2


class Decoder(nn.Module):
    """A transposed conv with a batch norm after it (its output channels are the weight's dim 1, so
    the norm must not fold into dim 0), nearest and bilinear resampling, and shuffles."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.up = nn.Conv2d(4, 4, 3, 2, 1), nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_var.uniform_(0.5, 2), self.bn.weight.data.normal_()

    def forward(self, x):
        y = F.relu(self.conv(x))
        a = self.bn(self.up(y)) + F.interpolate(y, scale_factor=2.0)
        a = a + F.interpolate(y, size=x.shape[-2:], mode="bilinear")
        b = F.pixel_unshuffle(F.channel_shuffle(a, 2), 2)
        return F.relu(F.pixel_shuffle(b, 2) + x)


def test_transposed_convs_resampling_and_shuffles_match_jvp_without_fallback():
    torch.manual_seed(0)
    gm = nf.passes.normalize(fx.symbolic_trace(Decoder().eval()))
    x = torch.randn(2, 4, 6, 6)
    _check(gm, x)
    kinds = linearize_graph(gm, x)[1].kinds
    assert "jvp" not in kinds.values() and "folded" not in kinds.values()
    assert kinds["up"] == "affine" and kinds["bn"] == "scale"


def test_normalised_resnet_block_needs_no_jvp():
    """A compiled ResNet's residual stage is covered by the cheap rules (no ``jvp`` fallback)."""
    model = torchvision.models.resnet18().eval()
    flow = nf.compile_naflow(model, (1, 3, 32, 32), layers="blocks")
    stage = flow.inverse.stage_layer1_0_add
    _, tangent = linearize_graph(stage, torch.randn(1, 64, 32, 32))
    assert "jvp" not in tangent.kinds.values() and tangent.transposable
    assert {"affine", "folded", "mask", "sum"} <= set(tangent.kinds.values())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny"])
def test_region_stages_of_the_zoo_match_jvp(name, monkeypatch):
    """Every region stage NAFlow solves on these models: op-by-op tangent = jvp."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    flow = nf.compile_naflow(model, (1, 3, 64, 64), layers="blocks", max_iter=2)
    seen = []
    original = generic.affine_piece

    def checked(stage, input, *extras):
        _check(stage, input, *extras)
        seen.append(stage)
        return original(stage, input, *extras)

    monkeypatch.setattr(generic, "affine_piece", checked)
    flow(torch.randn(2, 3, 64, 64))
    assert seen, "no region was solved"


class SharedConv(nn.Module):
    """A conv whose output the batch norm and a skip sum both read: the batch norm must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.normal_()

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_batch_norm_does_not_fold_into_a_conv_that_other_nodes_read():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SharedConv().eval())
    _check(gm, torch.randn(4, 3, 6, 6))
    assert linearize_graph(gm, torch.randn(4, 3, 6, 6))[1].kinds["bn"] == "scale"


def test_a_program_with_a_jvp_fallback_is_not_declared_transposable():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Mixed().eval())
    _, tangent = linearize_graph(gm, torch.randn(1, 3, 6, 6), torch.randn(1, 4, 6, 6))
    assert "jvp" in tangent.kinds.values() and not tangent.transposable
