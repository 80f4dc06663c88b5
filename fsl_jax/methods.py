"""Name -> method and backbone factories, so configs and the CLI can name them."""
from __future__ import annotations

import functools
import inspect

from fsl_jax import meta, metric
from fsl_jax import seg
from fsl_jax.config import DEFAULTS
from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner
from fsl_jax.nets import BACKBONES

METHODS = {
    "protonet": metric.protonet,
    "matching": metric.matching,
    "relation": metric.relation,
    "siamese": metric.siamese,
    "transfer": metric.transfer,
    "prototype_segmenter": seg.prototype_segmenter,
    "siamese_unet": seg.siamese_unet,
    "maml_segmenter": seg.maml_segmenter,
    "maml": meta.maml,
    "fomaml": functools.partial(meta.maml, first_order=True),
    "anil": functools.partial(meta.maml, adapted="head"),
    "metasgd": functools.partial(meta.maml, learn_inner_lr=True),
    "reptile": meta.reptile,
}


# An option whose default is one of these takes that type (a whole number where a float is expected too); one
# whose default is a tuple takes a list of its items' type.
_OPTION_KINDS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                 str: ((str,), "a string")}


def _check_kind(name: str, value, default_type: type) -> None:
    kinds, wanted = _OPTION_KINDS.get(default_type, ((object,), ""))
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")


def _call(factory, what: str, options: dict, context: dict):
    """Call ``factory`` with ``options`` (checked against its signature and its defaults' types) and the
    context it asks for: ``{name: (value, where the config sets it)}``, which options cannot set."""
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    given = sorted(set(options) & set(context) & set(accepted))
    if given:
        raise ConfigError(f"option(s) {given} of {what} come from the config ({', '.join(context[k][1] for k in given)}), "
                          "not from its options: set them there")
    if unknown:
        valid = sorted(p for p in accepted if p not in context)
        raise ConfigError(f"unknown option(s) {unknown} for {what}; valid options: {valid}")
    for key, value in options.items():
        default = accepted[key].default
        if isinstance(default, tuple) and default:  # a sequence: every item of the type of the default's first
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"option {key} of {what} must be a list like {list(default)}, got {value!r}")
            for i, item in enumerate(value):
                _check_kind(f"option {key}[{i}] of {what}", item, type(default[0]))
        else:
            _check_kind(f"option {key} of {what}", value, type(default))
    extra = {k: value for k, (value, _) in context.items() if k in accepted}
    return factory(**options, **extra)


def make_backbone(name: str, options: dict | None = None):
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return _call(BACKBONES[name], f"backbone {name!r}", options or {}, {})


SEGMENTERS = ("prototype_segmenter", "siamese_unet", "maml_segmenter")


def make_learner(config: dict, num_train_classes: int) -> Learner:
    """The learner a config describes. ``num_train_classes``, and a segmentation task's ``eval.threshold``
    (the threshold of its training metrics), are offered to methods that ask for them."""
    name = config["method"]
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    context = {"num_train_classes": (num_train_classes, "the training classes of data")}
    if "threshold" in config["eval"]:  # segmentation: the training metrics at the held-out scores' threshold
        context["threshold"] = (config["eval"]["threshold"], "eval.threshold")
    if "backbone" in inspect.signature(METHODS[name]).parameters:
        context["backbone"] = (make_backbone(config["backbone"], config["backbone_options"]), "backbone")
    elif config["backbone"] != DEFAULTS["backbone"] or config["backbone_options"]:
        raise ConfigError(f"method {name!r} builds its own network (see its method_options); it takes no backbone "
                          f"or backbone_options, got {config['backbone']!r} {config['backbone_options']}")
    return _call(METHODS[name], f"method {name!r}", dict(config["method_options"]), context)
