"""
Metrics as importable functions, and a command line that evaluates checkpoints.

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

VQA accuracy is computed exactly as the official evaluation tool computes it (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), quirks included, so that our numbers and the
server's agree: a prediction is cleaned (punctuation, number words, articles, contractions); the
ten human answers only get the punctuation step, and only when they disagree; accuracy is
min(1, matches / 3) averaged over the ten leave-one-out subsets of the human answers.
NLVR2 accuracy and consistency are computed as lil-lab/nlvr's nlvr2/eval/metrics.py computes them.

Retrieval recall (R@1/5/10 both ways) is computed from a score matrix and each caption's image,
with ties counted against the ground truth (see retrieval_recall).

The metric part needs only the standard library (data.py builds VQA soft targets and reads
NLVR2's JSON Lines with it; retrieval_recall imports torch when called); the
checkpoint-evaluation part imports torch, data.py and model.py when it runs.
"""

import argparse
import json
import os
import re
import sys

DTYPES = ("auto", "bf16", "fp16", "fp32")  # = common.DTYPES; not imported: scoring a file needs no torch

# -----------------------------------------------------------------------------
# The official VQA answer processing (the tables are the official tool's, unchanged)

# Keys are as the official tool has them; those with capitals can never match (words are lower-cased
# first), and "somebody'd" maps to "somebodyd": kept, because the point is to agree with the tool.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern reads as if it meant "a period not between digits", but "(?!<=\d)" is a
# look-ahead for the text "<=" + digit, so in effect: any period not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The tool passes re.UNICODE (= 32) where re.sub expects its `count`: at most 32 periods go.
PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text):
    """Delete a punctuation mark where it touches a space (or anywhere, if the text has a
    digit,digit comma), otherwise replace it by a space; then drop periods not before a digit."""
    out = text
    delete_all = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text):
    """Lower-case, number words -> digits, drop articles, restore contractions' apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer):
    """A predicted answer as the official tool compares it. Also how answer vocabularies are
    built: every candidate answer is in this form."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction, human_answers):
    """The official accuracy of one prediction (already normalised) against the annotation's
    `answers` list (dicts with at least "answer"): the mean over leave-one-out subsets of
    min(1, matches / 3). With 10 annotators, n matching gives 0, 0.3, 0.6, 0.9, 1.0 for n = 0..>=4."""
    texts = [a["answer"] for a in human_answers]
    if len(set(texts)) > 1:
        texts = [process_punctuation(t) for t in texts]
    records = [{**a, "answer": t} for a, t in zip(human_answers, texts)]
    total = 0.0
    for held_out in records:
        # The tool leaves out every record equal to this one (not just this one), so identical
        # records leave out together; in real annotations answer_id tells them apart.
        matches = sum(1 for r in records if r != held_out and r["answer"] == prediction)
        total += min(1, float(matches) / 3)
    return total / len(records)


# -----------------------------------------------------------------------------
# Scoring a predictions file


class EvaluationError(ValueError):
    """Predictions that cannot be scored. The message names the file and the entry."""


def check_predictions(predictions, question_ids, where):
    """A list of {"question_id": int, "answer": str} with exactly one entry per question.
    Returns {question_id: answer}."""
    if not isinstance(predictions, list):
        raise EvaluationError(f"{where}: expected a JSON list of {{\"question_id\": int, \"answer\": str}} objects")
    answers = {}
    for i, p in enumerate(predictions):
        if not (isinstance(p, dict) and isinstance(p.get("question_id"), int)
                and not isinstance(p.get("question_id"), bool) and isinstance(p.get("answer"), str)):
            raise EvaluationError(f"{where}: entry {i} is not {{\"question_id\": int, \"answer\": str}}: {str(p)[:100]}")
        if p["question_id"] in answers:
            raise EvaluationError(f"{where}: question_id {p['question_id']} is answered twice (entries "
                                  f"{[j for j, q in enumerate(predictions) if q.get('question_id') == p['question_id']]})")
        answers[p["question_id"]] = p["answer"]
    missing = [q for q in question_ids if q not in answers]
    wanted = set(question_ids)
    extra = [q for q in answers if q not in wanted]
    if missing or extra:
        raise EvaluationError(f"{where}: the predictions must answer every question of the split and nothing else; "
                              f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} not in the split "
                              f"(e.g. {extra[:5]})")
    return answers


