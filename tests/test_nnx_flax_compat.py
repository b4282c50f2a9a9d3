"""jaxbn.nnx.flax_compat.BatchNorm: flax.nnx.BatchNorm's spelling, jaxbn's numbers.

The oracle is flax.nnx.BatchNorm itself for what the spelling promises (signature, defaults,
variables, random stream, outputs, running mean) and PyTorch for the running variance."""

from __future__ import annotations

import inspect
import re
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxbn.nnx
from jaxbn._module_logic import MomentumConventionWarning
from jaxbn.nnx import flax_compat


def tutorial_cnn(BatchNorm):
    """The Flax NNX MNIST tutorial's CNN (the same layers and calls, smaller sizes), with
    ``BatchNorm`` the one name that changes."""

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
            self.batch_norm1 = BatchNorm(4, rngs=rngs)
            self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
            self.batch_norm2 = BatchNorm(8, rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
            self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.linear2 = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
            x = self.avg_pool(nnx.relu(self.batch_norm2(self.dropout2(self.conv2(x)))))
            x = x.reshape(x.shape[0], -1)  # flatten
            x = nnx.relu(self.linear1(x))
            return self.linear2(x)

    return CNN


FlaxCNN = tutorial_cnn(nnx.BatchNorm)
CompatCNN = tutorial_cnn(flax_compat.BatchNorm)

BATCH = 6
IMAGES = jax.random.normal(jax.random.key(1), (3, BATCH, 8, 8, 1)) * 2 + 0.5
LABELS = jax.random.randint(jax.random.key(2), (3, BATCH), 0, 10)


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit
def train_step(model, optimizer, images, labels):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, images, labels)
    optimizer.update(model, grads)
    return loss


def trained(cnn_class):
    model = cnn_class(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(0.005, 0.9), wrt=nnx.Param)
    model.train()
    losses = [train_step(model, optimizer, IMAGES[i], LABELS[i]) for i in range(len(IMAGES))]
    return model, losses


@pytest.fixture(scope="module")
def flax_and_compat():
    return trained(FlaxCNN), trained(CompatCNN)


