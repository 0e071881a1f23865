"""
The few helpers every training script shares: torchrun setup, print0, precision, dataclass ->
flags, the learning-rate schedule and batch plan, building and wrapping the model, moving a batch
to the device, progress and metric logs. The training step itself is written out in each script;
checkpoints, resuming and preemption live in checkpoint.py.
"""

import argparse
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import re
import sys
import time
import tokenize
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import PAD_MULTIPLE, normalize_images
from metrics import EvaluationError
from model import PixelBert, PixelBertConfig, copy_weights, count_parameters, load_bert, load_cnn

# -----------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def default_device(device=""):
    """torch.device(device), or CUDA when there is a GPU, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup_distributed(device=""):
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); one process per GPU with
    NCCL, or processes on the CPU with gloo. Without torchrun: one process."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


DTYPES = ("auto", "bf16", "fp16", "fp32")


@functools.cache  # asked at every autocast with --dtype auto; the hardware does not change
def native_bf16(device):
    """Whether the device multiplies bf16 matrices in hardware: CUDA GPUs from Ampere on, CPUs
    with AMX or AVX512-BF16. Other CPUs emulate it, far slower than fp32 (docs/performance.md)."""
    if device.type == "cuda":  # by default the check also counts bf16 emulated on pre-Ampere GPUs
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a release before the argument existed
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's feature probes are private; absent in a release, assume no
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                            "_is_avx512_bf16_supported"))
    return True


def resolve_dtype(dtype, device):
    """--dtype auto (the default) -> bf16 where the device has it natively, else fp16 on a GPU
    (with GradScaler) and fp32 on a CPU. An explicit bf16 is kept, with a warning if emulated."""
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    if dtype == "bf16" and not native_bf16(device):
        print0(f"warning: this {device.type} has no native bf16 (AMX, AVX512-BF16 or an Ampere GPU): bf16 matrix "
               f"products are emulated, ~100x slower than fp32 on the CPU; --dtype auto picks fp32 here")
    return dtype


def autocast(device, dtype):
    """bf16 / fp16 autocast, or nothing for fp32 ("auto": see resolve_dtype). Matrix products then
    run in half precision (on the CPU's AMX units bf16 is several times fp32); reductions and the losses stay
    in fp32."""
    dtype = resolve_dtype(dtype, device) if dtype == "auto" else dtype
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


# -----------------------------------------------------------------------------
# Configuration: one dataclass per script, flags generated from its fields and checked before any work


class FlagParser(argparse.ArgumentParser):
    """argparse with a bad flag reported as one line that starts with the flag (a SystemExit: run
    exits with status 2) instead of the usage text followed by the error."""

    def error(self, message):
        for prefix, what in (("unrecognized arguments: ", "unknown flag"), ("the following arguments are required: ",
                                                                           "required")):
            if message.startswith(prefix):
                message = f"{message.removeprefix(prefix)}: {what}"
        raise SystemExit(f"{message.removeprefix('argument ')} (see {self.prog} --help)")


def at_least(minimum):
    """An argparse type for a count: an integer >= minimum, refused in check_config's words."""
    def count(text):
        value = int(text)  # not a number: argparse says "invalid count value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value
    return count


def refuse(flag, value, what):
    """The one-line refusal of a bad setting: the flag, its value, and what to do."""
    return SystemExit(f"--{flag.replace('_', '-')} {f'{value:g}' if isinstance(value, float) else value}: {what}")


# What a count, rate or size may be, by field name: one meaning per flag name in every script.
LIMITS = {**dict.fromkeys(("batch_size", "global_batch", "captions_per_image", "questions_per_image", "eval_images",
                           "eval_pairs", "minival_images", "score_batch", "negatives", "hard_negatives",
                           "min_answer_count", "pixel_pool", "log_every", "ckpt_every", "keep_checkpoints"), ">= 1"),
          **dict.fromkeys(("epochs", "lr"), "> 0"),
          **dict.fromkeys(("max_steps", "cnn_pretrain_epochs", "weight_decay", "cnn_weight_decay", "cnn_lr",
                           "warmup_steps", "grad_clip", "pixel_samples", "num_workers", "eval_every", "seed"), ">= 0"),
          **dict.fromkeys(("mask_prob", "itm_neg_prob", "dropout", "warmup_start", "cnn_momentum"), "in [0, 1]"),
          "image_min_size": ">= 64",  # one pixel token: the CNN's stride 32, pooled 2x2
          "image_size": ">= 32",  # one cell of the CNN's stride-32 map
          "max_text_len": ">= 3"}  # [CLS], one word piece, [SEP]
WITHIN = {">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0,
          "in [0, 1]": lambda v: 0 <= v <= 1, ">= 64": lambda v: v >= 64, ">= 32": lambda v: v >= 32,
          ">= 3": lambda v: v >= 3}

# --model x152's images (either width), unless given: shorter side 600, longer side at most 1000 (paper 4.1).
MODEL_PRESETS = {"x152": dict(image_min_size=600, image_max_size=1000),
                 "x152_32x4d": dict(image_min_size=600, image_max_size=1000)}

DEMO_MARKER = "DEMO_CORPUS.json"  # tools/synthetic.py marks the demo corpus with it
# Where a --data value's official files show under --data-root (README: Real data, layout on disk).
DATA_FILES = {"coco": ["coco/dataset_coco.json"], "coco2014": ["coco/annotations/captions_train2014.json"],
              "vg": ["vg/region_descriptions.json"],
              "coco_vg": ["coco/dataset_coco.json", "vg/region_descriptions.json"],
              "vqa": ["vqa"], "nlvr2": ["nlvr2/data"], "flickr30k": ["flickr30k/dataset_flickr30k.json"]}


def parse_config(cls, presets=None, argv=None):
    """--kebab-case flags from the dataclass fields, each with its comment as help (config_parser).
    A value comes from, in increasing priority: the field default, --model's image sizes
    (MODEL_PRESETS, for scripts with presets), the preset named by --data, the flag. --data
    defaults to demo only on the demo corpus (data_choice); --init's checkpoint decides --model
    (init_model). The training scripts then call check_config."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    given = vars(config_parser(cls, presets).parse_args(argv))
    if "data" in fields:
        given["data"] = data_choice(cls, given.get("data"), given.get("data_root", fields["data_root"]))
    preset = (presets or {}).get(given.get("data"), {})
    values = {**fields, **preset, **given}
    model = init_model(values["init"], given.get("model"), values["model"]) if values.get("init") else values["model"]
    model_preset = MODEL_PRESETS.get(model, {}) if presets is not None else {}
    return cls(**{**fields, **model_preset, **preset, **given, "model": model})


def config_parser(cls, presets=None):
    """The parser of a config dataclass: a flag per field in the groups its section comments open,
    each help the field's comment followed by its range, its default and what the presets change."""
    helps, sections = field_docs(cls)
    labelled = {**(presets or {}), **(MODEL_PRESETS if presets is not None else {})}
    parser = FlagParser(allow_abbrev=False, description=(cls.__doc__ or "").strip(), epilog=(
        "In parentheses: the range, the default, and the value under a preset (demo: with --data demo, the default on "
        "the demo corpus; x152, x152_32x4d: with that --model)." if presets is not None else None))
    group = parser
    for f in dataclasses.fields(cls):
        if f.name in sections:
            group = parser.add_argument_group(*sections[f.name])
        notes = [LIMITS[f.name]] if f.name in LIMITS else []
        notes.append("default: demo on the demo corpus, else required" if f.name == "data" and presets is not None
                     else f"default: {shown(f.default)}")
        notes += [f"{label}: {shown(values[f.name])}" for label, values in labelled.items() if f.name in values]
        text = f"{helps.get(f.name, '')} ({'; '.join(notes)})".replace("%", "%%")  # argparse formats % itself
        kwargs = dict(default=argparse.SUPPRESS, help=text)
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(f.type) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(f.type), **kwargs)
        else:
            group.add_argument(flag, type=f.type, metavar=f.type.__name__.upper(), **kwargs)
    return parser


