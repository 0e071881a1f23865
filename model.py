"""
Pixel-BERT in one file: a CNN turns the image into a grid of "pixel" features, and one BERT
Transformer reads [CLS] text [SEP] followed by those pixels, so every layer lets words and
image regions attend to each other.

Copy this file into another project if you like: it imports only torch (safetensors lazily,
when loading a .safetensors checkpoint). Parameter names equal those of the reference
checkpoints, so loading pretrained weights is a checked copy:
  - BERT: Hugging Face transformers' BertModel / BertForPreTraining (`bert.*`, `cls.predictions.*`)
  - ResNet / ResNeXt: torchvision's models (`conv1`, `bn1`, `layer1..4`), kept under `cnn.`

References:
1) Huang, Zeng, Liu, Fu, Fu. Pixel-BERT: Aligning Image Pixels with Text by Deep Multi-Modal
   Transformers. arXiv:2004.00849, 2020. (Sections 3.1-3.3: model; 3.4: pre-training.)
2) Devlin et al. BERT. NAACL 2019. Hugging Face transformers, models/bert/modeling_bert.py.
3) He et al. Deep Residual Learning. CVPR 2016; Xie et al. ResNeXt. CVPR 2017;
   torchvision/models/resnet.py (the "V1.5" bottleneck: stride on the 3x3 conv).
"""

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class PixelBertConfig:
    # Transformer: BERT-base by default (the paper initialises from bert-base-uncased)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    initializer_range: float = 0.02
    # CNN: a torchvision ResNet / ResNeXt without its classifier
    cnn_depth: int = 50  # 18, 34, 50, 101 or 152
    cnn_groups: int = 1  # ResNeXt cardinality (32 for X-152)
    cnn_width_per_group: int = 64  # ResNeXt bottleneck width per group (8 for 32x8d, 4 for 32x4d)
    cnn_width: int = 64  # stem channels; stage i has cnn_width * 2**i planes (torchvision: 64)
    norm: str = "frozen"  # BatchNorm: "frozen" (fixed ImageNet statistics) or "batch" (batch statistics)
    # The CNN's input convention: what its weights were trained to see. An 8-bit RGB image is put in
    # image_channels order and scaled to [0, image_scale]; then each channel has image_mean subtracted and is
    # divided by image_std (both in that order and scale). The defaults are torchvision's ImageNet weights;
    # Detectron's Caffe2 weights (tools/convert_detectron.py) read BGR in 0-255 minus a mean, std 1. load_cnn
    # sets these from the CNN file, data.normalize_images applies them, and checkpoints carry them.
    image_channels: str = "RGB"  # "RGB" or "BGR"
    image_scale: float = 1.0  # 1.0: pixels in [0, 1] (torchvision); 255.0: raw 8-bit values (Detectron)
    image_mean: tuple = (0.485, 0.456, 0.406)  # per channel, in image_channels order and image_scale units
    image_std: tuple = (0.229, 0.224, 0.225)
    # Visual embedding (paper 3.2); the two extras are not in the paper and are off by default
    pixel_pool: int = 2  # max-pool of the stride-32 map (paper: 2x2; 1 keeps every cell)
    visual_layernorm: bool = False  # LayerNorm + dropout on the pixel tokens
    visual_position: bool = False  # learned row + column embeddings for the pixel grid
    max_pixel_grid: int = 32  # rows/columns the position table covers (1333 / 64 -> 21; 42 with pixel_pool 1)
    # The paper's Fig. 2 draws CNN -> conv -> pooling (the conv's size is not given): the 1x1 conv
    # projects every stride-32 cell 2048 -> hidden, then the max-pool (the default). False pools
    # first, as the authors' follow-up SOHO does: pixel_pool**2 fewer cells to project, a small part
    # of the CNN's cost either way. With pixel_pool 1 the two orders are the same computation.
    pixel_proj_first: bool = True
    # Task heads built on top of the trunk: any of "mlm", "itm", "vqa", "nlvr", "rank"
    heads: tuple = ("mlm", "itm")
    num_answers: int = 0  # VQA answer vocabulary size (needs "vqa" in heads)

    def __post_init__(self):
        self.heads = tuple(self.heads)
        unknown = set(self.heads) - {"mlm", "itm", "vqa", "nlvr", "rank"}
        assert not unknown, f"unknown heads {sorted(unknown)}"
        assert ("vqa" in self.heads) == (self.num_answers > 0), "the vqa head needs num_answers > 0"
        assert self.cnn_depth in RESNET_LAYERS, f"cnn_depth must be one of {sorted(RESNET_LAYERS)}"
        assert self.norm in ("frozen", "batch"), "norm must be frozen or batch"
        assert self.pixel_pool >= 1, "pixel_pool must be >= 1"
        assert self.hidden_size % self.num_heads == 0, "hidden_size must divide into num_heads"
        # lists (a config.json, an older torch.save) become tuples, so configs compare and print alike
        self.image_mean, self.image_std = tuple(map(float, self.image_mean)), tuple(map(float, self.image_std))
        self.image_scale = float(self.image_scale)
        assert self.image_channels in ("RGB", "BGR"), "image_channels must be RGB or BGR"
        assert len(self.image_mean) == len(self.image_std) == 3, "image_mean and image_std need 3 values each"
        assert min(self.image_std) > 0 and self.image_scale > 0, "image_std and image_scale must be positive"

    INPUT_FIELDS = ("image_channels", "image_scale", "image_mean", "image_std")  # a class constant, not a field

    @classmethod
    def saved(cls, fields, **changes):
        """The config a checkpoint saved (its "model_config" dict), with `changes`. A field the
        checkpoint lacks takes the behaviour it was trained with, which is not always today's
        default: checkpoints older than pixel_proj_first pooled first."""
        return cls(**{"pixel_proj_first": False, **fields, **changes})

    @classmethod
    def r50(cls, **overrides):
        """The paper's Pixel-BERT-R50: ImageNet ResNet-50 + BERT-base."""
        return cls(**overrides)

    @classmethod
    def x152(cls, width_per_group=8, **overrides):
        """The paper's Pixel-BERT-X152: ResNeXt-152 + BERT-base. The paper does not give the
        ResNeXt's width, so both readings are here: width_per_group=8 (the default) builds 32x8d,
        the width of Detectron's X-152-32x8d checkpoints; width_per_group=4 builds 32x4d, which the
        FLOP counts ViLT reprints for Pixel-BERT-X152 fit better. Stage widths: 32 groups x 8 (or 4)
        channels per group in layer1's 3x3 convs, doubling each stage."""
        return cls(**{**dict(cnn_depth=152, cnn_groups=32, cnn_width_per_group=width_per_group), **overrides})

    @classmethod
    def tiny(cls, **overrides):
        """A laptop-CPU model for the demo corpus and the tests. It trains from scratch, so its
        BatchNorm learns batch statistics instead of keeping ImageNet's, and it starts from a
        wider init (0.1, not BERT's 0.02), which shortens the plateau before ITM starts to use the image."""
        tiny = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, max_position_embeddings=64,
                    cnn_depth=18, cnn_width=16, norm="batch", initializer_range=0.1)
        return cls(**{**tiny, **overrides})


