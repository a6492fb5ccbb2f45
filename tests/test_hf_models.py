"""Hugging Face models through ``make_private`` and ``DPStrategy`` (issue 15).

Every model is built from a tiny config (random init, offline: nothing is downloaded), in train mode with
dropout 0, with a padding mask where it takes one. One DP step with noise 0 through ``make_private``; the
gradient the inner optimizer receives (recorded in its ``step``) must equal the textbook clipped mean:
each sample's gradient from its own float64 forward and backward, clipped (flat to ``C``, per layer to
``C/√K``), summed, divided by the batch size. ``C`` is the median per-sample norm, so some samples are
clipped and some are not. Tolerance (float32 step vs float64 reference): ``rtol=1e-4`` and ``atol`` of
``1e-5`` times the largest reference entry (some entries are exactly 0 in exact arithmetic, e.g. the
attention key biases, and come out as float32 rounding noise).

Full fine-tuning and LoRA (PEFT, classification heads in ``modules_to_save``), in every clipping mode
(``auto``, ``ghost``, ``materialize``) with flat and per-layer clipping; then which path each parameter
takes (factored, rule, ``torch.func`` fallback; nothing for frozen parameters), and a short Lightning run
of each family with a ``PrivacyBudgetCallback``. The matrix has no Lightning in it and runs once, under
the first Lightning namespace; the Lightning runs run under both.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lightning_dp import make_private  # noqa: E402
from lightning_dp.grad_sample import attach_grad_sample_hooks, get_attached_hooks  # noqa: E402
from lightning_dp.grad_sample.embedding import RowsPart  # noqa: E402
from lightning_dp.grad_sample.linear import BiasPart, LinearPart  # noqa: E402
from tests import namespace  # noqa: E402
from tests.conftest import clipped_mean_reference  # noqa: E402
from tests.lightning_helpers import trainer_kwargs  # noqa: E402
from tests.namespace import DPStrategy, PrivacyBudgetCallback, pl  # noqa: E402
from tests.test_grad_sample import reference_grads, smooth_loss  # noqa: E402
from tests.test_nonfinite import RecordingSGD  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore:secure_mode=False", "ignore::UserWarning")
core = pytest.mark.skipif(
    namespace.NAME != "lightning.pytorch", reason="no Lightning in this test: it runs once, under the first namespace"
)

B, T, V, LABELS = 4, 8, 100, 3  # batch, sequence length, vocabulary, classes
MODES = ("auto", "ghost", "materialize")
CLIPPINGS = ("flat", "per_layer")
RTOL, ATOL = 1e-4, 1e-5  # atol is relative to the largest reference entry


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (see ``tests/conftest.py``)."""


# --- models ----------------------------------------------------------------------------------------------
def _decoder(cls: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, f"{cls}Config")(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16, **extra,
        )
        return getattr(transformers, f"{cls}ForCausalLM")(config)

    return build


def _encoder(cls: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, f"{cls}Config")(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=LABELS, **extra,
        )
        return getattr(transformers, f"{cls}ForSequenceClassification")(config)

    return build


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                                           seq_classif_dropout=0.0, num_labels=LABELS)
    return transformers.DistilBertForSequenceClassification(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=LABELS)
    return transformers.ViTForImageClassification(config)


# name: (builder, task, LoRA target modules)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], str, List[str]]] = {
    "gpt2": (_gpt2, "lm", ["c_attn", "c_proj"]),  # Conv1D layers (weight stored (in, out))
    "bert": (_encoder("Bert"), "cls", ["query", "value"]),
    "roberta": (_encoder("Roberta", pad_token_id=1), "cls", ["query", "value"]),
    "distilbert": (_distilbert, "cls", ["q_lin", "v_lin"]),
    "llama": (_decoder("Llama"), "lm", ["q_proj", "v_proj"]),
    "mistral": (_decoder("Mistral", head_dim=16), "lm", ["q_proj", "v_proj"]),
    "qwen2": (_decoder("Qwen2", tie_word_embeddings=True), "lm", ["q_proj", "v_proj"]),  # tied input/output
    "t5": (_t5, "seq2seq", ["q", "v"]),
    "vit": (_vit, "image", ["q_proj", "v_proj"]),
}
VARIANTS = ("full", "lora")