def test_swapping_the_import_gives_the_same_initial_parameters_for_the_same_seed():
    flax_params = nnx.state(FlaxCNN(rngs=nnx.Rngs(0)), nnx.Param)
    compat_params = nnx.state(CompatCNN(rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(flax_params) == jax.tree.structure(compat_params)
    jax.tree.map(np.testing.assert_array_equal, flax_params, compat_params)
    # a random initializer takes the same keys too (scale first, then bias)
    init = nnx.initializers.normal(1.0)
    a = nnx.BatchNorm(3, scale_init=init, bias_init=init, rngs=nnx.Rngs(7))
    b = flax_compat.BatchNorm(3, scale_init=init, bias_init=init, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(a.scale[...], b.scale[...])
    np.testing.assert_array_equal(a.bias[...], b.bias[...])
    assert not np.array_equal(b.scale[...], b.bias[...])


def test_the_swapped_tutorial_cnn_trains_alike_with_the_unbiased_running_variance(
    flax_and_compat,
):
    (flax_model, flax_losses), (model, losses) = flax_and_compat
    np.testing.assert_allclose(losses, flax_losses, rtol=1e-5)
    for name, spatial in (("batch_norm1", 8 * 8), ("batch_norm2", 4 * 4)):
        ours, theirs = getattr(model, name), getattr(flax_model, name)
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-4, atol=1e-6)
        # var_k = 0.99^k + Σ 0.99^(k-j) 0.01 σ²_j (Flax) and the same with σ²_j·n/(n-1) (jaxbn)
        n, kept = BATCH * spatial, 0.99 ** len(IMAGES)
        np.testing.assert_allclose(
            ours.var[...] - kept, (theirs.var[...] - kept) * n / (n - 1), rtol=1e-4
        )
        assert int(ours.num_batches_tracked[...]) == len(IMAGES)


def test_the_swapped_models_eval_uses_the_running_statistics(flax_and_compat):
    (flax_model, _), (model, _) = flax_and_compat
    model, flax_model = nnx.clone(model), nnx.clone(flax_model)
    x = IMAGES[0]
    model.eval()
    flax_model.eval()
    ours, theirs = model(x), flax_model(x)
    assert np.abs(ours - theirs).max() > 1e-5  # the variances differ
    # with Flax's biased variance loaded, eval agrees: the only difference is the variance
    for name in ("batch_norm1", "batch_norm2"):
        getattr(model, name).var[...] = getattr(flax_model, name).var[...]
    np.testing.assert_allclose(model(x), theirs, rtol=1e-5, atol=1e-6)


def test_every_flax_argument_is_accepted_with_flax_s_default():
    theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
    ours = inspect.signature(flax_compat.BatchNorm.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].kind == parameter.kind, name
        default = ours[name].default
        if name in ("bias_init", "scale_init"):  # initializer objects: compare their values
            key = jax.random.key(0)
            np.testing.assert_array_equal(
                default(key, (2,), jnp.float32), parameter.default(key, (2,), jnp.float32)
            )
        else:
            assert default == parameter.default, name
    assert set(ours) - set(theirs) == {"momentum_convention_checked"}


def test_the_running_statistics_equal_torch_with_the_momentum_converted():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    torch_bn = torch.nn.BatchNorm1d(4, momentum=0.2)
    bn = flax_compat.BatchNorm(4, momentum=0.8, axis=1, rngs=nnx.Rngs(0))
    for _ in range(3):
        y_torch = torch_bn(x)
        y = bn(jnp.asarray(x.numpy()))
    np.testing.assert_allclose(y, y_torch.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], torch_bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(bn.var[...], torch_bn.running_var.numpy(), atol=1e-5)
    assert int(bn.num_batches_tracked[...]) == int(torch_bn.num_batches_tracked)


def test_a_mask_selects_the_statistics_and_every_row_is_normalized_as_in_flax():
    x = jax.random.normal(jax.random.key(3), (8, 3)) * 2 + 1
    mask = (jnp.arange(8) < 5)[:, None]
    theirs = nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    ours = flax_compat.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), atol=2e-6)
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], atol=1e-6)
    np.testing.assert_allclose(ours.var[...] - 0.5, (theirs.var[...] - 0.5) * 5 / 4, rtol=1e-5)

    def loss(bn, x):  # a training call's gradient, wrt x
        return jnp.sum(bn(x, mask=mask) * jnp.arange(1.0, 4.0))

    g_ours = nnx.grad(loss, argnums=1)(ours, x)
    g_theirs = nnx.grad(loss, argnums=1)(theirs, x)
    np.testing.assert_allclose(g_ours, g_theirs, atol=2e-5)
    # a channel with nothing selected: NaN as in Flax; jaxbn keeps its running statistics
    only_first = jnp.zeros((8, 3), bool).at[:, 0].set(True)
    before = ours.mean[...]
    y_ours, y_theirs = ours(x, mask=only_first), theirs(x, mask=only_first)
    np.testing.assert_array_equal(np.isnan(y_ours), np.isnan(y_theirs))
    assert np.isnan(y_ours[:, 1:]).all() and not np.isnan(y_ours[:, 0]).any()
    np.testing.assert_array_equal(ours.mean[...][1:], before[1:])


