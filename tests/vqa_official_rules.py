"""An independent oracle of the current official VQA accuracy (GT-Vision-Lab/VQA, vqaEval.py at its
commit "Fixed processing answers bug"), written from the rules as stated, not from metrics.py,
with other means wherever there is a choice (character scans instead of regular expressions,
exact fractions instead of floats), so that the two agreeing is evidence for both.

The rules, for each question with its human answers and the prediction:
1. every answer: tab and newline -> space, then outer whitespace stripped;
2. if the human answers are not all one string: every human answer and the prediction are
   normalised (3 then 4); if they are, nothing more is done;
3. punctuation: for each mark of PUNCTUATION, delete it if the text has it next to a space or has
   a digit-comma-digit anywhere, else replace it by a space; then delete each period not followed
   by a decimal digit, at most 32 of them (the tool passes re.UNICODE, 32, as re.sub's count);
4. lower-case, split on whitespace, number words -> digits, drop articles, contraction table,
   join with single spaces;
5. question accuracy: the mean over the leave-one-out subsets of min(1, matches / 3); overall,
   per answer type and per question type: the mean of those, x 100, rounded to 2 decimals.
"""

from fractions import Fraction

import pytest

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
PERIOD_LIMIT = 32
NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                   "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = ("a", "an", "the")
# The tool's contraction table as "key>value" pairs (neither side holds a space or a ">").
CONTRACTION_PAIRS = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've something'dve>something'd've
somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've
therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's
whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
you'dve>you'd've youll>you'll youre>you're youve>you've
"""
CONTRACTIONS = dict(pair.split(">") for pair in CONTRACTION_PAIRS.split())


def rule_1(text):
    return text.replace("\t", " ").replace("\n", " ").strip()


def has_digit_comma_digit(text):
    # \d in a str pattern is Unicode category Nd, which is what str.isdecimal tests
    return any(text[i] == "," and text[i - 1].isdecimal() and text[i + 1].isdecimal()
               for i in range(1, len(text) - 1))


def rule_3(text):
    out = text
    glued = has_digit_comma_digit(text)
    for mark in PUNCTUATION:  # the conditions look at the text as given, the edits accumulate
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space or glued else " ")
    kept, dropped = [], 0
    for i, char in enumerate(out):  # "followed by" means in `out` before any period is dropped
        before_digit = i + 1 < len(out) and out[i + 1].isdecimal()
        if char == "." and not before_digit and dropped < PERIOD_LIMIT:
            dropped += 1
        else:
            kept.append(char)
    return "".join(kept)


def rule_4(text):
    words = []
    for word in text.lower().split():
        word = NUMBERS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def question_accuracy(prediction, human_answers):
    """Exact (a Fraction) accuracy of a raw prediction against raw human answer strings."""
    humans = [rule_1(h) for h in human_answers]
    guess = rule_1(prediction)
    if len(set(humans)) > 1:
        humans = [rule_4(rule_3(h)) for h in humans]
        guess = rule_4(rule_3(guess))
    hits = [h == guess for h in humans]
    # leaving out answer i: the matches among the others are all hits but i's own
    return sum(Fraction(min(3, sum(hits) - hit), 3) for hit in hits) / len(hits)


def official_score(predictions, annotations):
    """{"overall", "perAnswerType", "perQuestionType"} of a submission list against an
    annotations list. Every answer record of a question must differ (as answer_id makes them in
    real files): the tool's leave-one-out compares whole records, which this oracle does not."""
    guess = {p["question_id"]: p["answer"] for p in predictions}
    groups = {"overall": {}, "perAnswerType": {}, "perQuestionType": {}}
    for ann in annotations:
        acc = question_accuracy(guess[ann["question_id"]], [h["answer"] for h in ann["answers"]])
        for group, key in (("overall", None), ("perAnswerType", ann["answer_type"]),
                           ("perQuestionType", ann["question_type"])):
            groups[group].setdefault(key, []).append(acc)

    def percent(accs):
        return round(float(100 * sum(accs) / len(accs)), 2)
    return {"overall": percent(groups["overall"][None]),
            "perAnswerType": {k: percent(v) for k, v in groups["perAnswerType"].items()},
            "perQuestionType": {k: percent(v) for k, v in groups["perQuestionType"].items()}}


# -----------------------------------------------------------------------------
# Adversarial answer files, and the 2017 tool that salesforce-lavis ships

ANSWER_TYPES = ("yes/no", "number", "other")
QUESTION_TYPES = ("is the", "how many", "what color", "what is", "none of the above")
BASES = ["yes", "no", "2", "two", "Two", "10", "ten", "none", "0", "zero", "red", "the red one", "a dog", "An apple",
         "dont", "don't", "it's", "o'clock", "oclock", "10:30", "1,000", "1000", "1, 000", "3.5", "2.", ".5", "5.0",
         "a.b", "left-handed", "red/white", "(maybe)", "y'all", "Im", "hello world", "isnt", "٣,٤", "²,³", "1,2,3"]
GLUE = ("", " ", "  ")