def make_model(name: str, variant: str) -> nn.Module:
    """The model, built the same way each time (seeded), in train mode; LoRA adapters initialised at
    random (not the zero ``B`` of PEFT's default) so that every adapter weight has a gradient."""
    build, task, targets = MODELS[name]
    torch.manual_seed(0)
    model = build()
    if variant == "lora":
        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
            modules_to_save=["classifier"] if task in ("cls", "image") else None,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's Conv1D: PEFT sets fan_in_fan_out itself, and says so
            model = peft.get_peft_model(model, config)
    return model.train()


# --- data and per-sample losses ------------------------------------------------------------------------
def make_batch(task: str, n: int = B, seed: int = 1) -> Dict[str, torch.Tensor]:
    """Inputs and targets of ``n`` samples; token inputs right-padded (two samples shorter)."""
    g = torch.Generator().manual_seed(seed)
    if task == "image":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g),
                "labels": torch.randint(0, LABELS, (n,), generator=g)}
    batch = {"input_ids": torch.randint(2, V, (n, T), generator=g),
             "attention_mask": torch.ones(n, T, dtype=torch.long)}
    batch["attention_mask"][1 % n, 5:] = 0
    batch["attention_mask"][2 % n, 3:] = 0
    if task == "lm":
        batch["labels"] = batch["input_ids"]
    elif task == "cls":
        batch["labels"] = torch.randint(0, LABELS, (n,), generator=g)
    else:
        batch["decoder_input_ids"] = torch.randint(2, V, (n, 5), generator=g)
        batch["labels"] = torch.randint(2, V, (n, 5), generator=g)
    return batch


def sample_losses(model: nn.Module, task: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's own loss ``(n,)``: cross-entropy of its label, or the sum of its tokens' (padding
    excluded for a causal LM)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"]
    if task in ("cls", "image"):
        return F.cross_entropy(logits, labels, reduction="none")
    nll = -logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if task == "lm":
        nll = nll * batch["attention_mask"]
    return nll.sum(1)


# --- the float64 reference -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def per_sample_reference(name: str, variant: str) -> Dict[str, torch.Tensor]:
    """``{name: (B, *shape)}`` float64 per-sample gradients: one forward and backward per sample alone."""
    model = copy.deepcopy(make_model(name, variant)).double()
    task = MODELS[name][1]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = make_batch(task)
    grads: Dict[str, List[torch.Tensor]] = {n: [] for n in params}
    for i in range(B):
        one = {k: (v[i : i + 1].double() if v.is_floating_point() else v[i : i + 1]) for k, v in batch.items()}
        loss = sample_losses(model, task, one).sum()
        for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(g) for n, g in grads.items()}


def clipping_norm(grads: Dict[str, torch.Tensor]) -> float:
    """The median per-sample norm: about half the samples are clipped."""
    return torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1).median().item()


def clipped_mean(grads: Dict[str, torch.Tensor], clipping: str, c: float) -> Dict[str, torch.Tensor]:
    """``Σ_b clip(g_b) / B``: flat (one factor per sample) or per layer (each parameter to ``C/√K``)."""
    return clipped_mean_reference(grads, c, B, clipping)


def dp_step(name: str, variant: str, mode: str, clipping: str, c: float) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """One DP step with noise 0 through ``make_private``: the model and the gradient its inner optimizer got."""
    model = make_model(name, variant)
    inner = RecordingSGD({n: p for n, p in model.named_parameters() if p.requires_grad})
    opt = make_private(model, inner, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=B,
                       clipping_mode=mode, clipping=clipping)
    sample_losses(model, MODELS[name][1], make_batch(MODELS[name][1])).mean().backward()
    opt.step()
    return model, inner.received[-1]