# -----------------------------------------------------------------------------
# CNN backbone: torchvision's ResNet / ResNeXt, same names, without `fc`

RESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def conv3x3(in_planes, out_planes, stride=1, groups=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine, stored as buffers so no optimiser touches
    them. Detection backbones do this because a few large images per GPU give batch
    statistics too noisy to learn from; Pixel-BERT's 800x1333 inputs are in the same regime."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self):  # the per-channel affine map this layer is: y = x * scale + shift
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, groups, base_width, norm_layer):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity  # in place, as torchvision: one activation-sized tensor less per block
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    # "V1.5": the stride sits on the 3x3 conv (conv2), not on the first 1x1 as in the original
    # paper; this is torchvision's layout and what its ImageNet weights were trained with.
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, groups, base_width, norm_layer):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups  # ResNeXt: groups x width per group
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity  # in place, as torchvision: one activation-sized tensor less per block
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk up to the stride-32 feature map (torchvision's names, no avgpool/fc)."""

    def __init__(self, config):
        super().__init__()
        # "frozen" keeps an ImageNet CNN's statistics (FrozenBatchNorm2d says why); "batch" learns
        # them, as a CNN trained from scratch must (the tiny model).
        norm_layer = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}[config.norm]
        block = BasicBlock if config.cnn_depth < 50 else Bottleneck
        self.groups, self.base_width = config.cnn_groups, config.cnn_width_per_group
        w = config.cnn_width
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        layers = RESNET_LAYERS[config.cnn_depth]
        self.layer1 = self._make_layer(block, w, layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, w * 2, layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, w * 4, layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, w * 8, layers[3], 2, norm_layer)
        self.out_channels = w * 8 * block.expansion  # 2048 for ResNet-50
        for m in self.modules():  # torchvision's init; BatchNorm starts as the identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride, norm_layer):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, self.groups, self.base_width, norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, C, H/32, W/32), sizes rounded up
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        return x


