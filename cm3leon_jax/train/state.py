"""Train state and its sharded initialisation."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cm3leon_jax import partitioning


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Params are fp32; the model casts to its
    compute dtype inside."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                 seed: int) -> Callable[[], TrainState]:
    """A closure building the *boxed* state (params and optimizer moments keep
    their logical axis names, so their shardings can be read off them)."""

    def init():
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(jax.random.PRNGKey(seed), tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_state(model, tx, seq_len, seed, mesh, rules=None):
    """(abstract unboxed TrainState, its NamedShardings, jitted sharded init)."""
    init = make_init_fn(model, tx, seq_len, seed)
    abstract, shardings = partitioning.abstract_with_shardings(init, mesh, rules)
    sharded_init = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)
    return abstract, shardings, sharded_init


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
