"""What the tests judge hessgap against, and the tiny models several test files share.

- :func:`explicit_hessian`: the one explicit Hessian of the tests (torch.autograd.functional.hessian in
  float64), which every curvature and spectrum test compares against; of (inputs, targets) batches with a
  loss_fn, or of any ``objective(forward) -> f`` (Hugging Face batches, token-weighted losses), over all
  trainable parameters or a named subset (a diagonal block).
- :func:`reference_hvp`: H·v by a plain double backward, one vector at a time, on a float64 copy with
  eager (matmul and softmax) attention: the reference for models too large for an explicit Hessian.
- :func:`token_mean_loss`, :func:`hf_objective`: f of Hugging Face batches written from the logits (the
  mean over every counted label token of the loader, shifted by one for causal language models), so the
  reference shares nothing with hessgap's weighting or with the model's own ``.loss``.
- :func:`snapshot` / :func:`assert_unchanged`: the model-left-as-it-was contract (state, modes, grads).
- :func:`randomize_batchnorm`: non-trivial BatchNorm statistics and affine parameters.
- :func:`batchnorm_dropout_mlp`, :func:`unequal_batches`: a tiny MLP with BatchNorm and Dropout (modes
  matter) and 23 samples in unequal batches.
- :class:`Separable`, :func:`identity_loss`, :data:`ONE_BATCH`: a "model" whose forward pass is the loss
  itself, so that box maxima have closed forms.
- :func:`trained_mlp`: small BatchNorm MLPs trained with ADAM, cached per configuration (:data:`SB`,
  :data:`LB`, :data:`TINY_LOSS`).
- :func:`tiny_hf`, :func:`token_batches`, :func:`image_batches`, :func:`counted_tokens`: Hugging Face
  models (GPT-2, BERT, ViT, ResNet, and the encoder-decoders T5 and BART) from small random configs and their
  batches, with unequal padding.

Test files import these with ``from oracles import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def explicit_hessian(model: nn.Module, batches=None, loss_fn=None, *, objective=None, params=None) -> torch.Tensor:
    """∇²f over the trainable parameters (flattened in ``parameters()`` order), in float64.

    f = Σ_b w_b · loss_fn(model(x_b), y_b) / Σ_b w_b: the mean loss over every unit of the batches, with the
    model in eval mode. A batch's weight w_b is the number of targets its mean averages over: its size, or
    for cross-entropy with an ignore_index the targets that are not ignored. ``loss_fn`` returns a batch's
    mean loss (default cross-entropy). Or ``objective(forward) -> f`` for any other f, where ``forward``
    calls the model (``forward(*args, **kwargs)``) at the differentiated parameters. ``params`` (a list of
    parameter names) restricts the Hessian to those parameters, the others held fixed: the diagonal block.
    The model is not touched: a float64 copy with eager attention is differentiated. The result is
    symmetrized (it is symmetric up to rounding).
    """
    model = _float64_copy(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and (params is None or name in params)]
    assert named, f"no trainable parameter among {params}"
    names, tensors = [name for name, _ in named], [p.detach() for _, p in named]
    sizes = [p.numel() for p in tensors]
    if objective is None:
        objective = _batch_objective(batches, loss_fn)

    def f(flat):
        state = dict(zip(names, (piece.view_as(p) for piece, p in zip(flat.split(sizes), tensors))))
        return objective(lambda *args, **kwargs: functional_call(model, state, args, kwargs))

    with sdpa_kernel([SDPBackend.MATH]):
        hess = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in tensors]), vectorize=True)
    return (hess + hess.T) / 2


def reference_hvp(model: nn.Module, objective, vectors: torch.Tensor, params=None) -> torch.Tensor:
    """H·v for each row of ``vectors`` (k, n) by a plain double backward, one vector at a time, in float64.

    ``objective(forward) -> f`` as in :func:`explicit_hessian` (``forward`` is the float64 copy itself);
    ``params`` (names) restricts H as there. The copy runs eager attention where the model offers it.
    """
    model = _float64_copy(model)
    tensors = [p for name, p in model.named_parameters() if p.requires_grad and (params is None or name in params)]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(objective(model), tensors, create_graph=True)
        rows = []
        for v in vectors.double():
            pieces = [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in tensors]), tensors)]
            hv = torch.autograd.grad(grads, tensors, grad_outputs=pieces, retain_graph=True)
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(rows)


def _float64_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).double().eval()
    if hasattr(model, "set_attn_implementation"):  # Hugging Face: attention as plain matmul and softmax
        model.set_attn_implementation("eager")
    return model


def _batch_objective(batches, loss_fn):
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def weight(x, y):
        if isinstance(loss_fn, nn.CrossEntropyLoss) and not y.is_floating_point():
            return int((y != loss_fn.ignore_index).sum())
        return x.shape[0]

    batches = [tuple(t.double() if t.is_floating_point() else t for t in batch[:2]) for batch in batches]
    total = sum(weight(x, y) for x, y in batches)

    def objective(forward):
        loss = 0
        for x, y in batches:
            if weight(x, y):
                loss = loss + loss_fn(forward(x), y) * weight(x, y)
        return loss / total

    return objective


# ---- Hugging Face batches -------------------------------------------------------------------------------

def token_mean_loss(logits_of, batches, *, causal: bool, key: str = "labels") -> torch.Tensor:
    """Σ over every counted label token of the loader of its cross-entropy, / the number of counted tokens.

    ``logits_of(batch)`` gives a batch's logits (B, T, V) (or (B, V) for one label per sample); labels equal
    to -100 do not count; for a causal language model token t's logits predict label t + 1.
    """
    total, count = 0, 0
    for batch in batches:
        logits, labels = logits_of(batch), batch[key]
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = labels != -100
        total = total + nn.functional.cross_entropy(logits[keep].double(), labels[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def hf_objective(batches, *, causal: bool):
    """``objective(forward)`` of Hugging Face mapping batches for :func:`explicit_hessian` / :func:`reference_hvp`:
    the token-weighted mean of :func:`token_mean_loss`, labels kept out of the model's call."""
    def logits_of(forward):
        def run(batch):
            inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items() if k != "labels"}
            return forward(**inputs).logits
        return run

    return lambda forward: token_mean_loss(logits_of(forward), batches, causal=causal)