# Opt-in speed-up for norm="frozen": fold_frozen_batchnorm(model). A frozen BatchNorm is a
# per-channel affine map, so bn(conv(x)) is one conv with the weight scaled per output channel and
# the shift as its bias: two passes over the conv's output (multiply, add) in the forward and one
# in the backward become one bias add. The forwards above stay as they are: each folded conv does
# its norm's work and the norm passes its input through.


class FoldedConv2d(nn.Conv2d):
    """A bias-free conv that applies the FrozenBatchNorm2d after it (self.folded_norm) itself.
    The weight is scaled on the fly, so the trained parameter is still the conv's own weight."""

    def forward(self, x):
        scale, shift = self.folded_norm.scale_shift()  # (out,), (out,)
        weight = self.weight * scale[:, None, None, None]  # (out, in / groups, kh, kw)
        return F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose map the conv before it applies; it keeps its buffers (and keys)."""

    def forward(self, x):
        return x


def fold_frozen_batchnorm(model):
    """Fold every FrozenBatchNorm2d of `model` into the conv that feeds it, in place; returns the
    model. The state dict (names, tensors), the parameters and their gradients stay the same; the
    outputs equal the plain path's up to float rounding. Meant for GPU training with norm="frozen"
    (r50, x152), where the elementwise passes over the CNN's activations are a visible share of the step."""
    folded = 0
    for module in model.modules():
        # torchvision registers each conv right before the norm that reads its output
        # (conv1, bn1, conv2, bn2, ...; downsample = Sequential(conv, norm))
        children = list(module.children())
        for conv, norm in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and type(norm) is FrozenBatchNorm2d and conv.bias is None:
                conv.__class__, norm.__class__ = FoldedConv2d, FoldedFrozenBatchNorm2d
                conv.__dict__["folded_norm"] = norm  # a plain attribute, not a submodule: no new state-dict keys
                folded += 1
    if not folded:
        raise ValueError("fold_frozen_batchnorm: no FrozenBatchNorm2d after a conv (is the config's norm 'frozen'?)")
    return model


# -----------------------------------------------------------------------------
# BERT: Hugging Face's module tree, so state-dict keys match bert-base-uncased


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids):  # (B, T) -> (B, T, H)
        # All text is token type 0: the paper's text "semantic embedding" s_w is exactly this row.
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:T] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads, self.dropout = c.num_heads, c.dropout
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, attn_mask):  # x (B, L, H), attn_mask (B, 1, 1, L) bool, True = attend
        B, L, H = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, H // self.num_heads).transpose(1, 2)  # (B, nh, L, hs)
                   for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout if self.training else 0.0
        if x.device.type == "cpu":  # fp32: PyTorch's CPU attention runs slower in bf16, at best as fast
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                   dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, L, H)


class BertAddNorm(nn.Module):
    """Dense -> dropout -> residual add -> LayerNorm: BERT is post-LayerNorm."""

    def __init__(self, c, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = BertSelfAttention(c)  # HF's name: bert.encoder.layer.N.attention.self.query
        self.output = BertAddNorm(c, c.hidden_size)

    def forward(self, x, attn_mask):
        return self.output(self.self(x, attn_mask), x)


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = nn.Sequential(OrderedDict(dense=nn.Linear(c.hidden_size, c.intermediate_size),
                                                      act=nn.GELU()))  # exact (erf) GELU, as BERT
        self.output = BertAddNorm(c, c.intermediate_size)

    def forward(self, x, attn_mask):
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_layers)])

    def forward(self, x, attn_mask):
        for layer in self.layer:
            x = layer(x, attn_mask)
        return x


