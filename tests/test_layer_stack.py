"""The layer stack unrolled (`scan_layers=False`) computes what the scan computes: same logits and gradients for
dense and hybrid MoE models, with and without remat; and the unrolled step really has no loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xorl_jax.checkpoint.orbax import read_hf_config
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.models.common import ModelOptions, unstack_layers
from xorl_jax.models.loading import build_config
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

DENSE = Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, intermediate_size=48)


def _loss_and_grads(make, scan, remat, ids):
    model = make(ModelOptions(remat_policy=remat, scan_layers=scan, attn_implementation="xla"))
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(ids)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(ids, -1, 1)[..., None], -1)) + 0.01 * out.aux_loss

    compiled = jax.jit(jax.value_and_grad(loss)).lower(state).compile()  # one compilation, run and read
    value, grads = compiled(state)
    return value, grads, compiled.as_text()


def _dense(opts):
    return Qwen3ForCausalLM(DENSE, opts, rngs=nnx.Rngs(0))


def _hybrid_moe(opts):
    cls, cfg = build_config(read_hf_config(DEMO_DIR + "_qwen3_5_moe"))
    return cls(cfg, opts, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make,remat", [(_dense, "none"), (_dense, "dots_saveable"), (_hybrid_moe, "full")])
def test_unrolled_layers_equal_the_scan(make, remat):
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 1, 64)
    want, want_g, scanned_hlo = _loss_and_grads(make, True, remat, ids)
    got, got_g, unrolled_hlo = _loss_and_grads(make, False, remat, ids)
    assert " while(" in scanned_hlo and " while(" not in unrolled_hlo
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want_g)]
    atol_scale = _fp32_reduction_bound(ids, want_g)
    for path, a, b in zip(paths, jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert a.shape == b.shape, path
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=atol_scale * np.abs(b).max(),
                                   err_msg=path)


def _fp32_reduction_bound(ids, grads) -> float:
    """Relative error bound of an fp32 gradient element: scan and unrolled programs sum the same terms in another
    order, and n-term summation differs by at most n * eps of the terms' magnitude. A weight gradient sums over
    every token and, through the backward, over the widest contraction (hidden, intermediate or vocab width)."""
    width = max(max(leaf.shape[-2:]) for leaf in jax.tree.leaves(grads) if leaf.ndim >= 2)
    return float(np.finfo(np.float32).eps) * ids.size * width


def test_unstack_layers_slices_every_leaf_and_its_gradient_is_one_concatenation():
    tree = {"w": jnp.arange(24.0).reshape(3, 2, 4), "b": jnp.arange(3.0)}
    parts = unstack_layers(tree, 3)
    assert len(parts) == 3
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part["w"], tree["w"][i])
        assert float(part["b"]) == float(tree["b"][i])

    def f(w):
        return sum(jnp.sum(p * (i + 1)) for i, p in enumerate(unstack_layers(w, 3)))

    g = jax.grad(f)(tree["w"])
    np.testing.assert_array_equal(g, jnp.broadcast_to(jnp.arange(1.0, 4.0)[:, None, None], (3, 2, 4)))
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(tree["w"]))
    assert "concatenate" in jaxpr and " pad" not in jaxpr