def snapshot(model: nn.Module):
    """The model's state, every module's train/eval mode and every parameter's .grad, to compare with
    :func:`assert_unchanged`."""
    grads = {name: None if p.grad is None else (p.grad, p.grad.clone()) for name, p in model.named_parameters()}
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()], grads


def assert_unchanged(model: nn.Module, snap) -> None:
    """Bit for bit: parameters and buffers, modes, and each .grad (the very tensor, with its values)."""
    state, modes, grads = snap
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes
    for name, p in model.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
        else:
            tensor, values = grads[name]
            assert p.grad is tensor and torch.equal(p.grad, values), name


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm's terms are really tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def batchnorm_dropout_mlp() -> nn.Sequential:
    """5 → 4 → 3 with BatchNorm and Dropout: train and eval mode give different losses."""
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3))


def unequal_batches(n=23, batch=8):
    """``n`` random samples of 5 features and 3 classes in batches of ``batch`` (the last one shorter), and
    all of them as one (inputs, targets) pair."""
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], x, y


# ---- closed-form sharpness ------------------------------------------------------------------------------

#: One dummy batch: the models below ignore their inputs.
ONE_BATCH = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def identity_loss(outputs, targets):
    """The loss of a model whose forward pass already returns the loss."""
    return outputs


class Separable(nn.Module):
    """loss(w) = Σ a_i w_i² + Σ b_i w_i + c: the forward pass returns the loss itself."""

    def __init__(self, x, a, b, c=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(x, dtype=torch.float64).clone())
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float64))
        self.c = c

    def forward(self, inputs):
        return (self.a * self.w**2).sum() + (self.b * self.w).sum() + self.c


# ---- trained models -------------------------------------------------------------------------------------

