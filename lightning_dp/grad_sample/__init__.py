"""Per-sample gradients: one rule per layer family, registered by module type (layers with a factored
weight gradient also declare their factors: the fast clipping path); a ``torch.func`` fallback for any
other module with trainable parameters; inputs shared by the batch followed to where they meet it.

A factored layer is one file holding its rule, the part type of its gradient (factors and merge rule)
and its forward without weight gradients, all registered by decorator when the file is imported: a new
one is that file plus its name in the import below.
"""
from . import (  # noqa: F401  (registers the rules)
    attention, conv, embedding, group_norm, hf_conv1d, layer_norm, linear, prelu, rnn,
)
from .batch_shared_inputs import SharedInputError, SharedTensor
from .clipping_modes import CLIPPING_MODES, set_clipping_mode
from .hook_attachment import GradSampleHooks, attach_grad_sample_hooks, clear_grad_samples, get_attached_hooks
from .per_sample_parts import wide_dtype
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
from .torch_func_fallback import UnsupportedModuleError

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
