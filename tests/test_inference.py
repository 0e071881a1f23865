"""One-line inference (evaluate.py match / ask) and the attention maps of paper Figure 3
(evaluate.py attention) on checkpoints written by short pre-training and VQA runs."""

import json
import math
import os

import pytest
import torch
from PIL import Image

import data
import evaluate
import finetune_vqa
import pretrain

SIZES = ["--image-min-size=64", "--image-max-size=96", "--num-workers=0", "--dtype=fp32"]


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    """(pre-training final.pt, VQA best.pt) after a few steps each."""
    runs = tmp_path_factory.mktemp("runs")
    pretrain.main([f"--data-root={corpus}", f"--out-dir={runs / 'pre'}", "--max-steps=2", "--batch-size=16",
                   "--global-batch=16", "--captions-per-image=2", "--eval-pairs=16", *SIZES])
    finetune_vqa.main([f"--data-root={corpus}", f"--init={runs / 'pre' / 'final.pt'}", f"--out-dir={runs / 'vqa'}",
                       "--batch-size=20", "--global-batch=20", "--questions-per-image=2", "--max-steps=2",
                       "--minival-images=100", *SIZES])
    return str(runs / "pre" / "final.pt"), str(runs / "vqa" / "best.pt")


@pytest.fixture(scope="module")
def image(corpus):
    return os.path.join(corpus, data.read_vqa(corpus, "val")[0][0]["image_path"])


def test_match(checkpoints, image, capsys):
    result = evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", image, "--text", "a red circle"])
    assert json.loads(capsys.readouterr().out) == result
    # the same number as ITM's softmax over a batch the training code builds
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0], "itm")
    batch = data.collate([{"image": data.image_tensor(image, 64, 96), "input_ids": tokenizer.encode("a red circle")}])
    with torch.no_grad():
        _, pooled = model(batch["input_ids"], batch["text_mask"], data.normalize_images(batch["images"]),
                          batch["image_mask"])
    assert model.itm_head(pooled).softmax(-1)[0, 1].item() == pytest.approx(result["match_probability"], abs=1e-4)


def test_ask(checkpoints, image):
    result = evaluate.main(["ask", "--checkpoint", checkpoints[1], "--image", image,
                            "--question", "what colour is the circle?"])
    answers = torch.load(checkpoints[1], weights_only=True)["answers"]
    assert len(result["answers"]) == min(5, len(answers))
    # the scores are the sigmoid of the head's logits on a batch the training code builds, best first
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[1], "vqa")
    batch = data.collate([{"image": data.image_tensor(image, 64, 96),
                           "input_ids": tokenizer.encode("what colour is the circle?")}])
    with torch.no_grad():
        _, pooled = model(batch["input_ids"], batch["text_mask"], data.normalize_images(batch["images"]),
                          batch["image_mask"])
        scores = model.vqa_head(pooled)[0].sigmoid()
    best = scores.topk(len(result["answers"]))
    assert [a["score"] for a in result["answers"]] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [a["answer"] for a in result["answers"]] == [answers[i] for i in best.indices.tolist()]


def rigged_vqa_checkpoint(path, out, winner, runner_up):
    """The checkpoint with its answer classifier's last Linear set to ignore its input and
    score label `winner` highest and `runner_up` second (biases 8 and 4, the rest 0): whatever
    the image and question, its answers must come out in that order, by name."""
    state = torch.load(path, weights_only=True)
    last = max(int(k.split(".")[1]) for k in state["model"] if k.startswith("vqa_head.") and k.endswith(".weight"))
    weight, bias = f"vqa_head.{last}.weight", f"vqa_head.{last}.bias"
    assert state["model"][bias].shape == (len(state["answers"]),)  # the last layer gives one logit per answer
    state["model"][weight] = torch.zeros_like(state["model"][weight])
    state["model"][bias] = torch.zeros_like(state["model"][bias])
    state["model"][bias][winner], state["model"][bias][runner_up] = 8.0, 4.0
    torch.save(state, out)
    return state["answers"]