def vqa_score(predictions, annotations, where="predictions", digits=2):
    """Official VQA accuracy of `predictions` (the submission list format) against the
    `annotations` list of an official annotations file, in percent: overall, perAnswerType and
    perQuestionType, rounded as the tool rounds them. Sums run in annotation order, as the
    tool's do, so even the last digit agrees."""
    answers = check_predictions(predictions, [a["question_id"] for a in annotations], where)
    overall, per_answer_type, per_question_type = [], {}, {}
    for ann in annotations:
        acc = vqa_accuracy(normalize_answer(answers[ann["question_id"]]), ann["answers"])
        overall.append(acc)
        per_answer_type.setdefault(ann["answer_type"], []).append(acc)
        per_question_type.setdefault(ann["question_type"], []).append(acc)

    def percent(accs):
        return round(100 * float(sum(accs)) / len(accs), digits)
    return {"overall": percent(overall),
            "perAnswerType": {k: percent(v) for k, v in per_answer_type.items()},
            "perQuestionType": {k: percent(v) for k, v in per_question_type.items()}}


def read_json_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{path}: not a valid JSON {what} file ({e})") from None


def score_files(predictions_path, questions_path, annotations_path):
    """vqa-score: official accuracy of a predictions file against official question and
    annotation files (the annotations decide which questions are scored, as in the tool)."""
    questions = read_json_file(questions_path, "VQA questions").get("questions", [])
    annotations = read_json_file(annotations_path, "VQA annotations").get("annotations")
    if not isinstance(annotations, list):
        raise EvaluationError(f"{annotations_path}: no annotations[] list; is it a v2_mscoco_*_annotations.json?")
    asked = {q.get("question_id") for q in questions}
    unasked = [a["question_id"] for a in annotations if a["question_id"] not in asked]
    if unasked:
        raise EvaluationError(f"{annotations_path}: {len(unasked)} annotated questions (e.g. {unasked[:3]}) are not in "
                              f"{questions_path}; the two files must be of the same split")
    return vqa_score(read_json_file(predictions_path, "predictions"), annotations, predictions_path)


# -----------------------------------------------------------------------------
# The official NLVR2 metric (lil-lab/nlvr, nlvr2/eval/metrics.py): accuracy ("precision" in the
# script's output) and consistency


def read_json_lines(path):
    """[(line number, record dict)] of a JSON Lines file such as NLVR2's train/dev/test1.json,
    blank lines skipped. Each line is decoded on its own, so an error names the line."""
    records = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise EvaluationError(f"{path}, line {number}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                          f"re-download the file") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvaluationError(f"{path}, line {number}: not a JSON object ({e.msg}); every line of a JSON "
                                          f"Lines file is one record") from None
                if not isinstance(record, dict):
                    raise EvaluationError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object")
                records.append((number, record))
    except FileNotFoundError:
        raise EvaluationError(f"{path}: file not found") from None
    return records


def check_nlvr2_record(record, where):
    """An NLVR2 record needs a string identifier of the form split-set-pair-sentence (the
    metric groups on its fields) and a label "True" or "False"."""
    identifier, label = record.get("identifier"), record.get("label")
    if not isinstance(identifier, str) or len(identifier.split("-")) < 4:
        raise EvaluationError(f"{where}: 'identifier' is {identifier!r}, not a string like 'dev-850-0-0' "
                              f"(split-set-pair-sentence)")
    if label not in ("True", "False"):
        raise EvaluationError(f"{where} ({identifier}): 'label' is {label!r}, not \"True\" or \"False\"")


def nlvr2_group(identifier):
    """The consistency group of an example, as metrics.py forms it: the identifier with its
    third field (the image pair) blanked, so 'dev-850-0-1' and 'dev-850-3-1' share the group
    'dev-850--1': one sentence (set 850, sentence 1) judged on every image pair it was written for."""
    fields = identifier.split("-")
    fields[2] = ""
    return "-".join(fields)


def nlvr2_score(predictions, examples, where="predictions", digits=2):
    """Accuracy and consistency in percent, as lil-lab/nlvr's nlvr2/eval/metrics.py computes them:
    accuracy over `examples` (records with "identifier" and "label"), comparing case-insensitively;
    consistency = the fraction of groups (nlvr2_group) whose every example is right.
    predictions: {identifier: "True" | "False"}; identifiers that are not examples are ignored, as
    the script ignores them; a missing one is an error listing them (the script lists and stops)."""
    missing = [e["identifier"] for e in examples if e["identifier"] not in predictions]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise EvaluationError(f"{where}: {len(missing)} of {len(examples)} examples have no prediction: {shown}")
    correct, consistent = 0, {}
    for e in examples:
        right = predictions[e["identifier"]].lower() == e["label"].lower()
        correct += right
        group = nlvr2_group(e["identifier"])
        consistent[group] = consistent.get(group, True) and right

    def percent(fraction):
        return 100 * fraction if digits is None else round(100 * fraction, digits)
    return {"accuracy": percent(correct / len(examples)),
            "consistency": percent(sum(consistent.values()) / len(consistent)),
            "examples": len(examples), "groups": len(consistent)}


