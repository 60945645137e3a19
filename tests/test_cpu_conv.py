"""CPU convolution kernels (covidmt_jax.models.cpu_conv): equal to lax in value, reverse and
forward mode, really taken when the switch is on, plain lax when it is off."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from covidmt_jax import config_lib
from covidmt_jax.models import cpu_conv, layers
from covidmt_jax.models.layers import BasicBlock, Bottleneck, ConvBN

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _switch_from_environment():
    """Each test sets the switch it needs; afterwards it is read from COVIDMT_CPU_CONV again."""
    cpu_conv.set_paths("auto")
    yield
    cpu_conv.set_paths("auto")


def _conv(x, w, stride, pad, groups):
    return layers.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                       dimension_numbers=NHWC, feature_group_count=groups)


def _lax_conv(x, w, stride, pad, groups):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=NHWC, feature_group_count=groups)


@pytest.mark.parametrize("shape,groups,kernel,stride,pad,mult", [
    ((2, 9, 10, 8), 4, 3, 1, 1, 1),    # ResNeXt-style grouped 3x3: elementwise fusion
    ((2, 9, 10, 8), 4, 3, 1, 0, 1),    # the same unpadded (transposed padding of dx differs)
    ((2, 12, 12, 128), 32, 3, 1, 1, 1),  # 32 groups of 4: dW blocks of 8 groups
    ((2, 10, 11, 8), 4, 3, 2, 1, 1),   # strided grouped: XLA's grouped kernel, chunked dW
    ((2, 8, 9, 6), 6, 3, 1, 1, 2),     # depthwise with channel multiplier: elementwise
    ((2, 11, 12, 12), 3, 1, 2, 0, 1),  # grouped 1x1 strided
    ((4, 16, 16, 64), 2, 3, 1, 1, 1),  # 32 channels per group: XLA's grouped kernel, dW in 2 chunks
    ((2, 9, 10, 8), 1, 3, 1, 1, 1),    # dense 3x3, small output: XLA's weight gradient
    ((3, 40, 40, 3), 1, 3, 1, 1, 2),   # dense 3x3, narrow, >= DW_MIN_PIXELS: im2col dW, 3 chunks
    ((1, 66, 65, 2), 1, 3, 2, 1, 2),   # dense strided 3x3, odd sizes, 33x33 out: im2col dW
    ((2, 34, 33, 128), 1, 3, 1, 1, 1),  # dense 3x3, wide: one matmul per tap
    ((2, 11, 12, 8), 1, 1, 1, 0, 2),   # dense 1x1: one matmul
    ((2, 11, 12, 8), 1, 1, 2, 0, 2),   # dense 1x1 strided (odd sizes)
    ((2, 13, 12, 3), 1, 7, 2, 3, 4),   # 7x7 stem
])
def test_cpu_conv_paths_equal_lax(shape, groups, kernel, stride, pad, mult):
    """With the switch on, layers.conv_general_dilated (1x1 as a matmul, the elementwise grouped
    conv, chunked matmul weight gradients) computes lax's outputs,
    gradients (reverse mode) and forward-mode derivatives."""
    cpu_conv.set_paths("on")
    rng = np.random.RandomState(0)
    c = shape[-1]
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, c // groups, c * mult), jnp.float32)
    tx = jnp.asarray(rng.randn(*x.shape), jnp.float32)
    tw = jnp.asarray(rng.randn(*w.shape), jnp.float32)
    args = (stride, pad, groups)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, *args)))

    y = jax.jit(lambda x, w: _conv(x, w, *args))(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_lax_conv(x, w, *args)), rtol=1e-5, atol=1e-4)
    ours = jax.jit(jax.grad(loss(_conv), (0, 1)))(x, w)
    for a, b in zip(jax.grad(loss(_lax_conv), (0, 1))(x, w), ours):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    _, t_ours = jax.jit(lambda x, w, tx, tw: jax.jvp(lambda x, w: _conv(x, w, *args), (x, w), (tx, tw)))(x, w, tx, tw)
    _, t_ref = jax.jvp(lambda x, w: _lax_conv(x, w, *args), (x, w), (tx, tw))
    np.testing.assert_allclose(np.asarray(t_ours), np.asarray(t_ref), rtol=1e-4, atol=1e-3)


def test_cpu_conv_paths_are_taken():
    """With the switch on the fast paths are really used on CPU (StableHLO of the jitted
    functions): a 1x1 conv is a matmul; a stride-1 narrow grouped conv has no convolution; the
    weight gradient of a 3x3 conv with a 100x100 output is one im2col matmul (narrow input) or
    nine tap matmuls (wide input) inside a loop over batch chunks; with a 16x16 output it keeps
    XLA's kernel. With the switch off every one of them is a convolution and nothing else."""
    cpu_conv.set_paths("on")

    def conv(x, w, groups=1):
        return _conv(x, w, 1, w.shape[0] // 2, groups)

    def dw_hlo(x, w):  # the input is not differentiated
        return jax.jit(jax.grad(lambda w: jnp.sum(conv(x, w)))).lower(w).as_text()

    x = jnp.ones((2, 100, 100, 4), jnp.float32)
    w1 = jnp.ones((1, 1, 4, 8), jnp.float32)
    hlo = jax.jit(conv).lower(x, w1).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo
    xg, wg = jnp.ones((2, 20, 20, 32), jnp.float32), jnp.ones((3, 3, 4, 32), jnp.float32)
    hlo = jax.jit(lambda x, w: conv(x, w, 8)).lower(xg, wg).as_text()
    assert "convolution" not in hlo and "dot_general" not in hlo
    w3 = jnp.ones((3, 3, 4, 8), jnp.float32)
    dw = dw_hlo(x, w3)
    assert "convolution" not in dw and "while" in dw and dw.count("dot_general") == 1  # narrow: im2col
    wide = cpu_conv.IM2COL_MAX_CHANNELS
    dw = dw_hlo(jnp.ones((2, 100, 100, wide), jnp.float32), jnp.ones((3, 3, wide, 8), jnp.float32))
    assert "convolution" not in dw and "while" in dw and dw.count("dot_general") == 9  # wide: per tap
    dw = dw_hlo(jnp.ones((2, 16, 16, wide), jnp.float32), jnp.ones((3, 3, wide, 8), jnp.float32))
    assert "convolution" in dw and "dot_general" not in dw  # small output: XLA's kernel
    assert cpu_conv._batch_chunk(12, 100 * 100) == 1 and cpu_conv._batch_chunk(12, 16 * 16) == 2
    assert cpu_conv._batch_chunk(7, 10) == 7 and cpu_conv._group_block(728, 1) == 28

    with cpu_conv.using("off"):
        for hlo in (jax.jit(conv).lower(x, w1).as_text(),
                    jax.jit(lambda x, w: conv(x, w, 8)).lower(xg, wg).as_text(), dw_hlo(x, w3)):
            assert "convolution" in hlo and "dot_general" not in hlo and "while" not in hlo
    # a subset: 1x1 convs stay convolutions, the weight gradient still takes the matmul loop
    with cpu_conv.using("elementwise,weight_grad"):
        assert "convolution" in jax.jit(conv).lower(x, w1).as_text()
        assert "while" in dw_hlo(x, w3)
    assert cpu_conv.enabled_paths() == frozenset(cpu_conv.PATHS)


def test_switch_values_and_errors(monkeypatch):
    """COVIDMT_CPU_CONV: on by default, 0/off, or a list of paths; set_paths/using override it
    ("auto" returns to it); bad values name the setting."""
    monkeypatch.delenv(cpu_conv.ENV_VAR, raising=False)
    assert cpu_conv.enabled_paths() == frozenset(cpu_conv.PATHS)
    monkeypatch.setenv(cpu_conv.ENV_VAR, "0")
    assert cpu_conv.enabled_paths() == frozenset()
    monkeypatch.setenv(cpu_conv.ENV_VAR, "pointwise, weight_grad")
    assert cpu_conv.enabled_paths() == {"pointwise", "weight_grad"}
    assert cpu_conv.set_paths("on") == frozenset(cpu_conv.PATHS)
    with cpu_conv.using(False) as paths:
        assert paths == frozenset() and cpu_conv.enabled_paths() == frozenset()
    assert cpu_conv.enabled_paths() == frozenset(cpu_conv.PATHS)
    assert cpu_conv.set_paths("auto") == {"pointwise", "weight_grad"}
    monkeypatch.setenv(cpu_conv.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="COVIDMT_CPU_CONV='fast'.*unknown CPU conv path"):
        cpu_conv.enabled_paths()
    with pytest.raises(ValueError, match="model.cpu_conv_kernels='pointwise,im2col'"):
        cpu_conv.set_paths("pointwise,im2col", "model.cpu_conv_kernels")
    assert config_lib.base_config().model.cpu_conv_kernels == "auto"  # the trainer's default


def test_switch_off_is_plain_lax_in_a_model():
    """With the switch off a model's jitted forward and backward hold no matmul loops: every
    conv is lax.conv_general_dilated (the GPU/TPU program)."""
    graphdef, params, rest = nnx.split(TinyResNeXt(nnx.Rngs(0)), nnx.Param, ...)
    x = jnp.ones((2, 32, 32, 1), jnp.float32)

    def grad_hlo():
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x))
        return jax.jit(jax.grad(loss)).lower(params).as_text()

    with cpu_conv.using("off"):
        hlo = grad_hlo()
    assert "convolution" in hlo and "while" not in hlo and "dot_general" in hlo  # the linear layer
    with cpu_conv.using("on"):
        hlo = grad_hlo()
    assert "while" in hlo


