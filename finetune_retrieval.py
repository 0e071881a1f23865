"""
Pixel-BERT fine-tuning for image-text retrieval (paper 4.4): a linear layer on [CLS] scores
each (image, caption) pair; for each image, its ground-truth caption and 20 captions of other
images are scored, and the ground truth is ranked against the 5 highest-scoring negatives by
softmax cross-entropy, so gradient flows only through those 6. The CNN is frozen.

    python3 finetune_retrieval.py     # demo: fine-tunes runs/demo_pretrain/final.pt on the demo's Flickr30K files
    torchrun --nproc_per_node=8 finetune_retrieval.py --data flickr30k --data-root /datasets \
        --init runs/pretrain_r50/final.pt

Reads top to bottom like finetune_vqa.py: config -> processes -> data -> model -> optimiser ->
loop (validation recall each epoch, best checkpoint kept) -> test recall of the best checkpoint.
SIGTERM / SIGUSR1 finish the step in flight, write a checkpoint and exit with status 75;
the same command with --resume continues exactly (docs/reliability.md).
The full-protocol scoring (every image against every caption) is evaluate.retrieval_scores.
"""

import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist

import checkpoint
import common
import data
from evaluate import retrieval_scores
from metrics import retrieval_recall
from model import fold_frozen_batchnorm, hard_negative_loss, make_optimizers, rank_scores