def mutate(rng, text):
    """One surface change of the kinds the answer processing reacts to."""
    kind = rng.randrange(9)
    mark = rng.choice(PUNCTUATION)
    if kind == 0:
        return rng.choice([text.capitalize(), text.upper(), text.lower()])
    if kind == 1:
        return rng.choice(["", " ", "\t", "\n", " \t"]) + text + rng.choice(["", " ", "\n", "\t ", " \n"])
    if kind == 2:  # a mark glued to the answer or next to a space, before or after it
        return rng.choice([text + rng.choice(GLUE) + mark, mark + rng.choice(GLUE) + text])
    if kind == 3:  # a mark inside, glued or spaced
        cut = rng.randrange(len(text) + 1)
        return text[:cut] + rng.choice(GLUE) + mark + rng.choice(GLUE) + text[cut:]
    if kind == 4:
        return text + rng.choice([".", "..", " .", "." * 40, ".5", ":", "'", "'s"])
    if kind == 5:
        return rng.choice(["a ", "an ", "the ", "The ", "A "]) + text
    if kind == 6:  # a tab, newline, colon, apostrophe or comma between words or digits
        head, _, tail = text.partition(" ")
        return head + rng.choice(["\t", "\n", ":", "'", " , ", ","]) + (tail or rng.choice(["s", "5", ""]))
    if kind == 7:  # a number word for a digit or the reverse
        words = dict(zip("0 1 2 3 10".split(), "zero one two three ten".split()))
        words.update({v: k for k, v in list(words.items())})
        return " ".join(words.get(w, w) for w in text.split(" "))
    return rng.choice(BASES)


def random_answer(rng, base):
    text = base
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        text = mutate(rng, text)
    return text


def human_records(answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def random_question(rng):
    """(ten human answers, prediction): unanimous (raw, or only after rule 1) or drawn from a few
    surface variants of one or two answers; the prediction one of them, a variant, or a stranger."""
    base = rng.choice(BASES)
    shape = rng.random()
    if shape < 0.25:  # all one raw string, possibly with capitals and stray spaces
        answers = [random_answer(rng, base)] * 10
    elif shape < 0.35:  # one string after rule 1, different raw strings
        core = random_answer(rng, base).strip()
        answers = [rng.choice(["", " ", "\t", "\n"]) + core + rng.choice(["", " ", "\n"]) for _ in range(10)]
    else:
        pool = [random_answer(rng, b) for b in (base, base, base, rng.choice(BASES))][: rng.choice([2, 3, 4])]
        answers = [rng.choice(pool) for _ in range(10)]
    prediction = rng.choice([rng.choice(answers), rng.choice(answers), random_answer(rng, base),
                             random_answer(rng, rng.choice(BASES))])
    return answers, prediction


def every_mark_questions():
    """For each punctuation mark: humans that write it glued, spaced and half-spaced, and a
    prediction of each form, so every mark meets every branch of rule 3."""
    out = []
    for mark in PUNCTUATION + ".:'":
        forms = [f"a{mark}b", f"a {mark} b", f"a{mark} b", f"1{mark}2", f"{mark}x"]
        for k, prediction in enumerate(forms):
            out.append(([forms[0]] * 4 + [forms[1]] * 3 + [forms[2]] * 2 + [forms[k]], prediction))
    return out


def adversarial_files(seed, questions=500):
    """(questions list, annotations list, predictions list) in the official formats."""
    import random

    rng = random.Random(seed)
    drawn = every_mark_questions() + [random_question(rng) for _ in range(questions)]
    qs, anns, preds = [], [], []
    for q, (answers, prediction) in enumerate(drawn):
        atype = rng.choice(ANSWER_TYPES)
        anns.append({"question_id": q, "image_id": q // 3, "question_type": rng.choice(QUESTION_TYPES),
                     "answer_type": atype, "multiple_choice_answer": answers[0], "answers": human_records(answers)})
        qs.append({"question_id": q, "image_id": q // 3, "question": "?"})
        preds.append({"question_id": q, "answer": prediction})
    return qs, anns, preds


def write_files(folder, questions, annotations, predictions):
    """The three JSON files vqa-score reads; returns their paths (predictions, questions, annotations)."""
    import json
    import os

    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014"}
    contents = {"predictions": predictions, "questions": {**header, "questions": questions},
                "annotations": {**header, "annotations": annotations}}
    paths = {}
    for name, obj in contents.items():
        paths[name] = os.path.join(str(folder), f"{name}.json")
        with open(paths[name], "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return paths["predictions"], paths["questions"], paths["annotations"]


def lavis_tool():
    """(VQA, VQAEval) of the 2017 official tool that the PyPI package salesforce-lavis vendors,
    loaded by path (the lavis package itself needs far more than the tests install), or None."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("lavis")
    if spec is None:
        return None
    folder = os.path.join(spec.submodule_search_locations[0], "common", "vqa_tools")
    modules = {}
    for name in ("vqa", "vqa_eval"):
        module_spec = importlib.util.spec_from_file_location(f"official_{name}", os.path.join(folder, f"{name}.py"))
        modules[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(modules[name])
    return modules["vqa"].VQA, modules["vqa_eval"].VQAEval


def lavis_score(tool, predictions_path, questions_path, annotations_path):
    """The 2017 tool's accuracy dict for three files (it prints progress: capture it if needed)."""
    VQA, VQAEval = tool
    vqa = VQA(annotations_path, questions_path)
    evaluator = VQAEval(vqa, vqa.loadRes(predictions_path, questions_path), n=2)
    evaluator.evaluate()
    return evaluator.accuracy


def assert_within(ours, theirs, tolerance=0.01):
    """Two accuracy dicts (overall, per answer type, per question type) equal within `tolerance`
    percentage points: 0.01, the tools' rounding to 2 decimals."""
    assert ours.keys() == theirs.keys() == {"overall", "perAnswerType", "perQuestionType"}
    assert ours["overall"] == pytest.approx(theirs["overall"], abs=tolerance + 1e-9)
    for group in ("perAnswerType", "perQuestionType"):
        assert ours[group].keys() == theirs[group].keys()
        for key in ours[group]:
            assert ours[group][key] == pytest.approx(theirs[group][key], abs=tolerance + 1e-9), (group, key)
