"""
The metrics every script reports, as importable functions that need only the standard library
(retrieval recall imports torch when it is called). Each one equals an official tool:

- VQA accuracy (vqa_accuracy, vqa_score, score_files): GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py, quirks included, so that local numbers and the
  tool's agree to the last digit. A question's accuracy is min(1, matches / 3) averaged over the
  ten leave-one-out subsets of its human answers; overall, per answer type and per question type
  are means of those, in percent, rounded to 2 decimals. Which answers are processed before they
  are compared, and how, depends on the rule set (VQA_RULES):

    "current" (the default): the tool since its commit "Fixed processing answers bug". Every
      human answer and the prediction lose tabs, newlines and outer spaces. If the human answers
      then disagree, all of them and the prediction are normalised (normalize_answer:
      punctuation, number words, articles, contractions); if they agree, nothing more is done,
      so "Yes" or "2." scores 0 against ten "yes" or ten "2".
    "2017": the tool before that commit (the copy vendored by salesforce-lavis and by most VQA
      code of its time). The prediction is always normalised; the human answers are never
      whitespace-cleaned, only punctuation-processed, and only when they disagree, so a human
      "two" never matches any prediction.

  Both versions share every table: the punctuation list, number words, articles, contractions.
  The evaluation server scores test-dev and test-std itself; these functions score splits with
  public answers.
- NLVR2 accuracy and consistency (nlvr2_score, score_nlvr2_files): lil-lab/nlvr's
  nlvr2/eval/metrics.py.
- Image-text retrieval recall R@1/5/10 both ways (retrieval_recall, retrieval_recall_folds), from
  a score matrix and each caption's image, ties counted against the ground truth.
"""

import functools
import json
import re


class EvaluationError(ValueError):
    """Predictions that cannot be scored. The message names the file and the entry."""


# -----------------------------------------------------------------------------
# The official VQA answer processing (the tables are the official tool's, unchanged; its two
# versions share them)

VQA_RULES = ("current", "2017")  # the first is the default everywhere

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


def clean_whitespace(text):
    """Tabs and newlines become spaces, outer whitespace goes: the first step of every answer the
    current rules compare (of the prediction alone under the 2017 rules)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)  # answers repeat ("yes", "2"): soft targets normalise each many times
def normalize_answer(answer):
    """The full processing: whitespace, punctuation, then number words, articles, contractions.
    The form a prediction is compared in whenever the human answers disagree (always, under the
    2017 rules); the answer vocabulary's entries are in this form (canonical_answer)."""
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def canonical_answer(answer):
    """normalize_answer repeated until nothing changes: its own result except past the tool's
    32-period limit, where one pass leaves periods that the next removes. The form of the answer
    vocabulary's entries (data.vqa_answer_vocab): a string the processing leaves as it is, so a
    predicted entry is compared as itself."""
    while True:
        answer, before = normalize_answer(answer), answer
        if answer == before:
            return answer


def check_rules(rules):
    if rules not in VQA_RULES:
        raise EvaluationError(f"VQA rules {rules!r}: choose one of {', '.join(map(repr, VQA_RULES))}")


def as_given(text):
    return text


def unanimous(human_answers, rules="current"):
    """Whether the human answers are all one string, as the rule set tests it: after
    clean_whitespace ("current") or as given ("2017")."""
    clean = clean_whitespace if rules == "current" else as_given
    return len({clean(a["answer"]) for a in human_answers}) <= 1


def process_human_answers(human_answers, rules="current"):
    """The annotation's `answers` records (dicts with at least "answer") with each answer as the
    rule set compares it. current: whitespace-cleaned, and normalised when they disagree.
    2017: as given, and punctuation-processed when they disagree."""
    check_rules(rules)
    if rules == "current":
        process = clean_whitespace if unanimous(human_answers, rules) else normalize_answer
    else:
        process = as_given if unanimous(human_answers, rules) else process_punctuation
    return [{**a, "answer": process(a["answer"])} for a in human_answers]


def process_prediction(prediction, human_answers, rules="current"):
    """A predicted answer, as submitted, in the form the rule set compares with these human
    answers. current: normalised when they disagree, else only whitespace-cleaned. 2017: always
    normalised."""
    check_rules(rules)
    if rules == "current" and unanimous(human_answers, rules):
        return clean_whitespace(prediction)
    return normalize_answer(prediction)


