"""VQA v2: the official files read per split, the answer vocabulary and soft targets, the label
map's round trip through checkpoints, the submission file, and a short fine-tuning run."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import common
import data
import evaluate
import finetune_vqa
import pretrain
from model import PixelBert, PixelBertConfig


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A few steps of demo pre-training: a checkpoint in the format finetune_vqa.py starts from."""
    out = str(tmp_path_factory.mktemp("pre") / "run")
    pretrain.main([f"--data-root={corpus}", f"--out-dir={out}", "--max-steps=2", "--batch-size=16",
                   "--global-batch=16", "--captions-per-image=2", "--image-min-size=64", "--image-max-size=96",
                   "--eval-pairs=16", "--num-workers=0", "--dtype=fp32"])
    return os.path.join(out, "final.pt")


def humans(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def run_args(corpus, init, out, **overrides):
    args = dict(data_root=corpus, init=init, out_dir=out, image_min_size=64, image_max_size=96, batch_size=20,
                global_batch=20, questions_per_image=2, max_steps=4, epochs=2, num_workers=0, dtype="fp32",
                minival_images=100, log_every=1, seed=0)
    args.update(overrides)
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def test_splits(corpus):
    train, train_a = data.read_vqa(corpus, "train")
    val, val_a = data.read_vqa(corpus, "val")
    minival, _ = data.read_vqa(corpus, "minival", minival_images=100)
    trainval, trainval_a = data.read_vqa(corpus, "trainval", minival_images=100)
    ids = lambda qs: {q["question_id"] for q in qs}  # noqa: E731
    assert train and val and minival and len(train_a) == len(train) and len(val_a) == len(val)
    assert ids(minival) < ids(val) and ids(trainval) == ids(train) | (ids(val) - ids(minival))
    assert not {q["image_id"] for q in minival} & {q["image_id"] for q in trainval}  # held out by image
    assert [a["question_id"] for a in trainval_a] == [q["question_id"] for q in trainval]
    test, test_a = data.read_vqa(corpus, "test-dev")
    with open(os.path.join(corpus, "vqa/v2_OpenEnded_mscoco_test2015_questions.json")) as f:
        assert ids(test) == ids(json.load(f)["questions"]) and test_a == []  # every test2015 question
    assert all(os.path.exists(os.path.join(corpus, q["image_path"])) for q in train + test)


def test_png_images_and_missing_ones(corpus, tmp_path):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    questions, _ = data.read_vqa(str(root), "val")
    jpg = root / questions[0]["image_path"]
    from PIL import Image
    Image.open(jpg).save(jpg.with_suffix(".png"))
    os.remove(jpg)
    again, _ = data.read_vqa(str(root), "val")
    assert again[0]["image_path"].endswith(".png")
    os.remove(jpg.with_suffix(".png"))
    with pytest.raises(data.DataError, match=f"{jpg.name}.*not found"):
        data.read_vqa(str(root), "val")


def test_bad_records_are_named(corpus, tmp_path):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(corpus, root)
    path = root / "vqa/v2_mscoco_val2014_annotations.json"
    d = json.loads(path.read_text())
    del d["annotations"][3]["answers"][2]["answer"]
    path.write_text(json.dumps(d))
    with pytest.raises(data.DataError, match=r"annotations\[3\]\.answers\[2\]: field 'answer'"):
        data.read_vqa(str(root), "val")
    with pytest.raises(data.DataError, match="choose one of"):
        data.read_vqa(str(root), "testdev")


def test_answer_vocab_and_soft_targets():
    annotations = [{"multiple_choice_answer": a, "answers": []} for a in ["Two", "2", "yes", "yes", "no", "red."]]
    vocab = data.vqa_answer_vocab(annotations, min_count=2)
    assert vocab == ["2", "yes"]  # normalised before counting; ties broken alphabetically
    answer_to_label = {"2": 0, "yes": 1, "no": 2, "red": 3}
    ann = {"answers": humans(*["2"] * 2, *["two"] * 3, "yes", *["no"] * 4)}
    labels, scores = data.vqa_soft_targets(ann, answer_to_label)
    # The annotators disagree, so the current official tool normalises their answers too: the three
    # "two"s match the candidate "2" with the two "2"s (5 matches: 1.0)
    assert dict(zip(labels, np.round(scores, 4))) == {0: 1.0, 1: 0.3, 2: 1.0}
    labels, scores = data.vqa_soft_targets(ann, answer_to_label, rules="2017")
    # the 2017 tool left the human answers' number words as written: only the literal "2"s match
    assert dict(zip(labels, np.round(scores, 4))) == {0: 0.6, 1: 0.3, 2: 1.0}
    with pytest.raises(data.DataError, match="lower --min-answer-count"):
        data.vqa_answer_vocab(annotations, min_count=10)


@pytest.mark.slow
def test_finetune_improves_and_checkpoint_round_trip(corpus, pretrained, tmp_path):
    """Six epochs on the small corpus lift minival accuracy far above the untrained head's, and
    best.pt holds what evaluate.py needs. Measured over seeds 0, 1, 2 (pre-training and
    fine-tuning): 12.4-20.8 at the start, 60.0-63.6 at best; the test asks +10."""
    out = str(tmp_path / "vqa")
    start = finetune_vqa.main(run_args(corpus, pretrained, out, max_steps=1, lr=1e-9, cnn_lr=1e-9))
    best = finetune_vqa.main(run_args(corpus, pretrained, str(tmp_path / "vqa2"), max_steps=0, epochs=6, lr=2e-3,
                                      cnn_lr=1e-3))
    assert best["overall"] > start["overall"] + 10, (start, best)
    state = checkpoint.load_checkpoint(os.path.join(out, "best.pt"))
    with open(os.path.join(out, "ans2label.json")) as f:
        ans2label = json.load(f)
    assert state["answers"] == sorted(ans2label, key=ans2label.get) and state["task"] == "vqa"
    # evaluate.py with the checkpoint's own vocabulary reproduces the run's held-out figure
    result = evaluate.main(["vqa", f"--checkpoint={os.path.join(out, 'best.pt')}", f"--data-root={corpus}",
                            "--split=minival", "--minival-images=100", "--num-workers=0", "--dtype=fp32",
                            f"--ans2label={os.path.join(out, 'ans2label.json')}"])
    assert result["overall"] == start["overall"]
    # a label map that is not the checkpoint's is refused
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({a: i for i, a in enumerate(reversed(state["answers"]))}))
    with pytest.raises(SystemExit, match="does not match the answer vocabulary"):
        evaluate.main(["vqa", f"--checkpoint={os.path.join(out, 'best.pt')}", f"--data-root={corpus}",
                       f"--ans2label={wrong}", "--num-workers=0"])
    # the submission file answers every test2015 question exactly once
    sub = evaluate.main(["vqa", f"--checkpoint={os.path.join(out, 'best.pt')}", f"--data-root={corpus}",
                         "--split=test-dev", f"--out={tmp_path / 'sub.json'}", "--num-workers=0", "--dtype=fp32"])
    with open(sub["submission"]) as f:
        submission = json.load(f)
    with open(os.path.join(corpus, "vqa/v2_OpenEnded_mscoco_test2015_questions.json")) as f:
        test_ids = [q["question_id"] for q in json.load(f)["questions"]]
    assert [p["question_id"] for p in submission] == test_ids
    assert all(p["answer"] in state["answers"] for p in submission)


