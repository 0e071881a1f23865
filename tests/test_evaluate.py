"""The official VQA metric: hand-worked cases, the official tool's quirks, clear errors on bad
predictions, and agreement with the official tool itself on random inputs (the copy of
GT-Vision-Lab/VQA's PythonEvaluationTools shipped in the PyPI package salesforce-lavis)."""

import importlib.util
import json
import os
import random

import pytest

import evaluate
from evaluate import EvaluationError, normalize_answer, vqa_accuracy, vqa_score


def humans(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


@pytest.mark.parametrize("raw, clean", [
    ("Two", "2"), ("the dog.", "dog"), ("A  Cat!", "cat"), ("dont", "don't"), ("Isnt it", "isn't it"),
    ("1,000", "1000"), ("3.5", "3.5"), ("yes.", "yes"), ("hello, world", "hello world"),
    ("red/white", "red white"), ("  ten\tbirds\n", "10 birds"), ("an apple", "apple"), ("none", "0"),
    ("left-handed", "left handed"), ("o'clock", "o'clock"), ("Im", "im"),  # "Im" is a key the tool never reaches
])
def test_answer_normalisation(raw, clean):
    assert normalize_answer(raw) == clean


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_annotator_disagreement(matching, accuracy):
    answers = humans(*(["cat"] * matching + ["dog"] * (10 - matching)))
    assert vqa_accuracy("cat", answers) == pytest.approx(accuracy)


def test_official_quirks():
    # Human answers are cleaned only when they disagree, and then only of punctuation:
    assert vqa_accuracy(normalize_answer("yes."), humans(*["yes."] * 10)) == 0  # unanimous, left as is
    assert vqa_accuracy(normalize_answer("yes."), humans(*["yes."] * 9, "no")) == 1  # cleaned to "yes"
    assert vqa_accuracy(normalize_answer("two"), humans(*["two"] * 5, *["2"] * 5)) == 1  # "two" never becomes "2"
    assert vqa_accuracy(normalize_answer("two"), humans(*["two"] * 8, *["2"] * 2)) == pytest.approx(0.6)
    # Periods: only those before a digit survive, and the tool removes at most 32 of them.
    assert normalize_answer("a.b") == "ab" and normalize_answer("." * 40) == "." * 8


def test_score_per_type_and_rounding():
    annotations = [
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no", "answers": humans(*["yes"] * 10)},
        {"question_id": 2, "question_type": "how many", "answer_type": "number",
         "answers": humans(*["2"] * 2, *["3"] * 8)},
        {"question_id": 3, "question_type": "how many", "answer_type": "number", "answers": humans(*["4"] * 10)},
        {"question_id": 4, "question_type": "what color", "answer_type": "other",
         "answers": humans("red", *["blue"] * 9)},
    ]
    predictions = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "two"},
                   {"question_id": 3, "answer": "4"}, {"question_id": 4, "answer": "the red"}]
    result = vqa_score(predictions, annotations)
    assert result == {"overall": round(100 * (1 + 0.6 + 1 + 0.3) / 4, 2),  # 72.5
                      "perAnswerType": {"yes/no": 100.0, "number": 80.0, "other": 30.0},
                      "perQuestionType": {"is the": 100.0, "how many": 80.0, "what color": 30.0}}


@pytest.mark.parametrize("predictions, message", [
    ([{"question_id": 1, "answer": "yes"}], "1 missing"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 9, "answer": "x"}],
     "1 not in the split"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}], "answered twice"),
    ([{"question_id": "1", "answer": "yes"}], "entry 0 is not"),
    ([{"question_id": 1}], "entry 0 is not"),
    ({"1": "yes"}, "expected a JSON list"),
])
def test_bad_predictions_are_clear_errors(predictions, message):
    annotations = [{"question_id": q, "question_type": "t", "answer_type": "yes/no", "answers": humans("yes")}
                   for q in (1, 2)]
    with pytest.raises(EvaluationError, match=message):
        vqa_score(predictions, annotations, "preds.json")


# -----------------------------------------------------------------------------
# Agreement with the official tool on random inputs

PIECES = ["yes", "no", "Yes", "two", "2", "3", "none", "zero", "the", "a", "an", "cat", "Cat", "dog", "dont", "isnt",
          "red", "1,000", "1000", "3.5", "ten", "10", "o'clock", "oclock", "left-handed", "red/white", "(maybe)",
          "yes!", "no?", "cat.", "dog,", "..", "hello world", "Im", "let's", "whats", "@home", "it's"]


def random_answer(rng):
    if rng.random() < 0.5:  # already clean, as most real answers are
        return rng.choice(["yes", "no", "2", "cat", "red", "10", "don't"])
    text = " ".join(rng.choice(PIECES) for _ in range(rng.choice([1, 1, 1, 2, 3])))
    return rng.choice(["", " ", "\t"]) + text + rng.choice(["", " ", "\n", "."])


@pytest.fixture(scope="module")
def official_tool():
    spec = importlib.util.find_spec("lavis")
    if spec is None:
        pytest.skip("salesforce-lavis not installed (pip install --no-deps salesforce-lavis): it ships the official "
                    "VQA evaluation code")
    folder = os.path.join(spec.submodule_search_locations[0], "common", "vqa_tools")
    modules = {}
    for name in ("vqa", "vqa_eval"):  # loaded by path: the lavis package itself needs far more than we install
        module_spec = importlib.util.spec_from_file_location(f"official_{name}", os.path.join(folder, f"{name}.py"))
        modules[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(modules[name])
    return modules["vqa"].VQA, modules["vqa_eval"].VQAEval


@pytest.mark.parametrize("seed", range(3))
def test_matches_official_tool(official_tool, tmp_path, seed, capsys):
    VQA, VQAEval = official_tool
    rng = random.Random(seed)
    questions, annotations, predictions = [], [], []
    for q in range(400):
        pool = [random_answer(rng) for _ in range(rng.choice([1, 2, 3, 5]))]
        answers = humans(*(rng.choice(pool) for _ in range(10)))
        annotations.append({"question_id": q, "image_id": q // 3, "question_type": rng.choice(["what", "how many", "is"]),
                            "answer_type": rng.choice(["yes/no", "number", "other"]),
                            "multiple_choice_answer": answers[0]["answer"], "answers": answers})
        questions.append({"question_id": q, "image_id": q // 3, "question": "?"})
        guess = rng.choice(pool + [random_answer(rng)])
        predictions.append({"question_id": q, "answer": guess})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014"}
    paths = {name: str(tmp_path / f"{name}.json") for name in ("questions", "annotations", "predictions")}
    for name, obj in (("questions", {**header, "questions": questions}), ("annotations", {**header, "annotations": annotations}),
                      ("predictions", predictions)):
        with open(paths[name], "w") as f:
            json.dump(obj, f)
    vqa = VQA(paths["annotations"], paths["questions"])
    tool = VQAEval(vqa, vqa.loadRes(paths["predictions"], paths["questions"]), n=2)
    tool.evaluate()
    ours = evaluate.score_files(paths["predictions"], paths["questions"], paths["annotations"])
    assert ours == tool.accuracy
    assert 5 < ours["overall"] < 95  # the draw mixes right, wrong and partly right answers
