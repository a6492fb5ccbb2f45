"""Per-sample gradients: one rule per layer family, registered by module type."""
from . import conv, embedding, group_norm, layer_norm, linear  # noqa: F401  (registers the rules)
from .hooks import GradSampleHooks, attach_grad_sample_hooks, clear_grad_samples, get_attached_hooks
from .registry import GRAD_SAMPLERS, get_grad_sampler, register_grad_sampler, trainable_parameters

__all__ = [
    "GRAD_SAMPLERS",
    "GradSampleHooks",
    "attach_grad_sample_hooks",
    "clear_grad_samples",
    "get_attached_hooks",
    "get_grad_sampler",
    "register_grad_sampler",
    "trainable_parameters",
]