def test_final_run_trains_on_all_of_train_and_val_and_writes_the_submissions(corpus, pretrained, tmp_path,
                                                                              monkeypatch, capsys):
    """--train-split trainval_all --eval-split none, the paper's setting for test-dev / test-std:
    every train and val question is trained on (minival included), nothing is scored or selected
    during the run, final.pt holds the last step, and the two submission files answer every
    test2015 question in the file's order, as evaluate.py vqa --split test-dev does from final.pt.
    Without the test questions file the run still trains and writes final.pt, and says why there
    is no submission."""
    made, predicted = [], []

    class Recorded(data.VQAQuestions):
        def __init__(self, root, questions, *args, **kwargs):
            super().__init__(root, questions, *args, **kwargs)
            made.append(set(self.question_ids.tolist()))
    monkeypatch.setattr(data, "VQAQuestions", Recorded)

    def predict(*args, **kwargs):
        predicted.append(len(args[1].dataset))
        return evaluate.predict_vqa(*args, **kwargs)
    monkeypatch.setattr(finetune_vqa, "predict_vqa", predict)
    out = str(tmp_path / "final")
    result = finetune_vqa.main(run_args(corpus, pretrained, out, train_split="trainval_all", eval_split="none",
                                        max_steps=3))
    ids = lambda qs: {q["question_id"] for q in qs}  # noqa: E731
    train, val = data.read_vqa(corpus, "train"), data.read_vqa(corpus, "val")
    minival, _ = data.read_vqa(corpus, "minival", minival_images=100)
    with open(os.path.join(corpus, "vqa/v2_OpenEnded_mscoco_test2015_questions.json")) as f:
        test_ids = [q["question_id"] for q in json.load(f)["questions"]]
    assert minival and made[0] == ids(train[0]) | ids(val[0])  # every val question trained on, minival's too
    assert made[1:] == [set(test_ids)] and predicted == [len(test_ids)]  # no held-out set: only the test answers
    state = checkpoint.load_checkpoint(result["final"])
    assert result["step"] == state["step"] == 3 and state["task"] == "vqa"
    assert not os.path.exists(os.path.join(out, "best.pt")) and os.path.exists(os.path.join(out, "final.pt"))
    # the minival run's answer vocabulary: all of train + val
    assert state["answers"] == data.vqa_answer_vocab(train[1] + val[1], min_count=1)
    for split in ("test-dev", "test"):
        assert result[split] == os.path.join(out, f"vqa_{split}_submission.json")
        with open(result[split]) as f:
            submission = json.load(f)
        assert [p["question_id"] for p in submission] == test_ids
        assert all(p["answer"] in state["answers"] for p in submission)
    again = evaluate.main(["vqa", f"--checkpoint={result['final']}", f"--data-root={corpus}", "--split=test-dev",
                           f"--out={tmp_path / 'again.json'}", "--num-workers=0", "--dtype=fp32"])
    with open(again["submission"]) as f, open(result["test-dev"]) as g:
        assert json.load(f) == json.load(g)
    # a root without the test questions: final.pt, no submission, and a line that says so
    import shutil
    root = tmp_path / "root"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns(".pixelbert_cache", "*test2015_questions.json"))
    capsys.readouterr()
    result = finetune_vqa.main(run_args(str(root), pretrained, str(tmp_path / "no_test"), train_split="trainval_all",
                                        eval_split="none", max_steps=1))
    assert set(result) == {"final", "step"} and os.path.exists(result["final"])
    assert "v2_OpenEnded_mscoco_test2015_questions.json not found" in capsys.readouterr().out