def read_nlvr2_predictions(path):
    """{identifier: prediction} from the official CSV format, one `identifier,True|False` line per
    example (metrics.py splits each stripped line on commas and reads the first two fields).
    A prediction other than true/false (any case), a line without one, or an identifier given
    twice is an error naming the line: metrics.py would score those silently as wrong or keep
    the last."""
    predictions, lines = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.strip().split(",")
                if len(fields) < 2 or fields[1].lower() not in ("true", "false"):
                    raise EvaluationError(f"{path}, line {number}: expected 'identifier,True' or 'identifier,False', "
                                          f"got {line.strip()[:100]!r}")
                if fields[0] in predictions:
                    raise EvaluationError(f"{path}: {fields[0]} is predicted twice (lines {lines[fields[0]]} and "
                                          f"{number})")
                predictions[fields[0]], lines[fields[0]] = fields[1], number
    except FileNotFoundError:
        raise EvaluationError(f"{path}: predictions file not found") from None
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path}: not UTF-8 text ({e.reason}); predictions are CSV lines "
                              f"'identifier,True|False'") from None
    return predictions


def read_nlvr2_labels(path):
    """The records of an official NLVR2 JSON Lines file (dev.json, test1.json, ...), checked."""
    records = read_json_lines(path)
    for number, record in records:
        check_nlvr2_record(record, f"{path}, line {number}")
    return [record for _, record in records]


def write_nlvr2_predictions(path, predictions):
    """[(identifier, True|False)] -> the official CSV format, one line each, in the given order."""
    with open(path, "w") as f:
        f.writelines(f"{identifier},{bool(value)}\n" for identifier, value in predictions)


def score_nlvr2_files(predictions_path, labels_path):
    """nlvr2-score: the official metric of a predictions CSV against an official JSON Lines file."""
    examples = read_nlvr2_labels(labels_path)
    return nlvr2_score(read_nlvr2_predictions(predictions_path), examples, predictions_path)


# -----------------------------------------------------------------------------
# Image-text retrieval recall (paper 4.4)


def retrieval_recall(scores, caption_image, ks=(1, 5, 10)):
    """R@K in percent of image->text (TR: for each image, is one of its captions among the K
    best-scored captions?) and text->image (IR: for each caption, is its image among the K
    best-scored images?), and rsum, their sum. scores (I, C): image i against caption c, any
    array-like; caption_image (C,): the image row each caption describes.

    Ties are broken against the ground truth: a wrong candidate that scores exactly as high as
    the best correct one ranks above it. The result therefore does not depend on the order of
    images or captions, and a constant scorer gets (almost) nothing instead of the luck of the
    index order. Uses torch (imported here, so this module still imports without it)."""
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float64)
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    I, C = scores.shape
    if owner.shape != (C,) or C == 0 or owner.min() < 0 or owner.max() >= I:
        raise EvaluationError(f"retrieval: caption_image must give an image row in [0, {I}) for each of the {C} "
                              f"captions (got shape {tuple(owner.shape)})")
    if not torch.isfinite(scores).all():
        raise EvaluationError("retrieval: the score matrix has NaN or infinite entries")
    captioned = torch.bincount(owner, minlength=I)
    if (captioned == 0).any():
        raise EvaluationError(f"retrieval: image {int((captioned == 0).nonzero()[0])} has no caption")
    tr_rank, ir_rank = torch.empty(I, dtype=torch.long), torch.empty(C, dtype=torch.long)
    for start in range(0, I, 256):  # blocks of images bound the memory of the (I, C) comparisons
        block = scores[start: start + 256]  # (b, C)
        rows = torch.arange(start, start + len(block))
        mine = owner[None, :] == rows[:, None]  # (b, C): the block's own captions
        best = block.masked_fill(~mine, float("-inf")).max(1).values  # (b,) best-scored correct caption
        tr_rank[rows] = ((block >= best[:, None]) & ~mine).sum(1)  # wrong captions at least as high
    gt = scores[owner, torch.arange(C)]  # (C,) each caption's score with its own image
    for start in range(0, C, 4096):
        cols = slice(start, start + 4096)
        ir_rank[cols] = (scores[:, cols] >= gt[None, cols]).sum(0) - 1  # wrong images at least as high
    result = {}
    for name, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for k in ks:
            result[f"{name}_r{k}"] = 100.0 * (rank < k).double().mean().item()
    result["rsum"] = sum(result.values())
    return result