class Bert(nn.Module):
    """BertModel: embeddings, encoder and pooler. The encoder takes any sequence of vectors,
    so Pixel-BERT appends its pixel tokens after the embedded text."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        self.pooler = nn.Sequential(OrderedDict(dense=nn.Linear(c.hidden_size, c.hidden_size), act=nn.Tanh()))


class MLMHead(nn.Module):
    """BERT's masked-LM head (`cls.predictions`). The decoder is tied to the word embeddings,
    so it has no weight of its own, only an output bias."""

    def __init__(self, c):
        super().__init__()
        self.transform = nn.Sequential(OrderedDict(
            dense=nn.Linear(c.hidden_size, c.hidden_size), act=nn.GELU(),
            LayerNorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, hidden, word_embeddings):  # (..., H) -> (..., vocab)
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


# -----------------------------------------------------------------------------
# Pixel features (paper 3.2) and pixel random sampling (paper 3.3)

CNN_STRIDE = 32  # the ResNet's output stride; a pixel token covers CNN_STRIDE * pixel_pool pixels


class VisualEmbedding(nn.Module):
    """CNN feature map -> pixel tokens. The paper adds one learned visual "semantic" vector s_v
    to every pixel feature and no position embedding (the CNN features already carry position);
    `visual_position` adds learned row/column embeddings as an option."""

    def __init__(self, c, in_channels):
        super().__init__()
        self.pool, self.proj_first, self.max_grid = c.pixel_pool, c.pixel_proj_first, c.max_pixel_grid
        self.proj = nn.Conv2d(in_channels, c.hidden_size, 1)
        self.type_embedding = nn.Parameter(torch.zeros(c.hidden_size))  # s_v
        if c.visual_position:
            self.row_embeddings = nn.Embedding(c.max_pixel_grid, c.hidden_size)
            self.col_embeddings = nn.Embedding(c.max_pixel_grid, c.hidden_size)
        if c.visual_layernorm:
            self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.dropout = nn.Dropout(c.dropout)

    def forward(self, fmap):  # (B, C, h, w) stride-32 map -> (B, K, H), K = ceil(h/pool) * ceil(w/pool)
        if self.proj_first:  # conv -> pool (the paper's figure, the default)
            x = F.max_pool2d(self.proj(fmap), self.pool, ceil_mode=True)  # (B, H, h', w')
        else:  # pool -> conv (SOHO's order)
            x = self.proj(F.max_pool2d(fmap, self.pool, ceil_mode=True))  # (B, H, h', w')
        h, w = x.shape[-2:]
        if hasattr(self, "row_embeddings") and max(h, w) > self.max_grid:
            raise ValueError(f"a {h}x{w} pixel grid exceeds the position table's {self.max_grid} rows/columns "
                             f"(max_pixel_grid): use smaller images or a model built for them")
        x = x.flatten(2).transpose(1, 2) + self.type_embedding  # (B, K, H), raster order
        if hasattr(self, "row_embeddings"):
            pos = self.row_embeddings.weight[:h, None] + self.col_embeddings.weight[None, :w]  # (h', w', H)
            x = x + pos.flatten(0, 1)
        if hasattr(self, "LayerNorm"):
            x = self.dropout(self.LayerNorm(x))
        return x


def sample_pixels(tokens, mask, n):
    """Pixel random sampling (paper 3.3, n = 100): keep n random valid pixel tokens per image, never a
    padded one; all valid tokens if an image has fewer. Used in pre-training only: it acts like
    dropout on the visual input and cuts the sequence length (~260 -> 100 at 800x1333).
    tokens (B, K, H), mask (B, K) bool -> (B, min(n, K), H), (B, min(n, K))."""
    B, K, H = tokens.shape
    if K <= n:
        return tokens, mask
    # Valid tokens get a uniform score in [0, 1), padded ones -1, so top-n takes a uniformly
    # random subset of the valid tokens first and pads with masked tokens only when it must.
    score = torch.rand(B, K, device=tokens.device).masked_fill(~mask, -1.0)
    idx = score.topk(n, dim=1).indices.sort(dim=1).values  # (B, n), kept in raster order
    return tokens.gather(1, idx[..., None].expand(-1, -1, H)), mask.gather(1, idx)


# -----------------------------------------------------------------------------
# Pixel-BERT


class PixelBert(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.cnn = ResNet(c)
        self.visual = VisualEmbedding(c, self.cnn.out_channels)
        self.bert = Bert(c)
        H = c.hidden_size
        if "mlm" in c.heads:
            self.cls = nn.ModuleDict({"predictions": MLMHead(c)})
        if "itm" in c.heads:  # image-text matching: 0 = mismatched, 1 = matched
            self.itm_head = nn.Linear(H, 2)
        if "vqa" in c.heads:  # paper 4.2, an MLP on [CLS]: Linear(h, 2h) -> GELU -> LayerNorm -> Linear(2h, answers)
            self.vqa_head = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.LayerNorm(2 * H, eps=c.layer_norm_eps),
                                          nn.Linear(2 * H, c.num_answers))
        if "nlvr" in c.heads:  # two [CLS] vectors (left image, right image) concatenated -> true/false
            self.nlvr_head = nn.Sequential(nn.Linear(2 * H, 2 * H), nn.GELU(),
                                           nn.LayerNorm(2 * H, eps=c.layer_norm_eps), nn.Linear(2 * H, 2))
        if "rank" in c.heads:  # retrieval: one score per (image, caption) pair
            self.rank_head = nn.Linear(H, 1)
        for name, module in self.named_children():
            if name != "cnn":  # the CNN keeps torchvision's init
                module.apply(self._init_weights)
        nn.init.normal_(self.visual.type_embedding, std=c.initializer_range)

    def _init_weights(self, m):  # BERT's init
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode_image(self, images, image_mask):
        """The image half of the model: CNN + visual embedding. Its output can be cached (one
        CNN pass per image in retrieval) and passed back to forward() as `pixels`.
        images (B, 3, H, W) normalised, padded bottom/right; image_mask (B, H, W) bool, True on
        real pixels. Returns pixel tokens (B, K, hidden) and pixel_mask (B, K)."""
        # Padding is zero whatever the collate wrote, so padded pixels cannot leak into features.
        images = images * image_mask[:, None].to(images.dtype)
        tokens = self.visual(self.cnn(images))
        # A pixel token covers a 64x64 cell (32x32 without pooling); it is real if the cell's
        # top-left pixel is real (the real image is a top-left rectangle, so the cell overlaps it).
        stride = CNN_STRIDE * self.config.pixel_pool
        pixel_mask = image_mask[:, ::stride, ::stride].flatten(1)  # (B, K)
        assert pixel_mask.shape == tokens.shape[:2], "image_mask does not match the images"
        return tokens, pixel_mask

    def forward(self, input_ids, text_mask, images=None, image_mask=None, pixels=None, image_index=None,
                sample_pixel_count=None):
        """input_ids (B, T) of [CLS] text [SEP] [PAD]..; text_mask (B, T) bool, True on real tokens.
        The image comes as `images` + `image_mask` or as `pixels` = encode_image's output.
        With neither, this is exactly BERT on the text. `image_index` (B,) lets several texts
        share one image: text b is paired with image row image_index[b], so the CNN runs once
        per image. `sample_pixel_count` = n turns on pixel random sampling (training mode only).
        Returns hidden states (B, T + K, hidden) - text first, then pixels - and the pooled
        [CLS] vector (B, hidden)."""
        x = self.bert.embeddings(input_ids)  # (B, T, H)
        mask = text_mask.bool()
        if images is not None:
            pixels = self.encode_image(images, image_mask)
        if pixels is not None:
            tokens, pixel_mask = pixels
            if image_index is not None:
                tokens, pixel_mask = tokens[image_index], pixel_mask[image_index]  # (B, K, H), (B, K)
            if sample_pixel_count is not None and self.training:
                tokens, pixel_mask = sample_pixels(tokens, pixel_mask, sample_pixel_count)
            x = torch.cat([x, tokens.to(x.dtype)], dim=1)  # (B, T + K, H)
            mask = torch.cat([mask, pixel_mask], dim=1)
        # Padded text and padded pixels are masked as keys, so no real position sees them.
        hidden = self.bert.encoder(x, mask[:, None, None, :])
        pooled = self.bert.pooler(hidden[:, 0])
        return hidden, pooled

    def mlm_logits(self, hidden):  # (..., H) -> (..., vocab); pass only the masked positions
        return self.cls.predictions(hidden, self.bert.embeddings.word_embeddings.weight)

    @torch.no_grad()
    def init_rank_head_from_itm(self):
        """Start the retrieval score as ITM's log-odds (match logit - mismatch logit), which
        ranks candidates exactly as ITM's match probability does."""
        self.rank_head.weight.copy_(self.itm_head.weight[1:] - self.itm_head.weight[:1])
        self.rank_head.bias.copy_(self.itm_head.bias[1:] - self.itm_head.bias[:1])