def test_final_run_refuses_a_held_out_split_it_trains_on(corpus, pretrained, tmp_path):
    with pytest.raises(SystemExit, match="--eval-split minival: --train-split trainval_all trains on every val"):
        finetune_vqa.main(run_args(corpus, pretrained, str(tmp_path / "x"), train_split="trainval_all"))


def test_fold_batchnorm_trains_as_the_plain_model(corpus, tmp_path, monkeypatch):
    """--fold-batchnorm on a model whose BatchNorm is fixed (norm "frozen", as r50 / x152): the
    same losses, the same checkpoint keys and, after SGD steps on the CNN, the same CNN weights as
    without it (the gradients reach the convolutions through the folded path alike)."""
    from model import FrozenBatchNorm2d
    tokenizer = data.Tokenizer(os.path.join(corpus, "vocab.txt"))
    torch.manual_seed(0)
    model = PixelBert(PixelBertConfig.tiny(vocab_size=tokenizer.vocab_size, norm="frozen"))
    with torch.no_grad():  # statistics that are not the identity, so that folding has something to do
        for m in model.cnn.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / "pre.pt")
    checkpoint.save_weights({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                             "vocab": tokenizer.vocab_tokens(), "task": "pretrain"}, path)
    folded_models, fold_frozen_batchnorm = [], finetune_vqa.fold_frozen_batchnorm

    def record_fold(model):  # the flag really folds
        folded_models.append(fold_frozen_batchnorm(model))
        return folded_models[-1]
    monkeypatch.setattr(finetune_vqa, "fold_frozen_batchnorm", record_fold)
    runs = {}
    for fold in (False, True):  # the Transformer held still (lr 1e-9): AdamW would magnify rounding
        out = str(tmp_path / f"fold_{fold}")
        finetune_vqa.main(run_args(corpus, path, out, max_steps=2, epochs=1, lr=1e-9, cnn_lr=0.1, cnn_optimizer="sgd")
                          + ["--fold-batchnorm" if fold else "--no-fold-batchnorm"])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[fold] = ([json.loads(line)["loss"] for line in f if '"loss"' in line],
                          checkpoint.load_checkpoint(checkpoint.step_checkpoints(out)[-1])["model"])
    (plain_losses, plain), (folded_losses, folded) = runs[False], runs[True]
    assert len(folded_models) == 1 and type(folded_models[0].cnn.conv1).__name__ == "FoldedConv2d"
    assert folded_losses == pytest.approx(plain_losses, rel=1e-4) and len(plain_losses) == 2
    assert folded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(folded[name], plain[name], atol=1e-4, rtol=1e-3)  # rounding, after a 0.1 lr
    conv = "cnn.layer1.0.conv1.weight"
    assert (plain[conv] - model.state_dict()[conv]).abs().max() > 1e-3  # the CNN did train


