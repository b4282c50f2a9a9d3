"""jaxbn.nnx.fold_batch_norm on NNX models of one's own: a CNN written like the Flax NNX MNIST
tutorial's folds every batch norm, with the weights torch's ``fuse_conv_bn_eval`` /
``fuse_linear_bn_eval`` give and the outputs of ``torch.fx``'s fused model; every batch norm
that cannot fold is kept and the report says why; the original model is untouched."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
from flax import nnx
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import jaxbn.nnx
from jaxbn.nnx.fold import FoldedBatchNorm

C1, C2, HIDDEN, SIDE = 4, 6, 16, 8
FLATTEN = {"linear1": (C2, SIDE // 4, SIDE // 4)}  # torch flattens [C, H, W]


class TutorialCNN(nnx.Module):
    """Written like the Flax NNX MNIST tutorial's CNN (smaller), its BatchNorm swappable."""

    def __init__(self, norm, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, C1, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = norm(C1, rngs)
        self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.conv2 = nnx.Conv(C1, C2, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.batch_norm2 = norm(C2, rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(C2 * (SIDE // 4) ** 2, HIDDEN, rngs=rngs)
        self.batch_norm3 = norm(HIDDEN, rngs)
        self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.linear2 = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout2(nnx.relu(self.batch_norm3(self.linear1(x))))
        return self.linear2(x)


class TorchCNN(torch.nn.Module):
    """The same network in PyTorch (NCHW), with the same attribute names."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, C1, 3, padding=1)
        self.batch_norm1 = torch.nn.BatchNorm2d(C1)
        self.conv2 = torch.nn.Conv2d(C1, C2, 3, padding=1, bias=False)
        self.batch_norm2 = torch.nn.BatchNorm2d(C2)
        self.linear1 = torch.nn.Linear(C2 * (SIDE // 4) ** 2, HIDDEN)
        self.batch_norm3 = torch.nn.BatchNorm1d(HIDDEN)
        self.linear2 = torch.nn.Linear(HIDDEN, 10)

    def forward(self, x):
        pool = torch.nn.functional.avg_pool2d
        x = pool(torch.relu(self.batch_norm1(self.conv1(x))), 2)
        x = pool(torch.relu(self.batch_norm2(self.conv2(x))), 2)
        x = torch.relu(self.batch_norm3(self.linear1(x.flatten(1))))
        return self.linear2(x)


NORMS = {
    "BatchNorm2d": lambda c, rngs: (
        jaxbn.nnx.BatchNorm2d if c != HIDDEN else jaxbn.nnx.BatchNorm1d
    )(c),
    "flax_compat": lambda c, rngs: jaxbn.nnx.flax_compat.BatchNorm(c, rngs=rngs),
}


def trained_cnn(norm: str) -> TutorialCNN:
    model = TutorialCNN(NORMS[norm], rngs=nnx.Rngs(0))
    model.train()
    step = nnx.jit(lambda model, x: model(x))
    for seed in range(3):
        step(model, jax.random.normal(jax.random.key(seed), (8, SIDE, SIDE, 1)) * 2 + 1)
    return model


def eval_output(model, x):
    model.eval()
    return np.asarray(model(x))


@pytest.fixture(scope="module", params=list(NORMS))
def folded_cnn(request):
    model = trained_cnn(request.param)
    x = np.asarray(jax.random.normal(jax.random.key(9), (4, SIDE, SIDE, 1)))
    before = jax.tree.map(np.asarray, jaxbn.nnx.to_linen_variables(model))
    return model, x, jaxbn.nnx.fold_batch_norm(model, x[:1]), before


def test_a_tutorial_style_cnn_folds_every_batch_norm_into_the_layer_before(folded_cnn):
    _, _, result, _ = folded_cnn
    assert result.folded == {
        "batch_norm1": "conv1",
        "batch_norm2": "conv2",
        "batch_norm3": "linear1",
    }
    assert result.left == {}
    assert all(isinstance(result.model.batch_norm1, FoldedBatchNorm) for _ in [0])
    assert nnx.state(result.model, nnx.BatchStat) == nnx.State({})


def test_the_folded_weights_are_torchs_fuse_conv_bn_eval_and_fuse_linear_bn_eval(folded_cnn):
    model, _, result, _ = folded_cnn
    net = TorchCNN().eval()
    net.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(v))
            for k, v in jaxbn.nnx.nnx_to_torch(model, flatten_shapes=FLATTEN).items()
        }
    )
    fused = jaxbn.nnx.nnx_to_torch(result.model, flatten_shapes=FLATTEN)
    expected = {
        "conv1": fuse_conv_bn_eval(net.conv1, net.batch_norm1),
        "conv2": fuse_conv_bn_eval(net.conv2, net.batch_norm2),
        "linear1": fuse_linear_bn_eval(net.linear1, net.batch_norm3),
    }
    for name, layer in expected.items():
        np.testing.assert_allclose(
            fused[f"{name}.weight"], layer.weight.detach(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(fused[f"{name}.bias"], layer.bias.detach(), rtol=1e-5, atol=1e-6)


def test_the_folded_model_computes_what_torch_fx_fuse_computes(folded_cnn):
    model, x, result, _ = folded_cnn
    net = TorchCNN().eval()
    net.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(v))
            for k, v in jaxbn.nnx.nnx_to_torch(model, flatten_shapes=FLATTEN).items()
        }
    )
    fused = fx_optimization.fuse(net)  # torch.fx: conv + bn folded (linear + bn too)
    with torch.no_grad():
        expected = fused(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(eval_output(result.model, x), expected, rtol=1e-4, atol=1e-5)


def test_folding_leaves_the_original_model_untouched(folded_cnn):
    model, _, _, before = folded_cnn
    after = jax.tree.map(np.asarray, jaxbn.nnx.to_linen_variables(model))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert model.conv2.bias is None and not model.conv2.use_bias
    assert not isinstance(model.batch_norm1, FoldedBatchNorm)


def test_a_use_bias_false_conv_gets_a_bias(folded_cnn):
    _, _, result, _ = folded_cnn
    assert result.model.conv2.use_bias and result.model.conv2.bias[...].shape == (C2,)


class Kept(nnx.Module):
    """One batch norm per reason to keep it."""

    def __init__(self, rngs):
        lin = lambda: nnx.Linear(4, 4, rngs=rngs)
        self.skip_lin, self.skip_bn = lin(), jaxbn.nnx.BatchNorm1d(4)
        self.untracked_lin = lin()
        self.untracked_bn = jaxbn.nnx.BatchNorm(4, track_running_stats=False)
        self.flax_lin, self.flax_bn = lin(), nnx.BatchNorm(4, rngs=rngs)
        self.shared, self.shared_bn = lin(), jaxbn.nnx.BatchNorm(4)
        self.masked_lin, self.masked_bn = lin(), jaxbn.nnx.BatchNorm(4)
        self.act_lin, self.act_bn = lin(), jaxbn.nnx.BatchNorm(4)
        self.branch_lin, self.branch_bn = lin(), jaxbn.nnx.BatchNorm(4)
        self.blocks = nnx.split_rngs(splits=2)(nnx.vmap(Block, in_axes=(0,), out_axes=0))(rngs)
        self.unused = jaxbn.nnx.BatchNorm(4)

    def __call__(self, x):
        h = self.skip_lin(x)
        x = self.skip_bn(h) + h
        x = self.untracked_bn(self.untracked_lin(x))
        x = self.flax_bn(self.flax_lin(x))
        x = self.shared_bn(self.shared(x)) + self.shared(x)
        x = self.masked_bn(self.masked_lin(x), mask=x > -100)
        x = self.act_bn(nnx.relu(self.act_lin(x)))
        x = nnx.cond(
            x.sum() > 0, lambda m, x: m.branch_bn(m.branch_lin(x)), lambda m, x: x, self, x
        )
        scan = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return scan(x, self.blocks)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin, self.bn = nnx.Linear(4, 4, rngs=rngs), jaxbn.nnx.BatchNorm(4)

    def __call__(self, x):
        return self.bn(self.lin(x))


@pytest.fixture(scope="module")
def kept():
    model = Kept(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    model.train()
    model(x)
    return model, x, jaxbn.nnx.fold_batch_norm(model, x[:2])


@pytest.mark.parametrize(
    "path, why",
    [
        ("skip_bn", "the output of skip_lin is also used elsewhere (add), e.g. a skip connection"),
        ("untracked_bn", "it is untracked (track_running_stats=False)"),
        ("flax_bn", "flax.nnx.BatchNorm is not a jaxbn batch norm; use jaxbn.nnx.flax_compat"),
        ("shared_bn", "shared is called 2 times with the same weights"),
        ("masked_bn", "it is called with mask="),
        ("act_bn", "its input does not come straight from a nnx.Conv or nnx.Linear layer"),
        ("branch_bn", "it runs inside a loop or branch (nnx.scan, nnx.while_loop, nnx.cond"),
        (
            "blocks/bn",
            "its statistics are stacked [2, 4] (one member per step or mapped index, as under "
            "nnx.scan or nnx.vmap)",
        ),
        ("unused", "the sample call did not run it"),
    ],
)
def test_a_batch_norm_that_cannot_fold_is_kept_and_the_report_says_why(kept, path, why):
    _, _, result = kept
    assert result.left[path].startswith(why)


def test_every_batch_norm_is_folded_or_left_and_the_output_is_unchanged(kept):
    model, x, result = kept
    assert result.folded == {}
    assert len(result.left) == 9
    model.eval()
    np.testing.assert_allclose(eval_output(result.model, x), np.asarray(model(x)), rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: jaxbn.nnx.FrozenBatchNorm(4),
        lambda: jaxbn.nnx.GhostBatchNorm(4, 2),
        lambda: jaxbn.nnx.BatchRenorm(4),
    ],
    ids=["frozen", "ghost", "renorm"],
)
def test_a_frozen_ghost_or_renorm_batch_norm_folds_like_torchs_fuse(make):
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), make(), nnx.relu)
    model.layers[1].mean[...] = jnp.arange(4.0) / 4
    model.layers[1].var[...] = jnp.arange(1.0, 5.0)
    model.layers[1].num_batches_tracked[...] = 3
    result = jaxbn.nnx.fold_batch_norm(model, jnp.ones((1, 3)))
    assert result.folded == {"layers/1": "layers/0"}
    state = jaxbn.nnx.nnx_to_torch(model)
    linear, bn = torch.nn.Linear(3, 4).eval(), torch.nn.BatchNorm1d(4).eval()
    linear.load_state_dict(
        {
            k.removeprefix("0."): torch.from_numpy(np.asarray(v))
            for k, v in state.items()
            if k.startswith("0.")
        }
    )
    bn.load_state_dict(
        {
            k.removeprefix("1."): torch.from_numpy(np.asarray(v))
            for k, v in state.items()
            if k.startswith("1.")
        }
    )
    fused = fuse_linear_bn_eval(linear, bn)
    np.testing.assert_allclose(
        result.model.layers[0].kernel[...], fused.weight.detach().T, rtol=1e-6
    )
    np.testing.assert_allclose(result.model.layers[0].bias[...], fused.bias.detach(), rtol=1e-6)


def test_a_batch_norm_whose_statistics_were_never_tracked_is_refused():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm1d(4))
    with pytest.raises(
        ValueError,
        match=r"cannot fold the batch norm at layers/1: its statistics were never tracked "
        r"\(num_batches_tracked == 0\)",
    ):
        jaxbn.nnx.fold_batch_norm(model, jnp.ones((1, 3)))


def test_a_folded_batch_norm_called_with_a_mask_raises():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm1d(4))
    model.layers[1].num_batches_tracked[...] = 1
    result = jaxbn.nnx.fold_batch_norm(model, jnp.ones((1, 3)))
    with pytest.raises(
        ValueError, match="this batch norm was folded into layers/0 by fold_batch_norm"
    ):
        result.model.layers[1](jnp.ones((2, 4)), mask=jnp.ones((2, 4), bool))


def test_fold_needs_a_sample_input():
    with pytest.raises(
        TypeError, match=r"fold_batch_norm needs a sample input: fold_batch_norm\(model, x\)"
    ):
        jaxbn.nnx.fold_batch_norm(nnx.Sequential(jaxbn.nnx.BatchNorm1d(3)))


class Wrapped(nnx.Module):
    """A pair inside nnx.jit and one inside nnx.remat (looked into), one over NCHW (kept),
    and a call flag."""

    def __init__(self, rngs):
        self.jit_lin, self.jit_bn = nnx.Linear(4, 4, rngs=rngs), jaxbn.nnx.BatchNorm1d(4)
        self.remat_lin, self.remat_bn = nnx.Linear(4, 4, rngs=rngs), jaxbn.nnx.BatchNorm1d(4)
        self.conv = nnx.Conv(4, 4, (1, 1), rngs=rngs)
        self.nchw_bn = jaxbn.nnx.BatchNorm2d(4, axis=1)

    def __call__(self, x, *, train: bool):
        x = nnx.jit(lambda m, x: m.jit_bn(m.jit_lin(x), train=train))(self, x)
        x = nnx.remat(lambda m, x: m.remat_bn(m.remat_lin(x), train=train))(self, x)
        h = self.conv(x[:, None, None, :])  # [N, 1, 1, 4]: the BN reads axis 1
        return self.nchw_bn(h.transpose(0, 3, 1, 2), train=train)


def test_pairs_inside_nnx_jit_and_nnx_remat_fold_and_a_channel_first_batch_norm_stays():
    model = Wrapped(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (6, 4))
    model(x, train=True)
    result = jaxbn.nnx.fold_batch_norm(model, x[:2], train=False)
    assert result.folded == {"jit_bn": "jit_lin", "remat_bn": "remat_lin"}
    assert result.left == {
        "nchw_bn": "its input does not come straight from a nnx.Conv or nnx.Linear layer"
    }
    np.testing.assert_allclose(
        result.model(x, train=False), model(x, train=False), rtol=1e-5, atol=1e-6
    )


def test_a_batch_norm_after_a_layer_whose_kernel_is_read_elsewhere_is_kept():
    class Tied(nnx.Module):
        def __init__(self):
            self.lin, self.bn = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm1d(4)

        def __call__(self, x):  # the kernel also serves as the transposed output layer
            return self.bn(self.lin(x)) @ self.lin.kernel[...].T

    model = Tied()
    model.train()
    model(jnp.arange(8.0).reshape(2, 4))
    result = jaxbn.nnx.fold_batch_norm(model, jnp.ones((1, 4)))
    assert result.left == {"bn": "the weights of lin are also read outside it"}