# -----------------------------------------------------------------------------
# Weight loading: a checked copy by name


@dataclass
class LoadReport:
    source: str
    new: list  # our tensors the checkpoint did not provide (left freshly initialised)
    unused: list  # checkpoint tensors the model has no place for

    def __str__(self):
        def short(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"
        return f"loaded {self.source}\n  new (freshly initialised): {short(self.new)}\n  unused: {short(self.unused)}"


def read_state_dict(path, extras=None):
    """A state dict from a .safetensors / .bin / .pt / .pth file, or a Hugging Face folder (its
    model.safetensors, or pytorch_model.bin when that is the only file or the safetensors package is
    not installed). Never unpickles code: torch.load runs with weights_only=True. A file holding
    {"model": state dict, ...} (a training checkpoint, tools/convert_detectron.py's output) gives
    its "model"; its other entries go into `extras` (a dict) if one is passed."""
    if os.path.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
        if len(names) == 2:
            from importlib.util import find_spec  # lazily, as safetensors itself: this file needs only torch
            if find_spec("safetensors") is None:
                print(f"{path}: the safetensors package is not installed; reading pytorch_model.bin instead")
                names = names[1:]
        return read_state_dict(os.path.join(path, names[0]), extras)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading a .safetensors file needs the safetensors package: pip install "
                              f"safetensors (or download the folder's pytorch_model.bin)") from None
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        if extras is not None:
            extras.update((k, v) for k, v in state.items() if k != "model")
        return state["model"]
    return state