def retrieval_recall_folds(scores, caption_image, fold_images=1000):
    """The mean of retrieval_recall over consecutive folds of `fold_images` images and their
    captions (COCO's 5K test split -> five 1K folds, in Karpathy's file order)."""
    import torch

    scores, owner = torch.as_tensor(scores), torch.as_tensor(caption_image, dtype=torch.long)
    folds = scores.shape[0] // fold_images
    if folds == 0 or scores.shape[0] % fold_images:
        raise EvaluationError(f"retrieval: {scores.shape[0]} images do not split into folds of {fold_images}")
    results = []
    for f in range(folds):
        cols = ((owner >= f * fold_images) & (owner < (f + 1) * fold_images)).nonzero().squeeze(1)
        block = scores[f * fold_images: (f + 1) * fold_images, cols]
        results.append(retrieval_recall(block, owner[cols] - f * fold_images))
    return {k: sum(r[k] for r in results) / folds for k in results[0]}


# -----------------------------------------------------------------------------
# The model a checkpoint holds, for every command below


def checkpoint_model(state, device, extra_heads=()):
    """A loaded checkpoint's model (its own config and weights) on `device` in eval mode, and the
    tokenizer of the vocabulary saved with it. extra_heads: heads the checkpoint has no weights
    for, added freshly initialised (every other tensor must still fit)."""
    import data
    from model import PixelBert, PixelBertConfig, copy_weights

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
                            dtype="auto", minival_images=None, ans2label=None):
    """Predict every question of `split` with the checkpoint's own answer vocabulary. Splits
    with answers (val, minival, train...) return the official accuracy; test-dev and test write
    the submission file (every test2015 question) to `out` and return its path. minival is
    the checkpoint's own held-out set unless `minival_images` says otherwise."""
    import torch

    import common
    import data
    from finetune_vqa import eval_loader, predict

    state = common.load_checkpoint(checkpoint)
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
    predictions = predict(model, eval_loader(dataset, batch_size, ddp, num_workers), answers, ddp, dtype)
    if annotations:
        return vqa_score(predictions, annotations, f"{split} predictions")
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
    import torch

    import common
    import data
    from finetune_nlvr import eval_loader, predict

    state = common.load_checkpoint(checkpoint)
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
    predictions = predict(model, eval_loader(dataset, batch_size, ddp, num_workers), identifiers, ddp, dtype)
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
    import time

    import torch

    import common
    import data
    from finetune_retrieval import retrieval_scores

    start = time.time()
    state = common.load_checkpoint(checkpoint)
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
    import common

    state = common.load_checkpoint(checkpoint)
    heads = state["model_config"]["heads"]
    if head is not None and head not in heads:
        raise EvaluationError(f"{checkpoint}: this model's heads are {list(heads)}, not {head!r}; "
                              f"use {HEAD_SOURCES[head]}")
    device = common.default_device(device)
    return (*checkpoint_model(state, device), state, device)


def image_text_batch(image, text, tokenizer, state, device):
    """One (image file, text) pair as a batch of one, the image resized as in the checkpoint's
    training run."""
    import common
    import data

    if not text.strip():
        raise EvaluationError("the text is empty")
    pixels = data.image_tensor(image, state["config"]["image_min_size"], state["config"]["image_max_size"])
    batch = data.collate([{"image": pixels, "input_ids": tokenizer.encode(text)}])
    return common.batch_to_device(batch, device, channels_last=False)


def run_pooled(model, batch):
    import torch

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
    import torch

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
    import numpy as np
    from PIL import Image, ImageDraw

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
    import data

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
    vqa.add_argument("--dtype", default="auto", choices=DTYPES)
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
    ret.add_argument("--dtype", default="auto", choices=DTYPES)
    score = commands.add_parser("vqa-score", help="official VQA accuracy of a predictions file")
    score.add_argument("--predictions", required=True)
    score.add_argument("--questions", required=True)
    score.add_argument("--annotations", required=True)
    nlvr2 = commands.add_parser("nlvr2", help="evaluate a finetune_nlvr.py checkpoint; writes the predictions CSV")
    nlvr2.add_argument("--checkpoint", required=True)
    nlvr2.add_argument("--data-root", required=True)
    nlvr2.add_argument("--split", default="dev", choices=["dev", "test1"])
    nlvr2.add_argument("--out", help="predictions CSV (default: nlvr2_<split>_predictions.csv beside the checkpoint)")
    nlvr2.add_argument("--batch-size", type=int, default=16, help="examples per batch (two images each)")
    nlvr2.add_argument("--num-workers", type=int, default=2)
    nlvr2.add_argument("--device", default="")
    nlvr2.add_argument("--dtype", default="auto", choices=DTYPES)
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
    from data import DataError  # here, not at the top: data.py imports this module's metric
    try:
        if args.command == "vqa-score":
            result = score_files(args.predictions, args.questions, args.annotations)
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
                                             args.ans2label)
            result = result if isinstance(result, dict) else {"submission": result}
    except (EvaluationError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2))
    if not args.command.endswith("-score"):  # checkpoint commands may run under torchrun
        import torch.distributed as dist
        if dist.is_initialized():  # leave together: a process exiting while gloo talks to it aborts the other
            dist.barrier()
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