def shown(value):
    """A default as --help shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value) if value != "" else "none"


def field_docs(cls):
    """The help of each field and the dataclass's sections, read from its source: the comment that
    ends a field's line is that field's help (continued on the comment lines right below it that
    start with "#  ", two spaces), and a comment on a line of its own ("# title: description")
    opens a section at the next field. Returns ({field: help}, {first field: (title, description)})."""
    names = {f.name for f in dataclasses.fields(cls)}
    source = inspect.getsource(cls)
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    helps, sections, field, section = {}, {}, None, None
    for number, line in enumerate(source.splitlines(), start=1):
        comment, name = comments.get(number, ""), re.match(r"\s*(\w+)\s*:", line)
        if name and name[1] in names:
            field, helps[name[1]] = name[1], comment[1:].strip()
            if section:
                sections[field], section = section, None
        elif comment and line.strip() == comment:  # a comment on a line of its own
            if comment.startswith("#  ") and field:
                helps[field] += " " + comment[1:].strip()
            else:
                title, _, description = comment[1:].partition(":")
                section, field = (title.strip(), description.strip() or None), None
    return helps, sections


def data_choice(cls, data, root):
    """--data as given, else demo where --data-root is the demo corpus, or a folder still empty
    (pretrain.py renders the corpus there). Real data must be named: the demo preset (the tiny
    model, small images, its rates) would otherwise train on it without a word."""
    real = os.path.isdir(root) and any(os.scandir(root)) and not os.path.exists(os.path.join(root, DEMO_MARKER))
    if not real or data not in (None, "demo"):
        return data or "demo"
    choices = [c for c in typing.get_args(cls.__dataclass_fields__["data"].type) if c in DATA_FILES]
    found = sorted((c for c in choices if all(os.path.exists(os.path.join(root, p)) for p in DATA_FILES[c])),
                   key=lambda c: -len(DATA_FILES[c]))  # coco_vg (the paper's) before its parts
    what = (f"pass --data {found[0]}" + (f" (also there: {', '.join(found[1:])})" if found[1:] else "") if found else
            f"choose --data from {', '.join(choices)} (none of their files is there: README, Real data)")
    if data == "demo":
        raise refuse("data", "demo", f"{root} is not the demo corpus (it has no {DEMO_MARKER}); {what}")
    raise refuse("data-root", root, f"real data (not the demo corpus) needs --data to say which: {what}")


# x152 is ResNeXt-152 32x8d, x152_32x4d the same depth at half the group width: the paper does not say which
# (PixelBertConfig.x152).
MODELS = {"tiny": PixelBertConfig.tiny, "r50": PixelBertConfig.r50, "x152": PixelBertConfig.x152,
          "x152_32x4d": functools.partial(PixelBertConfig.x152, width_per_group=4)}
ARCHITECTURE = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "cnn_depth", "cnn_groups",
                "cnn_width_per_group", "cnn_width")


def checkpoint_model_config(path):
    """A checkpoint's model_config, read without its tensors (memory-mapped), or None when it does
    not load: checkpoint.init_and_tokenizer then says why."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return state.get("model_config") if isinstance(state, dict) else None


