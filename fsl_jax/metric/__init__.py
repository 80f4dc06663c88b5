"""Metric learners: a query is classified by comparing its embedding with the support set's."""
from fsl_jax.metric.matching import matching
from fsl_jax.metric.protonet import protonet
from fsl_jax.metric.relation import relation
from fsl_jax.metric.siamese import siamese
from fsl_jax.metric.transfer import transfer

__all__ = ["matching", "protonet", "relation", "siamese", "transfer"]
