"""CPU convolution kernels behind one switch (every conv of the zoo goes through them on CPU).

XLA:CPU's convolution kernels are fast for dense forward and input-gradient convs, but slow
for weight gradients and for grouped convs. On the CPU backend, with the switch on,
:func:`covidmt_jax.models.layers.conv_general_dilated` sends NHWC/HWIO convs without dilation
through the paths below instead of ``lax.conv_general_dilated``; GPUs and TPUs (fast conv
kernels) always take ``lax``. Each path is tested equal to ``lax``'s outputs, gradients and
forward-mode derivatives (tests/test_cpu_conv.py).

Paths (names as the switch takes them):

- ``pointwise``: unpadded dense 1x1 convs as one matmul ``[B*H'*W', Cin] @ [Cin, Cout]``
  (forward, input and weight gradient all become matmuls).
- ``elementwise``: stride-1 grouped convs with <= :data:`ELEMENTWISE_MAX_GROUP_CHANNELS`
  channels per group (in and out) as one XLA loop fusion (:func:`elementwise_grouped_conv`).
- ``weight_grad``: weight gradients of grouped convs and of dense convs with >= 32x32 outputs
  as matmuls in a loop over batch chunks (:func:`_weight_tangent`).

Each path is kept because it makes a train step at least 10 % faster on the 2-core CPU of
benchmarks/README.md: ``pointwise`` 1.5-2x (ResNet-50, COVIDMT-ResNeXt-50 at 224 px),
``elementwise`` 1.6x (Xception's depthwise convs at 224 px), ``weight_grad`` 4.6x
(COVIDMT-ResNeXt-50 at 224 px). A fourth path, narrow grouped convs as dense convs with a
block-diagonal kernel, was removed: with ``elementwise`` on it changed a COVIDMT-ResNeXt-50
step by about 1 % at 224 and 512 px.

The switch: the environment variable ``COVIDMT_CPU_CONV`` (``1``/``on``, the default; ``0``/
``off``; or a comma-separated list of path names to keep), the training config key
``model.cpu_conv_kernels`` (``"auto"``: the environment variable; otherwise the same values),
or :func:`set_paths` / :func:`using` in code. It is read when a function is traced, so set
the environment variable before the process starts; :func:`set_paths` and :func:`using`
clear JAX's caches when they change the paths, so that jitted functions are traced anew.
With the switch off every conv is plain ``lax.conv_general_dilated``.

Differentiation: the kxk paths are one ``jax.custom_jvp`` whose tangent is linear in the
input and kernel tangents and built from transposable primitives, so forward mode
(``jax.jvp``, ``jacfwd``, Hessian-vector products) and reverse mode both work; reverse mode
gets its fast weight gradient by transposing :func:`_weight_tangent` (a ``lax.map`` over
batch chunks whose transpose accumulates ``x_ij^T dy`` chunk by chunk, one chunk's tap slices
alive at a time). Thresholds were tuned on a 2-core Zen 5 CPU (benchmarks/README.md).
"""
from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

ENV_VAR = "COVIDMT_CPU_CONV"
PATHS = ("pointwise", "elementwise", "weight_grad")
NHWC = ("NHWC", "HWIO", "NHWC")

DW_MIN_PIXELS = 32 * 32  # dense convs with fewer output pixels per image keep XLA's dW kernel
DW_CHUNK_MIN_ROWS = 512  # a dW chunk holds the fewest images with at least this many output pixels
IM2COL_MAX_CHANNELS = 128  # dense dW: one im2col matmul per chunk below this many input channels
DW_GROUP_BLOCK = 32  # grouped dW: one dense matmul per tap per block of this many channels
ELEMENTWISE_MAX_GROUP_CHANNELS = 8  # stride-1 grouped convs this narrow (in and out): one fusion

_override: frozenset[str] | None = None


def parse_paths(value: str | bool | Iterable[str] | None, where: str = ENV_VAR) -> frozenset[str]:
    """``"1"``/``"on"``/``True``/``None`` -> all paths, ``"0"``/``"off"``/``False`` -> none,
    ``"pointwise,weight_grad"`` (or a list of names) -> those paths. ``where`` names the
    setting in errors."""
    if value is None or value is True:
        return frozenset(PATHS)
    if value is False:
        return frozenset()
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "1", "on", "true", "yes", "all"):
            return frozenset(PATHS)
        if text in ("0", "off", "false", "no", "none"):
            return frozenset()
        names = [p.strip() for p in text.split(",") if p.strip()]
    else:
        names = list(value)
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        raise ValueError(f"{where}={value!r}: unknown CPU conv path(s) {unknown}; use 1/on, 0/off "
                         f"or a comma-separated subset of {list(PATHS)}")
    return frozenset(names)


