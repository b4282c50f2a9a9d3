"""The tutorial's models in NNX: one torch state_dict loads into the NNX and the Linen model
alike, the NNX ConvNet trains like its torch twin (float64), and the tools (interop, update_bn,
inspect, fold) work on NNX models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxbn
import jaxbn.nnx
from tests.model_pairs import make_pairs
from tests.nnx_builders import build
from tests.parity_report import assert_close

NNX_TWINS = {
    "mlp-bn": lambda: jaxbn.nnx.MLP(64, (32, 16), 10, rngs=nnx.Rngs(0)),
    "convnet": lambda: jaxbn.nnx.ConvNet(1, 8, (8, 16, 32), 32, 10, rngs=nnx.Rngs(0)),
    "resnet": lambda: jaxbn.nnx.ResNet(1, 8, (1, 1), (8, 16), 10, rngs=nnx.Rngs(0)),
}


def eval_forward(model, x):
    return nnx.jit(lambda model, x: model(x, train=False))(model, x)


@pytest.mark.parametrize("name", list(NNX_TWINS))
def test_one_torch_state_dict_loads_into_the_nnx_and_the_linen_model_alike(name):
    pair = make_pairs(seed=1)[name]
    model = build(NNX_TWINS[name])
    state_dict = pair.state_dict_for_jax()
    jaxbn.nnx.torch_to_nnx(state_dict, model, flatten_shapes=pair.flatten_shapes)
    x_t = torch.randn(pair.input_shape, generator=torch.Generator().manual_seed(3))
    x = pair.to_jax_input(x_t)
    template = jax.eval_shape(lambda x: pair.model.init(jax.random.key(0), x, train=False), x)
    linen_variables = jaxbn.interop.torch_to_flax(
        state_dict, template, flatten_shapes=pair.flatten_shapes
    )
    ours = jaxbn.nnx.to_linen_variables(model)
    assert jax.tree.structure(ours) == jax.tree.structure(linen_variables)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(linen_variables), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    back = jaxbn.nnx.nnx_to_torch(model, flatten_shapes=pair.flatten_shapes)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value.numpy())  # lossless round trip

    y = eval_forward(model, x)
    y_linen = jax.jit(lambda v, x: pair.model.apply(v, x, train=False))(linen_variables, x)
    np.testing.assert_allclose(y, y_linen, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert_close(f"nnx model {name} eval", y, pair.torch_model.eval()(x_t), 2e-5, 2e-5)


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_the_norm_choices_name_their_layers_like_the_linen_models(norm):
    model = nnx.eval_shape(
        lambda: jaxbn.nnx.ResNet(1, 8, (1, 1), (8, 16), norm=norm, rngs=nnx.Rngs(0))
    )
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    linen = jax.eval_shape(lambda x: model.linen_twin().init(jax.random.key(0), x, train=False), x)
    ours = jax.tree.map(lambda a: (a.shape, a.dtype), jaxbn.nnx.to_linen_variables(model))
    assert ours == jax.tree.map(lambda a: (a.shape, a.dtype), linen)


def test_the_nnx_convnet_trains_like_its_torch_twin_in_float64():
    steps, lr, momentum = 4, 0.05, 0.9
    pair = make_pairs(seed=1)["convnet"]
    with jax.enable_x64(True):
        net = pair.torch_model.double().train()
        model = build(NNX_TWINS["convnet"], dtype=jnp.float64)
        jaxbn.nnx.torch_to_nnx(pair.state_dict_for_jax(), model, flatten_shapes=pair.flatten_shapes)
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum=momentum), wrt=nnx.Param)
        torch_opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)

        @nnx.jit
        def train_step(model, optimizer, x, labels):
            def loss_fn(model):
                logits = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        gen = torch.Generator().manual_seed(2)
        group = "nnx convnet train float64"
        for _ in range(steps):
            x_t = (torch.randn(pair.input_shape, generator=gen) * 2 + 0.5).double()
            labels_t = torch.randint(0, 10, (pair.input_shape[0],), generator=gen)
            torch_opt.zero_grad()
            loss_t = torch.nn.functional.cross_entropy(net(x_t), labels_t)
            loss_t.backward()
            torch_opt.step()
            loss = train_step(model, optimizer, pair.to_jax_input(x_t), labels_t.numpy())
            assert_close(f"{group} loss", loss, loss_t.detach(), 1e-12, 1e-12)
        back = jaxbn.nnx.nnx_to_torch(model, flatten_shapes=pair.flatten_shapes)
        for key, value in pair.state_dict_for_jax().items():
            if key.endswith("num_batches_tracked"):
                assert int(back[key]) == int(value) == steps
            else:
                kind = "running stats" if "running" in key else "params"
                assert_close(f"{group} {kind}", back[key], value.numpy(), 1e-12, 1e-12)
        net.eval()
        x_t = torch.randn(pair.input_shape, generator=gen).double()
        with torch.no_grad():
            expected = net(x_t)
        got = eval_forward(model, pair.to_jax_input(x_t))
        assert_close(f"{group} eval logits", got, expected, 1e-12, 1e-12)


def test_update_bn_of_an_nnx_model_equals_update_bn_of_its_linen_twin():
    model = build(lambda: jaxbn.nnx.MLP(12, (8, 6), 3, rngs=nnx.Rngs(0)))
    model.eval()
    rng = np.random.default_rng(0)
    batches = [rng.normal(i, 1 + i, (5, 12)).astype(np.float32) for i in range(3)]
    linen = model.linen_twin()
    expected = jaxbn.update_bn(linen.apply, jaxbn.nnx.to_linen_variables(model), batches)
    jaxbn.nnx.update_bn(model, batches)
    assert model.layers_1.use_running_average is True  # the mode is left as it was
    assert nnx.state(model, nnx.Intermediate) == nnx.State({})
    ours = jaxbn.nnx.to_linen_variables(model)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(ours["batch_stats"]["layers_4"]["num_batches_tracked"]) == 3


def test_inspect_and_fold_work_on_an_nnx_tutorial_model():
    model = build(lambda: jaxbn.nnx.MLP(12, (8, 6), 3, rngs=nnx.Rngs(0)))
    report = jaxbn.nnx.inspect_batchnorm(model)
    assert [layer.path for layer in report.layers] == ["layers_1", "layers_4"]
    assert "statistics never updated" in report.problems[0]
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    nnx.jit(lambda model, x: model(x, train=True))(model, x)
    assert jaxbn.nnx.inspect_batchnorm(model).problems == []
    folded = jaxbn.nnx.fold_batch_norm(model, x[:1])
    assert folded.left == {}
    y = jax.jit(lambda v, x: folded.model.apply(v, x, train=False))(folded.variables, x)
    np.testing.assert_allclose(y, eval_forward(model, x), rtol=1e-5, atol=1e-5)


def test_the_nnx_tools_refuse_what_is_not_an_nnx_module():
    with pytest.raises(TypeError, match=r"takes a flax\.nnx\.Module"):
        jaxbn.nnx.inspect_batchnorm({"params": {}})


def test_from_linen_variables_names_missing_unexpected_and_misshaped_leaves():
    model = jaxbn.nnx.BatchNorm1d(3)
    good = jaxbn.nnx.to_linen_variables(model)
    with pytest.raises(
        KeyError, match=r"missing \['batch_stats/var'\].*unexpected \['batch_stats/varx'\]"
    ):
        stats = dict(good["batch_stats"])
        stats["varx"] = stats.pop("var")
        jaxbn.nnx.from_linen_variables(model, {**good, "batch_stats": stats})
    with pytest.raises(ValueError, match="params/scale: shape"):
        jaxbn.nnx.from_linen_variables(
            model, {**good, "params": {**good["params"], "scale": np.ones(4, np.float32)}}
        )
