"""The learning-rate schedule (common.lr_factor, common.schedule) against values computed by hand,
and a short pre-training run whose logged lr follows it step by step. Resume tests cannot see a
wrong schedule (both sides run the same code): only fixed numbers can."""

import json
import os

import pytest
import torch

import common
import data
import pretrain


# ---- lr_factor(step, warmup_steps, warmup_start, milestones): 0-based step, milestones in steps

@pytest.mark.parametrize("step, expected", [
    (0, 0.25),  # the warm-up starts at warmup_start
    (50, 0.625),  # halfway: 0.25 + 0.75 / 2
    (99, 0.9925),  # the last warm-up step: 0.25 + 0.75 * 99 / 100
    (100, 1.0),  # warm-up over
    (150, 1.0),
])
def test_warmup_is_linear_from_warmup_start_to_one(step, expected):
    assert common.lr_factor(step, 100, 0.25, []) == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_full_rate():
    assert common.lr_factor(0, 0, 0.25, []) == 1.0
    assert common.lr_factor(0, 0, 1 / 3, [10]) == 1.0


@pytest.mark.parametrize("step, expected", [
    (0, 1.0), (199, 1.0),  # before the first milestone
    (200, 0.1), (201, 0.1), (299, 0.1),  # from the first milestone's own step on
    (300, 0.01), (10 ** 6, 0.01),  # the second divides by 10 again, and it stays there
])
def test_each_milestone_divides_by_ten_from_its_step(step, expected):
    assert common.lr_factor(step, 0, 0.25, [200, 300]) == pytest.approx(expected, rel=1e-12)


def test_milestone_inside_the_warmup_multiplies_it():
    # step 50 of a 100-step warm-up from 1/3 is at 2/3; a milestone at step 40 divides that by 10
    assert common.lr_factor(50, 100, 1 / 3, [40]) == pytest.approx(2 / 30, rel=1e-12)
    assert common.lr_factor(39, 100, 1 / 3, [40]) == pytest.approx(1 / 3 + 2 / 3 * 39 / 100, rel=1e-12)


# ---- schedule(epochs, max_steps, lr_milestones "epochs,...", steps_per_epoch) -> (total steps, milestone steps)

@pytest.mark.parametrize("args, expected", [
    ((40, 0, "25,35", 100), (4000, [2500, 3500])),  # the paper's pre-training: 40 epochs, lr / 10 at 25 and 35
    ((40, 500, "25,35", 100), (500, [2500, 3500])),  # --max-steps caps the run; milestones stay where they were
    ((2, 10 ** 6, "1", 100), (200, [100])),  # a --max-steps beyond the epochs never lengthens the run
    ((2.5, 0, "0.5,1.25", 10), (25, [5, 12])),  # fractional epochs: 25 steps; 12.5 -> step 12
    ((1.5, 0, "0.25", 37), (55, [9])),  # 55.5 -> 55 steps, 9.25 -> step 9
    ((3, 0, "", 7), (21, [])),  # no milestones (finetune_retrieval's demo)
])
def test_schedule_in_steps(args, expected):
    total, milestones = common.schedule(*args)
    assert (total, list(milestones)) == expected


# ---- the schedule a real run follows

def test_logged_lr_follows_warmup_and_milestone(corpus, tmp_path):
    """6 steps: a 4-step warm-up from 1/3 and a milestone at step 5 (0-based), so the lr of each
    step is lr x [1/3, 1/2, 2/3, 5/6, 1, 1/10]; metrics.jsonl logs the rate the step just used."""
    # steps per epoch as pretrain.py's sampler counts them: captions // (8 images x 2 accumulation)
    tokenizer = data.Tokenizer(os.path.join(corpus, "vocab.txt"), 40)
    steps_per_epoch = len(data.caption_index("coco_vg", corpus, "train", tokenizer)) // 16
    milestone = 5.5 / steps_per_epoch  # epochs; int(5.5) -> step 5
    out = tmp_path / "run"
    lr, cnn_lr = 2e-3, 4e-4
    pretrain.main(["--data=coco_vg", f"--data-root={corpus}", f"--out-dir={out}", "--model=tiny",
                   "--image-min-size=64", "--image-max-size=96", "--batch-size=8", "--global-batch=16",
                   "--dtype=fp32", "--num-workers=0", "--eval-pairs=8", "--max-steps=6", "--log-every=1",
                   "--warmup-steps=4", "--warmup-start=0.3333333333333333", f"--lr-milestones={milestone!r}",
                   f"--lr={lr}", f"--cnn-lr={cnn_lr}", "--cnn-optimizer=adamw", "--epochs=10", "--seed=0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    factors = [1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0, 0.1]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    # metrics.jsonl rounds to 6 decimals; neighbouring factors differ by >= 3e-4 here
    assert [v for _, v in logged] == pytest.approx([lr * f for f in factors], abs=6e-7)
    # the logged epoch shows the sampler's steps per epoch is the one the milestone was computed from
    assert rows[0]["epoch"] == pytest.approx(1 / steps_per_epoch, abs=6e-7)
    # the CNN's optimiser follows the same factor: its rate as the last step left it
    state = torch.load(out / "ckpt_00000006.pt", map_location="cpu", weights_only=True)
    cnn_group, bert_group = (o["param_groups"][0] for o in state["optimizers"])
    assert cnn_group["lr"] == pytest.approx(cnn_lr * 0.1) and bert_group["lr"] == pytest.approx(lr * 0.1)
