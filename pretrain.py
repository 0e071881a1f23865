"""
Pixel-BERT pre-training: masked language modelling (MLM) + image-text matching (ITM) on COCO
captions and Visual Genome region phrases (paper 3.4 and 4.1).

    python3 pretrain.py         # demo: renders data/demo, trains the tiny model on the CPU (docs/demo.md)
    torchrun --nproc_per_node=8 pretrain.py --data coco_vg --data-root /datasets --out-dir runs/pretrain_r50 \
        --bert weights/bert-base-uncased --cnn weights/resnet50-0676ba61.pth

Reads top to bottom: config -> processes -> data -> model -> optimisers -> loop -> evaluation.
SIGTERM / SIGUSR1 finish the step in flight, write a checkpoint and exit with status 75;
the same command with --resume continues exactly (docs/reliability.md).
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
from model import fold_frozen_batchnorm, make_optimizers, pretraining_losses
from tools import pretrain_cnn, synthetic


@dataclass
class Config:
    """Pixel-BERT pre-training: masked language modelling (MLM) and image-text matching (ITM) on
    image-caption pairs. The defaults are the paper's recipe for --data coco_vg (paper 4.1)."""
    # data
    data: Literal["demo", "coco", "coco2014", "vg", "coco_vg"] = "demo"  # demo: the built-in corpus of shapes
    #  (rendered into --data-root) | coco: Karpathy train + restval | coco2014: the official 2014 captions |
    #  vg: Visual Genome region phrases | coco_vg: coco and vg (the paper's)
    data_root: str = "data/demo"  # folder of the official files (README: Real data) or of the demo corpus
    vocab: str = ""  # WordPiece vocab.txt; none: the --init checkpoint's, else the --bert folder's, else
    #  <data-root>/vocab.txt
    image_min_size: int = 800  # pixels: each image is resized so that its shorter side is this...
    image_max_size: int = 1333  # pixels: ...or its longer side this, whichever is smaller
    max_text_len: int = 40  # word pieces of a caption, [CLS] and [SEP] included; longer captions are cut
    captions_per_image: int = 1  # pairs that share one image and its CNN pass (1: the paper's)
    group_aspect: bool = True  # batch landscape and portrait images apart (less padding)
    num_workers: int = 6  # DataLoader processes per training process (0: load in the training process)
    skip_bad_images: bool = False  # report, count and skip unreadable training images instead of stopping
    cache_dir: str = ""  # folder of the tokenised caption index; none: <data-root>/.pixelbert_cache, or
    #  $XDG_CACHE_HOME/pixelbert (~/.cache/pixelbert) when --data-root is not writable
    # model: the --model architecture with --bert and --cnn weights, or a Pixel-BERT checkpoint (--init)
    model: Literal["tiny", "r50", "x152", "x152_32x4d"] = "r50"  # tiny: the demo's | r50: ResNet-50 + BERT-base |
    #  x152: ResNeXt-152 32x8d + BERT-base | x152_32x4d: ResNeXt-152 32x4d (half the group width) + BERT-base;
    #  the paper does not say which X152 it used. With --init, the checkpoint's architecture
    bert: str = ""  # Hugging Face BERT folder or weights file (bert-base-uncased) for the Transformer
    cnn: str = ""  # torchvision ResNet .pth (or a converted ResNeXt) for the CNN
    cnn_pretrain_epochs: float = 0  # epochs of classification on <data-root>/imagenet that give the CNN its
    #  start (tools/pretrain_cnn.py; 0: none)
    init: str = ""  # a Pixel-BERT checkpoint to start from, instead of --bert and --cnn
    from_scratch: bool = False  # allow r50 / x152 on real data without --bert, --cnn or --init (random weights)
    dropout: float = 0.1  # BERT's dropout probability (hidden states and attention)
    pixel_pool: int = 2  # cells of the stride-32 feature map max-pooled into a pixel token, a side (paper: 2;
    #  with --init, the checkpoint's)
    pixel_proj_first: bool = True  # without --init: the 1x1 projection on every stride-32 cell, then the pooling
    #  (the paper's figure); --no-pixel-proj-first pools first (SOHO's order, pixel-pool^2 fewer cells to project)
    visual_layernorm: bool = False  # LayerNorm + dropout on pixel tokens (not in the paper; with --init, the
    #  checkpoint's)
    visual_position: bool = False  # learned row and column embeddings of pixel tokens (not in the paper;
    #  with --init, the checkpoint's)
    # pre-training tasks (paper 3.3)
    tasks: str = "mlm,itm"  # objectives: mlm,itm | mlm | itm (the paper's ablation drops one)
    mask_prob: float = 0.15  # MLM: probability that a word piece is masked
    mask_at_least_one: bool = True  # MLM: mask one word piece of a caption that drew none, which raises the
    #  real rate on short captions (Visual Genome phrases: 24% at 5 word pieces, 100% at 1); off: --mask-prob
    #  exactly, and some captions have nothing masked
    itm_neg_prob: float = 0.5  # ITM: probability that a pair's caption is replaced by another image's
    mlm_on_negatives: bool = False  # MLM on mismatched pairs too
    pixel_samples: int = 100  # pixel random sampling: pixel tokens kept per image (0: all)
    # optimisation: 4096 pairs a step, 40 epochs, lr / 10 at epochs 25 and 35 (paper 4.1)
    batch_size: int = 32  # pairs per process and micro-step; gradient accumulation fills --global-batch
    global_batch: int = 4096  # pairs per optimiser step, all processes and micro-steps together
    epochs: float = 40  # passes over the training pairs
    max_steps: int = 0  # optimiser steps at most (0: as many as --epochs make)
    lr_milestones: str = "25,35"  # epochs at which every learning rate is divided by 10, comma-separated
    lr: float = 1e-4  # AdamW's learning rate: Transformer, visual embedding and heads
    weight_decay: float = 1e-2  # AdamW's weight decay
    cnn_lr: float = 1e-2  # the CNN's learning rate (0: the CNN stays as loaded)
    cnn_weight_decay: float = 5e-4  # the CNN's weight decay
    cnn_momentum: float = 0.9  # the CNN's SGD momentum
    cnn_optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's, for an ImageNet-trained CNN | adamw:
    #  for a CNN trained from scratch
    warmup_steps: int = 1000  # optimiser steps of linear learning-rate warm-up (not given in the paper)
    warmup_start: float = 1 / 3  # the warm-up's first learning rates, a fraction of --lr and --cnn-lr
    grad_clip: float = 10.0  # largest global gradient norm (0: no clipping; not given in the paper)
    seed: int = 0  # seeds the initialisation, the data order, masks, negatives and dropout
    # precision and device
    dtype: Literal[common.DTYPES] = "auto"  # auto: bf16 where the device has it natively, else fp32 on a CPU
    #  and fp16 on a GPU
    device: str = ""  # cpu, cuda, cuda:1...; none: cuda if there is a GPU, else cpu
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC convolutions in the CNN (faster with bf16 on GPUs and AMX CPUs)
    fold_batchnorm: bool = False  # apply the CNN's fixed BatchNorm inside its convolutions (same weights,
    #  checkpoints and gradients, fewer passes over the activations: a speed option for r50 / x152 on GPUs);
    #  only for BatchNorm with fixed statistics (not the tiny model's)
    # logging, evaluation and checkpoints
    out_dir: str = "runs/pretrain"  # run folder: config.json, metrics.jsonl, ckpt_<step>.pt, final.pt
    log_every: int = 50  # optimiser steps between logged losses
    eval_every: int = 2000  # optimiser steps between held-out evaluations (0: at the end only)
    eval_pairs: int = 5000  # held-out pairs (Karpathy val captions) that MLM and ITM accuracy count
    ckpt_every: int = 2000  # optimiser steps between step checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # step checkpoints kept, the newest
    resume: bool = False  # continue exactly from the newest complete checkpoint in --out-dir