# --- 1. the DP step equals the reference -------------------------------------------------------------------
@core
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_dp_step_matches_float64_reference(name, variant, mode, clipping):
    grads = per_sample_reference(name, variant)
    c = clipping_norm(grads)
    expected = clipped_mean(grads, clipping, c)
    _, received = dp_step(name, variant, mode, clipping, c)
    assert received.keys() == expected.keys()
    atol = ATOL * max(e.abs().max().item() for e in expected.values())
    for param, value in expected.items():
        torch.testing.assert_close(received[param].double(), value, rtol=RTOL, atol=atol, msg=param)


@core
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_bf16_autocast_records_the_same_parts_and_step(name):
    """Under bf16 autocast the fast path stays on (no GradScaler reads raw gradients): the layers (Conv1D,
    embeddings, the shared position and relative-bias lookups) run their weight-gradient-free forwards,
    record their factors in autocast's dtype (bf16 output gradients, not float32 copies) and autograd
    computes no weight gradient; the step is the reference's to bf16 precision (relative error of the
    whole gradient below 5 %; measured 0.3 % and 2.4 %)."""
    grads = per_sample_reference(name, "full")
    c = clipping_norm(grads)
    expected = clipped_mean(grads, "flat", c)
    model = make_model(name, "full")
    inner = RecordingSGD({n: p for n, p in model.named_parameters() if p.requires_grad})
    opt = make_private(model, inner, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = sample_losses(model, MODELS[name][1], make_batch(MODELS[name][1]))
    losses.float().mean().backward()
    factored = [m for m in model.modules() if type(m).__name__ in ("Linear", "Embedding", "Conv1D")]
    assert all(isinstance(m.weight.grad_parts[0], (LinearPart, RowsPart)) for m in factored)
    assert all(m.weight.grad is None for m in factored)  # the fast path: no autograd weight gradient
    linear_parts = [part for m in factored for part in m.weight.grad_parts if isinstance(part, LinearPart)]
    # the output gradient (one of the two factors; Conv1D swaps them) is kept in bf16, not a float32 copy
    assert linear_parts and all(torch.bfloat16 in (part.a.dtype, part.g.dtype) for part in linear_parts)
    opt.step()
    received = inner.received[-1]
    error = sum((received[n].double() - e).square().sum() for n, e in expected.items()).sqrt()
    assert error < 0.05 * sum(e.square().sum() for e in expected.values()).sqrt()


# --- 2. Hugging Face's Conv1D: a registered factored layer ------------------------------------------------
@core
@pytest.mark.parametrize("shape", [(4, 4), (4, 6, 4)])
@pytest.mark.parametrize("mode", MODES)
def test_conv1d_per_sample_gradients_match_the_reference(mode, shape):
    """``Conv1D`` (weight ``(in, out)``): factored parts with swapped factors in the fast modes, their
    materialised gradients otherwise; both equal the float64 reference, and ghost norms equal the
    materialised ones."""
    conv1d = transformers.pytorch_utils.Conv1D
    model = nn.Sequential(conv1d(5, 4), nn.Tanh(), conv1d(3, 5))
    x = torch.randn(*shape)
    reference = reference_grads(model, [x], smooth_loss, [0])
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum", clipping_mode=mode)
    assert hooks.fallback_modules == [] and hooks.patched_modules == ["0", "2"]
    smooth_loss(model(x)).backward()
    for name, p in model.named_parameters():
        if mode == "materialize":
            got = p.grad_sample
        else:
            assert [type(part) for part in p.grad_parts] == [LinearPart if name.endswith("weight") else BiasPart]
            (part,) = p.grad_parts
            got = part.materialize()
            for method in MODES:
                torch.testing.assert_close(part.norm_sq(method), got.flatten(1).square().sum(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), reference[name], rtol=1e-4, atol=1e-6, msg=name)
    hooks.remove()


# --- 3. which path each parameter takes --------------------------------------------------------------------
def _recorded(name: str, variant: str, mode: str = "auto") -> Tuple[nn.Module, Dict[str, List[str]]]:
    """The model after a backward, and for each parameter what the hooks recorded: the types of its parts
    (fast path), ``"rule"`` or ``"fallback"`` (materialised ``grad_sample``)."""
    model = make_model(name, variant)
    params = [p for p in model.parameters() if p.requires_grad]
    make_private(model, torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                 expected_batch_size=B, clipping_mode=mode)
    hooks = get_attached_hooks(model)
    sample_losses(model, MODELS[name][1], make_batch(MODELS[name][1])).mean().backward()
    owners = {id(p): path for path, m in model.named_modules() for p in m.parameters(recurse=False)}
    recorded = {}
    for n, p in model.named_parameters():
        kinds = [type(part).__name__ for part in getattr(p, "grad_parts", [])]
        if hasattr(p, "grad_sample"):
            kinds.append("fallback" if (owners[id(p)] or "<root module>") in hooks.fallback_modules else "rule")
        recorded[n] = kinds
    return model, recorded


@core
def test_gpt2_conv1d_and_shared_positions_take_the_fast_path():
    """GPT-2's Conv1D projections record factors (no fallback); the position embedding, looked up once
    for the batch, gets parts of the whole batch; the tied head and token embedding both record parts."""
    model, recorded = _recorded("gpt2", "full")
    assert get_attached_hooks(model).fallback_modules == []
    for n, kinds in recorded.items():
        if ".attn.c_" in n or ".mlp.c_" in n:
            assert kinds == ["LinearPart" if n.endswith("weight") else "BiasPart"], n
    wpe = model.transformer.wpe.weight.grad_parts
    assert len(wpe) == 1 and isinstance(wpe[0], RowsPart) and wpe[0].batch_size == B
    assert sorted(recorded["transformer.wte.weight"]) == ["LinearPart", "RowsPart"]  # tied to lm_head


@core
def test_t5_relative_bias_is_shared_and_exact_per_sample():
    """T5's relative-position bias is looked up once per attention stack and added to every sample's
    scores in every layer: its parts cover the batch."""
    model, recorded = _recorded("t5", "full")
    for stack in (model.encoder, model.decoder):
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert [type(p) for p in bias.grad_parts] == [RowsPart] and bias.grad_parts[0].batch_size == B


@core
@pytest.mark.parametrize("mode", ["auto", "materialize"])
@pytest.mark.parametrize("name", list(MODELS))
def test_lora_records_only_adapter_parameters(name, mode):
    """With a frozen base, only the adapters (and the ``modules_to_save`` head) are patched and record
    anything; LoRA's A and B are Linear layers on the fast path (factored parts, no grad_sample)."""
    model, recorded = _recorded(name, "lora", mode)
    hooks = get_attached_hooks(model)
    assert hooks.fallback_modules == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, kinds in recorded.items():
        if n not in trainable:
            assert kinds == [], n  # frozen: nothing recorded
        elif mode == "auto":
            assert kinds in (["LinearPart"], ["BiasPart"]), (n, kinds)
        else:
            assert kinds == ["rule"], (n, kinds)
    patched = set(hooks.patched_modules)
    assert all("lora_" in path or "modules_to_save" in path for path in patched), sorted(patched)
    frozen_layers = [m for m in model.modules() if not any(p.requires_grad for p in m.parameters(recurse=False))]
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in frozen_layers
               if not list(m.children()))  # frozen leaf layers run their own code, unhooked


