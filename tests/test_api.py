"""The Python API as the README shows it (evaluate.load -> match / answer on PIL images and strings,
in batches), run on tiny checkpoints written here and checked against the one-pair path; match / ask
with several texts; and evaluate.py check-data on a small data root in the official layout."""

import ast
import contextlib
import io
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import evaluate
from model import PixelBert, PixelBertConfig

# The README's five lines, run as written (in a folder holding these files).
README_SNIPPET = """\
import evaluate
from PIL import Image
images = [Image.open("photo1.jpg"), Image.open("photo2.png")]
print(evaluate.load("runs/demo_pretrain/final.pt").match(images, ["a red circle", "a blue square"]))
print(evaluate.load("runs/demo_vqa/best.pt").answer(images, ["what colour is the circle?", "how many shapes?"], top=3))
"""

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "what", "colour", "is",
         "the", "how", "many", "shapes", "?", "##s", "there"]
ANSWERS = ["red", "blue", "two", "yes", "no"]
SIZES = {"image_min_size": 64, "image_max_size": 96, "max_text_len": 16}


def write_checkpoint(path, heads, task, seed, **config):
    """A checkpoint in the training scripts' format (checkpoint.save_weights of what they save):
    the weights, model_config, vocabulary, the run's config (image sizes, text length) and, for
    VQA, the answers."""
    torch.manual_seed(seed)
    num_answers = len(ANSWERS) if "vqa" in heads else 0
    model = PixelBert(PixelBertConfig.tiny(vocab_size=len(VOCAB), heads=heads, num_answers=num_answers, **config))
    state = {"model": model.state_dict(), "model_config": asdict(model.config), "vocab": VOCAB, "config": SIZES,
             "task": task}
    if num_answers:
        state["answers"] = ANSWERS
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.save_weights(state, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two checkpoints and two photographs of different sizes and formats, at the snippet's paths."""
    root = tmp_path_factory.mktemp("api")
    write_checkpoint(str(root / "runs/demo_pretrain/final.pt"), ("mlm", "itm"), "pretrain", seed=0)
    write_checkpoint(str(root / "runs/demo_vqa/best.pt"), ("vqa",), "vqa", seed=1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "photo1.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (140, 70, 4), dtype=np.uint8), "RGBA").save(root / "photo2.png")
    return root


def one_pair(ckpt, image, text):
    """The one-pair path: a batch of one (evaluate.image_text_batch), the model on its images directly."""
    model, tokenizer, state, device = evaluate.load_for_inference(ckpt)
    return evaluate.run_pooled(model, evaluate.image_text_batch(image, text, tokenizer, state, device)), model


def test_readme_snippet_equals_one_pair_at_a_time(folder, monkeypatch):
    monkeypatch.chdir(folder)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(README_SNIPPET, {})
    matches, answers = (ast.literal_eval(line) for line in out.getvalue().splitlines())
    pre, vqa = "runs/demo_pretrain/final.pt", "runs/demo_vqa/best.pt"
    # the two images are resized to different shapes, so the batch pads one of them; each result is still the
    # one its pair gets alone
    shapes = {data.collate(data.image_text_examples([p], ["a"], data.Tokenizer(VOCAB), 64, 96))["images"].shape
              for p in ("photo1.jpg", "photo2.png")}
    assert len(shapes) == 2
    for image, text, p in zip(["photo1.jpg", "photo2.png"], ["a red circle", "a blue square"], matches):
        pooled, model = one_pair(pre, image, text)
        assert p == pytest.approx(model.itm_head(pooled).softmax(-1)[0, 1].item(), abs=1e-5)
    for image, question, best in zip(["photo1.jpg", "photo2.png"], ["what colour is the circle?", "how many shapes?"],
                                     answers):
        pooled, model = one_pair(vqa, image, question)
        scores = model.vqa_head(pooled)[0].sigmoid().detach()
        top = scores.topk(3)
        assert [a["answer"] for a in best] == [ANSWERS[i] for i in top.indices.tolist()]
        assert [a["score"] for a in best] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_batches_do_not_change_results(folder, monkeypatch):
    monkeypatch.chdir(folder)
    api = evaluate.load("runs/demo_pretrain/final.pt")
    photos = [Image.open("photo1.jpg"), Image.open("photo2.png")]
    images = [photos[0], photos[1], photos[0], "photo2.png"]  # PIL images and paths, repeats shared
    texts = ["a red circle", "a blue square", "how many shapes are there?", "the circle is red"]
    together = api.match(images, texts)
    assert together == pytest.approx([api.match(i, [t])[0] for i, t in zip(images, texts)], abs=1e-5)
    assert together == pytest.approx(api.match(images, texts, batch_size=3), abs=1e-5)
    # one image for several texts: its pixels are prepared once and shared through image_index
    batch = api.batch(photos[0], texts)
    assert batch["images"].shape[0] == 1 and batch["image_index"].tolist() == [0, 0, 0, 0]
    assert api.match(photos[0], texts) == pytest.approx([api.match(photos[0], [t])[0] for t in texts], abs=1e-5)
    with pytest.raises(evaluate.EvaluationError, match="not 'vqa'; use a VQA checkpoint"):
        api.answer(photos, ["what colour is the circle?", "a"])
    with pytest.raises(data.DataError, match="2 images for 3 texts"):
        api.match(photos, texts[:3])


def test_match_and_ask_take_several_texts(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    texts = ["a red circle", "a blue square", "the circle"]
    result = evaluate.main(["match", "--checkpoint", "runs/demo_pretrain/final.pt", "--image", "photo1.jpg",
                            *(arg for t in texts for arg in ("--text", t))])
    assert json.loads(capsys.readouterr().out) == result
    expected = evaluate.load("runs/demo_pretrain/final.pt").match("photo1.jpg", texts)
    assert [r["text"] for r in result] == texts
    assert [r["match_probability"] for r in result] == [round(p, 4) for p in expected]
    one = evaluate.main(["match", "--checkpoint", "runs/demo_pretrain/final.pt", "--image", "photo1.jpg",
                         "--text", texts[1]])
    assert one == result[1]  # one --text: one result, as before
    asked = evaluate.main(["ask", "--checkpoint", "runs/demo_vqa/best.pt", "--image", "photo2.png",
                           "--question", "what colour is the circle?", "--question", "how many shapes?"])
    best = evaluate.load("runs/demo_vqa/best.pt").answer("photo2.png", ["what colour is the circle?",
                                                                        "how many shapes?"])
    assert [[a["answer"] for a in r["answers"]] for r in asked] == [[a["answer"] for a in b] for b in best]


def test_the_checkpoints_input_convention_reaches_the_batch(folder, tmp_path):
    """A model whose CNN reads BGR 0-255 minus a mean (a converted Detectron CNN) gets its images so."""
    detectron = dict(image_channels="BGR", image_scale=255.0, image_mean=(102.9801, 115.9465, 122.7717),
                     image_std=(1.0, 1.0, 1.0))
    ckpt = write_checkpoint(str(tmp_path / "bgr.pt"), ("mlm", "itm"), "pretrain", seed=2, **detectron)
    api = evaluate.load(ckpt)
    assert api.model.config.image_channels == "BGR"
    image = str(folder / "photo1.jpg")
    raw = data.collate(data.image_text_examples([image], ["a"], api.tokenizer, 64, 96))["images"]
    bgr = raw.flip(1).float() - torch.tensor(detectron["image_mean"]).view(1, 3, 1, 1)
    torch.testing.assert_close(api.batch(image, ["a"])["images"], bgr)


# -----------------------------------------------------------------------------
# evaluate.py check-data


def write_vqa_root(root):
    """The VQA files in their official formats, COCO images as real JPEG and PNG files, and one
    file named .jpg that is not an image."""
    (root / "vqa").mkdir(parents=True)
    for subset, image_id in (("train2014", 9), ("val2014", 42)):
        (root / f"vqa/v2_OpenEnded_mscoco_{subset}_questions.json").write_text(json.dumps(
            {"questions": [{"question_id": image_id * 1000, "image_id": image_id, "question": "what colour?"}]}))
        (root / f"vqa/v2_mscoco_{subset}_annotations.json").write_text(json.dumps({"annotations": [
            {"question_id": image_id * 1000, "image_id": image_id, "question_type": "what color",
             "answer_type": "other", "multiple_choice_answer": "red",
             "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]}]}))
        (root / f"coco/{subset}").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        root / "coco/train2014/COCO_train2014_000000000009.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
        root / "coco/val2014/COCO_val2014_000000000042.png")
    (root / "coco/val2014/COCO_val2014_000000000043.jpg").write_bytes(b"not a jpeg")


def test_check_data(tmp_path, capsys):
    root = tmp_path / "datasets"
    write_vqa_root(root)
    result = evaluate.main(["check-data", "--data", "vqa", "--data-root", str(root)])
    out = capsys.readouterr().out
    assert result["ok"] and result["missing"] == []
    rows = {r["path"]: r for r in result["files"]}
    assert rows["coco/train2014"]["images"] == 1 and rows["coco/train2014"]["failed"] == []
    assert rows["coco/val2014"]["images"] == 2 and len(rows["coco/val2014"]["failed"]) == 1
    assert "COCO_val2014_000000000043.jpg: cannot decode the image" in out
    assert "1 of 2 sampled images decode" in out and "1 sampled image did not decode" in out
    size = os.path.getsize(root / "vqa/v2_mscoco_train2014_annotations.json")
    assert f"ok       vqa/v2_mscoco_train2014_annotations.json: {size} B" in out
    # the test2015 files are optional (only for submissions): shown absent, with their download
    assert "absent  coco/test2015/ (test-dev / test submissions) [optional]" in out
    assert "get test2015.zip from https://cocodataset.org/#download" in out
    # a required file missing: named with its download, exit status 1
    os.remove(root / "vqa/v2_mscoco_val2014_annotations.json")
    with pytest.raises(SystemExit, match="check-data: missing vqa/v2_mscoco_val2014_annotations.json") as exit_:
        evaluate.main(["check-data", "--data", "vqa", "--data-root", str(root)])
    assert exit_.value.code != 0
    out = capsys.readouterr().out
    assert "MISSING  vqa/v2_mscoco_val2014_annotations.json" in out
    assert "v2_Annotations_Val_mscoco.zip from https://visualqa.org/download.html" in out
    # pre-training data: Visual Genome's image folders have their download too
    with pytest.raises(SystemExit, match="vg/VG_100K_2"):
        evaluate.main(["check-data", "--data", "coco_vg", "--data-root", str(root)])
    assert "images2.zip (v1.2) from https://homes.cs.washington.edu" in capsys.readouterr().out