def test_the_variance_is_stable_where_flax_s_fast_variance_is_not():
    x = jax.random.normal(jax.random.key(4), (256, 2)) + 1e4
    bn = flax_compat.BatchNorm(2, use_fast_variance=True, rngs=nnx.Rngs(0))
    bn(x)
    expected = 0.99 + 0.01 * np.var(np.asarray(x, np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(bn.var[...], expected, rtol=1e-4)
    flax_bn = nnx.BatchNorm(2, use_fast_variance=True, rngs=nnx.Rngs(0))
    flax_bn(x)
    assert np.abs(flax_bn.var[...] - expected).max() > 1e-3  # what this test guards against


def test_output_dtypes_follow_flax_s_promotion():
    x = jnp.ones((4, 3), jnp.bfloat16).at[0].set(2)
    for kwargs in ({}, {"dtype": jnp.bfloat16}, {"param_dtype": jnp.bfloat16}):
        theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)(x)
        ours = flax_compat.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
        assert ours(x).dtype == theirs.dtype, kwargs
        assert ours.mean[...].dtype == jnp.float32


def test_use_scale_use_bias_and_metadata_give_flax_s_variables():
    for use_scale, use_bias in ((True, False), (False, True), (False, False)):
        kw = dict(use_scale=use_scale, use_bias=use_bias, rngs=nnx.Rngs(0))
        theirs, ours = nnx.BatchNorm(3, **kw), flax_compat.BatchNorm(3, **kw)
        assert (ours.scale is None, ours.bias is None) == (not use_scale, not use_bias)
        x = jnp.arange(12.0).reshape(4, 3) ** 1.5
        np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
    kw = dict(scale_metadata={"tag": "s"}, bias_metadata={"tag": "b"}, rngs=nnx.Rngs(0))
    theirs, ours = nnx.BatchNorm(3, **kw), flax_compat.BatchNorm(3, **kw)
    assert ours.scale.get_metadata() == theirs.scale.get_metadata()
    assert ours.bias.get_metadata() == theirs.bias.get_metadata()
    assert (ours.scale.get_metadata()["tag"], ours.bias.get_metadata()["tag"]) == ("s", "b")


def test_a_custom_promote_dtype_is_applied_to_the_input_and_the_parameters():
    seen = []

    def promote(arrays, *, dtype):
        seen.append(([None if a is None else a.dtype for a in arrays], dtype))
        return tuple(None if a is None else a.astype(jnp.float16) for a in arrays)

    bn = flax_compat.BatchNorm(3, promote_dtype=promote, rngs=nnx.Rngs(0))
    assert bn(jnp.ones((4, 3))).dtype == jnp.float16
    assert seen == [([jnp.float32] * 5, None)]
    assert bn.mean[...].dtype == jnp.float32


def test_modes_follow_flax_train_eval_view_and_the_call():
    x = jnp.arange(12.0).reshape(4, 3)
    bn = flax_compat.BatchNorm(3, rngs=nnx.Rngs(0))
    assert bn.use_running_average is False  # Flax's default: training
    bn(x)
    assert int(bn.num_batches_tracked[...]) == 1
    bn.eval()
    bn(x)
    bn(x, use_running_average=True)
    nnx.view(bn, use_running_average=True)(x)
    assert int(bn.num_batches_tracked[...]) == 1
    bn(x, use_running_average=False)
    assert int(bn.num_batches_tracked[...]) == 2
    bn = flax_compat.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="No `use_running_average` argument was provided"):
        bn(x)


def test_jaxbn_nnx_batch_norm_s_flax_momentum_warning_points_to_the_nnx_compat_class():
    with pytest.warns(MomentumConventionWarning) as caught:
        jaxbn.nnx.BatchNorm2d(4, momentum=0.99)
    message = str(caught[0].message)
    assert "jaxbn.nnx.flax_compat.BatchNorm (flax.nnx.BatchNorm's spelling)" in message
    assert "flax.nnx.BatchNorm's momentum=0.99 is jaxbn's 0.01" in message
    assert "jaxbn.flax_compat" not in message
    assert caught[0].filename == __file__


def test_a_pytorch_style_momentum_on_the_compat_class_warns_and_can_be_silenced():
    with pytest.warns(
        MomentumConventionWarning,
        match=re.escape("jaxbn.nnx.flax_compat.BatchNorm(momentum=0.1): this class takes"),
    ):
        flax_compat.BatchNorm(3, momentum=0.1, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flax_compat.BatchNorm(3, momentum=0.1, momentum_convention_checked=True, rngs=nnx.Rngs(0))


def test_bad_arguments_are_refused_when_the_module_is_built():
    with pytest.raises(TypeError, match="momentum must be float, not str"):
        flax_compat.BatchNorm(3, momentum="0.9", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="axis must be an int"):
        flax_compat.BatchNorm(3, axis=(1, 2), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        flax_compat.BatchNorm(3)  # required, as in Flax
    with pytest.raises(TypeError, match="use_running_average"):
        flax_compat.BatchNorm(3, use_running_average="yes", rngs=nnx.Rngs(0))


def test_one_value_per_channel_in_training_is_pytorch_s_error():
    bn = flax_compat.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape("Expected more than 1 value per channel")):
        bn(jnp.ones((1, 3)))


def test_synced_over_nnx_vmap_the_members_statistics_are_the_whole_batch_s():
    x = jax.random.normal(jax.random.key(6), (4, 5, 3)) * jnp.asarray([1.0, 2.0, 3.0]) + 1
    synced = flax_compat.BatchNorm(3, axis_name="members", rngs=nnx.Rngs(0))
    whole = flax_compat.BatchNorm(3, rngs=nnx.Rngs(0))

    @nnx.vmap(in_axes=(None, 0), axis_name="members")
    def members(bn, x):
        return bn(x)

    y = members(synced, x)
    np.testing.assert_allclose(y.reshape(20, 3), whole(x.reshape(20, 3)), atol=2e-6)
    np.testing.assert_allclose(synced.mean[...], whole.mean[...], atol=1e-6)
    np.testing.assert_allclose(synced.var[...], whole.var[...], atol=1e-6)
    assert int(synced.num_batches_tracked[...]) == 1