@core
def test_lora_per_sample_work_scales_with_the_adapter():
    """The factors a LoRA step keeps are those of the adapters: per trainable layer one input and one
    output gradient of the adapter's size, never a factor of a frozen projection's output width."""
    model, _ = _recorded("llama", "lora")
    parts = [part for p in model.parameters() if p.requires_grad for part in p.grad_parts]
    assert parts and all(isinstance(part, LinearPart) for part in parts)
    rank = 4
    for part in parts:
        assert rank in (part.a.shape[-1], part.g.shape[-1])  # (B, T, d) × (B, T, r) or (B, T, r) × (B, T, d)
    kept = sum(part.a.numel() + part.g.numel() for part in parts)
    full_model, _ = _recorded("llama", "full")
    full = sum(part.a.numel() + part.g.numel() for p in full_model.parameters() if p.requires_grad
               for part in getattr(p, "grad_parts", []) if isinstance(part, LinearPart))
    assert kept < full / 3


@core
def test_peft_lora_on_embeddings_is_refused_before_training():
    """PEFT keeps LoRA-on-embedding weights in ``ParameterDict``s that the parent layer reads: no per-sample
    rule sees that use, so validation names the dictionaries and ``make_private`` refuses the model."""
    from lightning_dp import PrivacyValidationError

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["wte", "c_attn"],
                             init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_gpt2(), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(PrivacyValidationError, match=r"lora_embedding_A \(ParameterDict\).*requires_grad_"):
        make_private(model, torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=B)


