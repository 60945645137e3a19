"""Task losses against closed forms, and the task options' checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covidmt_jax.config_lib import ConfigError
from covidmt_jax.models.heads import make_anchors, match_anchors
from covidmt_jax.tasks import BoxTask, bce_with_logits, build_tasks, focal_loss

LOGITS = np.array([-100.0, -30.0, -4.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 4.0, 30.0, 100.0], np.float32)


def _bce64(z, y):
    """-y log p - (1 - y) log(1 - p) in float64 (log-sigmoid via logaddexp)."""
    z = np.asarray(z, np.float64)
    return y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)


@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_bce_value_and_gradient_everywhere_including_zero(y):
    """Value = the textbook cross-entropy; gradient = sigmoid(z) - y at every logit, also at
    z = 0, where differentiating ``max(z, 0)`` and ``|z|`` gives -y instead of 0.5 - y."""
    z = jnp.asarray(LOGITS)
    np.testing.assert_allclose(np.asarray(bce_with_logits(z, y)), _bce64(LOGITS, y), rtol=1e-6, atol=1e-6)
    grad = np.asarray(jax.grad(lambda t: bce_with_logits(t, y).sum())(z))
    want = 1.0 / (1.0 + np.exp(-LOGITS.astype(np.float64))) - y
    np.testing.assert_allclose(grad, want, atol=1e-6)
    assert grad[list(LOGITS).index(0.0)] == pytest.approx(0.5 - y)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("target", [0.0, 1.0])
def test_focal_loss_closed_form_and_finite_gradients(gamma, target):
    """alpha_t * CE * (1 - p_t) ** gamma computed in float64 by hand; the gradient is finite
    at saturated logits for every gamma (gamma < 1 once gave NaN where p_t rounds to 1)."""
    alpha = 0.25
    z64 = LOGITS.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z64))
    one_minus_pt = 1.0 - p if target == 1.0 else p
    a_t = alpha if target == 1.0 else 1 - alpha
    want = a_t * _bce64(z64, target) * one_minus_pt ** gamma
    t = jnp.full(LOGITS.shape, target)
    got = np.asarray(focal_loss(jnp.asarray(LOGITS), t, alpha, gamma))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    grad = np.asarray(jax.grad(lambda z: focal_loss(z, t, alpha, gamma).sum())(jnp.asarray(LOGITS)))
    assert np.all(np.isfinite(grad)), grad
    # sign: raising the logit lowers the loss of a positive and raises that of a negative
    inner = slice(2, -2)
    assert np.all(grad[inner] < 0) if target == 1.0 else np.all(grad[inner] > 0), grad


def test_focal_gamma_zero_is_alpha_weighted_bce():
    z = jnp.asarray(LOGITS)
    for target, a_t in ((1.0, 0.3), (0.0, 0.7)):
        t = jnp.full(z.shape, target)
        np.testing.assert_allclose(np.asarray(focal_loss(z, t, 0.3, 0.0)),
                                   a_t * np.asarray(bce_with_logits(z, t)), rtol=1e-6)


def test_box_focal_options_reach_the_objectness_loss():
    """With ``focal_alpha=0.5, focal_gamma=0`` the objectness loss of one image is
    sum over non-ignored anchors of 0.5 * BCE / max(n_pos, 1), recomputed here from the
    anchor labels; the defaults give another value."""
    anchors = make_anchors((64, 64), sizes=(8.0, 16.0, 32.0))
    n = anchors.shape[0]
    boxes = np.zeros((1, 4, 4), np.float32)
    boxes[0, 0] = [10, 12, 22, 30]
    valid = np.array([[1, 0, 0, 0]], np.float32)
    rng = np.random.default_rng(0)
    obj = rng.normal(-2.0, 1.5, (1, n)).astype(np.float32)
    outputs = {"box": {"regression": jnp.zeros((1, n, 4)), "objectness": jnp.asarray(obj)}}
    batch = {"boxes": jnp.asarray(boxes), "box_valid": jnp.asarray(valid), "box_weight": jnp.ones(1)}
    _, label = match_anchors(jnp.asarray(anchors), jnp.asarray(boxes[0]), jnp.asarray(valid[0]))
    label = np.asarray(label)
    pos = (label == 1).astype(np.float64)
    want = np.sum(0.5 * _bce64(obj[0], pos) * (label >= 0)) / max(pos.sum(), 1.0)
    task, = build_tasks(["box"], {"box": {"focal_alpha": 0.5, "focal_gamma": 0.0}}, anchors=anchors)
    _, aux = task.loss(outputs, batch)
    assert float(aux["objectness"]) == pytest.approx(want, rel=1e-5)
    default, = build_tasks(["box"], anchors=anchors)
    _, aux_default = default.loss(outputs, batch)
    assert abs(float(aux_default["objectness"]) - want) > 0.1 * want


def test_task_options_are_checked_with_their_choices():
    anchors = make_anchors((64, 64), sizes=(8.0, 16.0, 32.0))
    box, covid = build_tasks(["box", "covid"], {"box": {"l2": 0.0}}, anchors=anchors)
    assert box.options == {"regression": "squared", "l2": 0.0, "focal_alpha": 0.25, "focal_gamma": 2.0,
                           "score_threshold": 0.3}
    assert covid.options == {"threshold": 0.5}
    with pytest.raises(ConfigError, match=r"task_options\.box: unknown option\(s\) \['regresion'\].*known: "
                                          r"\['focal_alpha', 'focal_gamma', 'l2', 'regression'"):
        build_tasks(["box"], {"box": {"regresion": "smooth_l1"}}, anchors=anchors)
    with pytest.raises(ConfigError, match=r"task_options\.box\.regression='l1': must be one of "
                                          r"\['squared', 'smooth_l1'\]"):
        BoxTask.check_options("box", {"regression": "l1"})
    with pytest.raises(ConfigError, match=r"focal_alpha=1.5: must be a number in \[0, 1\]"):
        BoxTask.check_options("box", {"focal_alpha": 1.5})
    with pytest.raises(ConfigError, match=r"task_options\.covid\.threshold='high'"):
        build_tasks(["covid"], {"covid": {"threshold": "high"}})
    # a task name that does not exist, and a known task left out of this run (the ablation)
    with pytest.raises(ConfigError, match=r"task_options\.bxo: no task of that name"):
        build_tasks(["covid"], {"bxo": {}})
    with pytest.raises(ConfigError, match=r"task_options\.box: unknown option"):
        build_tasks(["covid"], {"box": {"gamma": 1.0}})
    assert len(build_tasks(["covid"], {"box": {"l2": 1e-4}})) == 1