def init_model(path, asked, default):
    """--model of a run from --init: the preset whose architecture the checkpoint holds ("custom"
    for none). A trained model cannot change its architecture, so a --model given that differs is
    refused rather than ignored."""
    saved = checkpoint_model_config(path)
    if saved is None:
        return asked or default
    name = next((n for n, preset in MODELS.items() if all(saved.get(k) == getattr(preset(), k) for k in ARCHITECTURE)),
                "custom")
    if asked and asked != name:
        raise refuse("model", asked, f"--init {path} holds a {name} model ({saved.get('num_layers')} layers of "
                                     f"{saved.get('hidden_size')}, ResNet-{saved.get('cnn_depth')}), which --init "
                                     f"decides: drop --model, or --init a {asked} checkpoint")
    return name


def check_config(cfg):
    """Every setting of a training script, checked before any work: ranges (LIMITS), image sizes
    and text length within what the model takes, --lr-milestones, and the weights a paper-scale
    run starts from. A bad one raises refuse's one line."""
    values = dataclasses.asdict(cfg)
    for name, value in values.items():
        if name in LIMITS and not (math.isfinite(value) and WITHIN[LIMITS[name]](value)):
            raise refuse(name, value, f"must be {LIMITS[name]}")
    if "image_max_size" in values and cfg.image_max_size < cfg.image_min_size:
        raise refuse("image_max_size", cfg.image_max_size, f"must be >= --image-min-size ({cfg.image_min_size})")
    if "lr_milestones" in values:
        try:
            assert all(float(m) > 0 for m in cfg.lr_milestones.split(",") if m)
        except (ValueError, AssertionError):
            raise refuse("lr_milestones", cfg.lr_milestones, "comma-separated epochs > 0, e.g. 25,35") from None
    if "init" in values:
        check_weights(cfg)
        model_config = (cfg.init and checkpoint_model_config(cfg.init)) or dataclasses.asdict(
            MODELS[cfg.model](**fresh_model_fields(cfg)))
        check_model_fits(cfg, model_config)
        if values.get("fold_batchnorm") and model_config.get("norm") != "frozen":
            raise SystemExit(f"--fold-batchnorm: the {cfg.model} model's BatchNorm uses batch statistics (norm "
                             f"{model_config.get('norm')!r}); only fixed ImageNet statistics (norm 'frozen': r50, "
                             f"x152 from their weights) fold into the convolutions: drop --fold-batchnorm")


