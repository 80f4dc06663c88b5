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


# An option whose default is one of these takes that type (a whole number where a float is expected too).
_OPTION_KINDS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                 str: ((str,), "a string")}


def _call(factory, what: str, options: dict, context: dict):
    """Call ``factory`` with ``options`` (checked against its signature and its defaults' types) and the
    context it asks for."""
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = sorted(p for p in accepted if p not in context and p != "backbone")
        raise ConfigError(f"unknown option(s) {unknown} for {what}; valid options: {valid}")
    for key, value in options.items():
        kinds, wanted = _OPTION_KINDS.get(type(accepted[key].default), ((object,), ""))
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"option {key} of {what} must be {wanted}, got {value!r}")
    extra = {k: v for k, v in context.items() if k in accepted and k not in options}
    return factory(**options, **extra)


def make_backbone(name: str, options: dict | None = None):
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return _call(BACKBONES[name], f"backbone {name!r}", options or {}, {})


SEGMENTERS = ("prototype_segmenter", "siamese_unet", "maml_segmenter")


def make_learner(config: dict, num_train_classes: int) -> Learner:
    """The learner a config describes. ``num_train_classes`` is offered to methods that ask for it."""
    name = config["method"]
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    context = {"num_train_classes": num_train_classes}
    if "backbone" in inspect.signature(METHODS[name]).parameters:
        context["backbone"] = make_backbone(config["backbone"], config["backbone_options"])
    elif config["backbone"] != DEFAULTS["backbone"] or config["backbone_options"]:
        raise ConfigError(f"method {name!r} builds its own network (see its method_options); it takes no backbone "
                          f"or backbone_options, got {config['backbone']!r} {config['backbone_options']}")
    return _call(METHODS[name], f"method {name!r}", dict(config["method_options"]), context)
