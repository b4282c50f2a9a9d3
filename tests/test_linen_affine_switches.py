"""jaxbn's Linen batch norms: torch 2.13's ``bias=False``, Flax's ``use_scale``/``use_bias`` and
parameter metadata, against PyTorch, flax.linen.BatchNorm and the NNX twins (issue 25, item 4)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
import jaxbn.nnx

KEY = jax.random.key(0)
SWITCHES = [
    dict(bias=False),
    dict(use_scale=False),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(affine=False, bias=False),
]


def params_of(module, x):
    return module.init(KEY, x, train=False).get("params", {})


def test_torch_s_bias_false_learns_scale_only_with_torch_s_numbers():
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(6, 3, 4, generator=gen) * 2 + 1
    torch_bn = torch.nn.BatchNorm1d(3, bias=False)
    weight = np.asarray([0.5, 1.0, 2.0], np.float32)
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(weight))
    bn = jaxbn.BatchNorm1d(3, axis=1, bias=False)
    variables = bn.init(KEY, jnp.asarray(x_t.numpy()), train=False)
    assert list(variables["params"]) == ["scale"]
    assert [name for name, _ in torch_bn.named_parameters()] == ["weight"]
    params = {"scale": jnp.asarray(weight)}
    cotangent = torch.ones(6, 3, 4) * torch.arange(3.0)[:, None]
    y_t = torch_bn(x_t)
    y_t.backward(cotangent)

    def loss(params, x):
        y, updates = bn.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y * jnp.asarray(cotangent.numpy())), (y, updates)

    grads, (y, updates) = jax.grad(loss, has_aux=True)(params, jnp.asarray(x_t.numpy()))
    np.testing.assert_allclose(y, y_t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(grads["scale"], torch_bn.weight.grad.numpy(), atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), atol=1e-6)
    torch_bn.eval()
    x_eval = x_t * 0.5
    y_eval = bn.apply({"params": params, **updates}, jnp.asarray(x_eval.numpy()), train=False)
    np.testing.assert_allclose(y_eval, torch_bn(x_eval).detach().numpy(), atol=1e-5)


def test_bias_false_without_affine_learns_nothing_as_in_torch():
    torch_bn = torch.nn.BatchNorm2d(3, affine=False, bias=False)
    assert torch_bn.weight is None and torch_bn.bias is None
    assert params_of(jaxbn.BatchNorm2d(3, affine=False, bias=False), jnp.ones((2, 2, 2, 3))) == {}


@pytest.mark.parametrize(
    "use_scale, use_bias", [(True, False), (False, True), (False, False)], ids=str
)
def test_use_scale_and_use_bias_apart_match_flax_linen_batch_norm(use_scale, use_bias):
    x = jnp.arange(24.0).reshape(8, 3) ** 1.5
    ours = jaxbn.BatchNorm(use_scale=use_scale, use_bias=use_bias)
    theirs = nn.BatchNorm(use_running_average=False, use_scale=use_scale, use_bias=use_bias)
    v_ours = ours.init(KEY, x, train=False)
    v_theirs = theirs.init(KEY, x)
    assert sorted(v_ours.get("params", {})) == sorted(v_theirs.get("params", {}))
    y_ours, _ = ours.apply(v_ours, x, train=True, mutable=["batch_stats"])
    y_theirs, _ = theirs.apply(v_theirs, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, atol=1e-5)


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
@pytest.mark.parametrize(
    "linen, twin",
    [
        (lambda kw: jaxbn.BatchNorm(3, **kw), lambda kw: jaxbn.nnx.BatchNorm(3, **kw)),
        (
            lambda kw: jaxbn.BatchRenorm(3, **kw),
            lambda kw: jaxbn.nnx.BatchRenorm(3, **kw),
        ),
        (
            lambda kw: jaxbn.GhostBatchNorm(3, 2, **kw),
            lambda kw: jaxbn.nnx.GhostBatchNorm(3, 2, **kw),
        ),
        (
            lambda kw: jaxbn.FrozenBatchNorm(3, **kw),
            lambda kw: jaxbn.nnx.FrozenBatchNorm(3, **kw),
        ),
    ],
    ids=["BatchNorm", "BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm"],
)
def test_each_switch_gives_the_nnx_twin_s_parameters(linen, twin, switches):
    ours = params_of(linen(switches), jnp.ones((4, 3)))
    nnx_params = nnx.to_pure_dict(nnx.state(twin(switches), nnx.Param))
    assert sorted(ours) == sorted(nnx_params)
    for name in ours:
        np.testing.assert_array_equal(ours[name], nnx_params[name])


def test_a_batch_norm_without_parameters_or_statistics_checks_the_feature_count():
    bn = jaxbn.BatchNorm(4, use_scale=False, use_bias=False, track_running_stats=False)
    with pytest.raises(ValueError, match=r"^expected 4 features on axis -1, got input of shape"):
        bn.init(KEY, jnp.ones((2, 3)), train=True)


@pytest.mark.parametrize("name", ["bias", "use_scale", "use_bias"])
def test_a_switch_that_is_not_a_bool_is_refused_naming_it(name):
    message = re.escape(f"{name} must be a Python bool (True or False), got 1")
    with pytest.raises(TypeError, match=rf"^{message}$"):
        jaxbn.BatchNorm(**{name: 1})
    with pytest.raises(TypeError, match=rf"^{message}$"):
        jaxbn.GhostBatchNorm(3, 2, **{name: 1})


def test_variants_with_bias_false_compute_batch_norm_s_numbers():
    x = jax.random.normal(KEY, (4, 3)) * 3 + 1
    scale = {"scale": jnp.asarray([0.5, 2.0, -1.0])}
    bn = jaxbn.BatchNorm(bias=False)
    variables = {**bn.init(KEY, x, train=False), "params": scale}
    expected, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    for variant in (
        jaxbn.BatchRenorm(bias=False, r_max=1.0, d_max=0.0),
        jaxbn.GhostBatchNorm(virtual_batch_size=4, bias=False),
    ):
        y, _ = variant.apply(variables, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y, expected, atol=1e-6)
    trained = {"params": scale, **updates}
    frozen = jaxbn.FrozenBatchNorm(bias=False).apply(trained, x)
    np.testing.assert_allclose(frozen, bn.apply(trained, x, train=False), atol=1e-6)


def test_sharding_metadata_is_linen_s_partitioned_box_as_in_the_nnx_twin():
    bn = jaxbn.BatchNorm(3, scale_metadata={"out_sharding": ("model",)})
    params = params_of(bn, jnp.ones((2, 3)))
    assert isinstance(params["scale"], nn.Partitioned)
    assert nn.get_partition_spec(params) == {
        "scale": jax.sharding.PartitionSpec("model"),
        "bias": jax.sharding.PartitionSpec(),
    }
    # NNX shards eagerly, so its twin needs a mesh: given in the metadata, both take it
    mesh = jax.make_mesh((1,), ("model",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    metadata = {"out_sharding": ("model",), "mesh": mesh}
    boxed = params_of(jaxbn.BatchNorm(3, scale_metadata=metadata), jnp.ones((2, 3)))["scale"]
    twin = jaxbn.nnx.BatchNorm(3, scale_metadata=metadata)
    nnx_metadata = boxed.to_nnx_metadata()
    assert (nnx_metadata["out_sharding"], nnx_metadata["mesh"]) == (
        twin.scale.out_sharding,
        twin.scale.mesh,
    )
    y, _ = bn.apply(
        {**bn.init(KEY, jnp.ones((2, 3)), train=False), "params": params},
        jnp.arange(6.0).reshape(2, 3),
        train=True,
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(y, [[-1.0] * 3, [1.0] * 3], atol=1e-4)


def test_other_metadata_travel_in_flax_s_nnx_box_equal_to_the_twin_s():
    ours = params_of(jaxbn.BatchNorm(3, bias=False, scale_metadata={"tag": "s"}), jnp.ones((2, 3)))
    twin = jaxbn.nnx.BatchNorm(3, bias=False, scale_metadata={"tag": "s"})
    assert isinstance(ours["scale"], nnx.bridge.NNXMeta)
    restored = ours["scale"].to_nnx_variable()
    assert type(restored) is nnx.Param
    assert restored.get_metadata()["tag"] == twin.scale.get_metadata()["tag"] == "s"
    np.testing.assert_array_equal(restored[...], twin.scale[...])


def test_flax_linen_s_boxed_initializer_works_and_one_way_of_metadata_is_required():
    boxed = nn.with_partitioning(nn.initializers.ones, ("model",))
    params = params_of(jaxbn.GhostBatchNorm(3, 2, scale_init=boxed), jnp.ones((2, 3)))
    assert nn.get_partition_spec(params)["scale"] == jax.sharding.PartitionSpec("model")
    both = jaxbn.BatchNorm(3, scale_init=boxed, scale_metadata={"out_sharding": ("model",)})
    with pytest.raises(
        TypeError,
        match=r"^scale_metadata was given and scale_init returns a boxed value \(Partitioned\): "
        r"give the metadata one way",
    ):
        both.init(KEY, jnp.ones((2, 3)), train=False)
