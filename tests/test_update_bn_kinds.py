"""update_bn with every layer kind (frozen, ghost, renorm, a BN carried through nn.scan) and
transform: torch.optim.swa_utils.update_bn is the oracle where torch has the layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn as torch_update_bn

import jaxbn
from tests.parity_report import assert_close

C = 3


def normal(seed, shape, scale=1.0, shift=0.0):
    """float32 N(shift, scale²) data from numpy (JAX's generator compiles for every shape)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, jnp.float32)


def to_torch(a):
    return torch.tensor(np.asarray(a))


def assert_stats_equal(got, expected):
    for key in ("mean", "var", "num_batches_tracked"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


# --- frozen layers (item 1) ------------------------------------------------------------------


class TorchFrozenBatchNorm1d(torch.nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's buffers and formula, for [N, C] input: constants,
    not a torch.nn.modules.batchnorm._BatchNorm, so swa_utils.update_bn leaves it alone."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale + (self.bias - self.running_mean * scale)


class TorchNet(torch.nn.Module):
    """Linear → FrozenBN → Linear → BN: the BN's statistics depend on the frozen layer's map."""

    def __init__(self):
        super().__init__()
        self.fc1, self.frozen = torch.nn.Linear(C, C), TorchFrozenBatchNorm1d(C)
        self.fc2, self.bn = torch.nn.Linear(C, C), torch.nn.BatchNorm1d(C)

    def forward(self, x):
        return self.bn(self.fc2(self.frozen(self.fc1(x))))


class FrozenNet(nn.Module):
    """TorchNet in Flax; ``first`` is FrozenBatchNorm, or BatchNorm for freeze_batch_norm."""

    first: type

    @nn.compact
    def __call__(self, x, *, train):
        x = self.first(C, name="frozen")(nn.Dense(C, name="fc1")(x), train=train)
        return jaxbn.BatchNorm1d(C, name="bn")(nn.Dense(C, name="fc2")(x), train=train)


@pytest.fixture(scope="module")
def frozen_case():
    """The torch net with loaded (detectron2-like) frozen constants and stale BN statistics,
    the same variables for jaxbn, the batches, and torch's update_bn result."""
    torch.manual_seed(3)
    net = TorchNet()
    with torch.no_grad():
        net.frozen.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        net.frozen.running_var.copy_(torch.tensor([4.0, 0.25, 2.0]))
        net.frozen.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        net.frozen.bias.copy_(torch.tensor([0.3, 0.1, -1.0]))
        net.bn.running_mean.fill_(7.0)
        net.bn.num_batches_tracked.fill_(9)
    dense = lambda fc: {
        "kernel": jnp.asarray(fc.weight.detach().numpy().T),
        "bias": jnp.asarray(fc.bias.detach().numpy()),
    }
    buffer = lambda t: jnp.asarray(t.detach().numpy())
    variables = {
        "params": {
            "fc1": dense(net.fc1),
            "fc2": dense(net.fc2),
            "frozen": {"scale": buffer(net.frozen.weight), "bias": buffer(net.frozen.bias)},
            "bn": {"scale": buffer(net.bn.weight), "bias": buffer(net.bn.bias)},
        },
        "batch_stats": {
            "frozen": {
                "mean": buffer(net.frozen.running_mean),
                "var": buffer(net.frozen.running_var),
                "num_batches_tracked": jnp.asarray(0, jnp.int32),  # loaded: no counter
            },
            "bn": {
                "mean": buffer(net.bn.running_mean),
                "var": buffer(net.bn.running_var),
                "num_batches_tracked": jnp.asarray(9, jnp.int32),
            },
        },
    }
    batches = [normal(i, (8, C), i + 1, i) for i in range(3)]
    torch_update_bn([to_torch(b) for b in batches], net)
    return net, variables, batches


def expect_torch(net, variables):
    """``variables`` with the statistics torch's update_bn left in ``net``."""
    stats = variables["batch_stats"]
    return {
        "frozen": stats["frozen"],
        "bn": {
            "mean": net.bn.running_mean.numpy(),
            "var": net.bn.running_var.numpy(),
            "num_batches_tracked": int(net.bn.num_batches_tracked),
        },
    }


def check_against_torch(updated, net, variables):
    expected = expect_torch(net, variables)
    assert_stats_equal(updated["batch_stats"]["frozen"], expected["frozen"])  # bit for bit
    got = updated["batch_stats"]["bn"]
    assert_close("update_bn after frozen mean", got["mean"], expected["bn"]["mean"], 1e-5, 1e-5)
    assert_close("update_bn after frozen var", got["var"], expected["bn"]["var"], 1e-5, 1e-5)
    assert int(got["num_batches_tracked"]) == expected["bn"]["num_batches_tracked"] == 3


def test_update_bn_leaves_a_frozen_batch_norm_as_it_was_and_re_estimates_the_rest_like_torch(
    frozen_case,
):
    net, variables, batches = frozen_case
    model = FrozenNet(jaxbn.FrozenBatchNorm)
    check_against_torch(jaxbn.update_bn(model.apply, variables, batches), net, variables)


def test_update_bn_leaves_the_layers_freeze_batch_norm_froze_as_they_were_like_torch(
    frozen_case,
):
    net, variables, batches = frozen_case
    frozen_model, _ = jaxbn.freeze_batch_norm(
        FrozenNet(jaxbn.BatchNorm1d), variables, where=lambda path: path == "frozen"
    )
    check_against_torch(jaxbn.update_bn(frozen_model.apply, variables, batches), net, variables)


def test_update_bn_leaves_a_wholly_frozen_model_exactly_as_it_was(frozen_case):
    _, variables, batches = frozen_case
    frozen_model, _ = jaxbn.freeze_batch_norm(FrozenNet(jaxbn.BatchNorm1d), variables)
    with pytest.warns(UserWarning, match=r"no batch norm reported batch statistics over 3 batch"):
        updated = jaxbn.update_bn(frozen_model.apply, variables, batches)
    for path in ("frozen", "bn"):
        assert_stats_equal(updated["batch_stats"][path], variables["batch_stats"][path])


def test_an_apply_fn_that_ignores_train_leaves_the_statistics_and_says_so(frozen_case):
    _, variables, batches = frozen_case
    model = FrozenNet(jaxbn.BatchNorm1d)

    def always_eval(v, x, train, mutable):  # a wrapper that hard-wires eval mode
        del train
        return model.apply(v, x, train=False, mutable=mutable)

    with pytest.warns(UserWarning, match=r"apply_fn that runs the model with the train=True"):
        updated = jaxbn.update_bn(always_eval, variables, batches)
    assert_stats_equal(updated["batch_stats"]["bn"], variables["batch_stats"]["bn"])


# --- one batch norm carried through nn.scan, RNN style (item 5) ------------------------------

T, N = 4, 6


class Cell(nn.Module):
    """One step: h ← tanh(BN(Dense(x) + h)); the same BN at every step."""

    @nn.compact
    def __call__(self, h, x, train: bool = True):
        y = jaxbn.BatchNorm1d(C)(nn.Dense(C)(x) + h, train=train)
        return jnp.tanh(y), y


class RNN(nn.Module):
    """Cell scanned over time: params broadcast, the BN's statistics carried from step to step;
    ``report`` lists batch_moments in variable_axes (update_bn's advice)."""

    report: bool = True

    @nn.compact
    def __call__(self, xs, *, train):
        scan = nn.scan(
            Cell,
            variable_broadcast="params",
            variable_carry="batch_stats",
            variable_axes={"batch_moments": 0} if self.report else {},
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast),
            out_axes=0,
        )
        return scan(name="cell")(jnp.zeros((xs.shape[1], C)), xs, train)[1]


class TorchRNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(C, C), torch.nn.BatchNorm1d(C)

    def forward(self, xs):
        h = torch.zeros(xs.shape[1], C)
        for x in xs:
            h = torch.tanh(self.bn(self.lin(x) + h))
        return h


@pytest.fixture(scope="module")
def rnn_case():
    batches = [normal(i, (T, N, C), i + 1, i) for i in range(3)]
    # Flax's init cannot create a carried variable inside the scan: the cell is made alone
    cell = Cell().init(jax.random.key(0), jnp.zeros((N, C)), batches[0][0], False)
    variables = {key: {"cell": cell[key]} for key in ("params", "batch_stats")}
    return variables, batches


def test_update_bn_averages_a_batch_norm_carried_through_nn_scan_over_every_step_like_torch(
    rnn_case,
):
    variables, batches = rnn_case
    updated = jaxbn.update_bn(RNN().apply, variables, batches)
    net = TorchRNN()
    dense = variables["params"]["cell"]["Dense_0"]
    with torch.no_grad():
        net.lin.weight.copy_(to_torch(dense["kernel"]).T)
        net.lin.bias.copy_(to_torch(dense["bias"]))
    torch_update_bn([to_torch(b) for b in batches], net)
    stats = updated["batch_stats"]["cell"]["BatchNorm1d_0"]
    assert stats["mean"].shape == stats["var"].shape == (C,)
    assert_close("update_bn rnn mean", stats["mean"], net.bn.running_mean.numpy(), 1e-5, 1e-5)
    assert_close("update_bn rnn var", stats["var"], net.bn.running_var.numpy(), 1e-5, 1e-5)
    assert int(stats["num_batches_tracked"]) == int(net.bn.num_batches_tracked) == 3 * T


def test_update_bn_refuses_a_carried_batch_norm_without_reports_with_the_advice_that_works(
    rnn_case,
):
    variables, batches = rnn_case
    with pytest.raises(
        ValueError,
        match=r"\['cell/BatchNorm1d_0'\] were trained but reported no batch statistics: .*"
        r"give 'batch_moments' the variable_axes entry of 'batch_stats' \(0 under nn.scan, "
        r"also when 'batch_stats' is carried",
    ):
        jaxbn.update_bn(RNN(report=False).apply, variables, batches)


# --- ghost and renorm (item 8) -----------------------------------------------------------------


class TorchGhost(torch.nn.Module):
    """GhostBatchNorm in torch: one BatchNorm called on each virtual batch in turn."""

    def __init__(self, virtual_batch_size):
        super().__init__()
        self.size, self.bn = virtual_batch_size, torch.nn.BatchNorm1d(C)

    def forward(self, x):
        return torch.cat([self.bn(part) for part in x.split(self.size)])


def test_update_bn_re_estimates_a_ghost_batch_norm_split_by_split_like_torch():
    batches = [normal(i, (8, C), i + 1, i) for i in range(3)]
    model = jaxbn.GhostBatchNorm(C, 4)
    variables = model.init(jax.random.key(0), batches[0], train=False)
    _, trained = model.apply(variables, batches[0] * 9, train=True, mutable=["batch_stats"])
    updated = jaxbn.update_bn(model.apply, {**variables, **trained}, batches)
    net = TorchGhost(4)
    torch_update_bn([to_torch(b) for b in batches], net)
    stats = updated["batch_stats"]
    assert_close("update_bn ghost mean", stats["mean"], net.bn.running_mean.numpy(), 1e-5, 1e-6)
    assert_close("update_bn ghost var", stats["var"], net.bn.running_var.numpy(), 1e-5, 1e-6)
    assert int(stats["num_batches_tracked"]) == int(net.bn.num_batches_tracked) == 6


@pytest.mark.parametrize("update_rule", ["torch", "keras"])
def test_update_bn_re_estimates_a_batch_renorm_as_torch_does_a_batch_norm(update_rule):
    batches = [normal(i, (8, C), i + 1, i) for i in range(3)]
    model = jaxbn.BatchRenorm(C, r_max=2.0, d_max=1.0, update_rule=update_rule)
    variables = model.init(jax.random.key(0), batches[0], train=False)
    _, trained = model.apply(variables, batches[0] * 9, train=True, mutable=["batch_stats"])
    updated = jaxbn.update_bn(model.apply, {**variables, **trained}, batches)
    net = torch.nn.BatchNorm1d(C)
    torch_update_bn([to_torch(b) for b in batches], net)
    stats = updated["batch_stats"]
    assert_close("update_bn renorm mean", stats["mean"], net.running_mean.numpy(), 1e-5, 1e-6)
    assert_close("update_bn renorm var", stats["var"], net.running_var.numpy(), 1e-5, 1e-6)
    assert int(stats["num_batches_tracked"]) == 3


# --- the hostile pass: transforms and wrappers ---------------------------------------------


def test_update_bn_uses_only_the_elements_a_mask_selects():
    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    mask = jnp.arange(8)[:, None] < 5  # the last 3 rows are padding
    model = jaxbn.BatchNorm1d(C)
    variables = model.init(jax.random.key(0), batches[0], train=False)
    apply_fn = lambda v, x, **kw: model.apply(v, jnp.where(mask, x, jnp.nan), mask=mask, **kw)
    updated = jaxbn.update_bn(apply_fn, variables, batches)
    net = torch.nn.BatchNorm1d(C)
    torch_update_bn([to_torch(b[:5]) for b in batches], net)
    stats = updated["batch_stats"]
    assert_close("update_bn masked mean", stats["mean"], net.running_mean.numpy(), 1e-5, 1e-6)
    assert_close("update_bn masked var", stats["var"], net.running_var.numpy(), 1e-5, 1e-6)


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return jaxbn.BatchNorm1d(C, name="norm")(x, train=train)


class Blocks(nn.Module):
    """The trainable kinds, one of them behind nn.remat."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.remat(RematBlock, static_argnums=(2,))(name="bn")(x, train)
        x = jaxbn.GhostBatchNorm(C, 4, name="ghost")(x * 2 + 1, train=train)
        x = jaxbn.BatchRenorm(C, name="renorm")(x * 3 - 1, train=train)
        return jaxbn.flax_compat.BatchNorm(name="compat")(x + 1, use_running_average=not train)


def test_update_bn_gives_the_same_statistics_through_a_jitted_apply_traced_in_either_order():
    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    model = Blocks()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    apply_fn = jax.jit(model.apply, static_argnames=("train", "mutable"))
    fresh = jaxbn.update_bn(model.apply, variables, batches)
    apply_fn(variables, batches[0], train=True, mutable=("batch_stats",))  # traced first
    updated = jaxbn.update_bn(apply_fn, variables, batches)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updated, fresh))
    layers = jaxbn.tools.layers.stored_layers(updated)
    counts = {"/".join(p): int(s["num_batches_tracked"]) for p, (s, _) in layers.items()}
    assert counts == {"bn/norm": 2, "ghost": 4, "renorm": 2, "compat": 2}


def test_update_bn_of_an_nn_sequential_model_re_estimates_each_layer():
    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    model = nn.Sequential([nn.Dense(C), jaxbn.flax_compat.BatchNorm(use_running_average=False)])
    variables = model.init(jax.random.key(0), batches[0])

    def apply_fn(variables, x, *, train, mutable):  # nn.Sequential has no train flag
        assert train
        return model.apply(variables, x, mutable=mutable)

    updated = jaxbn.update_bn(apply_fn, variables, batches)
    dense = variables["params"]["layers_0"]
    inputs = [b @ dense["kernel"] + dense["bias"] for b in batches]
    stats = updated["batch_stats"]["layers_1"]
    expected = sum(z.mean(0) for z in inputs) / 2
    assert_close("update_bn sequential mean", stats["mean"], expected, 1e-5, 1e-6)
    assert int(stats["num_batches_tracked"]) == 2


class Members(nn.Module):
    """An ensemble of 2 members by nn.vmap; ``moments_axis`` is batch_moments' entry."""

    moments_axis: int | None

    @nn.compact
    def __call__(self, x, *, train):
        axes = {"params": 0, "batch_stats": 0, "batch_moments": self.moments_axis}
        members = nn.vmap(
            lambda module, x: jaxbn.BatchNorm1d(C)(x, train=train),
            variable_axes=axes,
            split_rngs={"params": True},
            in_axes=0,
            out_axes=0,
        )
        return members(self, x)


def test_update_bn_averages_each_member_of_an_nn_vmap_ensemble_on_its_own():
    batches = [normal(i, (2, 8, C), i + 1, i) for i in range(2)]
    model = Members(moments_axis=0)
    variables = model.init(jax.random.key(0), batches[0], train=False)
    updated = jaxbn.update_bn(model.apply, variables, batches)
    stats = updated["batch_stats"]["BatchNorm1d_0"]
    for member in range(2):
        expected = sum(b[member].var(0, ddof=1) for b in batches) / 2
        assert_close("update_bn vmap var", stats["var"][member], expected, 1e-5, 1e-6)
    np.testing.assert_array_equal(stats["num_batches_tracked"], [2, 2])


def test_update_bn_of_an_nnx_model_with_a_batch_norm_re_estimates_it():
    from flax import nnx

    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    model = nnx.Sequential(nnx.Linear(C, C, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm1d(C))
    jaxbn.nnx.update_bn(model, batches)
    inputs = [model.layers[0](b) for b in batches]
    expected = sum(z.var(0, ddof=1) for z in inputs) / 2
    assert_close("update_bn nnx var", model.layers[1].var[...], expected, 1e-5, 1e-6)
    assert int(model.layers[1].num_batches_tracked[...]) == 2


class SharedMembers(nn.Module):
    """nn.vmap over examples with one set of statistics, synced over the vmap axis."""

    moments_axis: int | None

    @nn.compact
    def __call__(self, x, *, train):
        axes = {"params": None, "batch_stats": None, "batch_moments": self.moments_axis}
        members = nn.vmap(
            lambda module, x: jaxbn.BatchNorm1d(C, axis_name="m")(x, train=train),
            variable_axes=axes,
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
            axis_name="m",
        )
        return members(self, x)


@pytest.fixture(scope="module")
def shared_case():
    batches = [normal(i, (2, 8, C), i + 1, i) for i in range(2)]
    variables = SharedMembers(None).init(jax.random.key(0), batches[0], train=False)
    return variables, batches


def test_update_bn_of_statistics_shared_by_nn_vmap_members_is_the_average_over_all_members(
    shared_case,
):
    variables, batches = shared_case
    updated = jaxbn.update_bn(SharedMembers(None).apply, variables, batches)
    stats = updated["batch_stats"]["BatchNorm1d_0"]
    expected = sum(b.reshape(-1, C).var(0, ddof=1) for b in batches) / 2
    assert_close("update_bn shared vmap var", stats["var"], expected, 1e-5, 1e-6)
    assert int(stats["num_batches_tracked"]) == 2


def test_update_bn_refuses_reports_mapped_on_an_axis_the_statistics_do_not_have(shared_case):
    variables, batches = shared_case
    with pytest.raises(
        ValueError,
        match=r"BatchNorm1d_0 reported 2 batch statistics per member for \[1\] updates of its "
        r"counter: .*None under nn.vmap when the members share one set of statistics\)",
    ):
        jaxbn.update_bn(SharedMembers(0).apply, variables, batches)


def test_update_bn_of_an_nnx_stack_made_by_nnx_vmap_and_run_by_nnx_scan_averages_each_layer():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.bn = nnx.Linear(C, C, rngs=rngs), jaxbn.nnx.BatchNorm1d(C)

        def __call__(self, x):
            return self.bn(self.lin(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            make = nnx.split_rngs(splits=2)(nnx.vmap(Block, in_axes=(0,), out_axes=0))
            self.blocks = make(rngs)

        def __call__(self, x):
            step = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            return step(x, self.blocks)

    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    model = Stack(nnx.Rngs(0))
    jaxbn.nnx.update_bn(model, batches)
    kernel, bias = model.blocks.lin.kernel[...][0], model.blocks.lin.bias[...][0]
    expected = sum((x @ kernel + bias).var(0, ddof=1) for x in batches) / 2
    assert_close("update_bn nnx stack var", model.blocks.bn.var[...][0], expected, 1e-5, 1e-6)
    np.testing.assert_array_equal(model.blocks.bn.num_batches_tracked[...], [2, 2])


class EvalInside(nn.Module):
    """``fixed`` is always called in eval (a BN the model keeps frozen that way); ``spare`` is
    called in eval only, so no training batch reaches it."""

    @nn.compact
    def __call__(self, x, *, train):
        x = jaxbn.BatchNorm1d(C, name="fixed")(x, train=False)
        if not train:
            x = jaxbn.BatchNorm1d(C, name="spare")(x, train=False)
        return jaxbn.BatchNorm1d(C, name="live")(x, train=train)


@pytest.fixture(scope="module")
def eval_inside_case():
    batches = [normal(i, (8, C), i + 1, i) for i in range(2)]
    variables = EvalInside().init(jax.random.key(0), batches[0], train=False)
    stale = {"mean": jnp.full((C,), 5.0), "var": jnp.full((C,), 2.0)}
    stale["num_batches_tracked"] = jnp.asarray(7, jnp.int32)
    variables["batch_stats"]["fixed"] = variables["batch_stats"]["spare"] = stale
    return variables, jaxbn.update_bn(EvalInside().apply, variables, batches)


def test_update_bn_leaves_a_batch_norm_the_model_calls_in_eval_as_it_was(eval_inside_case):
    variables, updated = eval_inside_case
    assert_stats_equal(updated["batch_stats"]["fixed"], variables["batch_stats"]["fixed"])
    assert int(updated["batch_stats"]["live"]["num_batches_tracked"]) == 2


def test_update_bn_leaves_a_batch_norm_no_batch_reached_as_it_was_instead_of_resetting_it(
    eval_inside_case,
):
    # torch resets it to 0/1; here it cannot be told from a frozen layer, which must stay
    variables, updated = eval_inside_case
    assert_stats_equal(updated["batch_stats"]["spare"], variables["batch_stats"]["spare"])


class SyncedPair(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = jaxbn.FrozenBatchNorm(C, name="frozen")(x, train=train)
        return jaxbn.BatchRenorm(C, axis_name="batch", name="renorm")(x, train=train)


def test_update_bn_of_replicated_pmap_variables_averages_renorm_globally_and_keeps_frozen():
    batches = [normal(i, (4, 5, C), i + 1, i) for i in range(2)]
    model = SyncedPair()
    variables = model.init(jax.random.key(0), batches[0][0], train=False)
    variables["batch_stats"]["frozen"] = {
        "mean": jnp.full((C,), -1.0),
        "var": jnp.full((C,), 4.0),
        "num_batches_tracked": jnp.asarray(0, jnp.int32),
    }
    replicated = jax.tree.map(lambda a: jnp.stack([a] * 4), variables)
    mapped = jax.pmap(
        lambda v, x, mutable: model.apply(v, x, train=True, mutable=mutable),
        axis_name="batch",
        static_broadcasted_argnums=(2,),
        devices=jax.devices()[:4],
    )
    updated = jaxbn.update_bn(
        lambda v, x, *, train, mutable: mapped(v, x, mutable), replicated, batches
    )
    frozen = jax.tree.map(lambda a: a[2], updated["batch_stats"]["frozen"])
    assert_stats_equal(frozen, variables["batch_stats"]["frozen"])
    inputs = [(b.reshape(-1, C) + 1.0) / np.sqrt(4.0 + 1e-5) for b in batches]
    expected = sum(z.var(0, ddof=1) for z in inputs) / 2
    for device in range(4):
        got = updated["batch_stats"]["renorm"]["var"][device]
        assert_close("update_bn pmap renorm var", got, expected, 1e-5, 1e-5)
    np.testing.assert_array_equal(updated["batch_stats"]["renorm"]["num_batches_tracked"], [2] * 4)
