"""Activation checkpointing under DP (issue 28): exact per-sample gradients, and the memory it saves.

1. Hugging Face models (GPT-2, Llama, BERT), full fine-tuning and LoRA, with ``gradient_checkpointing_enable``
   in its three forms (no arguments: non-reentrant since transformers 5; ``use_reentrant=False``;
   ``use_reentrant=True``), in every clipping mode: one DP step with noise 0 through ``make_private`` equals
   the textbook clipped mean of the float64 micro-batch reference of ``tests/test_hf_models.py`` (helpers
   imported from there), every block is recomputed, and no per-sample gradient is counted twice (each
   trainable parameter holds exactly its own parts: the recompute records nothing).
2. A user's own ``torch.utils.checkpoint.checkpoint`` calls inside a custom module's forward, both forms:
   a checkpointed *function* that calls layers directly (outside any container, with a position lookup
   shared by the batch inside it) and checkpointed blocks holding a custom layer (``torch.func``
   fallback), a LayerNorm (rule) and Linear layers; per-sample gradients equal the reference.
3. Memory: under non-reentrant checkpointing the activations inside a block are freed after the forward,
   those the hooks keep included (a rule's input, a fallback module's inputs); without checkpointing
   they live until the backward pass, and after it nothing the hooks kept is left (the fallback's inputs
   leaked before, checkpointing or not).
4. ``DPFSDPStrategy(activation_checkpointing_policy={Block})`` in one process: the same weights as without
   it, bit for bit, every block recomputed; bad policies refused.
5. ``DPStrategy`` runs (Lightning, both packages) of checkpointed Hugging Face models.

The matrix (1) has no Lightning in it and runs once, under the first Lightning namespace.
"""
from __future__ import annotations

import gc
import warnings
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from lightning_dp import make_private
from lightning_dp.grad_sample import attach_grad_sample_hooks
from tests.test_grad_sample import reference_grads, smooth_loss
from tests.test_nonfinite import RecordingSGD

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests import test_hf_models as hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:noise_multiplier=0", "ignore:secure_mode=False", "ignore::UserWarning", "ignore::FutureWarning"
)
core = hf.core
MODES = ("auto", "ghost", "materialize")
FORMS = ("default", "non_reentrant", "reentrant")
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (see ``tests/conftest.py``)."""


# --- 1. Hugging Face models ----------------------------------------------------------------------------------
def _enable_checkpointing(model: nn.Module, form: str, monkeypatch) -> List[int]:
    """``gradient_checkpointing_enable`` in the given form; returns a one-item list counting the calls of
    ``torch.utils.checkpoint.checkpoint`` the model makes (Hugging Face binds it when enabled)."""
    calls = [0]

    def counting(function, *args, **kwargs):
        calls[0] += 1
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "default":
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": form == "reentrant"})
        if form != "non_reentrant":  # reentrant (transformers 4's default): inputs that require grad, as
            model.enable_input_require_grads()  # Hugging Face asks when the embeddings are frozen (LoRA)
    return calls


@core
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", hf.VARIANTS)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_checkpointed_step_matches_float64_reference(name, variant, mode, form, monkeypatch):
    grads = hf.per_sample_reference(name, variant)
    c = hf.clipping_norm(grads)
    expected = hf.clipped_mean(grads, "flat", c)
    model = hf.make_model(name, variant)
    calls = _enable_checkpointing(model, form, monkeypatch)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    inner = RecordingSGD(named)
    opt = make_private(model, inner, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=hf.B,
                       clipping_mode=mode)
    task = hf.MODELS[name][1]
    hf.sample_losses(model, task, hf.make_batch(task)).mean().backward()
    assert calls[0] == 2, "both layers run under torch.utils.checkpoint"
    for n, p in named.items():  # each parameter's per-sample gradient recorded once: the recompute records nothing
        parts = getattr(p, "grad_parts", [])
        tied = n == "transformer.wte.weight" and mode != "materialize"  # GPT-2's tied head: two parts
        assert len(parts) + hasattr(p, "grad_sample") == (2 if tied else 1), n
        if hasattr(p, "grad_sample"):
            assert p.grad_sample.shape == (hf.B, *p.shape), n
    opt.step()
    received = inner.received[-1]
    assert received.keys() == expected.keys()
    atol = hf.ATOL * max(e.abs().max().item() for e in expected.values())
    for param, value in expected.items():
        torch.testing.assert_close(received[param].double(), value, rtol=hf.RTOL, atol=atol, msg=param)


# --- 2. a user's own checkpoint calls ----------------------------------------------------------------------------
class ScaleNorm(nn.Module):
    """A custom layer with its own parameter and no rule: the ``torch.func`` fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """Linear → custom norm (fallback) → GELU → LayerNorm (rule) → Linear, residual: every layer's input
    but the block's own is an activation made inside the block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.norm = nn.Linear(d, 2 * d), ScaleNorm(2 * d)
        self.ln, self.fc2 = nn.LayerNorm(2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.ln(F.gelu(self.norm(self.fc1(h)))))


class CheckpointedLM(nn.Module):
    """Checkpoints in its own forward (``reentrant``: ``None`` for none): a function that calls two layers
    directly, one of them on position ids ``(1, T)`` shared by the batch, then each block."""

    def __init__(self, reentrant: Optional[bool], vocab: int = 20, positions: int = 6, d: int = 8) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.tok, self.pos, self.mix = nn.Embedding(vocab, d), nn.Embedding(positions, d), nn.Linear(d, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, vocab)

    def _positions(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mix(h) + self.pos(positions)

    def _run(self, function, *args):
        if self.reentrant is None:
            return function(*args)
        return checkpoint(function, *args, use_reentrant=self.reentrant)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self._run(self._positions, self.tok(ids), torch.arange(ids.shape[1]).unsqueeze(0))
        for block in self.blocks:
            h = self._run(block, h)
        return self.head(h)


def _per_sample(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each parameter's per-sample gradient, materialised from its parts (fast modes) or ``grad_sample``."""
    out = {}
    for n, p in model.named_parameters():
        parts = [part.materialize() for part in getattr(p, "grad_parts", [])]
        assert len(parts) + hasattr(p, "grad_sample") == 1, n  # recorded once: not again by the recompute
        out[n] = p.grad_sample if hasattr(p, "grad_sample") else parts[0]
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_users_own_checkpoint_calls_give_exact_per_sample_gradients(reentrant, mode):
    model = CheckpointedLM(None)
    ids = torch.randint(0, 20, (4, 6))
    reference = reference_grads(model, [ids], smooth_loss, [0])  # without checkpointing (reentrant: no .grad())
    model.reentrant = reentrant
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum", clipping_mode=mode)
    assert hooks.fallback_modules == ["blocks.0.norm", "blocks.1.norm"]
    smooth_loss(model(ids)).backward()
    for n, got in _per_sample(model).items():
        torch.testing.assert_close(got.double(), reference[n], **TOL, msg=n)
    hooks.remove()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_users_checkpointed_model_dp_step_matches_clipped_mean(reentrant):
    """Through ``make_private`` (``"auto"``, flat clipping, noise 0): the step is the clipped mean."""
    model = CheckpointedLM(None)
    ids = torch.randint(0, 20, (hf.B, 6))
    reference = reference_grads(model, [ids], lambda out: _sample_losses(out).sum(), [0])
    c = hf.clipping_norm(reference)
    expected = hf.clipped_mean(reference, "flat", c)
    model.reentrant = reentrant
    inner = RecordingSGD(dict(model.named_parameters()))
    opt = make_private(model, inner, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=hf.B)
    _sample_losses(model(ids)).mean().backward()
    opt.step()
    for n, want in expected.items():
        torch.testing.assert_close(inner.received[-1][n].double(), want, **TOL, msg=n)


