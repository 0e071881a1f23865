"""
Measured speed of Pixel-BERT training: the training step (pre-training and VQA fine-tuning) with
each optimisation as a flag, the same computation glued from torchvision + transformers as a
baseline, data loading, aspect-ratio grouping, memory, and the ceiling the CNN's convolutions set
(conv_ceiling). Prints a table and writes it as JSON.

    python bench.py                                  # CPU: r50 on small images (see the table header)
    python bench.py --quick                          # smoke test: a small model on tiny images
    python bench.py --device cuda --model r50        # GPU: r50 at the paper's 800x1333

Every row runs the code the training scripts run: model.PixelBert, model.make_optimizers,
data.collate, common.batch_to_device, common.autocast, the task losses the scripts train
(model.pretraining_losses, model.vqa_loss), and the optimiser step as the scripts write it out. Throughput figures come with the
achieved FLOP/s (counted analytically, see train_flops) as a fraction of the same process's
measured dense-matmul peak in the same precision; compare ratios measured in one run, since
absolute figures move with whatever else runs on the machine.
"""

import copy
import gc
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter, OrderedDict, namedtuple
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import common
import data
from evaluate import retrieval_scores
from model import (CNN_STRIDE, RESNET_LAYERS, PixelBert, ResNet, fold_frozen_batchnorm, make_optimizers,
                   pretraining_losses, sample_pixels, vqa_loss)


@dataclass
class Config:
    """Pixel-BERT speed benchmark. Settings left at 0 / "" take the device's defaults (DEFAULTS)."""
    device: str = "cpu"  # cpu | cuda
    model: str = ""  # tiny | r50 | x152 (default r50; tiny with --quick)
    image_min_size: int = 0  # the resize rule of the step's images (paper: 800 / 1333 for r50)
    image_max_size: int = 0
    source_size: str = "640x480"  # WxH of the source images (COCO's typical landscape photo)
    batch_size: int = 0  # pairs (pre-training) or questions (VQA) per micro-batch
    accum: int = 0  # micro-batches per optimiser step: training accumulates to a global batch of 4096
    text_len: int = 16  # tokens per text with [CLS] and [SEP] (COCO captions: ~11 words)
    pixel_samples: int = 100  # pre-training's pixel random sampling (paper 3.3)
    captions_per_image: int = 4  # for the row that shares one CNN pass among several captions
    num_answers: int = 3129  # VQA answer vocabulary (the standard VQA v2 one)
    steps: int = 0  # timed steps per row
    warmup: int = -1  # untimed steps per row, where compilation happens (-1: the device's default)
    rows: str = ""  # comma-separated row names to run (default: the device's DEFAULT_ROWS)
    loader_images: int = 0  # JPEGs decoded for the data-loading row
    retrieval_images: int = 0  # retrieval scoring: images x captions, every pair scored (the full protocol's shape)
    retrieval_captions: int = 0
    threads: int = 0  # CPU threads (0: PyTorch's default, one per core)
    quick: bool = False  # a smoke test: the tiny model on tiny images
    out: str = ""  # JSON path (default runs/bench/<device>_<model>.json)
    seed: int = 0


# CPU: 2 cores cannot train r50 at 800x1333 in a 5-minute benchmark, so the CPU default keeps
# r50 (its matrix shapes are the ones that matter) on 640x480 sources resized to 224 / 373, and
# runs one thread: on a machine shared with other jobs, two OpenMP threads keep waiting for each
# other at every operator, several times slower than one. Pass --threads 2 on an idle machine. --quick uses the tiny model with torchvision's stem
# width (64), so that its baseline exists.
DEFAULTS = {
    "cpu": dict(model="r50", image_min_size=224, image_max_size=373, batch_size=4, accum=1, steps=2, warmup=1,
                loader_images=16, threads=1, retrieval_images=2, retrieval_captions=64),
    "cuda": dict(model="r50", image_min_size=800, image_max_size=1333, batch_size=32, accum=1, steps=10, warmup=3,
                 loader_images=64, retrieval_images=16, retrieval_captions=5000),
    "quick": dict(model="tiny", image_min_size=64, image_max_size=96, batch_size=4, accum=1, steps=1,
                  loader_images=4, threads=1, retrieval_images=2, retrieval_captions=32),
}

# The training rows, each named by the flags it adds to plain fp32 or bf16 (fp32 +cl +fused is
# bf16's like-for-like reference): precision, channels_last, fused optimisers, torch.compile, cuDNN
# autotuning (torch.backends.cudnn.benchmark), captions per image (1: the paper; 0:
# --captions-per-image), the model (ours, or the torchvision + transformers baseline), and the frozen
# BatchNorm folded into the convolutions (model.fold_frozen_batchnorm; r50 and x152 only).
Row = namedtuple("Row", "name task dtype channels_last fused compile autotune captions_per_image impl fold")
FLAGS = tuple(f for f in Row._fields if f not in ("name", "impl"))  # what our row and its baseline row share
ADDITIONS = {"+cl": "channels_last", "+channels_last": "channels_last", "+fused": "fused", "+compile": "compile",
             "+autotune": "autotune", "+captions/image": "captions_per_image", "+fold": "fold"}


def row(name):
    """The Row a name spells: "[baseline] <task> <dtype> [+addition ...]", so that a row's name and
    its settings cannot disagree."""
    words = name.split()
    impl = "baseline" if words[0] == "baseline" else "ours"
    task, dtype, *additions = words[impl == "baseline":]
    on = {ADDITIONS[a] for a in additions}
    return Row(name, task, dtype, "channels_last" in on, "fused" in on, "compile" in on, "autotune" in on,
               0 if "captions_per_image" in on else 1, impl, "fold" in on)


