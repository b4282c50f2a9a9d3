"""fold_batch_norm on every batch norm kind: the kinds whose eval is BatchNorm's eval fold
exactly (FrozenBatchNorm without a counter, BatchRenorm, GhostBatchNorm; torch's
``fuse_linear_bn_weights`` is the oracle), the others are kept and reported (untracked,
masked, stacked under nn.scan/nn.vmap), every batch norm ends in ``.folded`` or ``.left``,
and a Dense subclass is judged by what it computes."""

from __future__ import annotations

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_linear_bn_weights

import jaxbn
from jaxbn.tools.layers import GHOST, UNTRACKED, eval_kwargs, kind_of
from tests.parity_report import assert_close

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((8, 5)) * 3 + 1, jnp.float32)


def loaded(variables, counter=5, seed=1):
    """Variables with every batch norm's statistics and affine parameters set to
    trained-looking values, and ``num_batches_tracked = counter``."""
    rng = np.random.default_rng(seed)
    variables = flax.core.unfreeze(variables)
    for path, stats, _ in jaxbn.tools._tree.batch_norm_layers(variables):
        shape = stats["mean"].shape
        stats_at = jaxbn.tools._tree.get_path(variables["batch_stats"], path)
        stats_at["mean"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        stats_at["var"] = jnp.asarray(rng.uniform(0.3, 2.0, shape), jnp.float32)
        stats_at["num_batches_tracked"] = jnp.full_like(stats["num_batches_tracked"], counter)
        params_at = jaxbn.tools._tree.get_path(variables["params"], path)
        params_at["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
        params_at["bias"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return variables


class DenseNorm(nn.Module):
    """``norm(dense(x))`` for any batch norm factory."""

    norm: type = jaxbn.BatchNorm1d

    @nn.compact
    def __call__(self, x, mask=None, *, train):
        h = nn.Dense(4, name="dense")(x)
        kwargs = {} if mask is None else {"mask": mask}
        return self.norm(name="bn")(h, train=train, **kwargs)


def torch_fused(variables, eps=1e-5):
    """The dense layer's kernel and bias fused by torch (``fuse_linear_bn_weights``)."""
    t = lambda a: torch.as_tensor(np.array(a))
    dense, bn = variables["params"]["dense"], variables["params"]["bn"]
    stats = variables["batch_stats"]["bn"]
    w, b = fuse_linear_bn_weights(
        t(dense["kernel"]).T,
        t(dense["bias"]),
        t(stats["mean"]),
        t(stats["var"]),
        eps,
        t(bn["scale"]),
        t(bn["bias"]),
    )
    return w.detach().numpy().T, b.detach().numpy()


def check_folded_like_torch(model, variables, group):
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.folded == {"bn": "dense"} and not result.left
    kernel, bias = torch_fused(variables)
    assert_close(
        f"{group} kernel", result.variables["params"]["dense"]["kernel"], kernel, 1e-6, 1e-6
    )
    assert_close(f"{group} bias", result.variables["params"]["dense"]["bias"], bias, 1e-6, 1e-6)
    assert_close(
        f"{group} eval outputs",
        result.model.apply(result.variables, X, train=False),
        model.apply(variables, X, train=False),
        1e-5,
        1e-5,
    )
    return result


def test_a_frozen_batch_norm_whose_counter_is_zero_folds_without_asking_for_update_bn():
    # torchvision's FrozenBatchNorm2d buffers have no counter: constants, loaded as they are
    model = DenseNorm(lambda name: jaxbn.FrozenBatchNorm(4, name=name))
    variables = loaded(model.init(jax.random.key(0), X, train=False), counter=0)
    check_folded_like_torch(model, variables, "fold frozen counter 0")


@pytest.mark.parametrize(
    "norm",
    [
        lambda name: jaxbn.FrozenBatchNorm(4, name=name),
        lambda name: jaxbn.BatchRenorm(4, name=name),
        lambda name: jaxbn.GhostBatchNorm(4, 2, name=name),
    ],
    ids=["frozen", "renorm", "ghost"],
)
def test_frozen_renorm_and_ghost_batch_norms_fold_exactly_like_a_batch_norm(norm):
    model = DenseNorm(norm)
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    check_folded_like_torch(model, variables, "fold variant")


def test_a_trained_batch_norm_never_tracked_is_still_refused_with_update_bn_advice():
    model = DenseNorm()
    variables = loaded(model.init(jax.random.key(0), X, train=False), counter=0)
    with pytest.raises(
        ValueError,
        match=r"cannot fold the batch norm at bn: its statistics were never tracked "
        r"\(num_batches_tracked == 0\); train it or run jaxbn.update_bn first",
    ):
        jaxbn.fold_batch_norm(model, variables, X[:1])


def test_an_untracked_batch_norm_is_kept_and_a_sample_of_one_example_is_enough():
    model = DenseNorm(lambda name: jaxbn.BatchNorm1d(4, track_running_stats=False, name=name))
    variables = model.init(jax.random.key(0), X, train=False)
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert not result.folded
    assert result.left == {
        "bn": "it is untracked (track_running_stats=False): its eval normalizes with the "
        "batch's own statistics, which no Conv/Dense weights can hold"
    }
    assert_close(
        "fold untracked eval outputs",
        result.model.apply(result.variables, X, train=False),
        model.apply(variables, X, train=False),
        0.0,
        0.0,
    )


def test_an_untracked_ghost_batch_norm_is_kept_as_untracked():
    model = DenseNorm(lambda name: jaxbn.GhostBatchNorm(4, 1, track_running_stats=False, name=name))
    variables = model.init(jax.random.key(0), X, train=False)
    assert jaxbn.fold_batch_norm(model, variables, X[:2]).left["bn"].startswith("it is untracked")


PADDED = jnp.asarray(np.arange(8)[:, None] < 5).repeat(4, axis=1)  # rows 5..7 are padding


def test_a_batch_norm_called_with_a_mask_is_kept_and_the_padded_batch_is_unchanged():
    model = DenseNorm()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    # the sample's mask selects every row: the kind of call, not the data, decides
    result = jaxbn.fold_batch_norm(model, variables, X[:1], PADDED[:1])
    assert not result.folded
    assert result.left == {
        "bn": "it is called with mask=, and its masked elements output 0, which folded "
        "Conv/Dense weights cannot reproduce"
    }
    assert_close(
        "fold masked eval outputs on a padded batch",
        result.model.apply(result.variables, X, PADDED, train=False),
        model.apply(variables, X, PADDED, train=False),
        0.0,
        0.0,
    )


def test_a_model_folded_from_an_unmasked_sample_refuses_a_masked_call():
    model = DenseNorm()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    folded_model, folded = jaxbn.fold_batch_norm(model, variables, X[:1])
    with pytest.raises(
        ValueError,
        match=r"the batch norm at bn was folded by fold_batch_norm, whose sample call passed it "
        r"no mask; a masked call needs the batch norm: fold with a sample call that passes the "
        r"mask, and it is kept",
    ):
        folded_model.apply(folded, X, PADDED, train=False)


class Cell(nn.Module):
    @nn.compact
    def __call__(self, carry, x):
        return carry, jaxbn.BatchNorm1d(4, name="bn")(nn.Dense(4, name="dense")(x), train=False)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        scan = nn.scan(
            Cell,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        return scan(name="steps")(None, jnp.broadcast_to(x, (3, *x.shape)))[1]


class Block(nn.Module):
    """``bn(dense(x))`` in eval, without a flag (lifted transforms take no keywords)."""

    @nn.compact
    def __call__(self, x):
        return jaxbn.BatchNorm1d(4, name="bn")(nn.Dense(4, name="dense")(x), train=False)


class Mapped(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        mapped = nn.vmap(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=0,
        )
        return mapped(name="members")(jnp.broadcast_to(x, (3, *x.shape)))


@pytest.mark.parametrize(
    ("model", "path"), [(Scanned(), "steps/bn"), (Mapped(), "members/bn")], ids=["scan", "vmap"]
)
def test_a_dense_and_batch_norm_with_stacked_statistics_are_kept_and_reported(model, path):
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.left == {
        path: "its statistics are stacked [3, 4] (one member per step or mapped index, as under "
        "nn.scan or nn.vmap); folding keeps them"
    }
    assert_close(
        "fold stacked eval outputs",
        result.model.apply(result.variables, X, train=False),
        model.apply(variables, X, train=False),
        0.0,
        0.0,
    )


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.remat(Block)(name="block")(x)


def test_a_dense_and_batch_norm_under_nn_remat_fold():
    model = Remat()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.folded == {"block/bn": "block/dense"} and not result.left
    assert_close(
        "fold remat eval outputs",
        result.model.apply(result.variables, X, train=False),
        model.apply(variables, X, train=False),
        1e-5,
        1e-5,
    )


class LoggedDense(nn.Dense):
    """A Dense subclass that calls ``super().__call__`` (e.g. to log or reshape)."""

    scale_after: float = 1.0

    def __call__(self, x):
        y = super().__call__(x)
        return y if self.scale_after == 1.0 else y * self.scale_after


class SubclassedDense(nn.Module):
    scale_after: float = 1.0

    @nn.compact
    def __call__(self, x, *, train):
        h = LoggedDense(4, scale_after=self.scale_after, use_bias=False, name="dense")(x)
        return jaxbn.BatchNorm1d(name="bn")(h, train=train)


def test_a_dense_subclass_calling_super_folds_once_and_gets_one_bias():
    model = SubclassedDense()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.folded == {"bn": "dense"} and not result.left
    assert result.model.biased == ("dense",)
    assert_close(
        "fold dense subclass eval outputs",
        result.model.apply(result.variables, X, train=False),
        model.apply(variables, X, train=False),
        1e-5,
        1e-5,
    )


def test_a_dense_subclass_that_changes_its_output_is_kept_for_that_reason():
    model = SubclassedDense(scale_after=2.0)
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.left == {"bn": "its input does not come straight from a Conv or Dense layer"}


class EveryKind(nn.Module):
    """One of each: folded, kept, and one the sample call does not run."""

    @nn.compact
    def __call__(self, x, *, train, head=False):
        h = jaxbn.FrozenBatchNorm(4, name="frozen")(nn.Dense(4, name="a")(x))
        h = jaxbn.GhostBatchNorm(4, 2, name="ghost")(nn.Dense(4, name="b")(h), train=train)
        h = jaxbn.BatchRenorm(4, name="renorm")(nn.relu(h), train=train)
        if head:
            h = jaxbn.BatchNorm1d(4, name="head_bn")(nn.Dense(4, name="head")(h), train=train)
        return h


def test_every_batch_norm_ends_in_folded_or_left():
    model = EveryKind()
    variables = loaded(model.init(jax.random.key(0), X, train=False, head=True))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.folded == {"frozen": "a", "ghost": "b"}
    assert result.left == {
        "renorm": "its input does not come straight from a Conv or Dense layer",
        "head_bn": "the sample call did not run it (another method, or a branch not taken); "
        "kept as it is",
    }


class PaddedRows(nn.Module):
    """Rows of zeros are padding: the model masks them itself (a sequence model's usual way)."""

    @nn.compact
    def __call__(self, x, *, train):
        mask = jnp.broadcast_to(jnp.any(x != 0, axis=-1, keepdims=True), (*x.shape[:-1], 4))
        return jaxbn.BatchNorm1d(4, name="bn")(nn.Dense(4, name="dense")(x), train=train, mask=mask)


def test_a_batch_norm_masked_inside_the_model_is_kept_although_the_sample_has_no_padding():
    model = PaddedRows()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    padded = X.at[5:].set(0.0)
    result = jaxbn.fold_batch_norm(model, variables, X[:1])  # no padded row in the sample
    assert list(result.left) == ["bn"] and not result.folded
    assert_close(
        "fold masked inside eval outputs on a padded batch",
        result.model.apply(result.variables, padded, train=False),
        model.apply(variables, padded, train=False),
        0.0,
        0.0,
    )


def test_pmap_replicated_variables_are_refused_with_how_to_take_one_replica():
    model = DenseNorm()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    with pytest.raises(
        ValueError,
        match=r"the sample call failed \(ScopeParamShapeError\), and every batch norm's statistics "
        r"have a leading axis of 2, as pmap-replicated variables do; fold one replica: "
        r"jax.tree.map\(lambda a: a\[0\], variables\)",
    ):
        jaxbn.fold_batch_norm(model, replicated, X[:1])


def test_fold_under_jit_is_refused_in_one_line():
    model = DenseNorm()
    variables = loaded(model.init(jax.random.key(0), X, train=False))
    with pytest.raises(TypeError, match=r"fold_batch_norm needs concrete variables"):
        jax.jit(lambda v: jaxbn.fold_batch_norm(model, v, X[:1]).variables)(variables)


class FlaxLinenNorm(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(4, name="dense")(x))


def test_a_flax_linen_batch_norm_is_kept_and_named_with_the_jaxbn_class_to_use():
    model = FlaxLinenNorm()
    variables = model.init(jax.random.key(0), X, train=False)
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.left == {
        "bn": "flax.linen.BatchNorm is not a jaxbn batch norm; use jaxbn.flax_compat.BatchNorm "
        "(jaxbn.from_flax_batch_norm converts its statistics) to fold it"
    }


def test_an_untracked_ghost_batch_norm_is_of_the_untracked_kind():
    assert kind_of(jaxbn.GhostBatchNorm(4, 2, track_running_stats=False)) == UNTRACKED
    assert kind_of(jaxbn.GhostBatchNorm(4, 2)) == GHOST


def test_eval_kwargs_leaves_out_a_flag_the_model_holds_as_a_field():
    class Flagged(nn.Module):
        use_running_average: bool | None = None

        def __call__(self, x, use_running_average=None):
            return x

    assert eval_kwargs(Flagged()) == {"use_running_average": True}
    assert eval_kwargs(Flagged(use_running_average=True)) == {}
    assert eval_kwargs(Flagged(), "no_such_method") == {}
