"""MAML and its relatives as :class:`~fsl_jax.learner.Learner` factories.

* MAML (Finn, Abbeel and Levine, ICML 2017): ``inner_steps`` of SGD on the support set,
  cross-entropy on the query set at the adapted parameters; ``jax.grad`` of that through the
  ``lax.scan`` inner loop is the exact second-order meta-gradient.
* FOMAML: the same with the inner gradients held constant (``first_order=True``).
* ANIL (Raghu, Raghu, Bengio and Vinyals, ICLR 2020): only the head adapts (``adapted="head"``).
* Meta-SGD (Li, Zhou, Chen and Li, 2017): one learned inner learning rate per parameter,
  meta-learned with the initialisation (``learn_inner_lr=True``).

The model is the backbone followed by a linear head over the flattened features, whose
width is the task's number of ways. Parameters are ``{"model": {"backbone", "head"}}``, plus
``"inner_lr"`` (same structure, ``None`` where a leaf does not adapt) for Meta-SGD.

BatchNorm (:class:`~fsl_jax.nets.BatchNorm`) always normalises the support set with its own
statistics in the inner loop. For the query set, ``batch_stats`` chooses:
``"query"`` (default) normalises the query batch with its own statistics, the transductive
setting of the MAML paper and code; ``"support"`` normalises queries with the adapted model's
support-set statistics, so each query's prediction is independent of the others.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner, cross_entropy, init_params
from fsl_jax.meta.adapt import adapt, check_inner_loop, param_mask
from fsl_jax.meta.parallel import default_task_map

ADAPTED = ("all", "head")
BATCH_STATS = ("query", "support")


class MetaClassifier(nn.Module):
    """``backbone`` -> flatten -> ``Dense(ways)`` named ``head``: the model MAML adapts."""

    backbone: nn.Module
    ways: int

    def setup(self):
        self.head = nn.Dense(self.ways)

    def features(self, x):
        features = self.backbone(x)
        return features.reshape(features.shape[0], -1)

    def __call__(self, x):
        return self.head(self.features(x))


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer ``labels``: the inner and outer loss of the classifiers."""
    return cross_entropy(logits, labels)[0]


def _check(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


class _Classifier:
    """What the MAML family and Reptile share: the model, its mask, the inner loop, query logits."""

    def __init__(self, backbone, inner_steps, test_inner_steps, inner_lr, adapted, batch_stats, unroll):
        _check("adapted", adapted, ADAPTED)
        _check("batch_stats", batch_stats, BATCH_STATS)
        check_inner_loop(inner_steps, test_inner_steps, inner_lr)
        self.backbone, self.inner_lr, self.adapted, self.batch_stats = backbone, inner_lr, adapted, batch_stats
        self.inner_steps = inner_steps
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.unroll = unroll

    def model(self, task) -> MetaClassifier:
        return MetaClassifier(self.backbone, task.classes.shape[-1])

    def init_model(self, rng, task):
        return init_params(self.model(task), rng, task.support_x)

    def mask(self, model_params):
        """Which leaves adapt: all, or those under ``head`` (ANIL)."""
        return param_mask(model_params, lambda path, _: self.adapted == "all" or path.startswith("['head']"))

    def adapt(self, model_params, task, steps, lr, first_order, unroll=1):
        """The adapted model parameters. ANIL runs the backbone once and adapts the head on its
        features: the same result as masking, without recomputing frozen features every step."""
        outputs, ways = model_params["head"]["kernel"].shape[-1], task.classes.shape[-1]
        if outputs != ways:
            raise ConfigError(f"the model's head has {outputs} outputs, so it classifies {outputs}-way episodes only, "
                              f"not {ways}-way: MAML, its variants and Reptile adapt a head of the size they were trained with")
        model = self.model(task)
        if self.adapted == "head":
            features = model.apply({"params": model_params}, task.support_x, method=MetaClassifier.features)
            head = nn.Dense(task.classes.shape[-1])
            head_lr = lr["head"] if isinstance(lr, dict) else lr
            adapted_head = adapt(lambda p, x: head.apply({"params": p}, x), softmax_cross_entropy,
                                 model_params["head"], (features, task.support_y), steps, head_lr,
                                 first_order=first_order, unroll=unroll)[0]
            return {**model_params, "head": adapted_head}
        return adapt(lambda p, x: model.apply({"params": p}, x), softmax_cross_entropy, model_params,
                     (task.support_x, task.support_y), steps, lr, first_order=first_order, unroll=unroll)[0]

    def query_logits(self, model_params, task):
        model = self.model(task)
        variables = {"params": model_params}
        if self.batch_stats == "support":
            _, stats = model.apply(variables, task.support_x, mutable=["norm_stats"])
            variables = {**variables, **stats}
        return model.apply(variables, task.query_x)


def maml(backbone, inner_steps: int = 5, test_inner_steps: int | None = 10, inner_lr: float = 0.4,
         first_order: bool = False, adapted: str = "all", learn_inner_lr: bool = False,
         batch_stats: str = "query", unroll: int | bool = True, task_map: str | None = None) -> Learner:
    """MAML; FOMAML, ANIL and Meta-SGD are options of it (see the module docstring).

    inner_steps / test_inner_steps: SGD steps on the support set in training / in ``predict``
        (``None``: as in training).
    inner_lr: the inner learning rate (Meta-SGD: the initial value of every learned rate).
    first_order: FOMAML. adapted: ``"all"`` or ``"head"`` (ANIL).
    learn_inner_lr: Meta-SGD. batch_stats: ``"query"`` (transductive) or ``"support"``.
    unroll: ``lax.scan`` unrolling of the training inner loop. Default: all steps, so the
        meta-gradient needs no per-step stack of intermediates (on CPU, a faster meta-step for a
        longer compile: the README's speed table, ``--inner-scan`` against the default); ``1`` keeps
        a loop, for long inner loops. ``predict``'s loop (no meta-gradient) is never unrolled.
    task_map: ``"vmap"``, ``"map"`` or ``"unroll"`` over the task batch (:func:`fsl_jax.learner.map_tasks`);
        ``None``: the default for this backend.
    """
    core = _Classifier(backbone, inner_steps, test_inner_steps, inner_lr, adapted, batch_stats, unroll)

    def init(rng, task):
        params = {"model": core.init_model(rng, task)}
        if learn_inner_lr:
            params["inner_lr"] = jax.tree.map(lambda p, m: jnp.full_like(p, inner_lr) if m else None,
                                              params["model"], core.mask(params["model"]))
        return params

    def adapted_params(params, task, steps, first, unroll=1):
        lr = params["inner_lr"] if learn_inner_lr else inner_lr
        return core.adapt(params["model"], task, steps, lr, first, unroll)

    def task_loss(params, task, rng):
        adapted_model = adapted_params(params, task, core.inner_steps, first_order, core.unroll)
        return cross_entropy(core.query_logits(adapted_model, task), task.query_y)

    def task_predict(params, task, rng):
        return core.query_logits(adapted_params(params, task, core.test_inner_steps, True), task)

    return Learner(init=init, task_loss=task_loss, task_predict=task_predict,
                   task_map=task_map or default_task_map())