# (batch size, steps, seed, dtype, samples, lr): small-batch, large-batch, and a float64 model at loss ~1e-5
SB = (32, 100, 0, torch.float32, 256, 1e-2)
LB = (256, 200, 1, torch.float32, 256, 1e-2)
TINY_LOSS = (128, 300, 2, torch.float64, 128, 2e-2)


def trained_mlp(batch_size, steps, seed, dtype=torch.float32, samples=256, lr=1e-2):
    """A small BatchNorm MLP trained with ADAM, and its loader (each configuration trains once per test run;
    every call gets its own copy of the model)."""
    model, loader = _train(batch_size, steps, seed, dtype, samples, lr)
    return copy.deepcopy(model), loader


@functools.cache
def _train(batch_size, steps, seed, dtype, samples, lr):
    torch.manual_seed(seed)
    inputs = torch.randn(samples, 12, dtype=dtype)
    targets = (inputs[:, :3].sum(1) > 0).long() + (inputs[:, 3] > 1).long()
    model = nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    ).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        start = (step * batch_size) % samples
        xb, yb = inputs[start : start + batch_size], targets[start : start + batch_size]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    loader = [(inputs[i : i + 64], targets[i : i + 64]) for i in range(0, samples, 64)]
    return model, loader


# ---- tiny models of the kinds people train --------------------------------------------------------------

#: Hugging Face models built from small random configs (nothing is downloaded).
HF_KINDS = ("gpt2", "bert", "vit", "resnet", "t5", "bart")


def tiny_hf(kind: str, dtype=torch.float64, seed: int = 0, **config) -> nn.Module:
    """A Hugging Face model of ``kind`` from a small random config (its default attention), in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, **config)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=12, max_position_embeddings=16, **config)
        model = transformers.BertForMaskedLM(cfg)
    elif kind == "vit":
        cfg = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                                     image_size=8, patch_size=4, num_channels=3, num_labels=3, **config)
        model = transformers.ViTForImageClassification(cfg)
    elif kind == "resnet":
        cfg = transformers.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 6], depths=[1, 1],
                                        layer_type="basic", num_labels=3, **config)
        model = transformers.ResNetForImageClassification(cfg)
        randomize_batchnorm(model)
    elif kind == "t5":
        cfg = transformers.T5Config(vocab_size=23, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                    num_heads=2, pad_token_id=0, decoder_start_token_id=0, **config)
        model = transformers.T5ForConditionalGeneration(cfg)
    elif kind == "bart":
        cfg = transformers.BartConfig(vocab_size=23, d_model=16, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                      decoder_ffn_dim=16, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                                      eos_token_id=2, decoder_start_token_id=2, **config)
        model = transformers.BartForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def token_batches(causal: bool, seed: int = 1, vocab: int = 23):
    """Hugging Face token batches with unequal padding per batch (right padding, labels -100 there).

    Causal LM: labels are the input ids. Masked LM: only a few positions per row carry a label. The two
    batches hold very different numbers of counted tokens, so the token-weighted mean over the loader and
    the mean of the batch means differ.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows, length, pads in ((3, 9, (0, 2, 6)), (2, 4, (3, 0))):
        ids = torch.randint(1, vocab, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        for row, pad in enumerate(pads):
            if pad:
                mask[row, length - pad:] = 0
        if causal:
            labels = ids.masked_fill(mask == 0, -100)
        else:
            chosen = (torch.rand(rows, length, generator=gen) < 0.4) & (mask == 1)
            chosen[:, 0] = True
            labels = ids.masked_fill(~chosen, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def image_batches(sizes=(3, 2), seed: int = 2, classes: int = 3, side: int = 8):
    """Hugging Face image batches ``{"pixel_values", "labels"}`` of unequal sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(n, 3, side, side, generator=gen),
             "labels": torch.randint(0, classes, (n,), generator=gen)} for n in sizes]


def counted_tokens(batches, causal: bool) -> int:
    """The label tokens f averages over: not -100, shifted by one for a causal language model."""
    return sum(int((b["labels"][:, 1:] if causal else b["labels"]).ne(-100).sum()) for b in batches)