def check_weights(cfg):
    """A paper-scale model (r50, x152) on real data starts from --bert and --cnn, or --init:
    from random weights (its CNN with ImageNet's BatchNorm replaced by identities) it would spend
    its whole budget for nothing, so that takes an explicit --from-scratch."""
    if cfg.init and (cfg.bert or cfg.cnn):
        raise refuse("init", cfg.init, "holds every weight, so --bert / --cnn would be ignored: drop them")
    if cfg.init and cfg.from_scratch:
        raise refuse("init", cfg.init, "and --from-scratch contradict each other: drop one")
    missing = [f"--{name}" for name in ("bert", "cnn") if not getattr(cfg, name)]
    if getattr(cfg, "cnn_pretrain_epochs", 0):
        missing = [m for m in missing if m != "--cnn"]  # pretrain.py trains the CNN first
    if cfg.data != "demo" and cfg.model != "tiny" and not cfg.init and missing and not cfg.from_scratch:
        raise refuse("model", cfg.model, f"without {' and '.join(missing)} (or --init) the model starts from random "
                                         f"weights: pass {' and '.join(missing)} (README: Weights), or --from-scratch "
                                         f"if that is meant")


def check_model_fits(cfg, model_config):
    """--max-text-len within the model's position table, and with learned pixel positions, the
    largest image within its grid (model_config: --init's, else the one build_model would make,
    whose grid fresh_model_fields sizes to fit)."""
    if cfg.max_text_len > model_config["max_position_embeddings"]:
        raise refuse("max_text_len", cfg.max_text_len, f"the model has {model_config['max_position_embeddings']} "
                                                       f"text positions: use at most that")
    cell = 32 * model_config["pixel_pool"]  # image pixels per pixel-token side
    grid = model_config.get("max_pixel_grid", 32)
    if model_config.get("visual_position") and pixel_grid(cfg.image_max_size, model_config["pixel_pool"]) > grid:
        raise refuse("image_max_size", cfg.image_max_size, f"the learned pixel positions cover {grid} tokens of {cell} "
                                                           f"px a side: use at most {grid * cell}")


