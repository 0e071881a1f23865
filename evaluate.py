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

import argparse
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
from model import PixelBert, PixelBertConfig, copy_weights, nlvr2_logits, rank_scores


# -----------------------------------------------------------------------------
# Predictions over a held-out set: used by the fine-tuning scripts (model selection each epoch)
# and by the checkpoint commands below


def predict_vqa(model, loader, answers, ddp, dtype, channels_last=True):
    """Every question of the loader's dataset -> {"question_id", "answer"} (the submission
    format), gathered from all processes. The most likely answer of the vocabulary wins."""
    model.eval()
    predictions = []
    with torch.no_grad():
        for batch in loader:
            batch = common.batch_to_device(batch, ddp.device, channels_last)
            with common.autocast(ddp.device, dtype):
                _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"],
                                  image_index=batch["image_index"])
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
            batch = common.batch_to_device(batch, ddp.device, channels_last)
            with common.autocast(ddp.device, dtype):
                _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])
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
        batch = common.batch_to_device(batch, device, channels_last)
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
    model = PixelBert(PixelBertConfig(**{**state["model_config"],
                                         "heads": tuple(state["model_config"]["heads"]) + tuple(extra_heads)}))
    if extra_heads:
        copy_weights(model, state["model"], "checkpoint")
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), data.Tokenizer(state["vocab"], state["config"]["max_text_len"])


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
    ddp = common.setup_distributed(device)
    dtype = common.resolve_dtype(dtype, ddp.device)
    model, tokenizer = checkpoint_model(state, ddp.device)
    model.to(memory_format=torch.channels_last)
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
    ddp = common.setup_distributed(device)
    dtype = common.resolve_dtype(dtype, ddp.device)
    model, tokenizer = checkpoint_model(state, ddp.device)
    model.to(memory_format=torch.channels_last)
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
    ddp = common.setup_distributed(device)
    dtype = common.resolve_dtype(dtype, ddp.device)
    zero_shot = "rank_head.weight" not in keys
    model, tokenizer = checkpoint_model(state, ddp.device, ("rank",) if zero_shot else ())
    if zero_shot:
        model.init_rank_head_from_itm()  # ITM's match log-odds ranks like its match probability
    model.cnn.to(memory_format=torch.channels_last)
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
# One image and one text: match probability, VQA answers, attention maps (paper Figure 3)

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


def image_text_batch(image, text, tokenizer, state, device):
    """One (image file, text) pair as a batch of one, the image resized as in the checkpoint's
    training run."""
    if not text.strip():
        raise EvaluationError("the text is empty")
    pixels = data.image_tensor(image, state["config"]["image_min_size"], state["config"]["image_max_size"])
    batch = data.collate([{"image": pixels, "input_ids": tokenizer.encode(text)}])
    return common.batch_to_device(batch, device, channels_last=False)


