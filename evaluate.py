"""
Checkpoint evaluation, prediction and inference: the held-out predictions the fine-tuning
scripts select their best epoch with, full-protocol retrieval scoring, submission files, and a
command line.

    python evaluate.py vqa --checkpoint runs/demo_vqa/best.pt --data-root data/demo --split minival
    python evaluate.py vqa --checkpoint CKPT --data-root ROOT --split test-dev   # writes a submission file
    python evaluate.py vqa-score --predictions P.json --questions Q.json --annotations A.json
    python evaluate.py nlvr2 --checkpoint runs/demo_nlvr/best.pt --data-root data/demo --split dev
    python evaluate.py nlvr2-score --predictions P.csv --labels dev.json
    python evaluate.py match --checkpoint runs/demo_pretrain/final.pt --image IMG --text "a red circle"
    python evaluate.py ask --checkpoint runs/demo_vqa/best.pt --image IMG --question "what colour is the circle?"
    python evaluate.py attention --checkpoint CKPT --image IMG --text "..." [--layer 0] [--out map.png]
    python evaluate.py retrieval --checkpoint runs/demo_retrieval/best.pt --data-root data/demo --dataset flickr30k
    torchrun --nproc_per_node=8 evaluate.py retrieval --checkpoint CKPT --data-root ROOT --dataset coco --coco-1k-folds

The metrics themselves (VQA accuracy as the official tool computes it, NLVR2 accuracy and
consistency, retrieval recall) live in metrics.py, which needs only the standard library.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint as checkpoint_file  # here `checkpoint` is the path of the checkpoint being evaluated
import common
import data
from metrics import (VQA_RULES, EvaluationError, check_predictions, nlvr2_score, read_json_file, retrieval_recall,
                     retrieval_recall_folds, score_files, score_nlvr2_files, vqa_score, write_nlvr2_predictions)
from model import CNN_STRIDE, PixelBert, PixelBertConfig, copy_weights, nlvr2_logits, rank_scores


# -----------------------------------------------------------------------------
# Predictions over a held-out set: used by the fine-tuning scripts (model selection each epoch)
# and by the checkpoint commands below


def encode_each_alone(model, images, image_mask):
    """model.encode_image of a collated batch, each image encoded as it would be alone. A batch
    pads every image with zeros to its largest member, and the CNN's receptive field reaches into
    that padding along an image's bottom and right borders: next to a larger image, the same
    image gets slightly different features. So images are encoded in groups of equal own padded
    size (their real extent rounded up to data.PAD_MULTIPLE), cropped to it, and their tokens put
    back at their cells of the batch's grid; the cells beyond an image stay masked. Predictions
    then do not depend on the batch size or the number of processes.
    images (B, 3, H, W), image_mask (B, H, W) -> tokens (B, K, hidden), pixel_mask (B, K)."""
    stride = CNN_STRIDE * model.config.pixel_pool  # image pixels per pixel-token side
    B, _, H, W = images.shape
    heights, widths = image_mask[:, :, 0].sum(1).tolist(), image_mask[:, 0, :].sum(1).tolist()  # real extent
    own = [(-(-h // data.PAD_MULTIPLE) * data.PAD_MULTIPLE, -(-w // data.PAD_MULTIPLE) * data.PAD_MULTIPLE)
           for h, w in zip(heights, widths)]
    tokens, pixel_mask = None, torch.zeros(B, -(-H // stride), -(-W // stride), dtype=torch.bool, device=images.device)
    for h, w in sorted(set(own)):
        rows = [i for i in range(B) if own[i] == (h, w)]
        group_tokens, group_mask = model.encode_image(images[rows, :, :h, :w], image_mask[rows, :h, :w])
        if tokens is None:
            tokens = group_tokens.new_zeros(*pixel_mask.shape, group_tokens.shape[-1])  # (B, grid h, grid w, hidden)
        gh, gw = -(-h // stride), -(-w // stride)
        tokens[rows, :gh, :gw] = group_tokens.view(len(rows), gh, gw, -1)
        pixel_mask[rows, :gh, :gw] = group_mask.view(len(rows), gh, gw)
    return tokens.flatten(1, 2), pixel_mask.flatten(1)


def predict_vqa(model, loader, answers, ddp, dtype, channels_last=True):
    """Every question of the loader's dataset -> {"question_id", "answer"} (the submission
    format), gathered from all processes. The most likely answer of the vocabulary wins."""
    model.eval()
    predictions = []
    with torch.no_grad():
        for batch in loader:
            batch = common.batch_to_device(batch, ddp.device, channels_last, model.config)
            with common.autocast(ddp.device, dtype):
                pixels = encode_each_alone(model, batch["images"], batch["image_mask"])
                _, pooled = model(batch["input_ids"], batch["text_mask"], pixels=pixels, image_index=batch["image_index"])
                best = model.vqa_head(pooled).argmax(-1)
            predictions += [{"question_id": int(q), "answer": answers[int(a)]}
                            for q, a in zip(batch["question_id"].tolist(), best.tolist())]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    return predictions


def vqa_eval_loader(dataset, images_per_batch, ddp, num_workers):
    """Each image once with all of its questions; images split across processes."""
    firsts = dataset.first_questions()[ddp.rank:: ddp.world_size]
    return torch.utils.data.DataLoader(dataset, batch_size=images_per_batch, sampler=[(0, int(i)) for i in firsts],
                                       collate_fn=data.collate, num_workers=num_workers)


def predict_nlvr2(model, loader, identifiers, ddp, dtype, channels_last=True):
    """{identifier: "True" | "False"} for every example of the loader, gathered from all processes."""
    model.eval()
    predictions = {}
    with torch.no_grad():
        for batch in loader:
            batch = common.batch_to_device(batch, ddp.device, channels_last, model.config)
            with common.autocast(ddp.device, dtype):
                pixels = encode_each_alone(model, batch["images"], batch["image_mask"])  # (2B, K, hidden): left, right
                _, pooled = model(batch["input_ids"], batch["text_mask"], pixels=pixels)
                true = nlvr2_logits(model, pooled).argmax(-1)
            predictions.update({identifiers[i]: str(bool(t)) for i, t in zip(batch["index"].tolist(), true.tolist())})
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = {k: v for part in gathered for k, v in part.items()}
    return predictions


def nlvr2_eval_loader(dataset, batch_size, ddp, num_workers):
    """Every example once, split across processes."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=range(ddp.rank, len(dataset),
                                                                                      ddp.world_size),
                                       collate_fn=data.collate_nlvr2, num_workers=num_workers)