def pixel_grid(image_max_size, pixel_pool):
    """Pixel tokens along the longer side of the largest image a batch can hold: at most
    image_max_size pixels, padded to a multiple of PAD_MULTIPLE, then the CNN's stride 32 and the
    pixel_pool x pixel_pool max-pool, each rounded up (1333 px, pool 1: 1344 px -> 42 tokens)."""
    padded = -(-image_max_size // PAD_MULTIPLE) * PAD_MULTIPLE
    return -(-padded // (32 * pixel_pool))


def fresh_model_fields(cfg):
    """The PixelBertConfig fields that a run without --init takes from its flags: the visual
    embedding's, a position table that covers the grid of --image-max-size (never smaller than
    the default 32 rows, so the tables of smaller images stay those of the default config), and
    for --from-scratch without --cnn, BatchNorm with batch statistics (fixed statistics would
    keep their identity values, so the CNN learns batch statistics instead, as the tiny model's
    does)."""
    fields = dict(pixel_pool=cfg.pixel_pool, pixel_proj_first=cfg.pixel_proj_first,
                  visual_layernorm=cfg.visual_layernorm, visual_position=cfg.visual_position,
                  max_pixel_grid=max(PixelBertConfig.max_pixel_grid, pixel_grid(cfg.image_max_size, cfg.pixel_pool)))
    if getattr(cfg, "from_scratch", False) and not cfg.cnn:
        fields["norm"] = "batch"
    return fields


# -----------------------------------------------------------------------------
# Optimisation schedule and batch plan


def lr_factor(step, warmup_steps, warmup_start, milestones):
    """Multiplier of every base learning rate at `step`: a linear warm-up from warmup_start to 1
    over warmup_steps, and a division by 10 at each milestone (in steps)."""
    factor = 0.1 ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        factor *= warmup_start + (1 - warmup_start) * step / warmup_steps
    return factor


def schedule(epochs, max_steps, lr_milestones, steps_per_epoch):
    """Total optimiser steps (--max-steps caps --epochs) and the lr milestones, given in epochs
    ("25,35"), converted to steps."""
    total = int(epochs * steps_per_epoch)
    total = min(total, max_steps) if max_steps else total
    return total, [int(float(m) * steps_per_epoch) for m in lr_milestones.split(",") if m]


def batch_plan(global_batch, batch_size, world_size, texts_per_image, flag):
    """Accumulation steps and images per micro-batch: global batch = batch_size (texts per
    process and micro-step) x accumulation x processes, and `texts_per_image` texts share each
    image (one CNN pass). `flag` names that setting in the error."""
    accum, rem = divmod(global_batch, batch_size * world_size)
    if rem or accum == 0:
        raise SystemExit(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size} "
                         f"x {world_size} processes")
    images, rem = divmod(batch_size, texts_per_image)
    if rem:
        raise SystemExit(f"--batch-size {batch_size} is not a multiple of {flag} {texts_per_image}")
    return accum, images


# -----------------------------------------------------------------------------
# The model of a run: built, initialised, resumed, wrapped


def model_preset(name, **overrides):
    """The PixelBertConfig of a --model preset (tiny, r50, x152) with some fields changed."""
    if name not in MODELS:
        raise SystemExit(f"--model {name}: choose one of {', '.join(MODELS)}")
    return MODELS[name](**overrides)


def build_model(cfg, heads, vocab_size, num_answers=0, init_state=None):
    """PixelBert for a script's config, with a report of what was loaded and what stayed new.
    From --init (`init_state`: that checkpoint, loaded by checkpoint.init_and_tokenizer), the
    trunk's architecture is the checkpoint's own (only the heads and dropout are this run's);
    otherwise it is the --model preset with the fields the script's flags set (fresh_model_fields),
    initialised from --bert and --cnn (or, with --from-scratch, not). --cnn-lr 0 (where a script has it)
    fixes the CNN."""
    if cfg.init:
        state = init_state
        if state["model_config"]["vocab_size"] != vocab_size:
            raise SystemExit(f"{cfg.init} has {state['model_config']['vocab_size']} word pieces, this run's "
                             f"vocabulary {vocab_size}: pass the --vocab it was trained with")
        model_cfg = PixelBertConfig.saved(state["model_config"], heads=heads, num_answers=num_answers,
                                          dropout=cfg.dropout)
        model = PixelBert(model_cfg)
        print0(copy_weights(model, state["model"], cfg.init))
    else:
        model = PixelBert(model_preset(cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, heads=heads,
                                       num_answers=num_answers, **fresh_model_fields(cfg)))
        if cfg.bert:
            print0(load_bert(model, cfg.bert))
        if cfg.cnn:
            print0(load_cnn(model, cfg.cnn))
    if getattr(cfg, "cnn_lr", None) == 0:
        # --cnn-lr 0 keeps the CNN's weights as loaded. Weights that never move need no gradient:
        # autograd then stops at the pixel tokens and skips the CNN's backward pass, and
        # make_optimizers gives them no optimiser. BatchNorm still normalises with batch
        # statistics and updates its running ones (retrieval's frozen CNN keeps both fixed).
        model.cnn.requires_grad_(False)
    return model


def print_model_size(name, model):
    print0(f"model: {name}, {count_parameters(model):,} parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained")


def wrap_model(model, ddp, compile=False):
    """DistributedDataParallel across processes, then torch.compile if asked. Keep the raw
    module for saving, evaluation and the heads."""
    if ddp.world_size > 1:
        model = DDP(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def batch_to_device(batch, device, channels_last, model_config=None):
    """Tensors to the device; images from uint8 to normalised floats there (a quarter of the
    bytes cross the bus), in channels-last layout if asked. model_config: the model's
    PixelBertConfig, whose input convention (channel order, scale, mean, std: what its CNN's
    weights expect) normalize_images applies; pass it always (None: torchvision's ImageNet RGB)."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "images" in batch:
        batch["images"] = normalize_images(batch["images"], model_config)
        if channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    return batch


# -----------------------------------------------------------------------------
# What a run shows and writes as it goes


class Progress:
    """A training loop's progress on rank 0. On a terminal: a tqdm bar whose postfix shows the
    latest logged figures. Written to a file (a cluster job's log), a bar redraws itself into
    one ever-growing line, so there each log step prints one plain line instead, e.g.
    "step 20/800 | mlm 3.545 | itm 0.688 | lr 5.87e-04 | pairs_s 1347.8"."""

    def __init__(self, total, initial, enabled):
        self.total, self.enabled = total, enabled
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                        dynamic_ncols=True)

    def update(self):
        self.bar.update()

    def show(self, step, **figures):
        if not self.bar.disable:
            self.bar.set_postfix(**figures)
        elif self.enabled:
            print(f"step {step}/{self.total} | " + " | ".join(f"{k} {v}" for k, v in figures.items()), flush=True)

    def write(self, line):
        if self.enabled:
            self.bar.write(line)

    def close(self):
        self.bar.close()


class BadImages:
    """--skip-bad-images: each unreadable image (data.collate left it out of its batch) is
    reported once, with its file and the reason, and counted; report() prints the total."""

    def __init__(self):
        self.messages = set()

    def note(self, batch):
        """Prints the batch's new bad images and returns the batch without their list, so that a
        loop can read its loader through map(bad_images.note, loader)."""
        for message in batch.pop("bad_images", []):
            if message not in self.messages:
                self.messages.add(message)
                print(f"--skip-bad-images: skipped {message}", flush=True)
        return batch

    def report(self):
        """The number of distinct bad images seen by all processes (printed by rank 0)."""
        seen = [self.messages]
        if dist.is_initialized():
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, self.messages)
        count = len(set().union(*seen))
        print0(f"--skip-bad-images: {count} unreadable image{'s' * (count != 1)} skipped")
        return count


class MetricLog:
    """One JSON object per line in <run folder>/metrics.jsonl (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.file = open(path, "a") if enabled else None
        self.start = time.time()

    def write(self, **metrics):
        if self.file:
            metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
            self.file.write(json.dumps({"time": round(time.time() - self.start, 2), **metrics}) + "\n")
            self.file.flush()


def write_json(path, obj):
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# The scripts' top level: every error ends a run with one line, never a stack trace

EXIT_BAD_DATA, EXIT_BAD_FLAG, EXIT_INTERRUPTED = 1, 2, 130


def run(main, argv=None):
    """Each script's `__main__` block: main(argv), with every error reported as one line on
    stderr ("error: <what, naming the file, record or flag, and what to do>") and an exit status
    that says its kind: 2 for a bad flag (a SystemExit whose message starts with the flag,
    "--batch-size 0: ..."), 1 for bad data or a failed run, 130 for Ctrl-C. An integer SystemExit
    passes through unchanged: 0, argparse's 2, and preemption's 75 (checkpoint.EXIT_PREEMPTED).
    An error no check foresaw is one line too, with its type; PIXELBERT_TRACEBACK=1 shows its stack."""
    try:
        return main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        message = str(e.code)
        fail(message, EXIT_BAD_FLAG if message.startswith("--") else EXIT_BAD_DATA)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C); a run continues from its last checkpoint with --resume", EXIT_INTERRUPTED)
    except Exception as e:
        if os.environ.get("PIXELBERT_TRACEBACK"):
            raise
        fail(error_line(e), EXIT_BAD_DATA)


def fail(message, status):
    """Print one line to stderr (prefixed with the rank under torchrun) and exit with `status`."""
    message = " ".join(message.split("\n")).strip()
    message = message[len("error: "):] if message.startswith("error: ") else message
    rank = f"rank {os.environ.get('RANK', 0)}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    print(f"{rank}error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def error_line(error):
    """The message of an exception that reached the top: the errors these scripts raise on
    purpose (data.DataError, metrics.EvaluationError, ValueError, OSError) already name the file
    or record and what to do; anything else is shown with its type as unexpected."""
    text = worker_message(str(error))
    if isinstance(error, OSError) and error.filename and error.strerror:  # not "[Errno 2] No such file ...: 'x'"
        text = f"{error.filename}: {error.strerror}"
    if isinstance(error, (ValueError, OSError, EvaluationError)):  # data.DataError is a ValueError
        return text or type(error).__name__
    return (f"{type(error).__name__}: {text} (unexpected: please report it; PIXELBERT_TRACEBACK=1 shows where it "
            f"happened)")


def worker_message(text):
    """A DataLoader worker's exception comes back as the same type with the worker's whole
    traceback as its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ... data.DataError: <message>"): only the original message is kept."""
    if "Original Traceback" not in text:
        return text
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        found = re.match(r"[A-Za-z_][\w.]*: ", lines[i])  # the traceback's last line: "module.Type: message"
        if found:
            return " ".join([lines[i][found.end():], *lines[i + 1:]])
    return lines[-1]