def enabled_paths() -> frozenset[str]:
    """The paths in force: set by :func:`set_paths` / :func:`using`, else from ``COVIDMT_CPU_CONV``."""
    if _override is not None:
        return _override
    return parse_paths(os.environ.get(ENV_VAR), ENV_VAR)


def set_paths(value: str | bool | Iterable[str] | None, where: str = "cpu_conv.set_paths") -> frozenset[str]:
    """Set the switch for this process (``"auto"`` or ``None``: back to ``COVIDMT_CPU_CONV``);
    returns the paths now in force. The trainer calls it with ``model.cpu_conv_kernels``."""
    global _override
    auto = value is None or (isinstance(value, str) and value.strip().lower() == "auto")
    new = None if auto else parse_paths(value, where)
    try:
        before = enabled_paths()
    except ValueError:  # a bad COVIDMT_CPU_CONV, overridden now
        before = None
    _override = new
    now = enabled_paths()
    if now != before:  # traced functions keep the paths they were traced with: trace anew
        jax.clear_caches()
    return now


@contextlib.contextmanager
def using(value: str | bool | Iterable[str] | None) -> Iterator[frozenset[str]]:
    """``with cpu_conv.using("off"): ...`` traces the block's functions with that switch."""
    saved = _override
    try:
        yield set_paths(value, "cpu_conv.using")
    finally:
        set_paths("auto" if saved is None else saved)


def handles(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs) -> bool:
    """Whether :func:`conv` takes this ``lax.conv_general_dilated`` call: CPU backend, switch
    on, explicit NHWC/HWIO/NHWC dimension numbers (``None`` means lax's NCHW), explicit padding,
    no dilation, no ``preferred_element_type`` / ``out_sharding``."""
    if dimension_numbers is None or lhs.ndim != 4 or isinstance(padding, str):
        return False
    if any(d not in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    if kwargs.get("preferred_element_type") is not None or kwargs.get("out_sharding") is not None:
        return False
    if jax.default_backend() != "cpu" or not enabled_paths():
        return False
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv(x: jax.Array, w: jax.Array, window_strides, padding, groups: int = 1, precision=None) -> jax.Array:
    """``[B, H, W, Cin] * [kh, kw, Cin/G, Cout] -> [B, H', W', Cout]`` through the paths in force
    (call only where :func:`handles` said yes)."""
    paths = enabled_paths()
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(s) for s in window_strides)
    groups = int(groups)
    if ("pointwise" in paths and w.shape[:2] == (1, 1) and groups == 1
            and all(p == (0, 0) for p in pad)):
        return _pointwise_conv(x, w, strides, precision)
    if precision is None and paths & {"elementwise", "weight_grad"}:
        return _cpu_conv(x, w, strides, pad, groups, paths)
    return jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=NHWC,
                                        feature_group_count=groups, precision=precision)


def _pointwise_conv(x: jax.Array, w: jax.Array, strides: tuple, precision=None) -> jax.Array:
    """An unpadded 1x1 conv as one matmul: ``x[:, ::sh, ::sw]`` as ``[B*H'*W', Cin] @ w [Cin, Cout]``."""
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
    b, h, wd, cin = x.shape
    y = jnp.dot(x.reshape(b * h * wd, cin), w.reshape(cin, w.shape[-1]), precision=precision)
    return y.reshape(b, h, wd, w.shape[-1])


def _tap_slices(xp: jax.Array, kh: int, kw: int, strides: tuple, ho: int, wo: int):
    """``x_ij`` for each kernel tap ``(i, j)`` in row-major order: the (padded) input pixels
    the tap meets, ``[B, ho, wo, C]``."""
    b, _, _, c = xp.shape
    sh, sw = strides
    for i in range(kh):
        for j in range(kw):
            yield jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                                (1, sh, sw, 1))


def _xla_conv(x, w, strides, padding, groups):
    """XLA's conv (``lax.conv_general_dilated``, NHWC/HWIO)."""
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                        feature_group_count=groups)