def run_pooled(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"])[1]


def match_probability(checkpoint, image, text, device=""):
    """evaluate.py match: ITM's probability that `text` describes `image`."""
    model, tokenizer, state, device = load_for_inference(checkpoint, "itm", device)
    pooled = run_pooled(model, image_text_batch(image, text, tokenizer, state, device))
    probability = model.itm_head(pooled).float().softmax(-1)[0, 1].item()  # classes: 0 mismatched, 1 matched
    return {"image": image, "text": text, "match_probability": round(probability, 4)}


def answer_question(checkpoint, image, question, top=5, device=""):
    """evaluate.py ask: the `top` answers of a VQA checkpoint's own vocabulary with their scores,
    the sigmoid of each answer's logit: what the binary cross-entropy trained, an estimate of
    the answer's VQA accuracy (so the scores need not sum to 1)."""
    model, tokenizer, state, device = load_for_inference(checkpoint, "vqa", device)
    pooled = run_pooled(model, image_text_batch(image, question, tokenizer, state, device))
    best = model.vqa_head(pooled).float().sigmoid()[0].topk(min(top, model.config.num_answers))
    return {"image": image, "question": question,
            "answers": [{"answer": state["answers"][i], "score": round(s, 4)}
                        for s, i in zip(best.values.tolist(), best.indices.tolist())]}


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate Pixel-BERT checkpoints or score prediction files.")
    commands = parser.add_subparsers(dest="command", required=True)
    vqa = commands.add_parser("vqa", help="evaluate a finetune_vqa.py checkpoint, or write a test submission")
    vqa.add_argument("--checkpoint", required=True)
    vqa.add_argument("--data-root", required=True)
    vqa.add_argument("--split", default="minival", choices=["train", "val", "minival", "trainval", "test-dev", "test"])
    vqa.add_argument("--out", help="submission file for test-dev/test (default: beside the checkpoint)")
    vqa.add_argument("--ans2label", help="an ans2label.json that must match the checkpoint's answers")
    vqa.add_argument("--minival-images", type=int, default=None, help="default: the checkpoint's own setting")
    vqa.add_argument("--batch-size", type=int, default=32, help="images per batch (all their questions)")
    vqa.add_argument("--num-workers", type=int, default=2)
    vqa.add_argument("--device", default="")
    vqa.add_argument("--dtype", default="auto", choices=common.DTYPES)
    ret = commands.add_parser("retrieval", help="full-protocol image-text retrieval recall of a checkpoint")
    ret.add_argument("--checkpoint", required=True, help="finetune_retrieval.py's best.pt (or pretrain.py's final.pt: "
                                                         "zero-shot by ITM)")
    ret.add_argument("--data-root", required=True)
    ret.add_argument("--dataset", required=True, choices=["flickr30k", "coco"])
    ret.add_argument("--split", default="test", choices=["train", "val", "test"])
    ret.add_argument("--coco-1k-folds", action="store_true", help="also the mean over consecutive 1K-image folds")
    ret.add_argument("--max-images", type=int, default=0, help="only the split's first N images (0: all)")
    ret.add_argument("--out", help="result JSON (default: retrieval_<dataset>_<split>.json beside the checkpoint)")
    ret.add_argument("--save-scores", help="also save the (images, captions) score matrix to this .pt file")
    ret.add_argument("--batch-size", type=int, default=1024, help="(image, caption) pairs per transformer batch")
    ret.add_argument("--num-workers", type=int, default=2)
    ret.add_argument("--device", default="")
    ret.add_argument("--dtype", default="auto", choices=common.DTYPES)
    score = commands.add_parser("vqa-score", help="official VQA accuracy of a predictions file")
    score.add_argument("--predictions", required=True)
    score.add_argument("--questions", required=True)
    score.add_argument("--annotations", required=True)
    for command in (vqa, score):
        command.add_argument("--vqa-rules", default="current", choices=VQA_RULES,
                             help="the official tool's answer processing: current (GT-Vision-Lab/VQA since its 2021 "
                                  "fix, the default) or 2017 (its earlier copy, for comparison with older numbers)")
    nlvr2 = commands.add_parser("nlvr2", help="evaluate a finetune_nlvr.py checkpoint; writes the predictions CSV")
    nlvr2.add_argument("--checkpoint", required=True)
    nlvr2.add_argument("--data-root", required=True)
    nlvr2.add_argument("--split", default="dev", choices=["dev", "test1"])
    nlvr2.add_argument("--out", help="predictions CSV (default: nlvr2_<split>_predictions.csv beside the checkpoint)")
    nlvr2.add_argument("--batch-size", type=int, default=16, help="examples per batch (two images each)")
    nlvr2.add_argument("--num-workers", type=int, default=2)
    nlvr2.add_argument("--device", default="")
    nlvr2.add_argument("--dtype", default="auto", choices=common.DTYPES)
    nlvr2_score_cli = commands.add_parser("nlvr2-score", help="the official NLVR2 accuracy and consistency of a "
                                                              "predictions CSV")
    nlvr2_score_cli.add_argument("--predictions", required=True, help="CSV lines identifier,True|False")
    nlvr2_score_cli.add_argument("--labels", required=True, help="an official JSON Lines file, e.g. dev.json")
    for name, needs, help in (("match", "text", "ITM probability that a text describes an image"),
                              ("ask", "question", "top-5 answers of a VQA checkpoint to a question on an image"),
                              ("attention", "text", "PNG of each word's attention over the image (paper Figure 3)")):
        one = commands.add_parser(name, help=help)
        one.add_argument("--checkpoint", required=True)
        one.add_argument("--image", required=True, help="any image file")
        one.add_argument(f"--{needs}", required=True)
        one.add_argument("--device", default="")
        if name == "attention":
            one.add_argument("--layer", type=int, default=0, help="Transformer layer, 0 = the first")
            one.add_argument("--out", help="PNG path (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if args.command == "vqa-score":
            result = score_files(args.predictions, args.questions, args.annotations, args.vqa_rules)
        elif args.command == "match":
            result = match_probability(args.checkpoint, args.image, args.text, args.device)
        elif args.command == "ask":
            result = answer_question(args.checkpoint, args.image, args.question, device=args.device)
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
    main()
