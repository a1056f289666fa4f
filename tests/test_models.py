"""Reference models: metaopt's BatchNorm equals torch's, and stays exact under vmap where torch's is not."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import metaopt as mo
from metaopt.stacked import unstacked_modules
from problems import tiny_tasks


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_equals_torch(shape, training):
    ours = mo.models.BatchNorm(3, track_running_stats=True)
    ref = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(3)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    ours.train(training), ref.train(training)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))


class NormNet(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.lin, self.norm, self.out = nn.Linear(1, 4), norm, nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.lin(x))))


def _vmap_and_loop(model):
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    tasks = tiny_tasks(3, 2)
    return loop, meta, tasks


def test_metaopt_batchnorm_second_order_exact_under_vmap():
    loop, meta, tasks = _vmap_and_loop(NormNet(mo.models.BatchNorm(4, track_running_stats=True)))
    assert loop.second_order_vmap_unsafe == []
    vmapped = mo.Full()(loop, meta, tasks, batching="vmap")
    looped = mo.Full()(loop, meta, tasks, batching="loop")
    for k in vmapped.grads:
        torch.testing.assert_close(vmapped.grads[k], looped.grads[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.LayerNorm], ids=lambda m: m.__name__)
def test_torch_norm_layers_fall_back_to_loop_and_refuse_vmap(norm):
    loop, meta, tasks = _vmap_and_loop(NormNet(norm(4)))
    assert loop.second_order_vmap_unsafe == ["norm"]
    with pytest.raises(ValueError, match="functorch issue #534"):
        mo.Full()(loop, meta, tasks, batching="vmap")
    auto = mo.Full()(loop, meta, tasks)
    assert auto.stats["batching"] == "loop"
    # First-order estimators never take second derivatives, so they may still vmap (auto stacks them).
    assert mo.FirstOrder()(loop, meta, tasks, batching="vmap").stats["batching"] == "vmap"
    assert mo.FirstOrder()(loop, meta, tasks).stats["batching"] == "stacked"


def test_conv4_shapes():
    model = mo.Conv4(out_features=5, channels=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    embed = mo.Conv4(out_features=0, channels=8)
    assert embed(torch.randn(2, 1, 28, 28)).shape == (2, embed.embedding_size) == (2, 8)
    unpooled = mo.Conv4(out_features=0, channels=8, pools=3)  # the last 3x3 map kept: 8 * 3 * 3
    assert unpooled(torch.randn(2, 1, 28, 28)).shape == (2, unpooled.embedding_size) == (2, 72)
    assert mo.Conv4(out_features=5, channels=8, pools=2, image_size=16)(torch.randn(3, 1, 16, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match="pools = 5"):
        mo.Conv4(pools=5)


def test_conv4_stem_stride_reads_a_56_pixel_image_into_the_28_pixel_backbone():
    strided = mo.Conv4(out_features=0, channels=8, image_size=56, stem_stride=2)
    assert strided(torch.randn(2, 1, 56, 56)).shape == (2, strided.embedding_size) == (2, 8)
    assert strided.features[0].stride == (2, 2) and all(
        m.stride == (1, 1) for m in strided.features[1:] if isinstance(m, torch.nn.Conv2d))
    # The same parameters as the standard backbone (only the first convolution's stride differs).
    plain = mo.Conv4(out_features=0, channels=8)
    assert [p.shape for p in strided.parameters()] == [p.shape for p in plain.parameters()]
    # Odd sizes round up as the convolution does: 57 -> 29 -> 14 -> 7 -> 3 -> 1.
    assert mo.Conv4(out_features=4, channels=8, image_size=57, stem_stride=2)(torch.randn(1, 1, 57, 57)).shape == (1, 4)
    with pytest.raises(ValueError, match="stem_stride = 0"):
        mo.Conv4(stem_stride=0)
    with pytest.raises(ValueError, match="pools = 4"):
        mo.Conv4(image_size=28, stem_stride=4)  # 7 px: 4 pools leave nothing


def test_conv4_fused_norm_and_channels_last_compute_the_same_protonet_meta_gradient():
    """`norm="fused"` (nn.BatchNorm2d) and channels-last weights are speed options: the same embedding and the
    same ProtoNet meta-gradient (float64) as the default backbone, from the same weights."""
    torch.manual_seed(0)
    kwargs = dict(out_features=0, channels=4, image_size=8, pools=3)
    reference = mo.Conv4(**kwargs)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8).sample(2, 1, torch.Generator().manual_seed(0))
    x = tasks.query.x[0]
    expected_grads = None
    for options in [{}, {"norm": "fused"}, {"channels_last": True}, {"norm": "fused", "channels_last": True}]:
        model = mo.Conv4(**kwargs, **options)
        model.load_state_dict(reference.state_dict())
        if options.get("channels_last"):
            assert model.features[4].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
        loop = mo.PrototypeLoop(model, n_way=3)
        meta = mo.meta_params(mo.Init(model))
        grads = mo.Full()(loop, meta, tasks).grads
        expected_grads = expected_grads or grads
        for k, g in grads.items():
            torch.testing.assert_close(g, expected_grads[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="norm = 'layer'"):
        mo.Conv4(norm="layer")  # type: ignore[arg-type]


def test_conv4_fused_norm_is_known_to_be_second_order_unsafe_under_vmap():
    """nn.BatchNorm2d's second derivatives are wrong under vmap: MAML refuses vmap and runs stacked, where
    ordinary autograd differentiates it (exact: tests/test_stacked.py), or task by task where stacking is
    not offered (a compiled estimator)."""
    model = mo.Conv4(out_features=3, channels=4, image_size=8, pools=3, norm="fused")
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.cross_entropy)
    assert loop.second_order_vmap_unsafe == [f"features.{i}" for i in (1, 5, 9, 13)]
    meta = mo.meta_params(mo.Init(model))
    tasks = mo.RandomPatterns(n_way=3, k_shot=1, k_query=2, size=8).sample(2, 1, torch.Generator().manual_seed(0))
    assert mo.Full()(loop, meta, tasks).stats["batching"] == "stacked"
    with pytest.raises(ValueError, match="functorch issue #534"):
        mo.Full()(loop, meta, tasks, batching="vmap")
    assert mo.FirstOrder()(loop, meta, tasks, batching="vmap").stats["batching"] == "vmap"


@pytest.mark.parametrize("options", [{"padding": 1}, {"padding": 0, "bias": False}, {"padding": 1, "stride": 2},
                                     {"padding": (2, 1), "dilation": (2, 1)}, {"padding": (1, 0), "stride": (2, 1)}])
def test_matmul_conv2d_is_conv2d_to_the_second_derivative(options):
    """`MatmulConv2d` (im2col and one GEMM) computes nn.Conv2d's function: the same outputs and first derivatives
    as nn.Conv2d from the same weights (float64), and second derivatives that pass central differences."""
    reference = nn.Conv2d(3, 4, 3, **options)
    conv = mo.MatmulConv2d(3, 4, 3, **options)
    conv.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    y, want = conv(x), reference(x)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(y)
    got = torch.autograd.grad((y * probe).sum(), [x, *conv.parameters()])
    expected = torch.autograd.grad((want * probe).sum(), [x, *reference.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    small = torch.randn(1, 3, 5, 4, requires_grad=True)
    params = dict(conv.named_parameters())
    assert torch.autograd.gradgradcheck(
        lambda x, w: torch.func.functional_call(conv, {**params, "weight": w}, (x,)).tanh(),
        (small, conv.weight.detach().clone().requires_grad_()))


def test_matmul_conv2d_refuses_what_it_does_not_compute():
    for options in [{"groups": 3, "padding": 1}, {"padding": "same"}, {"padding": 1, "padding_mode": "reflect"}]:
        with pytest.raises(ValueError, match="only groups=1 and numeric zero padding"):
            mo.MatmulConv2d(3, 3, 3, **options)
    with pytest.raises(ValueError, match="conv = 'fft'"):
        mo.Conv4(conv="fft")  # type: ignore[arg-type]


@pytest.mark.parametrize("batching", ["vmap", "stacked", "loop"])
def test_conv4_matmul_conv_computes_the_same_maml_meta_gradient(batching):
    """`Conv4(conv="matmul")` is a kernel choice: second-order MAML's meta-gradient equals the native
    convolution's (float64) vmapped, stacked (its own rule: one bmm over the tasks) and task by task."""
    torch.manual_seed(0)
    reference = mo.Conv4(out_features=3, channels=4, image_size=8, pools=3)
    model = mo.Conv4(out_features=3, channels=4, image_size=8, pools=3, conv="matmul")
    model.load_state_dict(reference.state_dict())
    assert isinstance(model.features[0], mo.MatmulConv2d) and not unstacked_modules(model)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8).sample(3, 2, torch.Generator().manual_seed(0))
    results = []
    for m in (model, reference):
        loop = mo.InnerLoop(m, mo.optim.sgd(lr=0.3), mo.losses.cross_entropy)
        results.append(mo.Full()(loop, mo.meta_params(mo.Init(m)), tasks, batching=batching))
    assert results[0].stats["batching"] == batching
    torch.testing.assert_close(results[0].task_losses, results[1].task_losses, rtol=1e-12, atol=1e-12)
    for k, g in results[1].grads.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(results[0].grads[k], g, rtol=1e-10, atol=1e-12, msg=f"gradient of {k}")


@pytest.mark.slow
def test_conv4_matmul_conv_compiles_to_the_eager_meta_gradient():
    """The compiled path (one torch.compile'd meta-gradient) over `Conv4(conv="matmul")` equals eager in float64
    (about a minute of Inductor compilation on the CPU: slow)."""
    from metaopt.compiled import Compiled, gradient_errors

    model = mo.Conv4(out_features=3, channels=4, image_size=8, pools=3, conv="matmul")
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.3), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    tasks = mo.RandomPatterns(n_way=3, k_shot=1, k_query=2, size=8).sample(2, 2, torch.Generator().manual_seed(0))
    compiled = Compiled(mo.Full())
    got = compiled(loop, meta, tasks).grads
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    assert max(gradient_errors(got, mo.Full()(loop, meta, tasks).grads).values()) <= 1e-10