def _takes_elementwise_path(w_shape: tuple, strides: tuple, groups: int) -> bool:
    cg, cout = w_shape[2], w_shape[3]
    return (groups > 1 and tuple(strides) == (1, 1) and cg <= ELEMENTWISE_MAX_GROUP_CHANNELS
            and cout // groups <= ELEMENTWISE_MAX_GROUP_CHANNELS)


def elementwise_grouped_conv(x: jax.Array, w: jax.Array, padding: tuple, groups: int) -> jax.Array:
    """Stride-1 grouped conv ``[B, H, W, C] * [kh, kw, C/G, Cout] -> [B, H', W', Cout]`` as ONE
    XLA loop fusion: ``y[..., g, o] = sum_{i, j, k} x_pad[.., h+i, w+j, g, k] * w[i, j, k, g, o]``
    (``kh * kw * C/G`` multiply-adds per output; float32 accumulation). With a few channels
    per group this is 4-5x faster on CPU than any convolution kernel XLA has for it."""
    kh, kw, cg, cout = w.shape
    co = cout // groups
    acc = jnp.promote_types(x.dtype, jnp.float32)
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    b, hp, wp, _ = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    xg = xp.reshape(b, hp, wp, groups, cg).astype(acc)
    wg = w.reshape(kh, kw, cg, groups, co).astype(acc)
    y = None
    for i in range(kh):
        for j in range(kw):
            x_ij = xg[:, i:i + ho, j:j + wo]
            for k in range(cg):
                term = x_ij[..., k:k + 1] * wg[i, j, k]  # [B, ho, wo, G, 1] * [G, co]
                y = term if y is None else y + term
    return y.reshape(b, ho, wo, cout).astype(x.dtype)


def _elementwise_input_grad(dy: jax.Array, w: jax.Array, padding: tuple, groups: int) -> jax.Array:
    """Input gradient of :func:`elementwise_grouped_conv`: the same conv of ``dy`` with the
    flipped kernel whose in- and out-channels are swapped within each group (one fusion)."""
    kh, kw, cg, cout = w.shape
    co = cout // groups
    wt = w[::-1, ::-1].reshape(kh, kw, cg, groups, co).transpose(0, 1, 4, 3, 2).reshape(kh, kw, co, groups * cg)
    wt = jax.lax.optimization_barrier(wt)  # fused into the big loop, the transpose doubled its time
    pad_t = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding))
    return elementwise_grouped_conv(dy, wt, pad_t, groups)


def _elementwise_input_tangent(tx: jax.Array, w: jax.Array, padding: tuple, groups: int) -> jax.Array:
    """``elementwise_grouped_conv(tx, w)`` written as the transpose of
    :func:`_elementwise_input_grad`, so that reverse mode, transposing it back, runs that
    one-fusion input gradient (the transpose of the forward formula, pads of reductions over
    the output channels, was 30x slower at ResNeXt's layer1 shapes)."""
    kh, kw, _, cout = w.shape
    ho = tx.shape[1] + sum(padding[0]) - kh + 1
    wo = tx.shape[2] + sum(padding[1]) - kw + 1
    dy = jax.ShapeDtypeStruct((tx.shape[0], ho, wo, cout), tx.dtype)
    (y,) = jax.linear_transpose(lambda d: _elementwise_input_grad(d, w, padding, groups), dy)(tx)
    return y


def _input_tangent(tx, w, strides, padding, groups, paths):
    """``conv(tx, w)`` by the forward path; linear in ``tx``, its transpose is the input gradient."""
    if "elementwise" in paths and _takes_elementwise_path(w.shape, strides, groups):
        return _elementwise_input_tangent(tx, w, padding, groups)
    return _xla_conv(tx, w, strides, padding, groups)


def _forward(x, w, strides, padding, groups, paths):
    """The conv by the elementwise fusion or XLA's kernel."""
    if "elementwise" in paths and _takes_elementwise_path(w.shape, strides, groups):
        return elementwise_grouped_conv(x, w, padding, groups)
    return _xla_conv(x, w, strides, padding, groups)


def _batch_chunk(batch: int, pixels: int) -> int:
    """Images per weight-gradient chunk: the fewest (dividing ``batch``) with at least
    :data:`DW_CHUNK_MIN_ROWS` output pixels."""
    return next((c for c in range(1, batch + 1) if batch % c == 0 and c * pixels >= DW_CHUNK_MIN_ROWS), batch)


def _group_block(cin: int, cg: int) -> int:
    """Channels per dense block of the grouped dW: the largest multiple of ``cg`` that divides
    ``cin`` and is at most ``max(cg, DW_GROUP_BLOCK)``."""
    return max(s for s in range(cg, max(cg, DW_GROUP_BLOCK) + 1, cg) if cin % s == 0)


def _takes_weight_grad_path(x_shape: tuple, w_shape: tuple, strides: tuple, padding: tuple,
                            groups: int) -> bool:
    ho = (x_shape[1] + sum(padding[0]) - w_shape[0]) // strides[0] + 1
    wo = (x_shape[2] + sum(padding[1]) - w_shape[1]) // strides[1] + 1
    return groups > 1 or ho * wo >= DW_MIN_PIXELS