@dataclass
class Config:
    """Pixel-BERT fine-tuning for image-text retrieval: a linear layer on [CLS] scores each (image,
    caption) pair, ranked against hard negatives; the CNN is frozen. The defaults are the paper's
    recipe for --data flickr30k (paper 4.4)."""
    # data
    data: Literal["demo", "flickr30k", "coco"] = "demo"  # demo: the built-in corpus's Flickr30K files |
    #  flickr30k | coco: the official files (Karpathy splits) under --data-root
    data_root: str = "data/demo"  # folder of the official files (README: Real data) or of the demo corpus
    vocab: str = ""  # WordPiece vocab.txt; none: the --init checkpoint's, else the --bert folder's, else
    #  <data-root>/vocab.txt
    image_min_size: int = 800  # pixels: each image is resized so that its shorter side is this...
    image_max_size: int = 1333  # pixels: ...or its longer side this, whichever is smaller
    max_text_len: int = 40  # word pieces of a caption, [CLS] and [SEP] included; longer captions are cut
    num_workers: int = 6  # DataLoader processes per training process (0: load in the training process)
    skip_bad_images: bool = False  # report, count and skip unreadable training images instead of stopping
    # model: a pre-training checkpoint (--init), or the --model architecture with --bert and --cnn weights
    init: str = ""  # the Pixel-BERT checkpoint to fine-tune (pretrain.py's final.pt; its ITM head starts the
    #  ranking head)
    model: Literal["tiny", "r50", "x152", "x152_32x4d"] = "r50"  # tiny: the demo's | r50: ResNet-50 + BERT-base |
    #  x152: ResNeXt-152 32x8d + BERT-base | x152_32x4d: ResNeXt-152 32x4d (half the group width) + BERT-base;
    #  the paper does not say which X152 it used. With --init, the checkpoint's architecture
    bert: str = ""  # without --init: a Hugging Face BERT folder or weights file for the Transformer
    cnn: str = ""  # without --init: a torchvision ResNet .pth (or a converted ResNeXt) for the CNN
    from_scratch: bool = False  # allow r50 / x152 on real data without --init, --bert or --cnn (random weights)
    dropout: float = 0.1  # BERT's dropout probability (hidden states and attention)
    pixel_pool: int = 2  # without --init: cells of the stride-32 feature map max-pooled into a pixel token, a
    #  side (paper: 2)
    pixel_proj_first: bool = True  # without --init: the 1x1 projection on every stride-32 cell, then the pooling
    #  (the paper's figure); --no-pixel-proj-first pools first (SOHO's order, pixel-pool^2 fewer cells to project)
    visual_layernorm: bool = False  # without --init: LayerNorm + dropout on pixel tokens (not in the paper)
    visual_position: bool = False  # without --init: learned row and column embeddings of pixel tokens (not in
    #  the paper)
    # the ranking loss (paper 4.4)
    negatives: int = 20  # captions of other images scored with each image's ground-truth caption
    hard_negatives: int = 5  # the highest-scoring of those, which the ground truth is ranked against
    #  (at most --negatives; equal: a softmax over all)
    # optimisation: 512 images a step; Flickr30K 10 epochs, lr / 10 at epoch 6 (COCO: 4 and 2)
    batch_size: int = 8  # images per process and micro-step, each with its caption and --negatives others
    #  (the unit is an image with its 1 + --negatives captions, not a pair)
    global_batch: int = 512  # images per optimiser step, all processes and micro-steps together, each with 1 +
    #  --negatives captions: the paper's "8 GPUs x 64" read as 64 images per GPU (read as 64 pairs, 512 pairs
    #  would be about 24 images: --global-batch 24; docs/model.md)
    epochs: float = 10  # passes over the ground-truth captions
    max_steps: int = 0  # optimiser steps at most (0: as many as --epochs make)
    lr_milestones: str = "6"  # epochs at which the learning rate is divided by 10, comma-separated
    lr: float = 1e-4  # AdamW's learning rate: Transformer, visual embedding and head (the CNN is frozen)
    weight_decay: float = 1e-2  # AdamW's weight decay
    warmup_steps: int = 100  # optimiser steps of linear learning-rate warm-up (not given in the paper)
    warmup_start: float = 1 / 3  # the warm-up's first learning rate, a fraction of --lr
    grad_clip: float = 10.0  # largest global gradient norm (0: no clipping)
    seed: int = 0  # seeds the new head, the data order, the negatives and dropout
    # precision and device
    dtype: Literal[common.DTYPES] = "auto"  # auto: bf16 where the device has it natively, else fp32 on a CPU
    #  and fp16 on a GPU
    device: str = ""  # cpu, cuda, cuda:1...; none: cuda if there is a GPU, else cpu
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC convolutions in the CNN (faster with bf16 on GPUs and AMX CPUs)
    fold_batchnorm: bool = False  # apply the CNN's fixed BatchNorm inside its convolutions (same weights,
    #  checkpoints and gradients, fewer passes over the activations: a speed option for r50 / x152 on GPUs);
    #  only for BatchNorm with fixed statistics (not the tiny model's)
    # evaluation, logging and checkpoints
    eval_images: int = 1000  # validation images scored after each epoch against all their split's captions
    score_batch: int = 1024  # (image, caption) pairs per Transformer batch when scoring
    out_dir: str = "runs/retrieval"  # run folder: config.json, metrics.jsonl, ckpt_<step>.pt, best.pt
    log_every: int = 50  # optimiser steps between logged losses
    ckpt_every: int = 1000  # optimiser steps between step checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # step checkpoints kept, the newest
    resume: bool = False  # continue exactly from the newest complete checkpoint in --out-dir


