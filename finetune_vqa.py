"""
Pixel-BERT fine-tuning on VQA 2.0 (paper 4.2): [CLS] -> MLP -> a score per answer of a fixed
vocabulary, binary cross-entropy against soft targets (each answer's official VQA accuracy
given the ten human answers).

    python3 finetune_vqa.py    # demo: fine-tunes runs/demo_pretrain/final.pt (run python3 pretrain.py first)
    torchrun --nproc_per_node=8 finetune_vqa.py --data vqa --data-root /datasets \
        --init runs/pretrain_r50/final.pt --batch-size 32

Reads top to bottom like pretrain.py: config -> processes -> data -> model -> optimisers ->
loop (with held-out evaluation each epoch, best checkpoint kept) -> final evaluation.
SIGTERM / SIGUSR1 finish the step in flight, write a checkpoint and exit with status 75;
the same command with --resume continues exactly (docs/reliability.md).
"""

import json
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
from evaluate import predict_vqa, vqa_eval_loader
from metrics import VQA_RULES, check_predictions, vqa_score
from model import fold_frozen_batchnorm, make_optimizers, vqa_loss


@dataclass
class Config:
    """Pixel-BERT fine-tuning on VQA 2.0: an MLP on [CLS] scores each answer of a fixed vocabulary.
    The defaults are the paper's recipe for --data vqa (paper 4.2)."""
    # data
    data: Literal["demo", "vqa"] = "demo"  # demo: the built-in corpus's VQA v2 files | vqa: the official VQA v2
    #  files under --data-root
    data_root: str = "data/demo"  # folder of the official files (README: Real data) or of the demo corpus
    vocab: str = ""  # WordPiece vocab.txt; none: the --init checkpoint's, else the --bert folder's, else
    #  <data-root>/vocab.txt
    train_split: Literal["train", "trainval", "trainval_all"] = "trainval"  # train | trainval: train + val minus
    #  minival (the run whose best epoch fixes the final run's schedule) | trainval_all: all of train + val (the
    #  final run, with --eval-split none)
    eval_split: Literal["val", "minival", "none"] = "minival"  # held-out questions scored after each epoch, which
    #  choose best.pt: val | minival | none: the final run, no held-out selection: the last step's weights go to
    #  final.pt, and its answers to every test2015 question to the test-dev and test submission files beside it
    minival_images: int = 5000  # val2014 images (with all their questions) held out of val as minival
    min_answer_count: int = 9  # answers (normalised) given at least this often in train + val make the answer
    #  vocabulary (3,129 answers on VQA v2 at 9)
    vqa_rules: Literal[VQA_RULES] = "current"  # the official VQA tool's answer processing, for the soft targets
    #  and the held-out accuracy: current (since its 2021 fix) | 2017 (its older copy, to compare with old numbers)
    image_min_size: int = 800  # pixels: each image is resized so that its shorter side is this...
    image_max_size: int = 1333  # pixels: ...or its longer side this, whichever is smaller
    max_text_len: int = 40  # word pieces of a question, [CLS] and [SEP] included; longer questions are cut
    questions_per_image: int = 1  # questions that share one image and its CNN pass (1: the paper's)
    num_workers: int = 6  # DataLoader processes per training process (0: load in the training process)
    skip_bad_images: bool = False  # report, count and skip unreadable training images instead of stopping
    # model: a pre-training checkpoint (--init), or the --model architecture with --bert and --cnn weights
    init: str = ""  # the Pixel-BERT checkpoint to fine-tune (pretrain.py's final.pt)
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
    # optimisation: 256 questions a step, 18 epochs, lr / 10 at epochs 12 and 16 (paper 4.2)
    batch_size: int = 32  # questions per process and micro-step; gradient accumulation fills --global-batch
    global_batch: int = 256  # questions per optimiser step, all processes and micro-steps together
    epochs: float = 18  # passes over the training questions
    max_steps: int = 0  # optimiser steps at most (0: as many as --epochs make)
    lr_milestones: str = "12,16"  # epochs at which every learning rate is divided by 10, comma-separated
    lr: float = 1e-4  # AdamW's learning rate: Transformer, visual embedding and head (pre-training's)
    weight_decay: float = 1e-2  # AdamW's weight decay
    cnn_lr: float = 1e-2  # the CNN's learning rate (0: the CNN stays as loaded)
    cnn_weight_decay: float = 5e-4  # the CNN's weight decay
    cnn_momentum: float = 0.9  # the CNN's SGD momentum
    cnn_optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's | adamw
    warmup_steps: int = 500  # optimiser steps of linear learning-rate warm-up (not given in the paper)
    warmup_start: float = 1 / 3  # the warm-up's first learning rates, a fraction of --lr and --cnn-lr
    grad_clip: float = 10.0  # largest global gradient norm (0: no clipping)
    seed: int = 0  # seeds the new head, the data order and dropout
    # precision and device
    dtype: Literal[common.DTYPES] = "auto"  # auto: bf16 where the device has it natively, else fp32 on a CPU
    #  and fp16 on a GPU
    device: str = ""  # cpu, cuda, cuda:1...; none: cuda if there is a GPU, else cpu
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC convolutions in the CNN (faster with bf16 on GPUs and AMX CPUs)
    fold_batchnorm: bool = False  # apply the CNN's fixed BatchNorm inside its convolutions (same weights,
    #  checkpoints and gradients, fewer passes over the activations: a speed option for r50 / x152 on GPUs);
    #  only for BatchNorm with fixed statistics (not the tiny model's)
    # logging and checkpoints
    out_dir: str = "runs/vqa"  # run folder: config.json, ans2label.json, metrics.jsonl, ckpt_<step>.pt, best.pt
    #  (--eval-split none: final.pt, vqa_test-dev_submission.json, vqa_test_submission.json)
    log_every: int = 50  # optimiser steps between logged losses (held-out accuracy: after each epoch)
    ckpt_every: int = 2000  # optimiser steps between step checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # step checkpoints kept, the newest
    resume: bool = False  # continue exactly from the newest complete checkpoint in --out-dir