def _sample_losses(out: torch.Tensor) -> torch.Tensor:
    """Each sample's loss ``(n,)``, nonlinear in every output."""
    ramp = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)
    return (out.pow(2) * ramp + torch.sin(out)).flatten(1).sum(1)


# --- 3. memory ------------------------------------------------------------------------------------------------
def _inner_activations(model: CheckpointedLM) -> List[StorageWeakRef]:
    """Hooks noting weak references to the storages of the activations made inside each block that its
    layers take as input (the fallback's, the rule's, the last Linear's), at each layer's first call (the
    forward; not the fallback's one-time check, nor the recompute)."""
    refs: List[StorageWeakRef] = []
    seen = set()

    def note(module, args):
        if id(module) not in seen:
            seen.add(id(module))
            refs.append(StorageWeakRef(args[0].untyped_storage()))

    for block in model.blocks:
        for layer in (block.norm, block.ln, block.fc2):
            layer.register_forward_pre_hook(note)
    return refs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [None, False], ids=["no_checkpointing", "non_reentrant"])
def test_checkpointed_activations_are_not_kept_by_the_hooks(reentrant, mode):
    """Non-reentrant checkpointing frees a block's activations after its forward, also those the hooks keep
    for the backward pass (kept as saved tensors, which checkpointing drops and recomputes): in the
    materialising mode a rule's and every layer's input, in every mode the fallback's inputs. Without
    checkpointing they live until the backward pass. After the step nothing the hooks kept is left."""
    model = CheckpointedLM(reentrant)
    refs = _inner_activations(model)
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum", clipping_mode=mode)
    ids = torch.randint(0, 20, (4, 6))
    loss = smooth_loss(model(ids))
    gc.collect()
    assert len(refs) == 6
    alive = [not r.expired() for r in refs]
    assert alive == [reentrant is None] * 6
    loss.backward()
    del loss
    for p in model.parameters():  # what the optimizer would take, then drop
        for attr in ("grad_sample", "grad_parts"):
            if hasattr(p, attr):
                delattr(p, attr)
    gc.collect()
    assert all(r.expired() for r in refs)
    hooks.remove()