class TinyResNeXt(nnx.Module):
    """A ResNeXt-like classifier small enough for forward-mode tests whose convs meet every
    path on 32 px inputs: the stem's weight gradient at 32x32 (im2col), a stride-1 block with 2
    channels per group (elementwise), a strided one with 4 and one with 16 (XLA's
    grouped kernel, chunked weight gradient), 1x1 convs (matmuls), a dense 3x3 at 8x8 (XLA's
    weight gradient). ``[B, 32, 32, 1] -> [B, 2]``."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = ConvBN(1, 16, 3, rngs=rngs)
        self.block1 = Bottleneck(16, 8, groups=4, base_width=16, rngs=rngs)
        self.block2 = Bottleneck(32, 8, stride=2, groups=4, base_width=32, rngs=rngs)
        self.block3 = Bottleneck(32, 16, groups=2, base_width=64, rngs=rngs)
        self.block4 = BasicBlock(64, 32, stride=2, rngs=rngs)
        self.fc = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in (self.stem, self.block1, self.block2, self.block3, self.block4):
            x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


def test_forward_mode_through_a_model_equals_the_plain_path():
    """jax.jvp (input and parameter tangents), jacfwd and a Hessian-vector product
    (forward-over-reverse) through a small ResNeXt (:class:`TinyResNeXt`) on CPU with the CPU
    kernels on equal the same with the switch off (plain lax convs)."""
    m = TinyResNeXt(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 32, 32, 1), jnp.float32)
    dirs = jnp.asarray(rng.randn(3, 32, 32, 1), jnp.float32)
    t_params = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), p.dtype), params)

    def logits(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    @jax.jit
    def run(p, x, tp):
        _, t_out = jax.jvp(logits, (p, x), (tp, x[::-1]))
        jac = jax.jacfwd(lambda a: logits(p, x + jnp.einsum("k,khwc->hwc", a, dirs)))(jnp.zeros(3))
        hvp = jax.jvp(jax.grad(lambda p: jnp.sum(jnp.sin(logits(p, x)))), (p,), (tp,))[1]
        return t_out, jac, hvp

    with cpu_conv.using("on"):
        on = run(params, x, t_params)
    with cpu_conv.using("off"):
        off = run(params, x, t_params)
    assert on[1].shape == (2, 2, 3)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
        scale = float(np.abs(np.asarray(b)).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3 * scale)