ROWS = [row(name) for name in (
    "pretrain fp32", "pretrain fp32 +cl +fused", "pretrain bf16", "pretrain bf16 +channels_last",
    "pretrain bf16 +cl +fused", "pretrain bf16 +cl +fused +autotune", "pretrain fp32 +cl +fused +fold",
    "pretrain bf16 +cl +fused +fold", "pretrain bf16 +cl +fused +captions/image",
    "baseline pretrain fp32", "baseline pretrain bf16 +cl +fused", "baseline pretrain bf16 +cl +fused +autotune",
    "vqa fp32", "vqa bf16 +cl +fused",
    "pretrain bf16 +cl +fused +compile", "pretrain bf16 +cl +fused +autotune +compile",
)]
# torch.compile comes last, so that a slow or failing compilation leaves every other row measured.
# Each device's default rows; any other row runs when named in --rows. The compiled rows are
# opt-in: compiling r50 + BERT-base forward and backward takes minutes (docs/performance.md).
# cuDNN autotuning exists only on CUDA.
DEFAULT_ROWS = {
    "cpu": [r.name for r in ROWS if not r.compile and not r.autotune],
    "cuda": [r.name for r in ROWS if not r.compile],
}


def model_config(name, quick, **overrides):
    if quick:  # torchvision's stem width, so that the baseline exists
        overrides = {"cnn_width": 64, **overrides}
    return common.model_preset(name, **overrides)


# -----------------------------------------------------------------------------
# FLOPs, counted analytically (a multiply-add is 2 FLOPs; only matrix products and convolutions)