def test_cnn_lr_zero_keeps_the_cnn_fixed(corpus, pretrained, tmp_path):
    """--cnn-lr 0 (the demo's setting) trains the Transformer and head only: the CNN's weights
    come out as they went in: they take no gradient and get no optimiser (which the old lr-0
    optimiser would have had), and a resume with a CNN lr gives it a fresh one."""
    out = str(tmp_path / "vqa")
    finetune_vqa.main(run_args(corpus, pretrained, out, max_steps=2, epochs=1, lr=1e-3, cnn_lr=0))
    before = checkpoint.load_checkpoint(pretrained)["model"]
    after = checkpoint.load_checkpoint(checkpoint.step_checkpoints(out)[-1])
    cnn = [k for k in before if k.startswith("cnn.") and not k.endswith(("running_mean", "running_var", "tracked"))]
    assert cnn and all(torch.equal(before[k], after["model"][k]) for k in cnn)
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["model"]["bert.encoder.layer.0.attention.self.query.weight"])
    assert after["optimizers"][0] is None
    finetune_vqa.main(run_args(corpus, pretrained, out, max_steps=3, epochs=1, lr=1e-3, cnn_lr=1e-3) + ["--resume"])
    resumed = checkpoint.load_checkpoint(checkpoint.step_checkpoints(out)[-1])
    assert resumed["step"] == 3 and resumed["optimizers"][0] is not None
    assert not all(torch.equal(before[k], resumed["model"][k]) for k in cnn)


def test_mismatched_answer_vocab_refused(corpus, pretrained, tmp_path):
    out = str(tmp_path / "vqa")
    finetune_vqa.main(run_args(corpus, pretrained, out, max_steps=1))
    state = checkpoint.load_checkpoint(os.path.join(out, "best.pt"))
    state["answers"] = state["answers"][::-1]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="another answer vocabulary"):
        finetune_vqa.main(run_args(corpus, str(tmp_path / "other.pt"), str(tmp_path / "x"), max_steps=1))


def test_vqa_score_cli_reports_missing_questions(corpus, tmp_path):
    questions = os.path.join(corpus, "vqa/v2_OpenEnded_mscoco_val2014_questions.json")
    annotations = os.path.join(corpus, "vqa/v2_mscoco_val2014_annotations.json")
    with open(annotations) as f:
        anns = json.load(f)["annotations"]
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
                                 for a in anns]))
    result = evaluate.main(["vqa-score", f"--predictions={preds}", f"--questions={questions}",
                            f"--annotations={annotations}"])
    assert 90 < result["overall"] <= 100 and set(result["perAnswerType"]) == {"yes/no", "number", "other"}
    preds.write_text(json.dumps([{"question_id": a["question_id"], "answer": "yes"} for a in anns[1:]]))
    with pytest.raises(SystemExit, match="1 missing"):
        evaluate.main(["vqa-score", f"--predictions={preds}", f"--questions={questions}",
                       f"--annotations={annotations}"])