# The built-in demo: the tiny model on the rendered shapes corpus, sized for a laptop CPU (docs/demo.md
# has the measurements behind each choice). As the paper's CNN comes ImageNet-trained, the demo's first
# learns to classify single objects (tools/pretrain_cnn.py): taught by MLM and ITM alone it learned colour
# but never shape. The trained CNN then moves gently, AdamW at a tenth of the Transformer's lr: at the same
# lr the first steps erased what it knew and the run fell back to colour alone. Eight captions share each
# CNN pass: the CNN is most of the tiny model's compute, and an image seen with matched and mismatched
# captions in one batch teaches ITM faster. Learned pixel positions (not in the paper) and every stride-32
# cell as a token (--pixel-pool 1; the objects are about one cell) help with "left of" and "above".
PRESETS = {"demo": dict(model="tiny", cnn_pretrain_epochs=5, image_min_size=128, image_max_size=192, batch_size=256,
                        global_batch=256, captions_per_image=8, epochs=32, lr_milestones="27", lr=1e-3, cnn_lr=1e-4,
                        cnn_optimizer="adamw", warmup_steps=50, dropout=0.0, pixel_pool=1, visual_position=True,
                        num_workers=1, log_every=20, eval_every=0, eval_pairs=2000, ckpt_every=500,
                        out_dir="runs/demo_pretrain")}