# The demo: the tiny model pre-trained by `python pretrain.py`, on the demo corpus's VQA files (docs/demo.md
# has the sweep behind each choice). A lower fine-tuning lr than pre-training's keeps what pre-training
# learned. The CNN stays as pre-training left it: fine-tuned too, it fit the training questions better but
# not the held-out ones, and the fixed CNN skips its backward pass.
PRESETS = {"demo": dict(model="tiny", init="runs/demo_pretrain/final.pt", image_min_size=128, image_max_size=192,
                        batch_size=160, global_batch=160, questions_per_image=5, epochs=16, lr_milestones="12",
                        lr=3e-4, cnn_lr=0.0, cnn_optimizer="adamw", warmup_steps=30, dropout=0.0,
                        minival_images=100, min_answer_count=1, num_workers=1, log_every=10, ckpt_every=500,
                        out_dir="runs/demo_vqa")}


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    common.check_config(cfg)
    if cfg.train_split == "trainval" and cfg.eval_split == "val":
        raise common.refuse("eval_split", "val", "--train-split trainval contains most of val: use minival")
    if cfg.train_split == "trainval_all" and cfg.eval_split != "none":
        raise common.refuse("eval_split", cfg.eval_split, "--train-split trainval_all trains on every val question: "
                                                          "pass --eval-split none (the final run, its schedule "
                                                          "chosen on a minival run)")
    final = cfg.eval_split == "none"  # the final run: a fixed schedule, final.pt and the test submissions
    ddp = common.setup_distributed(cfg.device)
    cfg.dtype = common.resolve_dtype(cfg.dtype, ddp.device)
    # bf16 / fp16: autocast runs the matrix products in half precision; reductions and losses stay in fp32
    autocast = common.autocast(ddp.device, cfg.dtype)  # one context, entered at every forward
    common.print0(f"config: {asdict(cfg)}")
    torch.manual_seed(cfg.seed + ddp.rank)
    accum, images_per_batch = common.batch_plan(cfg.global_batch, cfg.batch_size, ddp.world_size,
                                                cfg.questions_per_image, "--questions-per-image")
    checkpoint.prepare_out_dir(cfg, ddp)

    # ---- data: questions, the answer vocabulary (from train + val, as is standard), soft targets
    init_state, tokenizer = checkpoint.init_and_tokenizer(cfg)
    train_q, train_a = data.read_vqa(cfg.data_root, cfg.train_split, cfg.minival_images, cfg.skip_bad_images)
    eval_q, eval_a = data.read_vqa(cfg.data_root, cfg.eval_split, cfg.minival_images) if not final else ([], [])
    # The vocabulary comes from all of train + val, whichever parts train and select, so a final run
    # has the answers of the minival run that chose its schedule. `rest`: the part of val not trained on.
    rest = {"train": "val", "trainval": "minival", "trainval_all": None}[cfg.train_split]
    vocab_a = train_a + (eval_a if cfg.eval_split == rest else
                         data.read_vqa(cfg.data_root, rest, cfg.minival_images)[1] if rest else [])
    # The final run answers every test2015 question at the end (the server wants all of them for test-dev
    # too); read here, so that a missing test image stops the run before the training, not after it.
    test_file = "vqa/v2_OpenEnded_mscoco_test2015_questions.json"
    test_q = []
    if final and os.path.exists(os.path.join(cfg.data_root, test_file)):
        test_q, _ = data.read_vqa(cfg.data_root, "test")
    elif final:
        common.print0(f"{os.path.join(cfg.data_root, test_file)} not found: this final run writes final.pt but no "
                      f"submission file (get {data.DOWNLOADS[test_file]})")
    answers = data.vqa_answer_vocab(vocab_a, cfg.min_answer_count)
    check_answer_vocab(answers, init_state.get("answers"), cfg.init)
    if cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "ans2label.json")):
        with open(os.path.join(cfg.out_dir, "ans2label.json")) as f:
            check_answer_vocab(answers, list(json.load(f)), os.path.join(cfg.out_dir, "ans2label.json"))
    answer_to_label = {a: i for i, a in enumerate(answers)}
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, "ans2label.json"), answer_to_label)

    def questions(qs, anns, per_image, skip_bad_images=False):
        return data.VQAQuestions(cfg.data_root, qs, anns, tokenizer, answer_to_label, cfg.image_min_size,
                                 cfg.image_max_size, cfg.seed, per_image, skip_bad_images, cfg.vqa_rules)

    train_set = questions(train_q, train_a, cfg.questions_per_image, cfg.skip_bad_images)
    eval_set = questions(eval_q, eval_a, 0) if not final else None
    test_set = questions(test_q, [], 0) if test_q else None
    for split, held in ((cfg.eval_split, eval_set), ("test2015", test_set)):
        if held is not None:
            data.check_images([os.path.join(cfg.data_root, str(p)) for p in held.image_paths], split)
    sampler = data.MicroBatchSampler(len(train_set), images_per_batch, ddp.world_size, ddp.rank, accum, cfg.seed,
                                     epoch_size=len(train_set) // cfg.questions_per_image)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=data.collate,
                                         num_workers=cfg.num_workers, pin_memory=ddp.device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0)
    held_out = vqa_eval_loader(eval_set, images_per_batch, ddp, cfg.num_workers) if not final else None
    test_loader = vqa_eval_loader(test_set, images_per_batch, ddp, cfg.num_workers) if test_set else None
    steps_per_epoch = sampler.steps_per_epoch
    total_steps, milestones = common.schedule(cfg.epochs, cfg.max_steps, cfg.lr_milestones, steps_per_epoch)
    held = (f"{len(eval_set):,} {cfg.eval_split} questions" if not final else
            f"no held-out questions, {len(test_q):,} test2015 questions to answer at the end")
    common.print0(f"data: {len(train_set):,} {cfg.train_split} questions, {held}, {len(answers):,} answers (seen >= "
                  f"{cfg.min_answer_count} times) | global batch {cfg.global_batch} = {cfg.batch_size} per process x "
                  f"{accum} accumulation x {ddp.world_size} processes | {steps_per_epoch} steps/epoch, {total_steps} "
                  f"steps, lr / 10 at steps {milestones}")

    # ---- model: the trunk from --init (or BERT + CNN weights), a new VQA head
    raw_model = common.build_model(cfg, ("vqa",), tokenizer.vocab_size, len(answers), init_state).to(ddp.device)
    if cfg.fold_batchnorm:  # check_config made sure the CNN's BatchNorm is the fixed kind
        fold_frozen_batchnorm(raw_model)
    if cfg.channels_last:
        raw_model.cnn.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(raw_model, cfg.cnn_lr, cfg.cnn_momentum, cfg.cnn_weight_decay, cfg.lr,
                                 cfg.weight_decay, fused=True,
                                 cnn_optimizer=cfg.cnn_optimizer)
    scaler = torch.amp.GradScaler(ddp.device.type, enabled=cfg.dtype == "fp16")
    state = checkpoint.resume(cfg.out_dir, raw_model, optimizers, scaler, asdict(cfg)) if cfg.resume else {}
    step, best = state.get("step", 0), state.get("best", {"overall": -1.0})
    skipped_steps = state.get("skipped_steps", 0)  # fp16 steps the scaler skipped, over the whole run
    model = common.wrap_model(raw_model, ddp, cfg.compile)
    common.print_model_size(cfg.model, raw_model)

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizers": [o.state_dict() if o else None for o in optimizers],
                "scaler": scaler.state_dict(), "step": step, "rng": checkpoint.rng_state(), "config": asdict(cfg),
                "model_config": asdict(raw_model.config), "vocab": tokenizer.vocab_tokens(), "answers": answers,
                "best": best, "task": "vqa", "skipped_steps": skipped_steps}

    def evaluate():
        predictions = predict_vqa(raw_model, held_out, answers, ddp, cfg.dtype, cfg.channels_last)
        model.train()
        return vqa_score(predictions, eval_a, f"{cfg.eval_split} predictions", rules=cfg.vqa_rules)

    # ---- training loop
    log = common.MetricLog(os.path.join(cfg.out_dir, "metrics.jsonl"), ddp.is_main)
    if ddp.is_main:
        common.write_json(os.path.join(cfg.out_dir, "config.json"),
                          {"config": asdict(cfg), "model": asdict(raw_model.config)})
    model.train()
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
            num_questions = torch.tensor(sum(len(b["question_id"]) for b in micro), device=ddp.device, dtype=torch.float)
            if ddp.world_size > 1:
                dist.all_reduce(num_questions)
            # the learning rate: a linear warm-up, then / 10 at each milestone; initial_lr is each group's base rate
            lr_scale = common.lr_factor(step, cfg.warmup_steps, cfg.warmup_start, milestones)
            for group in [g for opt in filter(None, optimizers) for g in opt.param_groups]:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_scale
            totals = torch.zeros(1, device=ddp.device)  # the loss summed over micro-batches and processes
            for i, batch in enumerate(micro):
                # DDP all-reduces the gradients in backward(); the earlier micro-batches skip it
                with model.no_sync() if ddp.world_size > 1 and i < accum - 1 else nullcontext():
                    with autocast:
                        _, pooled = model(batch["input_ids"], batch["text_mask"], batch["images"], batch["image_mask"],
                                          image_index=batch["image_index"])
                        loss = vqa_loss(raw_model, pooled, batch["targets"], num_questions)
                    # DDP averages gradients over processes; the loss is a global mean already
                    scaler.scale(loss.sum() * ddp.world_size).backward()
                totals += loss.detach()
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
                bar.show(step, bce=f"{totals[0]:.3f}", lr=f"{lr:.2e}", questions_s=f"{rate:.1f}")
                log.write(step=step, epoch=step / steps_per_epoch, loss=totals[0].item(), lr=lr,
                          grad_norm=grad_norm.item(), skipped_steps=skipped_steps, questions_per_s=rate)
            # held-out accuracy each epoch, best kept; a stop signal skips it: the checkpoint comes first
            if (step % steps_per_epoch == 0 or step == total_steps) and not stop and not final:
                metrics = evaluate()
                log.write(step=step, epoch=step / steps_per_epoch, **{cfg.eval_split: metrics})
                bar.write(f"epoch {step / steps_per_epoch:.1f}: {cfg.eval_split} accuracy "
                          f"{metrics['overall']:.2f} {metrics['perAnswerType']}")
                if metrics["overall"] > best["overall"]:
                    best = {**metrics, "step": step}
                    if ddp.is_main:
                        checkpoint.save_weights(checkpoint_state(), os.path.join(cfg.out_dir, "best.pt"))
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

    if final:
        # ---- the final run: the last step's weights, and their answers to every test2015 question
        result = {"final": os.path.join(cfg.out_dir, "final.pt"), "step": step}
        if ddp.is_main:
            checkpoint.save_weights(checkpoint_state(), result["final"])
        if test_set is not None:
            predictions = predict_vqa(raw_model, test_loader, answers, ddp, cfg.dtype, cfg.channels_last)
            for split in ("test-dev", "test"):  # evaluate.py vqa --split <split>'s file names
                result[split] = os.path.join(cfg.out_dir, f"vqa_{split}_submission.json")
                if ddp.is_main:
                    write_submission(predictions, test_q, result[split])
        common.print0(f"final run: saved {result['final']} (step {step}); "
                      + (f"{len(test_q):,} test2015 answers in {result['test-dev']} and {result['test']}: upload them "
                         f"to the VQA challenge on EvalAI" if test_set is not None else "no submission file"))
    else:
        result = best
        common.print0(f"best {cfg.eval_split} VQA accuracy {best['overall']:.2f} at step {best.get('step')} "
                      f"(per answer type {best.get('perAnswerType')}); saved {os.path.join(cfg.out_dir, 'best.pt')}")
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return result


def write_submission(predictions, questions, path):
    """The test server's file: [{"question_id", "answer"}] in the questions file's order, each
    question exactly once (checked), written whole to a temporary file and then renamed."""
    order = {q["question_id"]: i for i, q in enumerate(questions)}
    predictions = sorted(predictions, key=lambda p: order[p["question_id"]])
    check_predictions(predictions, list(order), path)
    with open(path + ".tmp", "w") as f:
        json.dump(predictions, f)
    os.replace(path + ".tmp", path)


def check_answer_vocab(answers, other, source):
    """An answer vocabulary saved elsewhere (a checkpoint, a run folder) must be ours exactly:
    the head's outputs are indexed by it."""
    if other is not None and list(other) != list(answers):
        raise SystemExit(f"{source} has another answer vocabulary ({len(other)} answers) than this data gives "
                         f"({len(answers)}, --min-answer-count and the splits decide it); fine-tune from a "
                         f"pre-training checkpoint, or use the same data and settings")


if __name__ == "__main__":
    common.run(main)  # one line per error, never a stack; exit 2 for a flag, 1 for data (docs/reliability.md)