def leave_one_out_accuracy(prediction, records):
    """The mean over held-out records of min(1, matches among the others / 3): with 10 records,
    n matching gives 0, 0.3, 0.6, 0.9, 1.0 for n = 0..>=4. Both arguments already processed
    (process_prediction, process_human_answers)."""
    matching = [r for r in records if r["answer"] == prediction]
    total = 0.0
    for held_out in records:
        # The tool leaves out every record equal to this one (not just this one), so identical
        # records leave out together; in real annotations answer_id tells them apart.
        matches = sum(1 for r in matching if r != held_out)
        total += min(1, float(matches) / 3)
    return total / len(records)


def vqa_accuracy(prediction, human_answers, rules="current"):
    """The official accuracy of one predicted answer, as submitted (the rule set processes it),
    against the annotation's `answers` list (dicts with at least "answer")."""
    return leave_one_out_accuracy(process_prediction(prediction, human_answers, rules),
                                  process_human_answers(human_answers, rules))


# -----------------------------------------------------------------------------
# Scoring a VQA predictions file


def check_predictions(predictions, question_ids, where):
    """A list of {"question_id": int, "answer": str} with exactly one entry per question.
    Returns {question_id: answer}."""
    if not isinstance(predictions, list):
        raise EvaluationError(f"{where}: expected a JSON list of {{\"question_id\": int, \"answer\": str}} objects")
    answers = {}
    for i, p in enumerate(predictions):
        if not (isinstance(p, dict) and isinstance(p.get("question_id"), int)
                and not isinstance(p.get("question_id"), bool) and isinstance(p.get("answer"), str)):
            raise EvaluationError(f"{where}: entry {i} is not {{\"question_id\": int, \"answer\": str}}: "
                                  f"{str(p)[:100]}")
        if p["question_id"] in answers:
            twice = [j for j, q in enumerate(predictions) if q.get("question_id") == p["question_id"]]
            raise EvaluationError(f"{where}: question_id {p['question_id']} is answered twice (entries {twice})")
        answers[p["question_id"]] = p["answer"]
    missing = [q for q in question_ids if q not in answers]
    wanted = set(question_ids)
    extra = [q for q in answers if q not in wanted]
    if missing or extra:
        raise EvaluationError(f"{where}: the predictions must answer every question of the split and nothing else; "
                              f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} not in the split "
                              f"(e.g. {extra[:5]})")
    return answers


def vqa_score(predictions, annotations, where="predictions", digits=2, rules="current"):
    """Official VQA accuracy of `predictions` (the submission list format) against the
    `annotations` list of an official annotations file under `rules` (VQA_RULES), in percent:
    overall, perAnswerType and perQuestionType, rounded as the tool rounds them. Sums run in
    annotation order, as the tool's do, so even the last digit agrees."""
    check_rules(rules)
    answers = check_predictions(predictions, [a["question_id"] for a in annotations], where)
    overall, per_answer_type, per_question_type = [], {}, {}
    for ann in annotations:
        acc = vqa_accuracy(answers[ann["question_id"]], ann["answers"], rules)
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


def score_files(predictions_path, questions_path, annotations_path, rules="current"):
    """vqa-score: official accuracy of a predictions file against official question and
    annotation files under `rules` (the annotations decide which questions are scored, as in
    the tool)."""
    check_rules(rules)
    questions = read_json_file(questions_path, "VQA questions").get("questions", [])
    annotations = read_json_file(annotations_path, "VQA annotations").get("annotations")
    if not isinstance(annotations, list):
        raise EvaluationError(f"{annotations_path}: no annotations[] list; is it a v2_mscoco_*_annotations.json?")
    asked = {q.get("question_id") for q in questions}
    unasked = [a["question_id"] for a in annotations if a["question_id"] not in asked]
    if unasked:
        raise EvaluationError(f"{annotations_path}: {len(unasked)} annotated questions (e.g. {unasked[:3]}) are not in "
                              f"{questions_path}; the two files must be of the same split")
    return vqa_score(read_json_file(predictions_path, "predictions"), annotations, predictions_path, rules=rules)


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