def cnn_flops(c, H, W):
    """Forward FLOPs of the ResNet/ResNeXt trunk on one (H, W) image, and of its first conv."""
    def conv(cin, cout, k, h, w, groups=1):
        return 2 * cin // groups * cout * k * k * h * w

    h, w = -(-H // 2), -(-W // 2)  # 7x7 stride-2 stem
    stem = conv(3, c.cnn_width, 7, h, w)
    total, h, w = stem, -(-h // 2), -(-w // 2)  # 3x3 stride-2 max-pool
    inplanes = c.cnn_width
    for stage, blocks in enumerate(RESNET_LAYERS[c.cnn_depth]):
        planes = c.cnn_width * 2 ** stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            ho, wo = -(-h // stride), -(-w // stride)
            if c.cnn_depth < 50:  # BasicBlock: two 3x3 convs
                out = planes
                total += conv(inplanes, planes, 3, ho, wo) + conv(planes, planes, 3, ho, wo)
            else:  # Bottleneck: 1x1 -> grouped 3x3 (carries the stride) -> 1x1
                width, out = planes * c.cnn_width_per_group // 64 * c.cnn_groups, planes * 4
                total += conv(inplanes, width, 1, h, w) + conv(width, width, 3, ho, wo, c.cnn_groups)
                total += conv(width, out, 1, ho, wo)
            if stride != 1 or inplanes != out:  # 1x1 projection shortcut
                total += conv(inplanes, out, 1, ho, wo)
            inplanes, h, w = out, ho, wo
    return total, stem, inplanes


def transformer_flops(c, L):
    """Forward FLOPs of the BERT encoder on one sequence of L tokens (padded keys included)."""
    H, I = c.hidden_size, c.intermediate_size
    per_layer = 2 * L * H * 4 * H + 2 * 2 * L * H * I + 2 * 2 * L * L * H  # Q,K,V,O; FFN; QK^T and AV
    return c.num_layers * per_layer


def train_flops(c, images, H, W, texts, text_len, pixel_tokens, masked=0, answers=0, backward=True):
    """FLOPs of one step: `images` padded (H, W) images through the CNN and the visual
    projection, `texts` sequences of text_len + pixel_tokens through BERT with the pooler, and
    the heads present in c.heads (MLM on `masked` tokens, ITM, a VQA head of `answers`).
    A backward pass costs twice its forward, less the image gradient that nobody asks for."""
    cnn, stem, channels = cnn_flops(c, H, W)
    h, w = -(-H // CNN_STRIDE), -(-W // CNN_STRIDE)
    K = -(-h // c.pixel_pool) * -(-w // c.pixel_pool)
    Hd = c.hidden_size
    projected = h * w if c.pixel_proj_first else K  # the 1x1 conv sees every cell, or the pooled ones
    fwd = images * (cnn + 2 * channels * Hd * projected)
    fwd += texts * (transformer_flops(c, text_len + pixel_tokens) + 2 * Hd * Hd)  # + pooler
    if "mlm" in c.heads:
        fwd += masked * (2 * Hd * Hd + 2 * Hd * c.vocab_size)
    if "itm" in c.heads:
        fwd += texts * 2 * Hd * 2
    if "vqa" in c.heads:
        fwd += texts * (2 * Hd * 2 * Hd + 2 * 2 * Hd * answers)
    return fwd + (2 * fwd - images * stem if backward else 0)


def fastest(fn, device, repeats):
    """Seconds of the fastest of 1 + repeats calls of fn() (the first warms up, or autotunes)."""
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measured_peak(device, dtype, n, repeats):
    """FLOP/s of an n x n x n matrix product in `dtype`, the best of `repeats` timings."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / fastest(lambda: a @ b, device, repeats)


class ConvCalls(torch.overrides.TorchFunctionMode):
    """Records every 2-D convolution run under it: (input shape, weight shape, stride, padding,
    dilation, groups). Both nn.Conv2d and model.FoldedConv2d call F.conv2d."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            self.calls.append(self.key(*args, **kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def key(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return tuple(input.shape), tuple(weight.shape), stride, padding, dilation, groups


def conv_ceiling(cnn, images, device, repeats):
    """The CNN's convolutions alone, the bulk of a step's FLOPs at large images: each distinct
    convolution of a forward pass over `images` timed forward + backward (input and weight
    gradients; the first one has no input gradient) on its own, in bf16 channels-last (cuDNN
    autotuned on CUDA), with no bias, BatchNorm, ReLU or residual add. A step runs its kernels
    one after another on one stream, so its convolutions cost it at least this summed time: the
    step's FLOPs over it bound the fraction of peak the step can reach. Returns (FLOPs, seconds)
    of one pass."""
    recorder = ConvCalls()
    with torch.no_grad(), recorder:
        cnn(images)
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, device.type == "cuda"
    def bf16(shape):
        return torch.randn(shape, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)

    flops = seconds = 0.0
    for (x_shape, w_shape, stride, padding, dilation, groups), count in Counter(recorder.calls).items():
        x, w = bf16(x_shape), bf16(w_shape).requires_grad_()
        x.requires_grad_(x_shape != recorder.calls[0][0])  # the stem's input is the image: no gradient
        inputs = (x, w) if x.requires_grad else (w,)

        def conv():
            return F.conv2d(x, w, None, stride, padding, dilation, groups)

        y = conv()
        grad = torch.randn_like(y)
        # autograd.grad returns the gradients: no pass adding them into .grad
        best = fastest(lambda: torch.autograd.grad(conv(), inputs, grad), device, repeats)
        passes = 1 + len(inputs)  # forward, weight gradient, input gradient
        flops += count * passes * 2 * y.numel() * w_shape[1] * w_shape[2] * w_shape[3]
        seconds += count * best
    torch.backends.cudnn.benchmark = autotune
    return flops, seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# The baseline: the same computation glued from torchvision and transformers


class GluedBaseline(nn.Module):
    """What a user would otherwise assemble: torchvision's ResNet trunk, a 1x1 projection and
    transformers' BertForPreTraining (its NSP classifier serves as the ITM head), with the same
    pooling, masks and pixel sampling as model.PixelBert. Its parameter names follow ours where
    the libraries allow, so tests can load our weights into it and compare outputs."""

    def __init__(self, c):
        super().__init__()
        import torchvision
        import transformers
        if c.cnn_width != 64:
            raise ValueError(f"torchvision's ResNets have stem width 64, not {c.cnn_width}")
        norm = {"frozen": torchvision.ops.FrozenBatchNorm2d, "batch": nn.BatchNorm2d}[c.norm]
        block = torchvision.models.resnet.BasicBlock if c.cnn_depth < 50 else torchvision.models.resnet.Bottleneck
        resnet = torchvision.models.resnet.ResNet(block, RESNET_LAYERS[c.cnn_depth], groups=c.cnn_groups,
                                                  width_per_group=c.cnn_width_per_group, norm_layer=norm)
        self.cnn = nn.Sequential(OrderedDict(list(resnet.named_children())[:-2]))  # without avgpool and fc
        self.proj = nn.Conv2d(resnet.fc.in_features, c.hidden_size, 1)
        self.type_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        bert_config = transformers.BertConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
            hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout, attn_implementation="sdpa")
        if "mlm" in c.heads:
            hf = transformers.BertForPreTraining(bert_config)
            self.bert, self.cls, self.itm_head = hf.bert, hf.cls, hf.cls.seq_relationship
        else:
            self.bert = transformers.BertModel(bert_config)
        if "vqa" in c.heads:
            H = c.hidden_size
            self.vqa_head = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.LayerNorm(2 * H, eps=c.layer_norm_eps),
                                          nn.Linear(2 * H, c.num_answers))
        self.pool, self.proj_first, self.config = c.pixel_pool, c.pixel_proj_first, c  # ours: the same computation

    def forward(self, input_ids, text_mask, images, image_mask, image_index=None, sample_pixel_count=None):
        x = self.bert.embeddings(input_ids=input_ids)  # (B, T, H)
        fmap = self.cnn(images * image_mask[:, None].to(images.dtype))
        pool = lambda x: F.max_pool2d(x, self.pool, ceil_mode=True)  # noqa: E731
        tokens = pool(self.proj(fmap)) if self.proj_first else self.proj(pool(fmap))
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = tokens + self.type_embedding  # (B, K, H)
        stride = CNN_STRIDE * self.pool
        pixel_mask = image_mask[:, ::stride, ::stride].flatten(1)
        if image_index is not None:
            tokens, pixel_mask = tokens[image_index], pixel_mask[image_index]
        if sample_pixel_count is not None and self.training:
            tokens, pixel_mask = sample_pixels(tokens, pixel_mask, sample_pixel_count)
        x = torch.cat([x, tokens.to(x.dtype)], dim=1)
        mask = torch.cat([text_mask.bool(), pixel_mask], dim=1)[:, None, None, :]  # (B, 1, 1, L), True = attend
        hidden = self.bert.encoder(x, attention_mask=mask).last_hidden_state
        return hidden, self.bert.pooler(hidden)

    def mlm_logits(self, hidden):
        return self.cls.predictions(hidden)


# -----------------------------------------------------------------------------
# Inputs: batches in the training scripts' format, through data.collate


def source_wh(cfg):
    try:
        w, h = (int(v) for v in cfg.source_size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--source-size {cfg.source_size!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    return w, h


def step_image_size(cfg):
    """(W, H) of the step's images: a --source-size image resized by the min/max rule."""
    from PIL import Image
    return data.resize_image(Image.new("RGB", source_wh(cfg)), cfg.image_min_size, cfg.image_max_size).size


def step_batch(cfg, task, texts, captions_per_image, vocab_size, gen):
    """One collated batch of `texts` pairs on `texts / captions_per_image` images, each image a
    source of --source-size resized by the --image-min/max-size rule (random pixels: speed does
    not depend on them). Pre-training texts carry 15% MLM targets and ITM labels, VQA questions
    soft targets over num_answers answers."""
    w, h = step_image_size(cfg)
    items = []
    for _ in range(texts // captions_per_image):
        pairs = []
        for _ in range(captions_per_image):
            words = torch.randint(5, vocab_size, (cfg.text_len - 2,), generator=gen).tolist()
            ids = [2, *words, 3]  # [CLS] words [SEP]
            if task == "pretrain":
                labels = [data.IGNORE] * cfg.text_len
                for i in torch.randperm(cfg.text_len - 2, generator=gen)[: max(1, round(0.15 * (cfg.text_len - 2)))]:
                    labels[i + 1] = ids[i + 1]
                pairs.append({"input_ids": ids, "mlm_ids": ids, "mlm_labels": labels,
                              "itm_labels": int(torch.randint(2, (1,), generator=gen))})
            else:
                targets = torch.zeros(cfg.num_answers)
                targets[torch.randint(cfg.num_answers, (3,), generator=gen)] = torch.tensor([1.0, 0.6, 0.3])
                pairs.append({"input_ids": ids, "targets": targets})
        items.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen), "pairs": pairs})
    return data.collate(items)


# -----------------------------------------------------------------------------
# One training row


def step_losses(task, model, raw, batch, device, dtype, pixel_samples, accum=1):
    """The forward and the task loss the training scripts run (model.pretraining_losses,
    model.vqa_loss) on one of `accum` identical micro-batches, normalised by the global batch's
    counts as they are."""
    with common.autocast(device, dtype):
        if task == "pretrain":
            hidden, pooled = model(batch["mlm_ids"], batch["text_mask"], batch["images"], batch["image_mask"],
                                   image_index=batch["image_index"], sample_pixel_count=pixel_samples or None)
            num_masked = (batch["mlm_labels"] != data.IGNORE).sum() * accum
            num_pairs = torch.tensor(len(batch["itm_labels"]) * accum, device=num_masked.device)
            return pretraining_losses(raw, hidden, pooled, batch["mlm_labels"], batch["itm_labels"], num_masked,
                                      num_pairs)
        _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"],
                          image_index=batch["image_index"])
        return vqa_loss(raw, pooled, batch["targets"], len(batch["targets"]) * accum)


def optimizer_step(model, raw, micro_batches, loss_fn, optimizers, scaler, out_dir):
    """One optimiser step as the training scripts write it (one process): forward, loss and
    backward on each micro-batch, unscale, clip at 10, the divergence check, step, zero_grad.
    Returns the losses summed over the micro-batches."""
    totals = 0
    for batch in micro_batches:
        losses = loss_fn(batch)
        scaler.scale(losses.sum()).backward()
        totals = totals + losses.detach()
    for opt in filter(None, optimizers):
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 10.0)
    checkpoint.check_step(0, out_dir, totals, grad_norm, scaler)
    for opt in filter(None, optimizers):
        scaler.step(opt)
    scaler.update()
    for opt in filter(None, optimizers):
        opt.zero_grad(set_to_none=True)
    return totals


def saved_activation_bytes(fn):
    """Bytes autograd keeps for the backward pass while fn() runs (each storage counted once):
    the training step's activation memory, measurable on any device."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class RowRun:
    """One row's variant, built and warmed up: step() trains one timed step on a fixed batch and
    returns its seconds; figures() turns the timings into the table's columns. The memory is
    measured on a warm-up step, so rows timed in alternation do not mix their peaks."""

    def __init__(self, cfg, row, base_models, device, tmp):
        name, task, dtype, channels_last, fused, compile, self.autotune, per_image, impl, fold = row
        per_image = per_image or cfg.captions_per_image
        torch.backends.cudnn.benchmark = self.autotune
        if cfg.batch_size % per_image:
            raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of {per_image} captions per image")
        raw = copy.deepcopy(base_models[(task, impl)]).to(device).train()
        if fold:
            fold_frozen_batchnorm(raw)
        if channels_last:
            raw.cnn.to(memory_format=torch.channels_last)
        optimizers = make_optimizers(raw, fused=fused or None)
        model = torch.compile(raw) if compile else raw
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        batch = step_batch(cfg, task, cfg.batch_size, per_image, raw.config.vocab_size,
                           torch.Generator().manual_seed(cfg.seed))
        batch = common.batch_to_device(batch, device, channels_last, raw.config)

        def loss_fn(b):
            return step_losses(task, model, raw, b, device, dtype, cfg.pixel_samples, cfg.accum)

        def train_step():
            return optimizer_step(model, raw, [batch] * cfg.accum, loss_fn, optimizers, scaler, tmp)

        for i in range(cfg.warmup - 1):
            train_step()
        sync(device)
        if device.type == "cuda":  # what a step adds to weights and optimiser state: activations, gradients
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            train_step()
            sync(device)
            self.memory = (torch.cuda.max_memory_allocated(device) - before) / cfg.batch_size
        else:
            self.memory = saved_activation_bytes(lambda: loss_fn(batch))[0] / cfg.batch_size
            if cfg.warmup > 0:
                train_step()
        self.cfg, self.task, self.config, self.batch, self.device = cfg, task, raw.config, batch, device
        self.train_step, self.times = train_step, []

    def step(self):
        torch.backends.cudnn.benchmark = self.autotune  # rows are timed in alternation
        sync(self.device)
        t = time.perf_counter()
        self.losses = self.train_step()
        sync(self.device)
        self.times.append(time.perf_counter() - t)

    def figures(self):
        cfg, c, batch = self.cfg, self.config, self.batch
        images, (H, W) = batch["images"].shape[0], batch["images"].shape[2:]
        stride = CNN_STRIDE * c.pixel_pool
        pixels = batch["image_mask"][0, ::stride, ::stride].numel()  # pixel tokens of one padded image
        pixels = min(cfg.pixel_samples, pixels) if self.task == "pretrain" and cfg.pixel_samples else pixels
        masked = int((batch["mlm_labels"] != data.IGNORE).sum()) if self.task == "pretrain" else 0
        flops = cfg.accum * train_flops(c, images, H, W, cfg.batch_size, batch["input_ids"].shape[1], pixels,
                                        masked, cfg.num_answers)
        seconds = min(self.times)  # other processes only ever add time: the fastest step is the least disturbed
        return {"samples_per_s": cfg.batch_size * cfg.accum / seconds, "step_ms": 1000 * seconds,
                "flops_per_step": flops, "tflops": flops / seconds / 1e12, "mem_mb_per_sample": self.memory / 2 ** 20,
                "loss": [round(v, 4) for v in self.losses.tolist()]}


def row_groups(wanted):
    """The rows in ROWS order, each baseline row in one group with our row of the same flags:
    a group's rows are timed in alternation, so a load change on the machine hits both alike."""
    groups, by_flags = [], {}
    for row in ROWS:
        if row.name not in wanted:
            continue
        flags = tuple(getattr(row, f) for f in FLAGS)
        partner = by_flags.get(flags) if row.impl == "baseline" else None
        if partner is not None:
            partner.append(row)
        else:
            groups.append([row])
            by_flags[flags] = groups[-1]
    return groups


# -----------------------------------------------------------------------------
# Data loading and aspect-ratio grouping


def write_jpegs(folder, count, size, seed):
    """Photo-like JPEGs (smooth shapes plus sensor-like noise, quality 90: ~COCO's file sizes),
    alternately landscape and portrait."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = size if i % 4 else size[::-1]  # one in four portrait, as in COCO
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def loading_rate(cfg, folder, min_size, max_size):
    """Images/s of one loader process (what each DataLoader worker does), batches of batch_size."""
    paths = write_jpegs(folder, cfg.loader_images, source_wh(cfg), cfg.seed)
    # what a training dataset does per image (decode the JPEG, resize by the rule), then the padded batch
    loader = torch.utils.data.DataLoader(data.ImageFiles("", paths, min_size, max_size), batch_size=cfg.batch_size,
                                         collate_fn=lambda items: data.collate([{"image": im} for _, im in items]),
                                         num_workers=0)
    next(iter(loader))  # warm the page cache and PIL
    t = time.perf_counter()
    batches = list(loader)
    seconds = time.perf_counter() - t
    return len(paths) / seconds, tuple(batches[0]["images"].shape)


class RandomCaptions:
    """What retrieval_scores reads of a caption set (data.RetrievalCaptions): the image paths, and
    `count` captions, here text_len - 2 random word pieces each."""

    def __init__(self, image_paths, count, text_len, vocab_size, seed):
        self.image_paths = image_paths
        self.ids = np.random.default_rng(seed).integers(5, vocab_size, (count, text_len - 2)).tolist()

    def __len__(self):
        return len(self.ids)

    def input_ids(self, c):
        return [2, *self.ids[c], 3]  # [CLS] and [SEP] stand-ins: the cost does not depend on the ids


def retrieval_rates(cfg, device, folder):
    """evaluate.retrieval_scores (what `evaluate.py retrieval` runs: the CNN once per
    image, cached pixel tokens, large batches of pairs under bf16 autocast) on retrieval_images
    JPEGs x retrieval_captions captions: pairs/s of the whole and of the transformer alone, and
    the full protocols' hours at that rate (1K x 5K pairs for Flickr30K, 5K x 25K for COCO)."""
    torch.manual_seed(cfg.seed)
    model = PixelBert(model_config(cfg.model, cfg.quick, heads=("rank",))).to(device)
    model.cnn.to(memory_format=torch.channels_last)
    paths = write_jpegs(folder, cfg.retrieval_images, source_wh(cfg), cfg.seed)
    ddp = common.Dist(0, 0, 1, device)
    warm = RandomCaptions(paths[:1], 8, cfg.text_len, model.config.vocab_size, cfg.seed)
    retrieval_scores(model, "", warm, ddp, cfg.image_min_size, cfg.image_max_size, "bf16", num_workers=0,
                     progress=False)  # CUDA context, cuDNN's algorithm search
    captions = RandomCaptions(paths, cfg.retrieval_captions, cfg.text_len, model.config.vocab_size, cfg.seed)
    scores, times = retrieval_scores(model, "", captions, ddp, cfg.image_min_size, cfg.image_max_size, "bf16",
                                     num_workers=2, progress=False)
    pairs = scores.numel()
    per_image, per_pair = times["encode_s"] / len(paths), times["transformer_s"] / pairs

    def protocol(images, captions):  # seconds, and the transformer's share, of a full protocol at these costs
        total = images * per_image + images * captions * per_pair
        return total, images * captions * per_pair / total
    (flickr_s, flickr_ratio), (coco_s, _) = protocol(1000, 5000), protocol(5000, 25000)
    return {"images": len(paths), "captions": len(captions), "dtype": "bf16", "pairs_per_s": pairs / times["total_s"],
            "transformer_pairs_per_s": 1 / per_pair, "ratio": times["transformer_s"] / times["total_s"],
            "flickr30k_ratio": flickr_ratio, "flickr30k_1k_h": flickr_s / 3600, "coco_5k_h": coco_s / 3600}


def padding_fractions(batch_size, min_size, max_size, count=4096, seed=0):
    """Fraction of padded pixels in data.collate's batches of data.MicroBatchSampler, without and
    with its aspect-ratio groups (landscape vs portrait), for an assumed COCO-like size mix:
    long side 640, short side uniform in 360..512, one image in four portrait."""
    rng = np.random.default_rng(seed)
    short = rng.integers(360, 513, count)
    portrait = rng.random(count) < 0.25
    wh = np.stack([np.where(portrait, short, 640), np.where(portrait, 640, short)], 1)
    scale = np.minimum(min_size / wh.min(1), max_size / wh.max(1))
    resized = np.maximum(1, np.round(wh * scale[:, None])).astype(np.int64)  # data.resize_image's rule
    result = {}
    for grouped in (False, True):
        sampler = data.MicroBatchSampler(count, batch_size, seed=seed,
                                         group_ids=(wh[:, 0] >= wh[:, 1]).astype(int) if grouped else None)
        real = padded = 0
        for keys in sampler:
            sizes = resized[[i for _, i in keys]]
            W, H = (-(-sizes.max(0) // data.PAD_MULTIPLE) * data.PAD_MULTIPLE).tolist()
            real += int(sizes.prod(1).sum())
            padded += len(keys) * H * W
        result["grouped" if grouped else "ungrouped"] = 1 - real / padded
    return result


# -----------------------------------------------------------------------------
# The table


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads > 1 else ''}"


def format_table(result):
    m = result["meta"]
    lines = [f"Pixel-BERT bench: {m['device_name']} | torch {m['torch']} | {m['date']}",
             f"model {m['model']}, {m['image']} images ({m['source_size']} sources, resize rule {m['resize_rule']}), "
             f"{m['accum']} micro-batches of {m['batch_size']} texts x {m['text_len']} tokens per step, "
             f"pre-training samples {m['pixel_samples']} pixels; {m['steps']} timed steps after {m['warmup']} "
             f"warm-up (fastest)",
             f"measured matmul peak: fp32 {result['peak_tflops']['fp32']:.2f} TFLOP/s, "
             f"bf16 {result['peak_tflops']['bf16']:.2f} TFLOP/s",
             "", "| row | samples/s | step ms | TFLOP/s | of peak | memory MB/sample | vs baseline | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['name']} | | | | | | | {r.get('error') or r.get('skipped')} |")
            continue
        lines.append(f"| {r['name']} | {r['samples_per_s']:.2f} | {r['step_ms']:.0f} | {r['tflops']:.3f} | "
                     f"{r['peak_fraction']:.1%} | {r['mem_mb_per_sample']:.0f} | {r.get('vs_baseline', '')} | "
                     f"{r.get('note', '')} |")
    lines.append(f"\nmemory: {m['memory_note']}")
    if m["precision_note"]:
        lines.append(f"precision: {m['precision_note']}")
    if "loading" in result:
        ld = result["loading"]
        lines.append(f"data loading: {ld['images_per_s_per_worker']:.1f} images/s per worker decoding "
                     f"{m['source_size']} JPEGs into {ld['rule']} batches {ld['batch_shape']}; the "
                     f"'{ld['step_row']}' step consumes {ld['step_images_per_s']:.1f} images/s -> "
                     f"{ld['workers_needed']:.2f} workers")
    if "padding" in result:
        p = result["padding"]
        lines.append(f"aspect-ratio grouping ({p['batch_size']} images per batch, {p['mix']}): padded pixels "
                     f"{p['ungrouped']:.1%} without, {p['grouped']:.1%} with")
    if "conv_ceiling" in result:
        r = result["conv_ceiling"]
        tuned = ", cuDNN autotuned" if r.get("autotuned") else ""
        lines.append(f"convolutions alone (bf16, channels-last{tuned}; forward + backward): " + (
            r["error"] if "error" in r else
            f"{r['ms_per_micro_batch']:.1f} ms per micro-batch of {r['images']} images, {r['tflops']:.3f} TFLOP/s = "
            f"{r['peak_fraction']:.1%} of the bf16 peak" + (
                f"; the pre-training step could reach at most {r['step_bound']:.1%} of peak if everything else "
                f"took no time; they are {r['conv_share_of_fastest']:.0%} of the fastest row's step "
                f"({r['fastest_row']})" if "step_bound" in r else "")))
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append("retrieval scoring: " + (r["error"] if "error" in r else
                     f"{r['images']} images x {r['captions']} captions ({r['dtype']}): {r['pairs_per_s']:.1f} pairs/s "
                     f"in all, {r['transformer_pairs_per_s']:.1f} for the transformer alone (ratio {r['ratio']:.3f}; "
                     f"{r['flickr30k_ratio']:.3f} at Flickr30K's 5,000 captions per image) -> Flickr30K 1Kx5K "
                     f"{r['flickr30k_1k_h']:.2f} h, COCO 5Kx25K {r['coco_5k_h']:.2f} h on this device"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    if cfg.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device {cfg.device}: choose cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch; run with --device cpu")
    defaults = DEFAULTS["quick" if cfg.quick else cfg.device]
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if k != "warmup" and not getattr(cfg, k)})
    cfg.warmup = cfg.warmup if cfg.warmup >= 0 else defaults.get("warmup", 0)
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.out or os.path.join("runs", "bench", f"{cfg.device}_{cfg.model}{'_quick' if cfg.quick else ''}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    names = [r.name for r in ROWS]
    wanted = [n.strip() for n in cfg.rows.split(",")] if cfg.rows else DEFAULT_ROWS[device.type]
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; the rows are: {'; '.join(names)}")
    cuda_only = [r.name for r in ROWS if r.name in wanted and r.autotune] if device.type != "cuda" else []
    if cuda_only:
        raise SystemExit(f"--rows: {cuda_only} autotune cuDNN, which needs --device cuda")
    if model_config(cfg.model, cfg.quick).norm != "frozen":  # only a frozen BatchNorm folds into the convolutions
        folding = [r.name for r in ROWS if r.name in wanted and r.fold]
        if cfg.rows and folding:
            raise SystemExit(f"--rows: {folding} fold a frozen BatchNorm, which the {cfg.model} model does not have")
        wanted = [n for n in wanted if n not in folding]
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    def progress(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    c_pre = model_config(cfg.model, cfg.quick, heads=("mlm", "itm"))
    c_vqa = model_config(cfg.model, cfg.quick, heads=("vqa",), num_answers=cfg.num_answers)
    w, h = step_image_size(cfg)
    result = {"meta": {"command": " ".join(["python bench.py", *(sys.argv[1:] if argv is None else argv)]),
                       "config": asdict(cfg), "device_name": device_name(device), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": cfg.model,
                       "image": f"{w}x{h}", "source_size": cfg.source_size,
                       "resize_rule": f"{cfg.image_min_size}/{cfg.image_max_size}", "batch_size": cfg.batch_size,
                       "accum": cfg.accum,
                       "text_len": cfg.text_len, "pixel_samples": cfg.pixel_samples, "steps": cfg.steps,
                       "warmup": cfg.warmup,
                       "memory_note": "CUDA: peak allocated during the step beyond weights and optimiser state "
                                      "(activations and gradients)" if device.type == "cuda" else
                                      "CPU: bytes autograd saves for the backward pass (activations)",
                       "precision_note": "fp32 on CUDA: convolutions in TF32 (cuDNN's default), matrix products in "
                                         "full fp32 (PyTorch's default)" if device.type == "cuda" else
                                         "" if common.native_bf16(device) else "this CPU has no native bf16 (AMX "
                                         "or AVX512-BF16): the bf16 rows are emulated, far slower than fp32"},
              "rows": []}

    def save():
        common.write_json(out, result)

    # ---- the same process's dense-matmul peak in each precision
    n = 8192 if device.type == "cuda" else (512 if cfg.quick else 2048)
    result["peak_tflops"] = {p: measured_peak(device, d, n, 3 if device.type == "cpu" else 10) / 1e12
                             for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    progress(f"matmul peak {result['peak_tflops']}")

    # ---- data loading at the paper's 800x1333 rule (first: quick, and kept if a later row hangs),
    # and aspect-ratio grouping
    with tempfile.TemporaryDirectory() as tmp:
        rate, shape = loading_rate(cfg, tmp, 800, 1333)
    result["loading"] = {"images_per_s_per_worker": rate, "rule": "800/1333", "batch_shape": list(shape),
                         "step_row": "none", "step_images_per_s": float("nan"), "workers_needed": float("nan")}
    result["padding"] = {"batch_size": 32, "mix": "assumed COCO-like sizes: long side 640, short 360-512, 25% portrait",
                         **padding_fractions(32, 800, 1333, seed=cfg.seed)}
    progress(f"data loading: {rate:.1f} images/s per worker; padding {result['padding']}")
    save()

    # ---- retrieval scoring: the full protocol's pairs/s, and the transformer's alone
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result["retrieval"] = retrieval_rates(cfg, device, tmp)
        progress(f"retrieval: {result['retrieval']}")
        save()
    except Exception as e:
        result["retrieval"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        traceback.print_exc()

    # ---- the convolutions' ceiling (before the rows: a slow compiled row cannot lose it)
    try:
        result["conv_ceiling"] = ceiling_figures(cfg, c_pre, device, result["peak_tflops"]["bf16"] * 1e12)
        progress(f"convolutions alone: {result['conv_ceiling']}")
        save()
    except Exception as e:
        result["conv_ceiling"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        traceback.print_exc()

    # ---- training rows; ours and the baseline with the same flags in alternation
    base_models, entries = {}, {}
    autotune = torch.backends.cudnn.benchmark  # rows set it; the caller gets its own back
    with tempfile.TemporaryDirectory() as tmp:
        for group in row_groups(wanted):
            runs = {}
            for row in group:
                name, task, impl = row.name, row.task, row.impl
                entries[name] = {**row._asdict(),
                                 "captions_per_image": row.captions_per_image or cfg.captions_per_image}
                try:
                    if (task, impl) not in base_models:
                        c = c_pre if task == "pretrain" else c_vqa
                        torch.manual_seed(cfg.seed)
                        base_models[(task, impl)] = PixelBert(c) if impl == "ours" else GluedBaseline(c)
                    runs[name] = RowRun(cfg, row, base_models, device, tmp)
                except Exception as e:
                    record_failure(entries[name], e, device)
            for _ in range(cfg.steps):
                for name, run in list(runs.items()):
                    try:
                        run.step()
                    except Exception as e:
                        record_failure(entries[name], e, device)
                        del runs[name]
            for name, run in runs.items():
                entries[name].update(run.figures())
                entries[name]["peak_fraction"] = entries[name]["tflops"] / result["peak_tflops"][entries[name]["dtype"]]
            del runs
            gc.collect()  # the group's models and optimiser states go before the next group is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for row in group:
                entry = entries[row.name]
                progress(f"{entry['name']}: " + (entry.get("error") or entry.get("skipped") or
                                                 f"{entry['samples_per_s']:.2f} samples/s, {entry['tflops']:.3f} "
                                                 f"TFLOP/s ({entry['peak_fraction']:.1%} of peak), "
                                                 f"{entry['mem_mb_per_sample']:.0f} MB/sample"))
            result["rows"] = [entries[row.name] for row in ROWS if row.name in entries]
            save()
    torch.backends.cudnn.benchmark = autotune
    compare_rows(result["rows"])
    if "error" not in result["conv_ceiling"]:
        compare_ceiling(result["conv_ceiling"], result["rows"], cfg.accum, result["peak_tflops"]["bf16"] * 1e12)

    # ---- how many loader workers the measured step needs
    step_row = next((r for r in result["rows"] if r["name"] == "pretrain bf16 +cl +fused" and "samples_per_s" in r),
                    None)
    if step_row:  # one image per pair in this row
        images_per_s = step_row["samples_per_s"]
        result["loading"].update(step_row=step_row["name"], step_images_per_s=images_per_s,
                                 workers_needed=images_per_s / result["loading"]["images_per_s_per_worker"])

    result["meta"]["seconds"] = round(time.time() - t_start, 1)
    save()
    table = format_table(result)
    print("\n" + table + f"\n\nwritten to {out} ({result['meta']['seconds']:.0f} s)")
    return result


def ceiling_figures(cfg, c, device, peak):
    """conv_ceiling on one pre-training micro-batch's images."""
    images = step_batch(cfg, "pretrain", cfg.batch_size, 1, c.vocab_size, torch.Generator())["images"]
    with torch.device("meta"):  # recording the calls needs shapes only
        cnn, shapes_only = ResNet(c), torch.empty(images.shape)
    flops, seconds = conv_ceiling(cnn, shapes_only, device, 10 if device.type == "cuda" else 1)
    return {"images": len(images), "ms_per_micro_batch": 1000 * seconds, "tflops": flops / seconds / 1e12,
            "peak_fraction": flops / seconds / peak, "autotuned": device.type == "cuda"}


def compare_ceiling(ceiling, rows, accum, peak):
    """The step's FLOPs if its convolutions' time were all of its time (the most it can reach),
    and the convolutions' share of our fastest bf16 pre-training step."""
    rows = [r for r in rows if r["impl"] == "ours" and r["task"] == "pretrain" and r["dtype"] == "bf16"
            and r["captions_per_image"] == 1 and "step_ms" in r]
    if rows:
        fastest, seconds = min(rows, key=lambda r: r["step_ms"]), accum * ceiling["ms_per_micro_batch"] / 1000
        ceiling.update(step_bound=fastest["flops_per_step"] / seconds / peak, fastest_row=fastest["name"],
                       conv_share_of_fastest=1000 * seconds / fastest["step_ms"])


def record_failure(entry, error, device):
    """A failing variant is recorded in the table (a missing optional package as skipped), and
    the run goes on with the other rows."""
    if isinstance(error, ImportError):
        entry["skipped"] = f"skipped: {error}"
        return
    entry["error"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    traceback.print_exc()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_rows(rows):
    """Each baseline row against our row with the same flags: our step time / the baseline's."""
    def flags(r):
        return tuple(r[k] for k in FLAGS)
    ours = {flags(r): r for r in rows if r["impl"] == "ours" and "step_ms" in r}
    for r in rows:
        if r["impl"] == "baseline" and "step_ms" in r:
            mine = ours.get(flags(r))
            if mine:
                mine["vs_baseline"] = r["vs_baseline"] = f"{mine['step_ms'] / r['step_ms']:.2f}"
    fp32 = {r["task"]: r for r in rows if r["name"] in ("pretrain fp32", "vqa fp32") and "samples_per_s" in r}
    for r in rows:  # speed-up over our fp32 row of the same task, in samples/s
        if r["impl"] == "ours" and "samples_per_s" in r and r["task"] in fp32 and r is not fp32[r["task"]]:
            r["note"] = f"{r['samples_per_s'] / fp32[r['task']]['samples_per_s']:.2f}x fp32"
        if r["captions_per_image"] > 1 and "samples_per_s" in r:
            r["note"] = f"{r['captions_per_image']} captions share each image; " + r.get("note", "")


if __name__ == "__main__":
    main()