# -----------------------------------------------------------------------------
# Full-protocol retrieval scoring: every image against every caption


@torch.no_grad()
def encode_images(model, root, paths, rows, min_size, max_size, device, dtype="auto", num_workers=2,
                  channels_last=True, image_batch=32):
    """Pixel tokens of the images `rows` of `paths`: a list of (K_i, hidden) tensors (only the
    real tokens), one CNN pass per image. Images are batched only with images of the same padded
    size, so each is encoded exactly as it would be alone: a larger neighbour's padding would
    change the CNN's features along the border (its receptive field reaches into the padding)."""
    dataset = torch.utils.data.Subset(data.ImageFiles(root, paths, min_size, max_size), list(rows))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    position = {row: k for k, row in enumerate(rows)}
    pixels, buckets = [None] * len(rows), {}

    def flush(shape):
        batch = data.collate([{"image": image} for _, image in buckets[shape]])
        batch = common.batch_to_device(batch, device, channels_last, model.config)
        with common.autocast(device, dtype):
            tokens, pixel_mask = model.encode_image(batch["images"], batch["image_mask"])
        for (row, _), t, m in zip(buckets.pop(shape), tokens, pixel_mask):
            pixels[position[row]] = t[m].float()  # (K_i, hidden), raster order
    for row, image in loader:
        shape = tuple(-(-s // data.PAD_MULTIPLE) for s in image.shape[1:])
        buckets.setdefault(shape, []).append((row, image))
        if len(buckets[shape]) == image_batch:
            flush(shape)
    for shape in list(buckets):
        flush(shape)
    return pixels


def caption_batches(captions, pairs_per_batch, device):
    """All captions as padded (input_ids, text_mask) batches, prepared once. Sorted by length,
    so a batch's padding is small; yields (caption rows, input_ids, text_mask)."""
    order = sorted(range(len(captions)), key=lambda c: len(captions.input_ids(c)))
    batches = []
    for k in range(0, len(order), pairs_per_batch):
        rows = order[k: k + pairs_per_batch]
        batch = data.collate([{"input_ids": captions.input_ids(c)} for c in rows])
        batches.append((torch.tensor(rows, device=device), batch["input_ids"].to(device),
                        batch["text_mask"].to(device)))
    return batches


@torch.no_grad()
def score_images(model, pixels, batches, num_captions, dtype="auto", bar=None):
    """(len(pixels), num_captions) scores of cached pixel tokens against every caption: the
    transformer alone. Each batch pairs one image with up to pairs_per_batch captions."""
    device = batches[0][1].device
    scores = torch.empty(len(pixels), num_captions, device=device)
    for r, tokens in enumerate(pixels):
        tokens = tokens.to(device)[None]  # (1, K, hidden)
        pixel_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        for rows, input_ids, text_mask in batches:
            with common.autocast(device, dtype):
                _, pooled = model(input_ids, text_mask, pixels=(tokens, pixel_mask),
                                  image_index=torch.zeros(len(rows), dtype=torch.long, device=device))
            scores[r, rows] = rank_scores(model, pooled)
            if bar is not None:
                bar.update(len(rows))
    return scores


def retrieval_scores(model, root, captions, ddp, min_size, max_size, dtype="auto", pairs_per_batch=1024,
                     num_workers=2, channels_last=True, progress=True):
    """The full protocol: (I, C) scores of every image of `captions` (a data.RetrievalCaptions)
    against every caption, on every process. Process r encodes and scores images r, r + W, ...;
    the rows are gathered at the end. Returns the scores and the seconds spent encoding images
    and in the transformer."""
    model.eval()
    I, C, W = len(captions.image_paths), len(captions), ddp.world_size
    rows = range(ddp.rank, I, W)
    sync = torch.cuda.synchronize if ddp.device.type == "cuda" else (lambda: None)
    t0 = time.time()
    pixels = encode_images(model, root, captions.image_paths, rows, min_size, max_size, ddp.device, dtype,
                           num_workers, channels_last)
    sync()
    t1 = time.time()
    batches = caption_batches(captions, pairs_per_batch, ddp.device)
    bar = tqdm(total=len(rows) * C, disable=not (progress and ddp.is_main), unit="pair", unit_scale=True,
               dynamic_ncols=True, desc=f"scoring {I}x{C}" + (f" ({W} processes)" if W > 1 else ""),
               mininterval=0.1 if sys.stderr.isatty() else 60)  # in a log file: one redraw a minute
    mine = score_images(model, pixels, batches, C, dtype, bar)
    bar.close()
    sync()
    t2 = time.time()
    if W > 1:  # equal shapes for all_gather: pad every process to the largest share
        padded = torch.zeros(-(-I // W), C, device=ddp.device)
        padded[: len(rows)] = mine
        gathered = [torch.empty_like(padded) for _ in range(W)]
        dist.all_gather(gathered, padded)
        mine = torch.empty(I, C, device=ddp.device)
        for r in range(W):
            mine[r::W] = gathered[r][: len(range(r, I, W))]
    return mine.cpu(), {"encode_s": t1 - t0, "transformer_s": t2 - t1, "total_s": time.time() - t0}


# -----------------------------------------------------------------------------
# The model a checkpoint holds, for every command below


def checkpoint_model(state, device, extra_heads=()):
    """A loaded checkpoint's model (its own config and weights) on `device` in eval mode, and the
    tokenizer of the vocabulary saved with it. extra_heads: heads the checkpoint has no weights
    for, added freshly initialised (every other tensor must still fit)."""
    model = PixelBert(PixelBertConfig.saved(state["model_config"],
                                            heads=tuple(state["model_config"]["heads"]) + tuple(extra_heads)))
    if extra_heads:
        copy_weights(model, state["model"], "checkpoint")
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), data.Tokenizer(state["vocab"], state["config"]["max_text_len"])


def evaluation_setup(state, device, dtype, extra_heads=()):
    """What a checkpoint evaluation starts with: the process group (one process, or each of
    torchrun's), the resolved --dtype, and the checkpoint's model (checkpoint_model) in
    channels-last layout, with its tokenizer."""
    ddp = common.setup_distributed(device)
    model, tokenizer = checkpoint_model(state, ddp.device, extra_heads)
    return ddp, common.resolve_dtype(dtype, ddp.device), model.to(memory_format=torch.channels_last), tokenizer


# -----------------------------------------------------------------------------
# Evaluating a fine-tuned VQA checkpoint


def evaluate_vqa_checkpoint(checkpoint, data_root, split, out=None, batch_size=32, num_workers=2, device="",
                            dtype="auto", minival_images=None, ans2label=None, vqa_rules="current"):
    """Predict every question of `split` with the checkpoint's own answer vocabulary. Splits
    with answers (val, minival, train...) return the official accuracy; test-dev and test write
    the submission file (every test2015 question) to `out` and return its path. minival is
    the checkpoint's own held-out set unless `minival_images` says otherwise."""
    state = checkpoint_file.load_checkpoint(checkpoint)
    if state.get("task") != "vqa" or "answers" not in state:
        raise EvaluationError(f"{checkpoint}: not a VQA checkpoint (task {state.get('task')!r}); "
                              f"use best.pt or final.pt from a finetune_vqa.py run")
    answers, num_answers = state["answers"], state["model_config"]["num_answers"]
    if len(answers) != num_answers:
        raise EvaluationError(f"{checkpoint}: {len(answers)} answers saved for a head of {num_answers}")
    if ans2label is not None:
        given = sorted(read_json_file(ans2label, "answer map").items(), key=lambda kv: kv[1])
        if [a for a, _ in given] != answers:
            raise EvaluationError(f"{ans2label} does not match the answer vocabulary saved in {checkpoint}; "
                                  f"use the ans2label.json of the run that wrote this checkpoint")
    ddp, dtype, model, tokenizer = evaluation_setup(state, device, dtype)
    minival_images = minival_images or state["config"]["minival_images"]
    questions, annotations = data.read_vqa(data_root, split, minival_images)
    sizes = state["config"]["image_min_size"], state["config"]["image_max_size"]
    dataset = data.VQAQuestions(data_root, questions, annotations, tokenizer, {a: i for i, a in enumerate(answers)},
                                *sizes, questions_per_image=0)
    predictions = predict_vqa(model, vqa_eval_loader(dataset, batch_size, ddp, num_workers), answers, ddp, dtype)
    if annotations:
        return vqa_score(predictions, annotations, f"{split} predictions", rules=vqa_rules)
    out = out or os.path.join(os.path.dirname(checkpoint), f"vqa_{split}_submission.json")
    if ddp.is_main:
        order = {q["question_id"]: i for i, q in enumerate(questions)}
        predictions.sort(key=lambda p: order[p["question_id"]])
        check_predictions(predictions, list(order), out)  # every test2015 question, once
        with open(out, "w") as f:
            json.dump(predictions, f)
    return out


# -----------------------------------------------------------------------------
# Evaluating a fine-tuned NLVR2 checkpoint


def evaluate_nlvr2_checkpoint(checkpoint, data_root, split, out=None, batch_size=16, num_workers=2, device="",
                              dtype="auto"):
    """Predict every example of `split` (dev or test1, whose labels are public), write the
    predictions in the official CSV format to `out` (default: beside the checkpoint) and return
    the official accuracy and consistency with the file's path."""
    state = checkpoint_file.load_checkpoint(checkpoint)
    if state.get("task") != "nlvr":
        raise EvaluationError(f"{checkpoint}: not an NLVR2 checkpoint (task {state.get('task')!r}); "
                              f"use best.pt or a ckpt_*.pt from a finetune_nlvr.py run")
    ddp, dtype, model, tokenizer = evaluation_setup(state, device, dtype)
    records = data.read_nlvr2(data_root, split)
    dataset = data.NLVR2Examples(data_root, records, tokenizer, state["config"]["image_min_size"],
                                 state["config"]["image_max_size"])
    identifiers = [r["identifier"] for r in records]
    predictions = predict_nlvr2(model, nlvr2_eval_loader(dataset, batch_size, ddp, num_workers), identifiers, ddp,
                                dtype)
    out = out or os.path.join(os.path.dirname(checkpoint), f"nlvr2_{split}_predictions.csv")
    if ddp.is_main:
        write_nlvr2_predictions(out, [(i, predictions[i] == "True") for i in identifiers])
    return {**nlvr2_score(predictions, records, f"{split} predictions"), "predictions": out}


# -----------------------------------------------------------------------------
# Evaluating a retrieval checkpoint: the full protocol


def evaluate_retrieval_checkpoint(checkpoint, data_root, dataset, split="test", coco_1k_folds=False, max_images=0,
                                  out=None, pairs_per_batch=1024, num_workers=2, device="", dtype="auto",
                                  save_scores=None):
    """Every image of the split scored against every caption (Karpathy splits; Flickr30K test:
    1K x 5K, COCO test: 5K x 25K), R@1/5/10 both ways, and with coco_1k_folds also the mean
    over the five 1K folds. A pre-training checkpoint is scored zero-shot, by its ITM match
    log-odds. The result (with wall time and pairs per second) is written as JSON to `out`,
    by default retrieval_<dataset>_<split>.json beside the checkpoint."""
    start = time.time()
    state = checkpoint_file.load_checkpoint(checkpoint)
    keys = state.get("model", {})
    if "rank_head.weight" not in keys and "itm_head.weight" not in keys or "model_config" not in state:
        raise EvaluationError(f"{checkpoint}: neither a retrieval nor a pre-training checkpoint (no rank or ITM "
                              f"head); use best.pt from finetune_retrieval.py or final.pt from pretrain.py")
    zero_shot = "rank_head.weight" not in keys
    ddp, dtype, model, tokenizer = evaluation_setup(state, device, dtype, ("rank",) if zero_shot else ())
    if zero_shot:
        model.init_rank_head_from_itm()  # ITM's match log-odds ranks like its match probability
    entries = data.retrieval_entries(data_root, dataset, split)
    captions = data.RetrievalCaptions(entries[: max_images or None], tokenizer)
    sizes = state["config"]["image_min_size"], state["config"]["image_max_size"]
    scores, times = retrieval_scores(model, data_root, captions, ddp, *sizes, dtype, pairs_per_batch, num_workers)
    I, C = scores.shape
    result = {"checkpoint": checkpoint, "dataset": dataset, "split": split, "images": I, "captions": C, "pairs": I * C,
              **{k: round(v, 2) for k, v in retrieval_recall(scores, captions.caption_image).items()}}
    if coco_1k_folds:
        folds = retrieval_recall_folds(scores, captions.caption_image)
        result["1k_folds"] = {k: round(v, 2) for k, v in folds.items()}
    result.update(processes=ddp.world_size, device=str(ddp.device), dtype=dtype,
                  wall_s=round(time.time() - start, 2), scoring_s=round(times["total_s"], 2),
                  pairs_per_s=round(I * C / times["total_s"], 1),
                  transformer_pairs_per_s=round(I * C / times["transformer_s"], 1))
    if ddp.is_main:
        out = out or os.path.join(os.path.dirname(checkpoint), f"retrieval_{dataset}_{split}.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        if save_scores:
            torch.save({"scores": scores, "caption_image": torch.as_tensor(captions.caption_image),
                        "image_paths": captions.image_paths}, save_scores)
    return result


# -----------------------------------------------------------------------------
# Inference, from Python and the command line: ITM match probabilities and VQA answers for images
# (PIL images or files) and texts, in batches; attention maps (paper Figure 3)

HEAD_SOURCES = {"itm": "a pre-training checkpoint (pretrain.py's final.pt)",
                "vqa": "a VQA checkpoint (finetune_vqa.py's best.pt)"}


def load_for_inference(checkpoint, head=None, device=""):
    """A checkpoint's model in eval mode on `device`, with its own tokenizer (the vocabulary
    saved in it). `head` ("itm" or "vqa"), if given, must be one of the model's heads."""
    state = checkpoint_file.load_checkpoint(checkpoint)
    heads = state["model_config"]["heads"]
    if head is not None and head not in heads:
        raise EvaluationError(f"{checkpoint}: this model's heads are {list(heads)}, not {head!r}; "
                              f"use {HEAD_SOURCES[head]}")
    device = common.default_device(device)
    return (*checkpoint_model(state, device), state, device)


class Inference:
    """A checkpoint ready for inference (evaluate.load): the model in eval mode with the
    checkpoint's architecture and input convention, the tokenizer of the vocabulary saved in it,
    the image sizes of its training run and, for VQA, its answers. `images` is one image for all
    the texts or a list of one per text, each a PIL image or a file path; `texts` a list of
    strings. Batches are prepared as training prepares them (data.image_text_examples ->
    data.collate -> common.batch_to_device), and each image is encoded as it would be alone
    (encode_each_alone), so a text's result does not depend on the rest of its batch."""

    def __init__(self, checkpoint, device="", head=None):
        self.model, self.tokenizer, self.state, self.device = load_for_inference(checkpoint, head, device)
        self.checkpoint, self.answers = checkpoint, self.state.get("answers")
        self.image_sizes = self.state["config"]["image_min_size"], self.state["config"]["image_max_size"]

    @staticmethod
    def pairs(images, texts):
        """(one image per text, texts) as lists, from one image or a list, and a string or a list."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        images = list(images) if isinstance(images, (list, tuple)) else [images] * len(texts)
        if len(images) != len(texts):
            raise data.DataError(f"{len(images)} images for {len(texts)} texts: give one image, or one per text")
        return images, texts

    def batch(self, images, texts):
        """One batch on the device: images (I, 3, H, W) normalised, padded to multiples of 64, and
        image_mask (I, H, W), each image once; input_ids, text_mask (T, L); image_index (T,): each
        text's image row; text_index (T,): each row's position in `texts` (rows go image by image)."""
        batch = data.collate(data.image_text_examples(*self.pairs(images, texts), self.tokenizer, *self.image_sizes))
        return common.batch_to_device(batch, self.device, False, self.model.config)

    @torch.no_grad()
    def pooled(self, images, texts, batch_size=32):
        """The [CLS] vectors (len(texts), hidden), float32, in the order of `texts`; `batch_size`
        texts per forward pass."""
        images, texts = self.pairs(images, texts)
        out = []
        for k in range(0, len(texts), batch_size):
            batch = self.batch(images[k: k + batch_size], texts[k: k + batch_size])
            pixels = encode_each_alone(self.model, batch["images"], batch["image_mask"])
            _, pooled = self.model(batch["input_ids"], batch["text_mask"], pixels=pixels,
                                   image_index=batch["image_index"])
            out.append(pooled[batch["text_index"].argsort()].float())
        return torch.cat(out)

    def require(self, head):
        if head not in self.model.config.heads:
            raise EvaluationError(f"{self.checkpoint}: this model's heads are {list(self.model.config.heads)}, not "
                                  f"{head!r}; use {HEAD_SOURCES[head]}")

    @torch.no_grad()
    def match(self, images, texts, batch_size=32):
        """ITM's probability that each text describes its image: a list of floats, one per text."""
        self.require("itm")
        logits = self.model.itm_head(self.pooled(images, texts, batch_size))
        return logits.float().softmax(-1)[:, 1].tolist()  # classes: 0 mismatched, 1 matched

    @torch.no_grad()
    def answer(self, images, questions, top=5, batch_size=32):
        """The `top` answers of the checkpoint's own vocabulary to each question about its image,
        best first: a list (one per question) of [{"answer", "score"}]. The score is the sigmoid of
        the answer's logit, what the binary cross-entropy trained: an estimate of the answer's VQA
        accuracy, so the scores need not sum to 1."""
        self.require("vqa")
        logits = self.model.vqa_head(self.pooled(images, questions, batch_size))
        best = logits.float().sigmoid().topk(min(top, len(self.answers)), dim=-1)
        return [[{"answer": self.answers[i], "score": s} for s, i in zip(values, indices)]
                for values, indices in zip(best.values.tolist(), best.indices.tolist())]


def load(checkpoint, device=""):
    """The Python API: evaluate.load(path).match(images, texts) or .answer(images, questions)."""
    return Inference(checkpoint, device)


def image_text_batch(image, text, tokenizer, state, device):
    """One (image, text) pair as a batch of one, prepared as Inference.batch prepares it."""
    sizes = state["config"]["image_min_size"], state["config"]["image_max_size"]
    batch = data.collate(data.image_text_examples([image], [text], tokenizer, *sizes))
    return common.batch_to_device(batch, device, False, PixelBertConfig.saved(state["model_config"]))


def run_pooled(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])[1]


def match_probability(checkpoint, image, texts, device=""):
    """evaluate.py match: ITM's probability that each text describes `image`, the model loaded
    once. One text (a string) gives one result, a list of texts a list of them."""
    many = [texts] if isinstance(texts, str) else list(texts)
    probabilities = Inference(checkpoint, device, "itm").match(image, many)
    results = [{"image": image, "text": t, "match_probability": round(p, 4)} for t, p in zip(many, probabilities)]
    return results[0] if isinstance(texts, str) else results


def answer_question(checkpoint, image, questions, top=5, device=""):
    """evaluate.py ask: the `top` answers of a VQA checkpoint's own vocabulary to each question,
    with their scores (Inference.answer), the model loaded once. One question (a string) gives
    one result, a list of questions a list of them."""
    many = [questions] if isinstance(questions, str) else list(questions)
    answers = Inference(checkpoint, device, "vqa").answer(image, many, top)
    results = [{"image": image, "question": q, "answers": [{**a, "score": round(a["score"], 4)} for a in best]}
               for q, best in zip(many, answers)]
    return results[0] if isinstance(questions, str) else results


def attention_probabilities(attention, x, attn_mask):
    """What F.scaled_dot_product_attention computes inside a BertSelfAttention but does not
    return: softmax(q k^T / sqrt(head size)) over the unmasked keys.
    x (B, L, H) the layer's input, attn_mask (B, 1, 1, L) bool -> (B, heads, L, L), rows sum to 1."""
    B, L, H = x.shape
    q, k = (proj(x).float().view(B, L, attention.num_heads, -1).transpose(1, 2)  # (B, nh, L, hs)
            for proj in (attention.query, attention.key))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, nh, L, L)
    return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)


def word_pixel_attention(model, batch, tokenizer, layer=0):
    """Each word's attention over the image in `layer` (paper Figure 3): the attention rows of
    its word pieces ([CLS]/[SEP] left out), averaged over heads, restricted to the pixel tokens
    and renormalised there (each map sums to 1), then averaged over the pieces. Returns
    (words, maps (n_words, h, w) on the pixel-token grid, pixel_share (n_words,): the part of
    the attention that went to pixels rather than text)."""
    if not 0 <= layer < model.config.num_layers:
        raise EvaluationError(f"--layer {layer}: this model has layers 0..{model.config.num_layers - 1}")
    self_attention, seen = model.bert.encoder.layer[layer].attention.self, {}
    hook = self_attention.register_forward_pre_hook(lambda module, args: seen.update(x=args[0], mask=args[1]))
    try:
        run_pooled(model, batch)
    finally:
        hook.remove()
    with torch.no_grad():
        probs = attention_probabilities(self_attention, seen["x"], seen["mask"])[0].mean(0)  # (L, L)
    T = batch["input_ids"].shape[1]
    to_pixels = probs[:T, T:]  # (T, K): text queries, pixel keys
    tokens, words, rows = tokenizer.vocab_tokens(), [], []
    for t, token_id in enumerate(batch["input_ids"][0, 1:-1].tolist(), start=1):
        if tokens[token_id].startswith("##") and words:  # a continuation piece joins its word
            words[-1] += tokens[token_id][2:]
            rows[-1].append(t)
        else:
            words.append(tokens[token_id])
            rows.append([t])
    share = torch.stack([to_pixels[r].sum(-1).mean() for r in rows])
    maps = torch.stack([(to_pixels[r] / to_pixels[r].sum(-1, keepdim=True)).mean(0) for r in rows])  # (n, K)
    cell = 32 * model.config.pixel_pool  # image pixels per pixel token side: CNN stride 32, then the pool
    h, w = (-(-side // cell) for side in batch["images"].shape[-2:])
    return words, maps.view(len(words), h, w).cpu(), share.cpu()


def draw_attention(image, words, maps, share, cell, out):
    """A PNG sheet: the image as the model saw it, then a panel per word with its map as a red
    overlay (each scaled to its own maximum), labelled with the word and its pixel share.
    image: the resized RGB PIL image; maps (n, h, w), each token covering cell x cell pixels."""
    W, H = image.size
    label, columns = 14, min(len(words) + 1, 6)
    sheet = Image.new("RGB", (columns * W, -(-(len(words) + 1) // columns) * (H + label)), "white")
    rgb, red = np.asarray(image, dtype=np.float32), np.array([255.0, 0, 0])
    panels = [("image", image)]
    for word, heat, s in zip(words, maps.numpy(), share.tolist()):
        grid = heat.repeat(cell, 0).repeat(cell, 1)[:H, :W]  # the last cells may overhang the image
        alpha = 0.7 * grid[..., None] / max(grid.max(), 1e-12)
        panels.append((f"{word} {100 * s:.0f}%", Image.fromarray((rgb * (1 - alpha) + red * alpha).astype(np.uint8))))
    draw = ImageDraw.Draw(sheet)
    for i, (text, panel) in enumerate(panels):
        x, y = (i % columns) * W, (i // columns) * (H + label)
        sheet.paste(panel, (x, y))
        draw.text((x + 2, y + H + 1), text, fill="black")
    sheet.save(out)
    return out


def attention_map(checkpoint, image, text, out=None, layer=0, device=""):
    """evaluate.py attention: writes the Figure 3 sheet for one image and text to `out`
    (default: attention_<image name>.png beside the checkpoint) and returns the numbers drawn."""
    model, tokenizer, state, device = load_for_inference(checkpoint, None, device)
    batch = image_text_batch(image, text, tokenizer, state, device)
    words, maps, share = word_pixel_attention(model, batch, tokenizer, layer)
    resized = data.resize_image(data.load_image(image), state["config"]["image_min_size"],
                                state["config"]["image_max_size"])
    out = out or os.path.join(os.path.dirname(checkpoint),
                              f"attention_{os.path.splitext(os.path.basename(image))[0]}.png")
    draw_attention(resized, words, maps, share, 32 * model.config.pixel_pool, out)
    return {"png": out, "layer": layer,
            "words": [{"word": w, "pixel_share": round(s, 4)} for w, s in zip(words, share.tolist())]}


# -----------------------------------------------------------------------------
# evaluate.py check-data: is a data root complete before a long run starts?

_PRETRAIN_VAL = [("coco/dataset_coco.json", True, "Karpathy splits: held-out MLM/ITM pairs"),
                 ("coco/val2014", True, "Karpathy val images")]
_COCO = [("coco/dataset_coco.json", True, "captions: Karpathy train + restval"), ("coco/train2014", True, ""),
         ("coco/val2014", True, "")]
_VG = [("vg/image_data.json", True, ""), ("vg/region_descriptions.json", True, "region phrases as captions"),
       ("vg/VG_100K", True, "images.zip"), ("vg/VG_100K_2", True, "images2.zip"), *_PRETRAIN_VAL]
_VQA_FILES = [f"vqa/v2_OpenEnded_mscoco_{s}_questions.json" for s in ("train2014", "val2014")] + \
    [f"vqa/v2_mscoco_{s}_annotations.json" for s in ("train2014", "val2014")]
CHECK_DATA = {  # --data -> [(path under --data-root, required, what it is for)]; optional ones only for some commands
    "coco": _COCO,
    "coco2014": [("coco/annotations/captions_train2014.json", True, "captions"), ("coco/train2014", True, ""),
                 *_PRETRAIN_VAL],
    "vg": _VG,
    "coco_vg": _COCO + [entry for entry in _VG if entry[0] not in {rel for rel, _, _ in _COCO}],
    "vqa": [*((f, True, "") for f in _VQA_FILES), ("coco/train2014", True, ""), ("coco/val2014", True, ""),
            ("vqa/v2_OpenEnded_mscoco_test2015_questions.json", False, "test-dev / test submissions"),
            ("vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json", False, "test-dev / test submissions"),
            ("coco/test2015", False, "test-dev / test submissions")],
    "nlvr2": [("nlvr2/data/train.json", True, ""), ("nlvr2/data/dev.json", True, ""),
              ("nlvr2/images/train", True, "100 numbered folders"), ("nlvr2/images/dev", True, ""),
              ("nlvr2/data/test1.json", False, "test-P: evaluate.py nlvr2 --split test1"),
              ("nlvr2/images/test1", False, "test-P: evaluate.py nlvr2 --split test1")],
    "flickr30k": [("flickr30k/dataset_flickr30k.json", True, "Karpathy splits"), ("flickr30k/images", True, "")],
}
_VG_IMAGES = "(v1.2) from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html, unzipped to "
EXTRA_DOWNLOADS = {"vg/VG_100K": "images.zip " + _VG_IMAGES + "vg/VG_100K",
                   "vg/VG_100K_2": "images2.zip " + _VG_IMAGES + "vg/VG_100K_2"}


def human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def check_data(name, root, sample=20):
    """Each official file or folder --data `name` reads under `root`: present (with its size; for
    an image folder, its image count and whether `sample` of its images, evenly spread over the
    sorted names, decode) or missing (with where to get it). Prints a table and returns it as a
    dict whose "ok" is False when a required file or folder is missing or holds no image."""
    if name not in CHECK_DATA:
        raise data.DataError(f"--data {name}: choose one of {', '.join(CHECK_DATA)}")
    rows, missing = [], []
    print(f"check-data --data {name} --data-root {root}")
    for rel, required, note in CHECK_DATA[name]:
        path, hint = os.path.join(root, rel), data.DOWNLOADS.get(rel) or data.RETRIEVAL_DOWNLOADS.get(rel) or \
            EXTRA_DOWNLOADS.get(rel, "see the README's Real data section")
        label = rel + ("/" if not rel.endswith(".json") else "") + (f" ({note})" if note else "") + \
            ("" if required else " [optional]")
        row = {"path": rel, "required": required, "present": os.path.exists(path)}
        if not row["present"]:
            print(f"  {'MISSING' if required else 'absent'}  {label}\n           get {hint}")
            missing += [rel] if required else []
        elif os.path.isfile(path):
            row["bytes"] = os.path.getsize(path)
            print(f"  ok       {label}: {human_size(row['bytes'])}")
        else:
            images = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                            if f.lower().endswith(data.IMAGE_SUFFIXES))
            picked = images[:: max(1, -(-len(images) // sample))][:sample] if sample > 0 else []
            failed = []
            for image in picked:
                try:
                    data.load_image(image)
                except data.DataError as e:
                    failed.append(str(e))
            row.update(images=len(images), bytes=sum(os.path.getsize(i) for i in images), sampled=len(picked),
                       failed=failed)
            status = "ok" if images and not failed else "EMPTY" if not images else "BAD"
            print(f"  {status:<8} {label}: {len(images):,} images, {human_size(row['bytes'])}; "
                  f"{len(picked) - len(failed)} of {len(picked)} sampled images decode")
            for message in failed:
                print(f"           {message}")
            if not images and required:
                missing.append(rel)
        rows.append(row)
    bad = sum(len(r.get("failed", [])) for r in rows)
    print(f"{len(missing)} required file{'s' * (len(missing) != 1)} or folder{'s' * (len(missing) != 1)} missing or "
          f"empty" + (f"; {bad} sampled image{'s' * (bad != 1)} did not decode (re-download them, or train with "
                      f"--skip-bad-images)" if bad else ""))
    return {"data": name, "data_root": root, "files": rows, "missing": missing, "ok": not missing}


def main(argv=None):
    parser = common.FlagParser(allow_abbrev=False, description="Evaluate Pixel-BERT checkpoints or score prediction "
                                                               "files. `evaluate.py COMMAND --help` lists a command's "
                                                               "flags.")
    commands = parser.add_subparsers(dest="command", required=True)

    def compute_flags(command, batch, default):
        """The flags of a command that runs a model: its batch (`batch` says what it counts), loader
        processes, device and precision."""
        group = command.add_argument_group("batching, precision and device")
        group.add_argument(batch[0], dest="batch_size", type=common.at_least(1), default=default,
                           help=f"{batch[1]} per batch and process (>= 1; default: {default})")
        group.add_argument("--num-workers", type=common.at_least(0), default=2,
                           help="DataLoader processes per process (0: load in the main process; default: 2)")
        group.add_argument("--device", default="", help="cpu, cuda, cuda:1... (default: cuda if there is a GPU, "
                                                         "else cpu)")
        group.add_argument("--dtype", default="auto", choices=common.DTYPES,
                           help="auto: bf16 where the device has it natively, else fp32 on a CPU and fp16 on a GPU "
                                "(default: auto)")

    vqa_rules_help = ("the official VQA tool's answer processing: current (GT-Vision-Lab/VQA since its 2021 fix) or "
                      "2017 (its earlier copy, to compare with older numbers) (default: current)")
    vqa = commands.add_parser("vqa", help="evaluate a finetune_vqa.py checkpoint, or write a test submission",
                              description="Official VQA accuracy of a finetune_vqa.py checkpoint on a split with "
                                          "answers, or the submission file of test-dev / test.")
    given = vqa.add_argument_group("checkpoint and data")
    given.add_argument("--checkpoint", required=True, help="finetune_vqa.py's best.pt (required)")
    given.add_argument("--data-root", required=True, help="the folder holding vqa/ and coco/ (README: Real data; "
                                                          "required)")
    given.add_argument("--split", default="minival", choices=["train", "val", "minival", "trainval", "test-dev",
                                                              "test"],
                       help="the questions answered: scored on train, val, minival, trainval; a submission file for "
                            "test-dev, test (default: minival)")
    given.add_argument("--minival-images", type=common.at_least(1), default=None,
                       help="val2014 images held out as minival (>= 1; default: the checkpoint's own setting)")
    given.add_argument("--ans2label", help="an ans2label.json that must match the checkpoint's answers (default: "
                                           "none, not checked)")
    given.add_argument("--vqa-rules", default="current", choices=VQA_RULES, help=vqa_rules_help)
    vqa.add_argument_group("output").add_argument(
        "--out", help="submission file for test-dev / test (default: vqa_<split>_submission.json beside the "
                      "checkpoint)")
    compute_flags(vqa, ["--batch-size", "images (with all their questions)"], 32)
    ret = commands.add_parser("retrieval", help="full-protocol image-text retrieval recall of a checkpoint",
                              description="Recall@1/5/10 of image and text retrieval, every image of the split "
                                          "scored against every caption.")
    given = ret.add_argument_group("checkpoint and data")
    given.add_argument("--checkpoint", required=True, help="finetune_retrieval.py's best.pt, or pretrain.py's "
                                                           "final.pt: zero-shot by ITM (required)")
    given.add_argument("--data-root", required=True, help="the folder holding flickr30k/ or coco/ (README: Real "
                                                          "data; required)")
    given.add_argument("--data", dest="dataset", required=True, choices=["flickr30k", "coco"],
                       help="whose Karpathy split to score (required)")
    given.add_argument("--split", default="test", choices=["train", "val", "test"],
                       help="the Karpathy split scored (default: test)")
    given.add_argument("--max-images", type=common.at_least(0), default=0,
                       help="score only the split's first N images, with their captions (0: all; default: 0)")
    out = ret.add_argument_group("output")
    out.add_argument("--coco-1k-folds", action="store_true", help="also the mean recall over consecutive 1K-image "
                                                                  "folds, as COCO 1K results are given (default: off)")
    out.add_argument("--out", help="result JSON (default: retrieval_<data>_<split>.json beside the checkpoint)")
    out.add_argument("--save-scores", help="also save the (images x captions) score matrix to this .pt file "
                                           "(default: none)")
    compute_flags(ret, ["--score-batch", "(image, caption) pairs scored by the Transformer"], 1024)
    score = commands.add_parser("vqa-score", help="official VQA accuracy of a predictions file",
                                description="The official VQA accuracy of a predictions file, as the official "
                                            "tool computes it.")
    score.add_argument("--predictions", required=True, help="a JSON list of {question_id, answer} (required)")
    score.add_argument("--questions", required=True, help="the official questions JSON of the split (required)")
    score.add_argument("--annotations", required=True, help="the official annotations JSON of the split (required)")
    score.add_argument("--vqa-rules", default="current", choices=VQA_RULES, help=vqa_rules_help)
    nlvr2 = commands.add_parser("nlvr2", help="evaluate a finetune_nlvr.py checkpoint; writes the predictions CSV",
                                description="NLVR2 accuracy and consistency of a finetune_nlvr.py checkpoint, and "
                                            "its predictions CSV (the format of the official scorer).")
    given = nlvr2.add_argument_group("checkpoint and data")
    given.add_argument("--checkpoint", required=True, help="finetune_nlvr.py's best.pt (required)")
    given.add_argument("--data-root", required=True, help="the folder holding nlvr2/ (README: Real data; required)")
    given.add_argument("--split", default="dev", choices=["dev", "test1"],
                       help="the official split scored: dev, or test1 (test-P) (default: dev)")
    nlvr2.add_argument_group("output").add_argument(
        "--out", help="predictions CSV (default: nlvr2_<split>_predictions.csv beside the checkpoint)")
    compute_flags(nlvr2, ["--batch-size", "examples (a sentence and two images)"], 16)
    nlvr2_score_cli = commands.add_parser("nlvr2-score", help="the official NLVR2 accuracy and consistency of a "
                                                              "predictions CSV")
    nlvr2_score_cli.add_argument("--predictions", required=True, help="CSV lines identifier,True|False (required)")
    nlvr2_score_cli.add_argument("--labels", required=True, help="an official JSON Lines file, e.g. dev.json "
                                                                 "(required)")
    check = commands.add_parser("check-data", help="list each official file a --data reads, present (with its size) "
                                                   "or missing (with its download), and decode a sample of images; "
                                                   "exit status 1 when a required one is missing")
    check.add_argument("--data", required=True, choices=list(CHECK_DATA), help="the data of the run to check")
    check.add_argument("--data-root", required=True, help="the folder holding coco/, vg/, vqa/, nlvr2/, flickr30k/")
    check.add_argument("--sample", type=int, default=20, help="images decoded per image folder (default 20; 0: none)")
    for name, needs, source, help in (
            ("match", "text", "pretrain.py's final.pt", "ITM probability that a text describes an image"),
            ("ask", "question", "finetune_vqa.py's best.pt", "top-5 answers of a VQA checkpoint to a question on an "
                                                              "image"),
            ("attention", "text", "any checkpoint", "PNG of each word's attention over the image (paper Figure 3)")):
        one = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        one.add_argument("--checkpoint", required=True, help=f"{source} (required)")
        one.add_argument("--image", required=True, help="any image file, resized as in the checkpoint's training "
                                                        "(required)")
        if name == "attention":
            one.add_argument(f"--{needs}", required=True, help="the text whose words' attention is drawn (required)")
        else:  # several texts for one image: the model is loaded once, the image encoded once
            one.add_argument(f"--{needs}", required=True, action="append",
                             help=f"repeat --{needs} for several; each gets its own result (required)")
        one.add_argument("--device", default="", help="cpu, cuda, cuda:1... (default: cuda if there is a GPU, else "
                                                      "cpu)")
        if name == "attention":
            one.add_argument("--layer", type=common.at_least(0), default=0,
                             help="the Transformer layer whose attention is drawn, 0 = the first (default: 0)")
            one.add_argument("--out", help="PNG path (default: attention_<image name>.png beside the checkpoint)")
    args = parser.parse_args(argv)
    if args.command == "check-data":  # prints a table for a person, not JSON
        result = check_data(args.data, args.data_root, args.sample)
        if not result["ok"]:
            sys.exit(f"check-data: missing {', '.join(result['missing'])}")
        return result
    checkpoint_file.check_output_files(out=getattr(args, "out", None), save_scores=getattr(args, "save_scores", None))
    try:
        if args.command == "vqa-score":
            result = score_files(args.predictions, args.questions, args.annotations, args.vqa_rules)
        elif args.command == "match":  # one --text prints one result, several a list
            texts = args.text[0] if len(args.text) == 1 else args.text
            result = match_probability(args.checkpoint, args.image, texts, args.device)
        elif args.command == "ask":
            questions = args.question[0] if len(args.question) == 1 else args.question
            result = answer_question(args.checkpoint, args.image, questions, device=args.device)
        elif args.command == "attention":
            result = attention_map(args.checkpoint, args.image, args.text, args.out, args.layer, args.device)
        elif args.command == "nlvr2-score":
            result = score_nlvr2_files(args.predictions, args.labels)
        elif args.command == "nlvr2":
            result = evaluate_nlvr2_checkpoint(args.checkpoint, args.data_root, args.split, args.out, args.batch_size,
                                               args.num_workers, args.device, args.dtype)
        elif args.command == "retrieval":
            result = evaluate_retrieval_checkpoint(args.checkpoint, args.data_root, args.dataset, args.split,
                                                   args.coco_1k_folds, args.max_images, args.out, args.batch_size,
                                                   args.num_workers, args.device, args.dtype, args.save_scores)
        else:
            result = evaluate_vqa_checkpoint(args.checkpoint, args.data_root, args.split, args.out, args.batch_size,
                                             args.num_workers, args.device, args.dtype, args.minival_images,
                                             args.ans2label, args.vqa_rules)
            result = result if isinstance(result, dict) else {"submission": result}
    except (EvaluationError, data.DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2))
    if not args.command.endswith("-score"):  # checkpoint commands may run under torchrun
        if dist.is_initialized():  # leave together: a process exiting while gloo talks to it aborts the other
            dist.barrier()
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