# The demo: the tiny model pre-trained by `python pretrain.py`, on the demo corpus's Flickr30K split
# (docs/demo.md). The paper's loss and negatives; a lower lr and a shorter schedule than the paper's: on the
# demo no setting tried clearly improved on the ITM-initialised start, and this one at least leaves it intact.
PRESETS = {"demo": dict(model="tiny", init="runs/demo_pretrain/final.pt", image_min_size=128, image_max_size=192,
                        batch_size=32, global_batch=32, epochs=1, lr_milestones="", lr=1e-5, warmup_steps=0,
                        dropout=0.0, eval_images=100, score_batch=512, num_workers=1, log_every=10, ckpt_every=200,
                        out_dir="runs/demo_retrieval"),
           "coco": dict(epochs=4, lr_milestones="2")}


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    common.check_config(cfg)
    if cfg.hard_negatives > cfg.negatives:
        raise SystemExit(f"--hard-negatives {cfg.hard_negatives} must be in 1..--negatives ({cfg.negatives})")
    ddp = common.setup_distributed(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, ddp.device)
    # bf16 / fp16: autocast runs the matrix products in half precision; reductions and losses stay in fp32
    autocast = common.autocast(ddp.device, cfg.dtype)  # one context, entered at every forward
    common.print0(f"config: {asdict(cfg)}")
    torch.manual_seed(cfg.seed + ddp.rank)
    accum, _ = common.batch_plan(cfg.global_batch, cfg.batch_size, ddp.world_size, 1, "--batch-size")
    dataset = "flickr30k" if cfg.data == "demo" else cfg.data  # the demo corpus is written in Flickr30K's format
    checkpoint.prepare_out_dir(cfg, ddp)

    # ---- data: Karpathy train (COCO: + restval) for training, val for model selection, test at the end
    init_state, tokenizer = checkpoint.init_and_tokenizer(cfg)
    train_captions = data.RetrievalCaptions(data.retrieval_entries(cfg.data_root, dataset, "train",
                                                                   cfg.skip_bad_images), tokenizer)
    val_captions = data.RetrievalCaptions(data.retrieval_entries(cfg.data_root, dataset, "val")[: cfg.eval_images],
                                          tokenizer)
    test_captions = data.RetrievalCaptions(data.retrieval_entries(cfg.data_root, dataset, "test"), tokenizer)
    data.check_images([os.path.join(cfg.data_root, p) for p in val_captions.image_paths + test_captions.image_paths],
                      "val / test")
    train_set = data.RetrievalPairs(cfg.data_root, train_captions, cfg.image_min_size, cfg.image_max_size,
                                    cfg.negatives, cfg.seed, cfg.skip_bad_images)
    sampler = data.MicroBatchSampler(len(train_set), cfg.batch_size, ddp.world_size, ddp.rank, accum, cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=data.collate,
                                         num_workers=cfg.num_workers, pin_memory=ddp.device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps, milestones = common.schedule(cfg.epochs, cfg.max_steps, cfg.lr_milestones, steps_per_epoch)
    common.print0(f"data: {dataset} train {len(train_captions.image_paths):,} images / {len(train_captions):,} "
                  f"captions, val {len(val_captions.image_paths):,} / {len(val_captions):,}, test "
                  f"{len(test_captions.image_paths):,} / {len(test_captions):,} | global batch {cfg.global_batch} "
                  f"images x {1 + cfg.negatives} captions = {cfg.batch_size} per process x {accum} accumulation x "
                  f"{ddp.world_size} processes | {steps_per_epoch} steps/epoch, {total_steps} steps, lr / 10 at "
                  f"steps {milestones}")

    # ---- model: the trunk from --init; the rank head starts as ITM's match log-odds when the
    # checkpoint has an ITM head, which then stays frozen (it is kept only to be saved with the rest).
    has_itm = "itm_head.weight" in init_state.get("model", {})
    raw_model = common.build_model(cfg, ("itm", "rank") if has_itm else ("rank",), tokenizer.vocab_size,
                                   init_state=init_state).to(ddp.device)
    if cfg.fold_batchnorm:  # check_config made sure the CNN's BatchNorm is the fixed kind
        fold_frozen_batchnorm(raw_model)
    if has_itm and "rank_head.weight" not in init_state["model"]:
        raw_model.init_rank_head_from_itm()
    if has_itm:
        raw_model.itm_head.requires_grad_(False)
    raw_model.cnn.requires_grad_(False)  # paper 4.4: the CNN is frozen (its BatchNorm too: see train_mode)
    if cfg.channels_last:
        raw_model.cnn.to(memory_format=torch.channels_last)
    _, adamw = make_optimizers(raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=True)
    optimizers = [adamw]
    trained = [p for p in raw_model.parameters() if p.requires_grad]  # clipped together
    scaler = torch.amp.GradScaler(ddp.device.type, enabled=cfg.dtype == "fp16")
    state = checkpoint.resume(cfg.out_dir, raw_model, optimizers, scaler, asdict(cfg)) if cfg.resume else {}
    step, best = state.get("step", 0), state.get("best", {"rsum": -1.0})
    skipped_steps = state.get("skipped_steps", 0)  # fp16 steps the scaler skipped, over the whole run
    model = common.wrap_model(raw_model, ddp, cfg.compile)
    common.print_model_size(f"{raw_model.config.hidden_size} hidden", raw_model)

    def train_mode():
        model.train()
        raw_model.cnn.eval()  # frozen: BatchNorm keeps its running statistics

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                "scaler": scaler.state_dict(), "step": step, "rng": checkpoint.rng_state(), "config": asdict(cfg),
                "model_config": asdict(raw_model.config), "vocab": tokenizer.vocab_tokens(), "best": best,
                "task": "retrieval", "skipped_steps": skipped_steps}

    def save_best():
        if ddp.is_main:
            checkpoint.save_weights(checkpoint_state(), os.path.join(cfg.out_dir, "best.pt"))

    def evaluate(captions):
        scores, _ = retrieval_scores(raw_model, cfg.data_root, captions, ddp, cfg.image_min_size, cfg.image_max_size,
                                     cfg.dtype, cfg.score_batch, cfg.num_workers, cfg.channels_last, progress=False)
        train_mode()
        return retrieval_recall(scores, captions.caption_image)

    # ---- training loop
    log = common.MetricLog(os.path.join(cfg.out_dir, "metrics.jsonl"), ddp.is_main)
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, "config.json"),
                          {"config": asdict(cfg), "model": asdict(raw_model.config)})
    if step == 0:  # the starting point (zero-shot ITM scores from a pre-training checkpoint) is a candidate too
        best = {**evaluate(val_captions), "step": 0}
        log.write(step=0, epoch=0.0, val=best)
        common.print0("step 0: val " + recall_line(best))
        save_best()
    train_mode()
    bar = common.Progress(total_steps, step, ddp.is_main)
    t_last, step_last = time.time(), step
    preemption, bad_images = checkpoint.Preemption(), common.BadImages()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, first)  # the data resumes mid-epoch exactly where it stopped
        micro_batches = map(bad_images.note, loader)  # --skip-bad-images: report what collate left out
        for _ in range(first, steps_per_epoch):
            checkpoint.seed_step(cfg.seed, ddp.rank, step)
            micro = [common.batch_to_device(next(micro_batches), ddp.device, cfg.channels_last, raw_model.config)
                     for _ in range(accum)]
            num_images = torch.tensor(sum(len(b["images"]) for b in micro), device=ddp.device, dtype=torch.float)
            if ddp.world_size > 1:
                dist.all_reduce(num_images)
            # the learning rate: a linear warm-up, then / 10 at each milestone; initial_lr is each group's base rate
            lr_scale = common.lr_factor(step, cfg.warmup_steps, cfg.warmup_start, milestones)
            for group in [g for opt in filter(None, optimizers) for g in opt.param_groups]:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_scale
            totals = torch.zeros(1, device=ddp.device)  # the loss summed over micro-batches and processes
            for i, batch in enumerate(micro):
                # DDP all-reduces the gradients in backward(); the earlier micro-batches skip it
                with model.no_sync() if ddp.world_size > 1 and i < accum - 1 else nullcontext():
                    with autocast:
                        # the frozen CNN runs once per image; the graph starts at the visual embedding
                        pixels = raw_model.encode_image(batch["images"], batch["image_mask"])

                    def score(rows):  # (n,) rows of the micro-batch -> (n,) scores of those image-caption pairs
                        with autocast:
                            _, pooled = model(batch["input_ids"][rows], batch["text_mask"][rows], pixels=pixels,
                                              image_index=batch["image_index"][rows])
                        return rank_scores(raw_model, pooled)
                    # collate puts an image's 1 + negatives captions in consecutive rows, ground truth first
                    candidates = torch.arange(len(batch["input_ids"]), device=ddp.device).view(-1, 1 + cfg.negatives)
                    # per image of the global batch (fewer than --global-batch when --skip-bad-images dropped some)
                    loss = hard_negative_loss(score, candidates, cfg.hard_negatives, raw_model)[None] / num_images
                    # DDP averages gradients over processes; the loss is a global mean already
                    scaler.scale(loss.sum() * ddp.world_size).backward()
                totals += loss.detach()
            if ddp.world_size > 1:
                dist.all_reduce(totals)  # summed over the processes, for the log and check_step
            for opt in optimizers:
                scaler.unscale_(opt)  # fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip or float("inf"))
            stop, skipped = checkpoint.check_step(step, cfg.out_dir, totals, grad_norm, scaler, preemption)
            for opt in optimizers:
                scaler.step(opt)  # fp16: skipped when a gradient overflowed
            scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            skipped_steps += skipped  # fp16: the scaler skipped an overflowing step
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                rate = (step - step_last) * cfg.global_batch / (time.time() - t_last)
                t_last, step_last = time.time(), step
                lr = adamw.param_groups[0]["lr"]
                bar.show(step, loss=f"{totals[0]:.3f}", lr=f"{lr:.2e}", images_s=f"{rate:.1f}")
                log.write(step=step, epoch=step / steps_per_epoch, loss=totals[0].item(), lr=lr,
                          grad_norm=grad_norm.item(), skipped_steps=skipped_steps, images_per_s=rate)
            # validation recall each epoch, best kept; a stop signal skips it: the checkpoint comes first
            if (step % steps_per_epoch == 0 or step == total_steps) and not stop:
                metrics = evaluate(val_captions)
                log.write(step=step, epoch=step / steps_per_epoch, val=metrics)
                bar.write(f"epoch {step / steps_per_epoch:.1f}: val " + recall_line(metrics))
                if metrics["rsum"] > best["rsum"]:
                    best = {**metrics, "step": step}
                    save_best()
            if ddp.is_main and (step % cfg.ckpt_every == 0 or step == total_steps or stop):
                checkpoint.save_step_checkpoint(checkpoint_state(), cfg.out_dir, step, cfg.keep_checkpoints)
            if stop:
                bar.close()
                preemption.exit(cfg.out_dir, step)
            if step >= total_steps:
                break
    bar.close()
    preemption.restore()
    if cfg.skip_bad_images:
        bad_images.report()

    # ---- the best checkpoint (by validation R-sum) on the test split, full protocol
    if ddp.world_size > 1:
        dist.barrier()  # rank 0 has written best.pt
    raw_model.load_state_dict(checkpoint.load_checkpoint(os.path.join(cfg.out_dir, "best.pt"))["model"])
    test = evaluate(test_captions)
    log.write(step=step, best_step=best["step"], test=test)
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, f"retrieval_{dataset}_test.json"), {**test, "step": best["step"]})
    common.print0(f"best checkpoint (step {best['step']}) on {dataset} test, {len(test_captions.image_paths)} images "
                  f"x {len(test_captions)} captions: " + recall_line(test))
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return test


def recall_line(m):
    return (f"TR R@1/5/10 {m['tr_r1']:.1f} / {m['tr_r5']:.1f} / {m['tr_r10']:.1f} | "
            f"IR R@1/5/10 {m['ir_r1']:.1f} / {m['ir_r5']:.1f} / {m['ir_r10']:.1f} | rsum {m['rsum']:.1f}")


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
