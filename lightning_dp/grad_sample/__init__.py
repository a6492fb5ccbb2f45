"""Per-sample gradients: one rule per layer family, registered by module type; a ``torch.func``
fallback for any other module with trainable parameters."""
from . import attention, conv, embedding, group_norm, layer_norm, linear, prelu, rnn  # noqa: F401  (registers)
from .functional import UnsupportedModuleError
from .hooks import GradSampleHooks, attach_grad_sample_hooks, clear_grad_samples, get_attached_hooks
from .registry import (
    DP_FORWARDS,
    GRAD_SAMPLERS,
    get_dp_forward,
    get_grad_sampler,
    register_dp_forward,
    register_grad_sampler,
    trainable_parameters,
)

__all__ = [
    "DP_FORWARDS",
    "GRAD_SAMPLERS",
    "GradSampleHooks",
    "UnsupportedModuleError",
    "attach_grad_sample_hooks",
    "clear_grad_samples",
    "get_attached_hooks",
    "get_dp_forward",
    "get_grad_sampler",
    "register_dp_forward",
    "register_grad_sampler",
    "trainable_parameters",
]