@core
@pytest.mark.smoke
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_matches_float64_reference(name, monkeypatch):
    """DoRA (``use_dora=True``): the magnitude vector goes through the ``torch.func`` fallback and LoRA's A
    and B through their Linear layers (PEFT detaches them in the weight norm, as the DoRA paper does), so
    the step is exact with no DoRA-specific code."""
    build, _, targets = MODELS[name]

    def make_dora(model_name: str, variant: str) -> nn.Module:
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                 init_lora_weights=False, use_dora=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(build(), config).train()

    monkeypatch.setattr(f"{__name__}.make_model", make_dora)
    reference = per_sample_reference(name, "dora")
    assert any("lora_magnitude_vector" in n for n in reference)
    c = clipping_norm(reference)
    _, received = dp_step(name, "dora", "auto", "flat", c)
    expected = clipped_mean(reference, "flat", c)
    assert received.keys() == expected.keys()
    atol = ATOL * max(e.abs().max().item() for e in expected.values())
    for n, want in expected.items():
        torch.testing.assert_close(received[n].double(), want, rtol=RTOL, atol=atol, msg=n)


@core
@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "t5", "vit"])
def test_full_fine_tuning_paths(name):
    """Linear and Embedding layers record factors; norms run their rule or (Hugging Face's own RMSNorm
    classes, ViT's embeddings with their own parameters) the exact torch.func fallback; nothing else."""
    model, recorded = _recorded(name, "full")
    hooks = get_attached_hooks(model)
    for n, kinds in recorded.items():
        assert kinds, n  # every trainable parameter has a per-sample gradient
        assert set(kinds) <= {"LinearPart", "BiasPart", "RowsPart", "ConvPart", "rule", "fallback"}, (n, kinds)
        if "fallback" in kinds:
            assert "norm" in n.lower() or n.startswith("vit.embeddings."), n
    assert all("norm" in path.lower() or path == "vit.embeddings" for path in hooks.fallback_modules)


# --- 4. Lightning: a short run of each family ----------------------------------------------------------------
class HFModule(pl.LightningModule):
    """An ordinary LightningModule around a Hugging Face model; its loss is the mean per-sample loss."""

    def __init__(self, name: str, variant: str) -> None:
        super().__init__()
        self.task = MODELS[name][1]
        self.keys = list(make_batch(self.task))
        self.model = make_model(name, variant)

    def training_step(self, batch, batch_idx):
        loss = sample_losses(self.model, self.task, dict(zip(self.keys, batch))).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


@pytest.mark.parametrize(
    "name, variant", [(n, "full") for n in MODELS] + [pytest.param("gpt2", "lora", marks=pytest.mark.smoke)]
)
def test_lightning_run_with_privacy_budget(name, variant, tmp_path):
    module = HFModule(name, variant)
    batch = make_batch(module.task, n=16, seed=2)
    loader = DataLoader(TensorDataset(*batch.values()), batch_size=B)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = PrivacyBudgetCallback(epsilon_budget=1e3, delta=1e-5)
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                         callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2 and trainer.strategy.accountant.total_steps == 2
    assert 0 < callback.last_epsilon == pytest.approx(trainer.strategy.get_epsilon(1e-5))
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable ones moved (noise), frozen did not
    assert all(not hasattr(p, "grad_parts") and not hasattr(p, "grad_sample") for p in module.parameters())