def test_fallback_inputs_do_not_outlive_the_step():
    """The fallback's gradient hook no longer goes through ``register_multi_grad_hook``, whose closure over
    the outputs' autograd nodes kept the hook, and the inputs it holds, alive after the step (for ever,
    when it also held the outputs): each step's inputs of a custom layer are freed with its graph."""
    model = nn.Sequential(nn.Linear(5, 6), ScaleNorm(6), nn.Linear(6, 2))
    hooks = attach_grad_sample_hooks(model)
    refs = []
    for _ in range(3):
        h = model[0](torch.randn(4, 5))
        refs.append(StorageWeakRef(h.untyped_storage()))
        model[2](model[1](h)).pow(2).sum().backward()
        del h
        for p in model.parameters():
            del p.grad_sample
    gc.collect()
    assert all(r.expired() for r in refs)
    hooks.remove()


# --- 4. DPFSDPStrategy(activation_checkpointing_policy=...) --------------------------------------------------------
@pytest.fixture
def _own_process_group():
    """A one-process fit initialises torch.distributed: destroy the group after (later tests of the session
    must not run as if distributed: parameters would get zero gradients, see ``fast._unused_grad``)."""
    before = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if not before and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("_own_process_group")
@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_dp_fsdp_activation_checkpointing_policy(mode, tmp_path):
    """One process, FSDP2 over the blocks: with ``activation_checkpointing_policy={Block}`` every block is
    recomputed in the backward pass and the two steps (noise 0) give the weights of the same run without
    it, bit for bit (``tests/test_fsdp.py`` checks that run against the float64 reference, on 2 ranks)."""
    from tests.fsdp_worker import Block, ShardedNet, full_weights
    from tests.lightning_helpers import make_loader, trainer_kwargs
    from tests.namespace import DPFSDPStrategy, pl

    weights = {}
    for policy in (None, {Block}):
        torch.manual_seed(0)
        model = ShardedNet()
        initial = full_weights(model.net)
        recomputed = [0]

        def count(module, args):
            recomputed[0] += torch._C._current_graph_task_id() != -1

        for block in model.net[1:-1]:
            block.lin1.register_forward_pre_hook(count)
        strategy = DPFSDPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, seed=11, clipping_mode=mode,
                                  auto_wrap_policy={Block}, activation_checkpointing_policy=policy)
        trainer = pl.Trainer(strategy=strategy, devices=1, max_steps=2, **trainer_kwargs(tmp_path))
        trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=8))
        assert trainer.global_step == 2
        assert recomputed[0] == (0 if policy is None else 2 * 2), "each block recomputed once a step"
        weights[policy is None] = full_weights(model.net)
        assert any(not torch.equal(weights[policy is None][k], initial[k]) for k in initial)
    for name, value in weights[True].items():
        torch.testing.assert_close(weights[False][name], value, rtol=0, atol=0, msg=name)


def test_dp_fsdp_activation_checkpointing_policy_is_checked():
    from tests.namespace import DPFSDPStrategy

    with pytest.raises(ValueError, match=r"names single layers \['Linear'\]"):
        DPFSDPStrategy(noise_multiplier=1.0, activation_checkpointing_policy={nn.Linear})
    with pytest.raises(ValueError, match="must be a set of nn.Module classes"):
        DPFSDPStrategy(noise_multiplier=1.0, activation_checkpointing_policy={"Block"})
    with pytest.raises(ValueError, match="not `activation_checkpointing`"):
        DPFSDPStrategy(noise_multiplier=1.0, activation_checkpointing=[Block])


@pytest.mark.parametrize("name, variant", [("llama", "full"), ("gpt2", "lora")])
def test_lightning_run_with_checkpointing(name, variant, tmp_path):
    """``DPStrategy`` on a LightningModule whose Hugging Face model checkpoints its layers (its default
    form): two steps, every trainable parameter moved, nothing per-sample left after ``fit``."""
    from tests.lightning_helpers import trainer_kwargs
    from tests.namespace import DPStrategy, pl

    module = hf.HFModule(name, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.model.gradient_checkpointing_enable()
        module.model.enable_input_require_grads()  # for transformers 4, whose default is reentrant
    batch = hf.make_batch(module.task, n=16, seed=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch.values()), batch_size=hf.B)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, before[n]) != p.requires_grad, n
    assert all(not hasattr(p, "grad_parts") and not hasattr(p, "grad_sample") for p in module.parameters())
