"""The model zoo: builders of the models people train in 2026, at a tiny size (tests) and a benchmark size.

Every model is built from a config with random weights (nothing is downloaded) and in eval mode. A builder
returns a :class:`ZooCase`: the model hessgap gets, a loader of two ragged batches (other sequence lengths or
batch sizes; token batches padded, with attention masks and -100 targets), the loss, and the one batch the
timings use (its shape is stated in ``case.shape``). Every batch is a tuple ``(x1, ..., xm, targets)``: the
model is called as ``model(x1, ..., xm)`` and the loss is ``loss_fn(outputs, targets)``, a cross-entropy over
the targets ≠ -100, so f is the mean over counted tokens (or samples) and is computed in the model's dtype.
Hugging Face models are wrapped to return their logits (a causal LM's shifted by one token): their own
``.loss`` upcasts the logits to float32, which would hide a float64 model's precision.

Benchmark shapes (batch × tokens for the timing batch):

- token transformers, 4 layers × width 256, 4 heads, vocabulary 8192, batch 4 × 256 tokens: GPT-2, Llama
  (grouped-query attention: 2 key/value heads), Qwen3, Gemma-3 (text), Mistral (sliding window 128),
  Mixtral and Qwen3-MoE (4 experts, top 2), BERT and RoBERTa (sequence classification, 3 classes); T5 and BART
  with 2 encoder + 2 decoder layers, 4 × 256 source and 4 × 128 target tokens;
- vision at 224 × 224: Hugging Face ViT (4 layers × 256, patch 16, batch 4), Swin (embed 32, depths
  [2, 2, 2, 2], window 7, batch 2), ConvNeXt (widths 32–256, depths [2, 2, 2, 2], batch 2); timm resnet18,
  efficientnet_b0, mobilenetv3_small_100, mobilenetv3_large_100, convnext_atto, vit_tiny_patch16_224
  (10 classes, batch 2);
- an LSTM and a GRU sequence classifier (embedding 128, 2 layers of 256, batch 8 × 128 tokens, mean over
  the unpadded steps), a ``torch.compile``'d small CNN and hessgap's CIFAR ResNet-18 (3 × 32 × 32, batch 32
  and 8), an F1-like MLP (784 → 3 × [512, BatchNorm, ReLU] → 10, batch 256: hessgap's layer-stack engine).

``CONFIGS`` maps each name to its builder and the packages it needs beyond torch (``requires``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

SIZES = ("tiny", "bench")
IGNORE = -100


@dataclass
class ZooCase:
    """One zoo configuration, built: what hessgap is given, and the same function for references and peers.

    ``model`` is what hessgap gets (for the compiled config the ``torch.compile``'d module); ``eager`` the same
    function with the same parameters without compilation (references and peers differentiate through it
    twice, which compiled graphs do not allow); ``wrap(eager)`` rebuilds ``model`` from an ``eager`` copy
    (how the float64 check makes its copy).
    """

    name: str
    model: nn.Module
    loader: list[tuple]
    timing_batch: tuple
    shape: str
    family: str
    loss_fn: nn.Module = field(default_factory=lambda: nn.CrossEntropyLoss(ignore_index=IGNORE))
    eager: nn.Module | None = None
    wrap: Callable[[nn.Module], nn.Module] | None = None

    def __post_init__(self):
        if self.eager is None:
            self.eager = self.model

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.eager.parameters() if p.requires_grad]

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def to(self, device) -> ZooCase:
        """Move the model (the compiled module wraps the eager one: both move) and the batches; returns self."""
        self.eager.to(device)
        self.loader = [tuple(t.to(device) for t in batch) for batch in self.loader]
        self.timing_batch = tuple(t.to(device) for t in self.timing_batch)
        return self

    def double(self) -> ZooCase:
        """A float64 copy: model, eager twin and every floating tensor of the batches."""
        eager = copy.deepcopy(self.eager).double()
        model = self.wrap(eager) if self.wrap is not None else eager
        return ZooCase(self.name, model, [_double(b) for b in self.loader], _double(self.timing_batch), self.shape,
                       self.family, self.loss_fn, eager, self.wrap)


def _double(batch: tuple) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


def units(batch: tuple) -> int:
    """What a batch's mean loss averages over: its targets ≠ -100 (tokens or samples)."""
    return int((batch[-1] != IGNORE).sum())


# ---- wrappers: a model's logits as a function of positional tensors ------------------------------------------

class CausalLM(nn.Module):
    """Next-token logits, classes second, (B, vocab, T − 1): token t predicts token t + 1."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].transpose(1, 2)


class SequenceClassifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class Seq2SeqLM(nn.Module):
    """Decoder logits, classes second, (B, vocab, T_target), teacher-forced on the target shifted right."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids).logits.transpose(1, 2)


class ImageClassifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


class RecurrentClassifier(nn.Module):
    """Embedding → LSTM or GRU → mean of the outputs over the unpadded steps → Linear."""

    def __init__(self, kind: str, vocab: int, embed: int, hidden: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        out, _ = self.rnn(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / mask.sum(1))


class SmallCNN(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x))


# ---- data ---------------------------------------------------------------------------------------------------

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def token_batch(batch: int, length: int, vocab: int, seed: int, pad_id: int = 0, low: int = 3):
    """(ids, attention mask, labels): random tokens, the last row right-padded over its last third (mask 0,
    label -100) when the batch has more than one row."""
    gen = _generator(seed)
    ids = torch.randint(low, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, length - length // 3 :] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask, ids.masked_fill(mask == 0, IGNORE)


def causal_batch(batch, length, vocab, seed, pad_id=0):
    ids, mask, labels = token_batch(batch, length, vocab, seed, pad_id)
    return ids, mask, labels[:, 1:]


def classified_batch(batch, length, vocab, seed, classes=3, pad_id=0):
    ids, mask, _ = token_batch(batch, length, vocab, seed, pad_id)
    return ids, mask, torch.randint(0, classes, (batch,), generator=_generator(seed + 100))


def seq2seq_batch(batch, source, target, vocab, seed, pad_id=0, start_id=0):
    ids, mask, _ = token_batch(batch, source, vocab, seed, pad_id)
    _, _, labels = token_batch(batch, target, vocab, seed + 50, pad_id)
    shifted = torch.cat([torch.full((batch, 1), start_id), labels[:, :-1]], 1)  # Hugging Face's shift_tokens_right
    decoder_ids = shifted.masked_fill(shifted == IGNORE, pad_id)
    return ids, mask, decoder_ids, labels


def image_batch(batch, size, seed, classes=10, channels=3):
    gen = _generator(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


# ---- the configurations ---------------------------------------------------------------------------------------

#: per size: token models' (layers, width, heads, vocab), ragged loader shapes, timing shape
TOKEN = {"tiny": dict(layers=2, width=32, heads=4, vocab=64, loader=[(3, 12), (2, 8)], timing=(2, 16)),
         "bench": dict(layers=4, width=256, heads=4, vocab=8192, loader=[(2, 64), (1, 48)], timing=(4, 256))}


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _token_case(name, size, hf_model, wrapper, make_batch, family):
    s = TOKEN[size]
    torch.manual_seed(0)
    model = wrapper(hf_model).eval()
    loader = [make_batch(b, t, s["vocab"], seed=1 + i) for i, (b, t) in enumerate(s["loader"])]
    b, t = s["timing"]
    return ZooCase(name, model, loader, make_batch(b, t, s["vocab"], seed=9), f"{b}×{t} tokens", family)


def _causal(name, size, config_class, model_class, **extra):
    tf, s = _transformers(), TOKEN[size]
    torch.manual_seed(0)
    config = getattr(tf, config_class)(hidden_size=s["width"], intermediate_size=4 * s["width"],
                                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                       vocab_size=s["vocab"], max_position_embeddings=512, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2, **extra)
    return _token_case(name, size, getattr(tf, model_class)(config), CausalLM, causal_batch, "token")


def gpt2(size):
    tf, s = _transformers(), TOKEN[size]
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=s["layers"], n_embd=s["width"], n_head=s["heads"], vocab_size=s["vocab"],
                           n_positions=512, bos_token_id=1, eos_token_id=2)
    return _token_case("gpt2", size, tf.GPT2LMHeadModel(config), CausalLM, causal_batch, "token")


def _head_dim(size):
    return TOKEN[size]["width"] // TOKEN[size]["heads"]


def llama(size):
    return _causal("llama", size, "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)


def qwen3(size):
    return _causal("qwen3", size, "Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=_head_dim(size))


def gemma3(size):
    return _causal("gemma3", size, "Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2,
                   head_dim=_head_dim(size), query_pre_attn_scalar=_head_dim(size),
                   sliding_window=TOKEN[size]["timing"][1] // 2)


def mistral(size):
    return _causal("mistral", size, "MistralConfig", "MistralForCausalLM", num_key_value_heads=2,
                   head_dim=_head_dim(size), sliding_window=TOKEN[size]["timing"][1] // 2)


#: Mixture-of-experts layers gather each token's experts and run batched matmuls: transformers' default,
#: grouped_mm, has no float64 kernel, so the float64 check could not run on it (the experts' arithmetic is the same).
EXPERTS = "batched_mm"


def mixtral(size):
    return _causal("mixtral", size, "MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2,
                   head_dim=_head_dim(size), num_local_experts=4, num_experts_per_tok=2, experts_implementation=EXPERTS)


def qwen3_moe(size):
    return _causal("qwen3-moe", size, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_key_value_heads=2,
                   head_dim=_head_dim(size), num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=2 * TOKEN[size]["width"], decoder_sparse_step=1,
                   experts_implementation=EXPERTS)


def _encoder(name, size, config_class, model_class, pad_id):
    tf, s = _transformers(), TOKEN[size]
    torch.manual_seed(0)
    config = getattr(tf, config_class)(vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["layers"],
                                       num_attention_heads=s["heads"], intermediate_size=4 * s["width"],
                                       max_position_embeddings=512 + 2, num_labels=3, pad_token_id=pad_id)

    def make(b, t, vocab, seed):
        return classified_batch(b, t, vocab, seed, pad_id=pad_id)

    return _token_case(name, size, getattr(tf, model_class)(config), SequenceClassifier, make, "token")


def bert(size):
    return _encoder("bert", size, "BertConfig", "BertForSequenceClassification", pad_id=0)


def roberta(size):
    return _encoder("roberta", size, "RobertaConfig", "RobertaForSequenceClassification", pad_id=1)


def _seq2seq(name, size, model, pad_id, start_id):
    s = TOKEN[size]

    def make(b, t, vocab, seed):  # targets half as long as the sources
        return seq2seq_batch(b, t, t // 2, vocab, seed, pad_id=pad_id, start_id=start_id)

    case = _token_case(name, size, model, Seq2SeqLM, make, "token")
    b, t = s["timing"]
    case.shape = f"{b}×{t} source, {b}×{t // 2} target tokens"
    return case


def t5(size):
    tf, s = _transformers(), TOKEN[size]
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=s["vocab"], d_model=s["width"], d_kv=s["width"] // s["heads"],
                         d_ff=4 * s["width"], num_layers=s["layers"] // 2, num_decoder_layers=s["layers"] // 2,
                         num_heads=s["heads"], pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    return _seq2seq("t5", size, tf.T5ForConditionalGeneration(config), pad_id=0, start_id=0)


def bart(size):
    tf, s = _transformers(), TOKEN[size]
    torch.manual_seed(0)
    config = tf.BartConfig(vocab_size=s["vocab"], d_model=s["width"], encoder_layers=s["layers"] // 2,
                           decoder_layers=s["layers"] // 2, encoder_attention_heads=s["heads"],
                           decoder_attention_heads=s["heads"], encoder_ffn_dim=4 * s["width"],
                           decoder_ffn_dim=4 * s["width"], max_position_embeddings=512, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return _seq2seq("bart", size, tf.BartForConditionalGeneration(config), pad_id=1, start_id=2)


#: per size: image side, ragged loader batch sizes, timing batch (the larger models' timing batch is halved)
VISION = {"tiny": dict(side=32, loader=[3, 2], timing=4), "bench": dict(side=224, loader=[2, 1], timing=2)}


def _vision_case(name, size, model, family="vision", timing=None, classes=10):
    s = VISION[size]
    model.eval()
    loader = [image_batch(b, s["side"], seed=1 + i, classes=classes) for i, b in enumerate(s["loader"])]
    batch = timing or s["timing"]
    return ZooCase(name, model, loader, image_batch(batch, s["side"], seed=9, classes=classes),
                   f"{batch}×3×{s['side']}×{s['side']}", family)


def vit(size):
    tf, tiny = _transformers(), size == "tiny"
    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=VISION[size]["side"], patch_size=8 if tiny else 16, hidden_size=32 if tiny else 256,
                          num_hidden_layers=2 if tiny else 4, num_attention_heads=4, intermediate_size=64 if tiny else 1024,
                          num_labels=10)
    return _vision_case("vit", size, ImageClassifier(tf.ViTForImageClassification(config)), timing=4)


def swin(size):
    tf, tiny = _transformers(), size == "tiny"
    torch.manual_seed(0)
    config = tf.SwinConfig(image_size=VISION[size]["side"], patch_size=2 if tiny else 4, embed_dim=16 if tiny else 32,
                           depths=[1, 1] if tiny else [2, 2, 2, 2], num_heads=[2, 4] if tiny else [2, 4, 8, 16],
                           window_size=4 if tiny else 7, num_labels=10)
    return _vision_case("swin", size, ImageClassifier(tf.SwinForImageClassification(config)))


def convnext(size):
    tf, tiny = _transformers(), size == "tiny"
    torch.manual_seed(0)
    config = tf.ConvNextConfig(hidden_sizes=[8, 16] if tiny else [32, 64, 128, 256], depths=[1, 1] if tiny else [2, 2, 2, 2],
                               num_stages=2 if tiny else 4, num_labels=10)
    return _vision_case("convnext", size, ImageClassifier(tf.ConvNextForImageClassification(config)))


def _timm(name, architecture, **options):
    def build(size):
        import timm

        torch.manual_seed(0)
        sized = dict(options)
        if architecture.startswith("vit"):
            sized["img_size"] = VISION[size]["side"]
            if size == "tiny":
                sized["patch_size"] = 8
        return _vision_case(name, size, timm.create_model(architecture, pretrained=False, num_classes=10, **sized),
                            family="timm")
    return build


def _recurrent(kind):
    def build(size):
        tiny = size == "tiny"
        torch.manual_seed(0)
        vocab = 50 if tiny else 1000
        model = RecurrentClassifier(kind, vocab, 8 if tiny else 128, 12 if tiny else 256, 1 if tiny else 2, 3).eval()
        loader = [classified_batch(b, t, vocab, seed=1 + i) for i, (b, t) in enumerate([(3, 10), (2, 6)] if tiny
                                                                                        else [(4, 64), (2, 48)])]
        b, t = (2, 12) if tiny else (8, 128)
        return ZooCase(kind, model, loader, classified_batch(b, t, vocab, seed=9), f"{b}×{t} tokens", "recurrent")
    return build


def compiled_cnn(size):
    tiny = size == "tiny"
    torch.manual_seed(0)
    eager = SmallCNN(4 if tiny else 32).eval()
    side = 8 if tiny else 32
    loader = [image_batch(b, side, seed=1 + i) for i, b in enumerate([3, 2] if tiny else [8, 4])]
    batch = 4 if tiny else 32
    wrap = torch.compile
    return ZooCase("compiled-cnn", wrap(eager), loader, image_batch(batch, side, seed=9), f"{batch}×3×{side}×{side}",
                   "compiled", eager=eager, wrap=wrap)


def cifar_resnet18(size):
    from hessgap.train.resnet import cifar_resnet

    tiny = size == "tiny"
    torch.manual_seed(0)
    model = cifar_resnet(8, width=2, num_classes=10) if tiny else cifar_resnet(18)
    side = 8 if tiny else 32
    loader = [image_batch(b, side, seed=1 + i) for i, b in enumerate([3, 2] if tiny else [4, 2])]
    batch = 4 if tiny else 8
    return ZooCase("cifar-resnet18", model.eval(), loader, image_batch(batch, side, seed=9),
                   f"{batch}×3×{side}×{side}", "plain")


def mlp(size):
    tiny = size == "tiny"
    torch.manual_seed(0)
    widths = [12, 8, 8] if tiny else [784, 512, 512, 512]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10)).eval()

    def batch(rows, seed):
        gen = _generator(seed)
        return torch.randn(rows, widths[0], generator=gen), torch.randint(0, 10, (rows,), generator=gen)

    sizes = [5, 3] if tiny else [64, 32]
    timing = 8 if tiny else 256
    return ZooCase("mlp", model, [batch(b, 1 + i) for i, b in enumerate(sizes)], batch(timing, 9),
                   f"{timing}×{widths[0]}", "plain")


@dataclass(frozen=True)
class Config:
    build: Callable[[str], ZooCase]
    requires: tuple[str, ...] = ()


HF = ("transformers",)
CONFIGS: dict[str, Config] = {
    "gpt2": Config(gpt2, HF), "llama": Config(llama, HF), "qwen3": Config(qwen3, HF),
    "gemma3": Config(gemma3, HF), "mistral": Config(mistral, HF), "mixtral": Config(mixtral, HF),
    "qwen3-moe": Config(qwen3_moe, HF), "bert": Config(bert, HF), "roberta": Config(roberta, HF),
    "t5": Config(t5, HF), "bart": Config(bart, HF), "vit": Config(vit, HF), "swin": Config(swin, HF),
    "convnext": Config(convnext, HF),
    "timm-resnet18": Config(_timm("timm-resnet18", "resnet18"), ("timm",)),
    "timm-efficientnet_b0": Config(_timm("timm-efficientnet_b0", "efficientnet_b0"), ("timm",)),
    "timm-mobilenetv3_small": Config(_timm("timm-mobilenetv3_small", "mobilenetv3_small_100"), ("timm",)),
    "timm-mobilenetv3_large": Config(_timm("timm-mobilenetv3_large", "mobilenetv3_large_100"), ("timm",)),
    "timm-convnext_atto": Config(_timm("timm-convnext_atto", "convnext_atto"), ("timm",)),
    "timm-vit_tiny": Config(_timm("timm-vit_tiny", "vit_tiny_patch16_224"), ("timm",)),
    "lstm": Config(_recurrent("lstm")), "gru": Config(_recurrent("gru")),
    "compiled-cnn": Config(compiled_cnn), "cifar-resnet18": Config(cifar_resnet18), "mlp": Config(mlp),
}


def build(name: str, size: str = "tiny") -> ZooCase:
    """The configuration ``name`` at ``size`` ("tiny" or "bench")."""
    if name not in CONFIGS:
        raise KeyError(f"no zoo configuration {name!r}; the zoo has {', '.join(CONFIGS)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return CONFIGS[name].build(size)