def copy_weights(model, state, source):
    """Copy every tensor of `state` whose name the model has; a shape mismatch is an error.
    Returns a LoadReport of what stayed new and what went unused."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(value.shape)} but the model's is "
                             f"{tuple(own[key].shape)}; the checkpoint is for a different model size")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value)
    return LoadReport(source, [k for k in own if k not in state], [k for k in state if k not in own])


def load_bert(model, path):
    """Load a Hugging Face BERT checkpoint (BertModel, BertForPreTraining or BertForMaskedLM
    layout; .safetensors or .bin; a folder or a file) into model.bert and model.cls."""
    state = {}
    for key, value in read_state_dict(path).items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith("position_ids") or key.startswith("cls.predictions.decoder."):
            continue  # a constant buffer; the decoder is tied to the word embeddings and bias
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key  # a bare BertModel checkpoint
        if key.startswith("bert.") and key not in model.state_dict():
            raise ValueError(f"{path}: checkpoint tensor {key} has no place in this model; is the "
                             f"config (layers, sizes) the checkpoint's?")
        if key.startswith("cls.") and not key.startswith(("cls.predictions.", "cls.seq_relationship.")):
            raise ValueError(f"{path}: unexpected tensor {key}; not a BERT checkpoint?")
        state[key] = value
    report = copy_weights(model, state, path)
    report.new = [k for k in report.new if not k.startswith(("cnn.", "visual."))]
    missing = [k for k in report.new if k.startswith("bert.") and not k.startswith("bert.pooler.")]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:3]}...; not a complete BERT checkpoint")
    return report


def load_cnn(model, path):
    """Load a torchvision ResNet/ResNeXt state dict (e.g. resnet50-11ad3fa6.pth) into model.cnn.
    The classifier (fc) is reported unused; every backbone tensor must be present. The file's input
    convention becomes model.config's (image_channels, image_scale, image_mean, image_std): the one
    tools/convert_detectron.py records in its output, else torchvision's (the config's defaults)."""
    own = model.state_dict()
    state, extras = {}, {}
    for key, value in read_state_dict(path, extras).items():
        if key.endswith("num_batches_tracked") and "cnn." + key not in own:
            continue  # frozen BatchNorm keeps no counter
        if not key.startswith("fc.") and "cnn." + key not in own:
            raise ValueError(f"{path}: checkpoint tensor {key} has no place in the CNN; is cnn_depth/"
                             f"cnn_groups/cnn_width_per_group the checkpoint's?")
        state[key if key.startswith("fc.") else "cnn." + key] = value
    other = {k: getattr(model.config, k) for k, v in extras.get("architecture", {}).items()
             if getattr(model.config, k) != v}
    if other:  # e.g. a 32x4d file for the 32x8d model: named before the shape errors it would cause
        raise ValueError(f"{path} holds a CNN with {extras['architecture']}; this model has {other}: build the "
                         f"model the file's way (x152: PixelBertConfig.x152(width_per_group=...))")
    report = copy_weights(model, state, path)
    report.new = [k for k in report.new if k.startswith("cnn.")]  # the rest is not this loader's business
    if report.new:
        raise ValueError(f"{path}: the checkpoint lacks {report.new[:3]}...; not a matching torchvision ResNet")
    convention = extras.get("input_convention", {k: getattr(PixelBertConfig, k) for k in PixelBertConfig.INPUT_FIELDS})
    if set(convention) != set(PixelBertConfig.INPUT_FIELDS):
        raise ValueError(f"{path}: input_convention has {sorted(convention)}, not {list(PixelBertConfig.INPUT_FIELDS)}")
    for k, v in convention.items():  # in place: the config object the caller holds (and saves) is this one
        setattr(model.config, k, v)
    model.config.__post_init__()  # checks the values and makes tuples of them
    c = model.config
    report.source += (f" (CNN input: {c.image_channels} in [0, {c.image_scale:g}], mean {c.image_mean}, "
                      f"std {c.image_std})")
    return report


# -----------------------------------------------------------------------------
# Optimisers (paper 3.4): SGD for the CNN, AdamW for the Transformer and heads


def make_optimizers(model, cnn_lr=1e-2, cnn_momentum=0.9, cnn_weight_decay=5e-4,
                    lr=1e-4, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-6, fused=None, cnn_optimizer="sgd"):
    """Returns [cnn optimiser, adamw]; the first is None when the CNN is frozen. Biases and
    normalisation weights (every 1-D parameter) get no weight decay, as in BERT.
    The paper's SGD suits an ImageNet-initialised CNN; a CNN trained from scratch (the demo)
    gets gradients too small for SGD to move it, and learns with AdamW (cnn_optimizer="adamw").
    fused=True: AdamW's update as one kernel over all parameters (CUDA and, from torch 2.4, CPU)
    instead of a Python loop of small operations per parameter; the scripts pass it."""
    groups = {(cnn, decay): [] for cnn in (True, False) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name.startswith("cnn."), p.ndim >= 2)].append(p)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(map(len, groups.values())) == len(trainable) == len({id(p) for g in groups.values() for p in g})
    cnn_groups = [{"params": groups[(True, True)], "weight_decay": cnn_weight_decay},
                  {"params": groups[(True, False)], "weight_decay": 0.0}]
    bert_groups = [{"params": groups[(False, True)], "weight_decay": weight_decay},
                   {"params": groups[(False, False)], "weight_decay": 0.0}]
    cnn_opt = None
    if groups[(True, True)] or groups[(True, False)]:
        if cnn_optimizer == "sgd":
            cnn_opt = torch.optim.SGD(cnn_groups, lr=cnn_lr, momentum=cnn_momentum)
        else:
            cnn_opt = torch.optim.AdamW(cnn_groups, lr=cnn_lr, betas=betas, eps=eps, fused=fused)
    adamw = torch.optim.AdamW(bert_groups, lr=lr, betas=betas, eps=eps, fused=fused)
    return [cnn_opt, adamw]


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# The task heads' losses (as nanoGPT's forward returns its loss, so that a benchmark times the
# very loss the scripts train). Each is a sum over the micro-batch divided by a count over the
# whole global batch (every micro-batch of every process), so gradient accumulation and the
# number of processes do not change the objective. Call them under the forward's autocast: the
# heads' matrix products run in its precision, the losses themselves in fp32.

MLM_IGNORE = -100  # the MLM label of text positions without a target (F.cross_entropy's ignore_index)


def pretraining_losses(model, hidden, pooled, mlm_labels, itm_labels, num_masked, num_pairs, tasks=("mlm", "itm")):
    """MLM and ITM (paper 3.4) of a micro-batch: hidden (B, T + K, H) and pooled (B, H) from
    forward(), mlm_labels (B, T) with MLM_IGNORE where nothing is masked, itm_labels (B,) with
    1 = matched. Returns (2,) [MLM, ITM]. An objective left out of `tasks` still joins the graph
    with weight 0, so every trained parameter gets a (zero) gradient and DDP's all-reduce sees
    the same parameters at every step."""
    masked = mlm_labels != MLM_IGNORE
    mlm_logits = model.mlm_logits(hidden[:, : mlm_labels.shape[1]][masked])  # (masked tokens, vocab)
    itm_logits = model.itm_head(pooled)  # (B, 2)
    mlm = F.cross_entropy(mlm_logits.float(), mlm_labels[masked], reduction="sum") / num_masked.clamp(min=1)
    itm = F.cross_entropy(itm_logits.float(), itm_labels, reduction="sum") / num_pairs
    return torch.stack([mlm * ("mlm" in tasks), itm * ("itm" in tasks)])


def vqa_loss(model, pooled, targets, num_questions):
    """Binary cross-entropy of the VQA head against soft targets (B, answers), summed over
    answers and questions, per question of the global batch. Returns (1,)."""
    logits = model.vqa_head(pooled)  # (B, answers)
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum")[None] / num_questions


def nlvr2_logits(model, pooled):
    """NLVR2's "pair" setting: pooled (2B, H), the rows of each example's left and right image
    in turn -> (B, 2) logits (false, true) from the two [CLS] vectors side by side."""
    return model.nlvr_head(pooled.view(-1, 2 * pooled.shape[-1]))  # (B, 2H) -> (B, 2)


def nlvr2_loss(model, pooled, labels, num_examples):
    """Cross-entropy of the NLVR2 head, summed over examples, per example of the global batch. Returns (1,)."""
    return F.cross_entropy(nlvr2_logits(model, pooled).float(), labels, reduction="sum")[None] / num_examples


def rank_scores(model, pooled):
    """The rank head on pooled [CLS] vectors (B, H) -> (B,) scores, in fp32 even under
    autocast: bf16 keeps 8 significant bits, so thousands of candidates would tie."""
    with torch.autocast(pooled.device.type, enabled=False):
        return model.rank_head(pooled.float()).squeeze(-1)


def hard_negative_loss(score, candidates, num_hard, model=None):
    """Softmax cross-entropy of ranking (paper 4.4) over the ground truth and its num_hard
    highest-scoring negatives, summed over images.
    candidates (B, C): row numbers of one image's pairs, ground truth in column 0, then its
    negatives; score(rows (n,)) -> (n,) scores of those pairs. Every candidate is scored without
    gradient to find the hardest; the ground truth and those are scored again with gradient, so
    only 1 + num_hard pairs per image are back-propagated (the paper's "gradient only through
    the 5 hardest"). model: the module that `score` runs; the choosing pass then runs it in eval
    mode (every submodule's own mode is restored after it), so that the hardest negatives are
    those the model ranks highest, not those one dropout draw happened to favour; the pass with
    gradient keeps the training mode and its dropout. The easier negatives are
    left out of the softmax, not kept in it as constants: with constants in the denominator,
    raising every trained score alike lowers the loss, so training drifts all scores up until
    the pooler's tanh saturates and [CLS] stops depending on the caption. Over the chosen
    candidates the loss is shift-invariant, as the full softmax is; the negatives it leaves out
    are the ones the model already scores lowest. (Where the model cannot tell the positive from
    its hardest negatives at all, the loss still settles at ln(1 + num_hard), every score alike.)"""
    B, C = candidates.shape
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        if model is not None:
            model.eval()
        with torch.no_grad():
            every = score(candidates.flatten()).float().view(B, C)  # (B, C)
    finally:
        for m, training in modes:  # e.g. retrieval's frozen CNN stays in eval mode inside a training model
            m.training = training
    hard = every[:, 1:].topk(min(num_hard, C - 1), dim=1).indices + 1  # (B, num_hard) columns
    chosen = torch.cat([torch.zeros_like(hard[:, :1]), hard], dim=1)  # (B, 1 + num_hard), ground truth first
    logits = score(candidates.gather(1, chosen).flatten()).float().view(B, -1)
    return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=logits.device), reduction="sum")
