"""update_bn and inspect_batch_norm on Equinox models (jaxbn.equinox.tools): update_bn equals
torch.optim.swa_utils.update_bn on the twin torch model; the inspection table names every layer
with its kind and flags statistics never updated."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn.equinox as jbn
from jaxbn.equinox.interop import torch_to_equinox
from jaxbn.equinox.tools import inspect_batch_norm, update_bn

D, H = 3, 4
BATCHES = [
    np.random.default_rng(i).normal(size=(5, D)).astype(np.float32) * (i + 1) + i for i in range(3)
]


def twins():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(D, H),
        torch.nn.BatchNorm1d(H),
        torch.nn.ReLU(),
        torch.nn.Linear(H, H),
        torch.nn.BatchNorm1d(H, momentum=0.3),
    )
    keys = jax.random.split(jax.random.key(0), 2)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(D, H, key=keys[0]),
            jbn.BatchNorm1d(H, axis_name="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(H, H, key=keys[1]),
            jbn.BatchNorm1d(H, momentum=0.3, axis_name="batch"),
        ]
    )
    return net, *torch_to_equinox(model, state, net.state_dict())


def test_update_bn_equals_torchs_swa_update_bn():
    net, model, state = twins()
    torch.optim.swa_utils.update_bn([torch.tensor(x) for x in BATCHES], net)
    state = update_bn(model, state, [jnp.asarray(x) for x in BATCHES])
    for i in (1, 4):
        stats = state.get(model.layers[i].state_index)
        np.testing.assert_allclose(stats.mean, net[i].running_mean.numpy(), atol=2e-6)
        np.testing.assert_allclose(stats.var, net[i].running_var.numpy(), atol=2e-6)
        assert int(stats.num_batches_tracked) == int(net[i].num_batches_tracked) == 3


def test_update_bn_leaves_the_model_and_its_momentum_unchanged():
    _, model, state = twins()
    update_bn(model, state, [jnp.asarray(x) for x in BATCHES])
    assert model.layers[4].momentum == 0.3
    assert model.layers[1].inference is not False  # the mode was never chosen: still unset


def test_inspect_lists_each_layer_with_its_kind_and_flags_never_updated_statistics():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [jbn.BatchNorm1d(H), jbn.FrozenBatchNorm(H), jbn.BatchNorm(H, track_running_stats=False)]
    )
    report = inspect_batch_norm(model, state)
    assert [(row.path, row.kind) for row in report.layers] == [
        ("layers.0", "trained"),
        ("layers.1", "frozen"),
        ("layers.2", "untracked"),
    ]
    assert report.problems == [
        "layers.0: statistics never updated (trained with train=False, or loaded without "
        "batch_stats?)"
    ]
    assert "layers.1 frozen" in str(report)
