"""Per-sample gradients: one rule per layer family, registered by module type (layers with a factored
weight gradient also declare their factors: the fast clipping path); a ``torch.func`` fallback for any
other module with trainable parameters; inputs shared by the batch followed to where they meet it."""
from . import (  # noqa: F401  (registers the rules)
    attention, conv, embedding, group_norm, hf_conv1d, layer_norm, linear, prelu, rnn,
)
from .bookkeeping import wide_dtype
from .fast import CLIPPING_MODES, set_clipping_mode
from .functional import UnsupportedModuleError
from .hooks import GradSampleHooks, attach_grad_sample_hooks, clear_grad_samples, get_attached_hooks
from .registry import (
    DP_FORWARDS,
    FACTORED,
    GRAD_SAMPLERS,
    Factored,
    get_dp_forward,
    get_factored,
    get_grad_sampler,
    register_dp_forward,
    register_factored,
    register_grad_sampler,
    trainable_parameters,
)
from .shared import SharedInputError, SharedTensor

__all__ = [
    "CLIPPING_MODES",
    "DP_FORWARDS",
    "FACTORED",
    "GRAD_SAMPLERS",
    "Factored",
    "GradSampleHooks",
    "SharedInputError",
    "SharedTensor",
    "UnsupportedModuleError",
    "attach_grad_sample_hooks",
    "clear_grad_samples",
    "get_attached_hooks",
    "get_dp_forward",
    "get_factored",
    "get_grad_sampler",
    "register_dp_forward",
    "register_factored",
    "register_grad_sampler",
    "set_clipping_mode",
    "trainable_parameters",
    "wide_dtype",
]