def tiny_vqa_checkpoint(corpus, path):
    """A randomly initialised tiny VQA model saved as finetune_vqa.py saves best.pt."""
    torch.manual_seed(0)
    tokenizer = data.Tokenizer(os.path.join(corpus, "vocab.txt"))
    answers = data.vqa_answer_vocab(data.read_vqa(corpus, "train")[1], min_count=1)
    model = PixelBert(PixelBertConfig.tiny(vocab_size=tokenizer.vocab_size, heads=("vqa",), num_answers=len(answers)))
    config = dict(minival_images=100, image_min_size=96, image_max_size=160, max_text_len=40)
    checkpoint.save_weights({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                             "vocab": tokenizer.vocab_tokens(), "answers": answers, "config": config, "task": "vqa"},
                            path)
    return model.eval(), tokenizer, answers


def test_each_held_out_image_is_encoded_as_if_alone(corpus, tmp_path):
    """Padded to a larger neighbour, an image's CNN features change along its border: the
    held-out predictions encode each image at its own padded size, so a batch gives what each
    image gives alone, and the VQA predictions do not depend on the batch size."""
    model, tokenizer, answers = tiny_vqa_checkpoint(corpus, str(tmp_path / "best.pt"))
    questions, annotations = data.read_vqa(corpus, "val")
    dataset = data.VQAQuestions(corpus, questions, annotations, tokenizer, {a: i for i, a in enumerate(answers)},
                                96, 160, questions_per_image=0)
    ddp = common.Dist(0, 0, 1, torch.device("cpu"))
    batch = common.batch_to_device(next(iter(evaluate.vqa_eval_loader(dataset, 8, ddp, 0))), ddp.device, False)
    alone = [common.batch_to_device(b, ddp.device, False) for b, _ in zip(evaluate.vqa_eval_loader(dataset, 1, ddp, 0),
                                                                       range(8))]  # the same 8 images, one by one
    with torch.no_grad():
        tokens, pixel_mask = evaluate.encode_each_alone(model, batch["images"], batch["image_mask"])
        together, _ = model.encode_image(batch["images"], batch["image_mask"])
        differs = 0
        for i, one in enumerate(alone):
            alone_tokens, alone_mask = model.encode_image(one["images"], one["image_mask"])
            torch.testing.assert_close(tokens[i][pixel_mask[i]], alone_tokens[0][alone_mask[0]], atol=1e-4, rtol=1e-5)
            differs += (together[i][pixel_mask[i]] - alone_tokens[0][alone_mask[0]]).abs().max().item() > 1e-2
    assert differs > 0  # the batch holds images of several sizes, which encoding it whole would change
    predict = {size: evaluate.predict_vqa(model, evaluate.vqa_eval_loader(dataset, size, ddp, 0), answers, ddp,
                                          "fp32", channels_last=False) for size in (1, 8)}
    assert sorted(predict[1], key=lambda p: p["question_id"]) == sorted(predict[8], key=lambda p: p["question_id"])


@pytest.mark.slow
def test_submission_is_the_same_for_one_and_two_processes(corpus, tmp_path):
    """evaluate.py vqa --split test-dev: the same submission from one process with batches of 8
    images, one with batches of 1, and two processes under torchrun (gloo)."""
    path = str(tmp_path / "best.pt")
    tiny_vqa_checkpoint(corpus, path)
    outs = {}
    for name, batch_size in (("one_b8", 8), ("one_b1", 1)):
        outs[name] = str(tmp_path / f"{name}.json")
        evaluate.main(["vqa", f"--checkpoint={path}", f"--data-root={corpus}", "--split=test-dev",
                       f"--batch-size={batch_size}", f"--out={outs[name]}", "--num-workers=0", "--dtype=fp32"])
    outs["two_b8"] = str(tmp_path / "two_b8.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "evaluate.py", "vqa", f"--checkpoint={path}", f"--data-root={corpus}", "--split=test-dev",
                    "--batch-size=8", f"--out={outs['two_b8']}", "--num-workers=0", "--dtype=fp32",
                    "--device=cpu"], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    submissions = {name: json.load(open(out)) for name, out in outs.items()}
    assert len(submissions["one_b8"]) == 50 and submissions["one_b8"] == submissions["one_b1"] == submissions["two_b8"]