EVAL_EPOCH = 1_000_000  # the (fixed) epoch number that seeds held-out masking and negatives


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    common.check_config(cfg)
    if not set(cfg.tasks.split(",")) <= {"mlm", "itm"}:
        raise common.refuse("tasks", cfg.tasks, "choose mlm,itm, mlm or itm")
    ddp = common.setup_distributed(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, ddp.device)
    # bf16 / fp16: autocast runs the matrix products in half precision; reductions and losses stay in fp32
    autocast = common.autocast(ddp.device, cfg.dtype)  # one context, entered at every forward
    common.print0(f"config: {asdict(cfg)}")
    dataset = "coco_vg" if cfg.data == "demo" else cfg.data  # the demo corpus is written in these formats
    accum, images_per_batch = common.batch_plan(cfg.global_batch, cfg.batch_size, ddp.world_size,
                                                cfg.captions_per_image, "--captions-per-image")
    checkpoint.prepare_out_dir(cfg, ddp)

    # ---- data. Rank 0 renders the demo corpus and builds the cached caption indexes while the
    # other processes wait at the barrier; then they read what rank 0 wrote.
    if ddp.world_size > 1 and not ddp.is_main:
        torch.distributed.barrier()
    if cfg.data == "demo":
        synthetic.ensure_demo_corpus(cfg.data_root)
    # The demo's stand-in for ImageNet weights; --cnn / --init bring their own CNN, --resume its checkpoint's.
    if cfg.cnn_pretrain_epochs and not (cfg.cnn or cfg.init or cfg.resume):
        cfg.cnn = os.path.join(cfg.out_dir, "cnn_pretrain.pth")  # every process then loads what rank 0 trained
        if ddp.is_main:
            pretrain_cnn.main([f"--data-root={cfg.data_root}", f"--model={cfg.model}", f"--out={cfg.cnn}",
                               f"--epochs={cfg.cnn_pretrain_epochs}", f"--dtype={cfg.dtype}", f"--device={ddp.device}",
                               f"--num-workers={cfg.num_workers}", f"--seed={cfg.seed}",
                               f"--{'' if cfg.skip_bad_images else 'no-'}skip-bad-images"])
    init_state, tokenizer = checkpoint.init_and_tokenizer(cfg)
    train_index = data.caption_index(dataset, cfg.data_root, "train", tokenizer, cfg.cache_dir or None,
                                     cfg.skip_bad_images)
    val_index = data.caption_index(dataset, cfg.data_root, "val", tokenizer, cfg.cache_dir or None)
    data.check_images([val_index.image_path(i) for i in range(len(val_index.image_paths))], "held-out")
    if ddp.world_size > 1 and ddp.is_main:
        torch.distributed.barrier()

    tasks = set(cfg.tasks.split(","))

    def pairs(index, captions_per_image, skip_bad_images=False):
        return data.PretrainPairs(index, tokenizer, cfg.image_min_size, cfg.image_max_size, cfg.seed,
                                  cfg.itm_neg_prob if "itm" in tasks else 0.0,
                                  cfg.mask_prob if "mlm" in tasks else 0.0, cfg.mlm_on_negatives, captions_per_image,
                                  skip_bad_images, cfg.mask_at_least_one)

    # An epoch is one pass over the pairs: with k captions per image, 1/k as many images.
    sizes = train_index.image_sizes[train_index.caption_image]  # (N, 2) width, height of each pair's image
    sampler = data.MicroBatchSampler(len(train_index), images_per_batch, ddp.world_size, ddp.rank, accum, cfg.seed,
                                     group_ids=(sizes[:, 0] >= sizes[:, 1]).astype(int) if cfg.group_aspect else None,
                                     epoch_size=len(train_index) // cfg.captions_per_image)
    loader_args = dict(collate_fn=data.collate, num_workers=cfg.num_workers, pin_memory=ddp.device.type == "cuda",
                       persistent_workers=cfg.num_workers > 0)
    loader = torch.utils.data.DataLoader(pairs(train_index, cfg.captions_per_image, cfg.skip_bad_images),
                                         batch_sampler=sampler, **loader_args)
    # Held-out pairs: Karpathy-val captions, cycled with a fresh (seeded) draw of negatives and
    # masks on each pass when --eval-pairs exceeds them, so small validation sets still give a
    # steady figure. The same pairs at every evaluation.
    eval_keys = [(EVAL_EPOCH + k // len(val_index), k % len(val_index)) for k in range(cfg.eval_pairs)]
    eval_keys = eval_keys[ddp.rank:: ddp.world_size]
    eval_loader = torch.utils.data.DataLoader(pairs(val_index, 1), batch_size=cfg.batch_size,
                                              sampler=eval_keys, **{**loader_args, "persistent_workers": False})
    steps_per_epoch = sampler.steps_per_epoch
    total_steps, milestones = common.schedule(cfg.epochs, cfg.max_steps, cfg.lr_milestones, steps_per_epoch)
    common.print0(f"data: {len(train_index):,} training pairs on {len(train_index.image_paths):,} images, "
                  f"{len(val_index):,} held-out pairs | global batch {cfg.global_batch} = {cfg.batch_size} per "
                  f"process x {accum} accumulation x {ddp.world_size} processes | {steps_per_epoch} steps/epoch, "
                  f"{total_steps} steps, lr / 10 at steps {milestones}")

    # ---- model
    torch.manual_seed(cfg.seed + ddp.rank)
    raw_model = common.build_model(cfg, ("mlm", "itm"), tokenizer.vocab_size, init_state=init_state).to(ddp.device)
    if cfg.fold_batchnorm:  # check_config made sure the CNN's BatchNorm is the fixed kind
        fold_frozen_batchnorm(raw_model)
    model_cfg = raw_model.config
    if cfg.channels_last:
        raw_model.cnn.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(raw_model, cfg.cnn_lr, cfg.cnn_momentum, cfg.cnn_weight_decay, cfg.lr,
                                 cfg.weight_decay, fused=True,
                                 cnn_optimizer=cfg.cnn_optimizer)
    scaler = torch.amp.GradScaler(ddp.device.type, enabled=cfg.dtype == "fp16")
    state = checkpoint.resume(cfg.out_dir, raw_model, optimizers, scaler, asdict(cfg)) if cfg.resume else {}
    step = state.get("step", 0)
    skipped_steps = state.get("skipped_steps", 0)  # fp16 steps the scaler skipped, over the whole run
    model = common.wrap_model(raw_model, ddp, cfg.compile)
    common.print_model_size(cfg.model, raw_model)

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizers": [o.state_dict() if o else None for o in optimizers],
                "scaler": scaler.state_dict(), "step": step, "rng": checkpoint.rng_state(), "config": asdict(cfg),
                "model_config": asdict(model_cfg), "vocab": tokenizer.vocab_tokens(), "task": "pretrain",
                "skipped_steps": skipped_steps}

    @torch.no_grad()
    def evaluate():
        """Held-out MLM accuracy on matched pairs, and ITM accuracy on unmasked captions, with
        the baselines they must beat: always predicting the most frequent masked token, and
        always predicting the more frequent ITM class."""
        model.eval()
        counts = torch.zeros(4, device=ddp.device)  # mlm correct, itm correct, itm positives, pairs
        label_hist = torch.zeros(tokenizer.vocab_size, device=ddp.device)
        for batch in eval_loader:
            batch = common.batch_to_device(batch, ddp.device, cfg.channels_last, raw_model.config)
            with autocast:
                pixels = raw_model.encode_image(batch["images"], batch["image_mask"])  # one CNN pass, two texts
                hidden, _ = raw_model(batch["mlm_ids"], batch["text_mask"], pixels=pixels)
                labels = batch["mlm_labels"]
                masked = labels != data.IGNORE
                predicted = raw_model.mlm_logits(hidden[:, : labels.shape[1]][masked]).argmax(-1)
                _, pooled = raw_model(batch["input_ids"], batch["text_mask"], pixels=pixels)
                itm_predicted = raw_model.itm_head(pooled).argmax(-1)
            counts += torch.stack([(predicted == labels[masked]).sum(), (itm_predicted == batch["itm_labels"]).sum(),
                                   batch["itm_labels"].sum(), labels.new_tensor(len(labels))]).float()
            label_hist += torch.bincount(labels[masked], minlength=tokenizer.vocab_size).float()
        if ddp.world_size > 1:
            dist.all_reduce(counts)
            dist.all_reduce(label_hist)
        model.train()
        n_masked, n_pairs = max(label_hist.sum().item(), 1), counts[3].item()
        positives = counts[2].item() / n_pairs
        return {"mlm_acc": counts[0].item() / n_masked, "mlm_baseline": label_hist.max().item() / n_masked,
                "itm_acc": counts[1].item() / n_pairs, "itm_baseline": max(positives, 1 - positives)}

    # ---- training loop
    log = common.MetricLog(os.path.join(cfg.out_dir, "metrics.jsonl"), ddp.is_main)
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, "config.json"), {"config": asdict(cfg), "model": asdict(model_cfg)})
    model.train()
    bar = common.Progress(total_steps, step, ddp.is_main)
    t_last, step_last = time.time(), step
    preemption, bad_images = checkpoint.Preemption(), common.BadImages()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, first)  # the data resumes mid-epoch exactly where it stopped
        micro_batches = map(bad_images.note, loader)  # --skip-bad-images: report what collate left out
        for _ in range(first, steps_per_epoch):
            # ---- one optimiser step: `accum` micro-batches on each process make the global batch
            checkpoint.seed_step(cfg.seed, ddp.rank, step)
            micro = [common.batch_to_device(next(micro_batches), ddp.device, cfg.channels_last, raw_model.config)
                     for _ in range(accum)]
            # masked tokens and pairs of the whole global batch, each loss a mean over these (counted on the
            # device: the host does not wait for it)
            counts = torch.stack([sum((b["mlm_labels"] != data.IGNORE).sum() for b in micro),
                                  torch.tensor(sum(len(b["itm_labels"]) for b in micro), device=ddp.device)])
            if ddp.world_size > 1:
                dist.all_reduce(counts)
            num_masked, num_pairs = counts
            # the learning rate: a linear warm-up, then / 10 at each milestone; initial_lr is each group's base rate
            lr_scale = common.lr_factor(step, cfg.warmup_steps, cfg.warmup_start, milestones)
            for group in [g for opt in filter(None, optimizers) for g in opt.param_groups]:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_scale
            totals = torch.zeros(2, device=ddp.device)  # MLM, ITM summed over micro-batches and processes
            for i, batch in enumerate(micro):
                # DDP all-reduces the gradients in backward(); the earlier micro-batches skip it
                with model.no_sync() if ddp.world_size > 1 and i < accum - 1 else nullcontext():
                    with autocast:
                        hidden, pooled = model(batch["mlm_ids"], batch["text_mask"], batch["images"],
                                               batch["image_mask"], image_index=batch["image_index"],
                                               sample_pixel_count=cfg.pixel_samples or None)
                        losses = pretraining_losses(raw_model, hidden, pooled, batch["mlm_labels"],
                                                    batch["itm_labels"], num_masked, num_pairs, tasks)
                    # DDP averages gradients over processes; the losses are global means already
                    scaler.scale(losses.sum() * ddp.world_size).backward()
                totals += losses.detach()
            if ddp.world_size > 1:
                dist.all_reduce(totals)  # summed over the processes, for the log and check_step
            for opt in filter(None, optimizers):
                scaler.unscale_(opt)  # fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            stop, skipped = checkpoint.check_step(step, cfg.out_dir, totals, grad_norm, scaler, preemption)
            for opt in filter(None, optimizers):
                scaler.step(opt)  # fp16: skipped when a gradient overflowed
            scaler.update()
            for opt in filter(None, optimizers):
                opt.zero_grad(set_to_none=True)
            step += 1
            skipped_steps += skipped  # fp16: the scaler skipped an overflowing step
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                rate = (step - step_last) * cfg.global_batch / (time.time() - t_last)
                t_last, step_last = time.time(), step
                lr = optimizers[-1].param_groups[0]["lr"]
                bar.show(step, mlm=f"{totals[0]:.3f}", itm=f"{totals[1]:.3f}", lr=f"{lr:.2e}", pairs_s=f"{rate:.1f}")
                log.write(step=step, epoch=step / steps_per_epoch, mlm_loss=totals[0].item(), itm_loss=totals[1].item(),
                          lr=lr, grad_norm=grad_norm.item(), skipped_steps=skipped_steps, pairs_per_s=rate)
            # A stop signal skips the evaluation: the checkpoint comes first (torchrun kills 30 s later).
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and not stop:
                metrics = evaluate()
                bar.write(f"step {step}: {metrics}")
                log.write(step=step, **metrics)
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

    # ---- final held-out evaluation
    metrics = evaluate()
    log.write(step=step, final=True, **metrics)
    common.print0(f"held-out MLM accuracy {metrics['mlm_acc']:.3f} (most-frequent-token baseline "
                  f"{metrics['mlm_baseline']:.3f}) | ITM accuracy {metrics['itm_acc']:.3f} (majority baseline "
                  f"{metrics['itm_baseline']:.3f})")
    if ddp.is_main:
        checkpoint.save_weights(checkpoint_state(), os.path.join(cfg.out_dir, "final.pt"))
        common.print0(f"saved {os.path.join(cfg.out_dir, 'final.pt')}")
    if ddp.world_size > 1:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