def test_ask_names_the_winning_label_from_the_checkpoint(checkpoints, image, tmp_path, capsys):
    """An answer list shifted by one (or read from elsewhere than the checkpoint) names the wrong
    answer here: the winning labels are known, not just the shape of the output."""
    answers = torch.load(checkpoints[1], weights_only=True)["answers"]
    winner, runner_up = len(answers) // 2, 1  # neither end of the list, so a shift either way shows
    rigged = str(tmp_path / "rigged.pt")
    assert rigged_vqa_checkpoint(checkpoints[1], rigged, winner, runner_up) == answers
    expected = [(answers[winner], round(1 / (1 + math.exp(-8)), 4)),  # the sigmoid of each bias
                (answers[runner_up], round(1 / (1 + math.exp(-4)), 4))]
    result = evaluate.main(["ask", "--checkpoint", rigged, "--image", image, "--question", "what shape is it?"])
    assert [(a["answer"], a["score"]) for a in result["answers"][:2]] == expected
    assert all(a["score"] == 0.5 for a in result["answers"][2:])  # every other logit is 0
    assert json.loads(capsys.readouterr().out) == result
    function = evaluate.answer_question(rigged, image, "is there a red circle?", top=2)
    assert [(a["answer"], a["score"]) for a in function["answers"]] == expected


@pytest.mark.parametrize("command, checkpoint, message", [
    ("ask", 0, "heads are \\['mlm', 'itm'\\], not 'vqa'; use a VQA checkpoint"),
    ("match", 1, "not 'itm'; use a pre-training checkpoint"),
])
def test_wrong_checkpoint_is_a_clear_error(checkpoints, image, command, checkpoint, message):
    flag = "--question" if command == "ask" else "--text"
    with pytest.raises(SystemExit, match=message):
        evaluate.main([command, "--checkpoint", checkpoints[checkpoint], "--image", image, flag, "a circle"])


def test_bad_image_and_text_are_clear_errors(checkpoints, image, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(SystemExit, match="notes.jpg: cannot decode the image"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", str(tmp_path / "notes.jpg"), "--text", "a"])
    with pytest.raises(SystemExit, match="missing.png: image file not found"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", str(tmp_path / "missing.png"),
                       "--text", "a"])
    with pytest.raises(SystemExit, match="the text is empty"):
        evaluate.main(["match", "--checkpoint", checkpoints[0], "--image", image, "--text", " "])


def test_attention_probabilities_are_the_ones_the_layer_uses(checkpoints, image):
    """softmax(q k^T / sqrt(d)) recomputed outside the layer, times the values, gives exactly
    what the layer's fused attention (SDPA) returned: the drawn weights are the model's own."""
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0])
    batch = evaluate.image_text_batch(image, "a red circle", tokenizer, state, device)
    layer = model.bert.encoder.layer[1].attention.self
    seen = {}
    hook = layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], mask=args[1], out=out))
    evaluate.run_pooled(model, batch)
    hook.remove()
    probs = evaluate.attention_probabilities(layer, seen["x"], seen["mask"])  # (1, nh, L, L)
    B, L, H = seen["x"].shape
    v = layer.value(seen["x"]).view(B, L, layer.num_heads, -1).transpose(1, 2)
    torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(B, L, H), seen["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, layer.num_heads, L))


def test_attention_png(checkpoints, image, tmp_path):
    out = tmp_path / "map.png"
    text = "a red zebra above a circle"  # "zebra" is not in the demo vocabulary: several word pieces
    result = evaluate.main(["attention", "--checkpoint", checkpoints[0], "--image", image, "--text", text,
                            "--layer", "1", "--out", str(out)])
    assert [w["word"] for w in result["words"]] == text.split() and result["png"] == str(out)
    model, tokenizer, state, device = evaluate.load_for_inference(checkpoints[0])
    batch = evaluate.image_text_batch(image, text, tokenizer, state, device)
    assert len(batch["input_ids"][0]) > len(text.split()) + 2  # the word was split, and merged back
    words, maps, share = evaluate.word_pixel_attention(model, batch, tokenizer, layer=1)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(words)))  # each drawn map is a distribution
    assert ((share > 0) & (share < 1)).all()  # the rest of each word's attention went to the text
    # the sheet: the image, then a panel per word, six panels a row, a 14-pixel label under each
    W, H = data.resize_image(data.load_image(image), 64, 96).size
    assert Image.open(out).size == (6 * W, 2 * (H + 14))
    with pytest.raises(SystemExit, match="--layer 7: this model has layers 0..1"):
        evaluate.main(["attention", "--checkpoint", checkpoints[0], "--image", image, "--text", text, "--layer", "7"])