def _weight_tangent(x: jax.Array, tw: jax.Array, strides: tuple, padding: tuple, groups: int) -> jax.Array:
    """The conv of ``x [B, H, W, C]`` with the kernel tangent ``tw [kh, kw, C/G, Cout]`` as
    matmuls in a ``lax.map`` over batch chunks (``[B, ho, wo, Cout]``); linear in ``tw``.

    ``y = sum over taps of x_ij @ tw[i, j]`` (``x_ij`` from :func:`_tap_slices`). Per chunk:
    dense convs with narrow inputs take one im2col matmul ``[rows, kh*kw*C] @ [kh*kw*C, Cout]``,
    wider ones one matmul per tap; grouped convs one matmul per tap per block of
    :func:`_group_block` channels with a block-diagonal kernel. Its transpose (reverse mode)
    is the weight gradient ``dW[i, j] = sum over pixels of x_ij^T dy``, accumulated chunk by
    chunk in a scan: XLA:CPU lowers a grouped dW to an lhs-dilated convolution ~100x slower
    than the dense case and its dense dW kernel is 2x slower than these matmuls at >= 32x32
    outputs; one chunk's tap slices are alive at a time (the body is rematerialised), where the
    same matmuls over the whole batch kept all nine ``[B, H, W, C]`` slices alive (+5 GB at
    512 px).
    """
    kh, kw, cg, cout = tw.shape
    b, h, wd, cin = x.shape
    ho = (h + sum(padding[0]) - kh) // strides[0] + 1
    wo = (wd + sum(padding[1]) - kw) // strides[1] + 1
    cb = _batch_chunk(b, ho * wo)
    taps_n = kh * kw
    if groups == 1 and cin < IM2COL_MAX_CHANNELS:
        kernel, mode = tw.reshape(taps_n * cin, cout), "im2col"
    elif groups == 1:
        kernel, mode = tw.reshape(taps_n, cin, cout), "per_tap"
    else:
        block = _group_block(cin, cg)
        nblk, gpb, cog = cin // block, block // cg, cout // groups
        wg = tw.reshape(taps_n, cg, nblk, gpb, cog)  # group index g = s * gpb + gl
        eye = jnp.eye(gpb, dtype=tw.dtype)
        kernel = jnp.einsum("tisgo,gG->tsGigo", wg, eye).reshape(taps_n, nblk, block, gpb * cog)
        mode = "grouped"

    @jax.checkpoint
    def chunk(xc):  # [cb, H, W, C] -> [cb, ho, wo, Cout]
        xp = jnp.pad(xc, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
        taps = [t.reshape(-1, cin) for t in _tap_slices(xp, kh, kw, strides, ho, wo)]
        if mode == "im2col":
            y = jnp.concatenate(taps, axis=1) @ kernel
        elif mode == "per_tap":
            y = sum(t @ k for t, k in zip(taps, kernel))
        else:
            y = sum(jnp.einsum("nsi,sio->nso", t.reshape(-1, nblk, block), k) for t, k in zip(taps, kernel))
        return y.reshape(cb, ho, wo, cout)

    y = jax.lax.map(chunk, x.reshape(b // cb, cb, h, wd, cin))
    return y.reshape(b, ho, wo, cout)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _cpu_conv(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple, groups: int,
              paths: frozenset) -> jax.Array:
    return _forward(x, w, strides, padding, groups, paths)


def _cpu_conv_jvp(strides, padding, groups, paths, primals, tangents):
    """``dy = conv(dx, w) + conv(x, dw)``: the first by :func:`_input_tangent` (its transpose is
    the input gradient), the second by :func:`_weight_tangent` (its transpose is the chunked
    weight gradient) or, where XLA's dW kernel wins or ``weight_grad`` is off, by XLA's conv
    (its transpose is XLA's weight-gradient kernel). Unperturbed inputs (symbolic zeros) add
    no term, so a frozen input costs no input gradient."""
    x, w = primals
    tx, tw = tangents
    y = _forward(x, w, strides, padding, groups, paths)
    terms = []
    if type(tx) is not SymbolicZero:
        terms.append(_input_tangent(tx, w, strides, padding, groups, paths))
    if type(tw) is not SymbolicZero:
        if "weight_grad" in paths and _takes_weight_grad_path(x.shape, w.shape, strides, padding, groups):
            terms.append(_weight_tangent(x, tw, strides, padding, groups).astype(y.dtype))
        else:
            terms.append(_xla_conv(x, tw, strides, padding, groups))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_cpu_conv.defjvp(_cpu_conv_jvp, symbolic_zeros=True)
