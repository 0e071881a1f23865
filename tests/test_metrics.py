"""The official VQA metric in metrics.py under both rule sets: hand-worked cases, the tool's quirks,
clear errors on bad predictions, agreement on randomised adversarial files with an independent
oracle of the current rules (tests/vqa_official_rules.py) and with the 2017 tool itself (the copy
that salesforce-lavis ships), and the soft training targets scored as the metric scores them."""

import contextlib
import io
import subprocess
import sys

import pytest

import metrics
import vqa_official_rules as oracle
from metrics import EvaluationError, normalize_answer, vqa_accuracy, vqa_score

humans = oracle.human_records


def both(prediction, answers):
    """(current, 2017) accuracy of one raw prediction against raw human answer strings."""
    return tuple(vqa_accuracy(prediction, humans(answers), rules) for rules in metrics.VQA_RULES)


# -----------------------------------------------------------------------------
# Hand-worked cases


@pytest.mark.parametrize("raw, clean", [
    ("Two", "2"), ("the dog.", "dog"), ("A  Cat!", "cat"), ("dont", "don't"), ("Isnt it", "isn't it"),
    ("1,000", "1000"), ("3.5", "3.5"), ("yes.", "yes"), ("hello, world", "hello world"),
    ("red/white", "red white"), ("  ten\tbirds\n", "10 birds"), ("an apple", "apple"), ("none", "0"),
    ("left-handed", "left handed"), ("o'clock", "o'clock"), ("Im", "im"),  # "Im" is a key the tool never reaches
    ("10:30", "10:30"), ("it's", "it's"),  # colons and apostrophes are not in the tool's list
    ("a - b", "b"), ("x -y", "x y"), ("1, 2 - 3", "1 2 3"), ("1,2-3", "123"),  # next to a space, or a digit,digit
])
def test_answer_normalisation(raw, clean):
    assert normalize_answer(raw) == clean


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_annotator_disagreement(matching, accuracy):
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert both("cat", answers) == pytest.approx((accuracy, accuracy))


def test_unanimous_answers_are_compared_unprocessed_under_current_rules():
    assert both("Yes", ["yes"] * 10) == (0, 1)  # current: "Yes" != "yes"; 2017: the prediction is normalised
    assert both("2.", ["2"] * 10) == (0, 1)
    assert both("two", ["2"] * 10) == (0, 1)
    assert both(" yes\t", ["yes"] * 10) == (1, 1)  # the prediction loses its outer whitespace under both
    assert both("yes", [" yes "] * 10) == (1, 0)  # 2017 never cleans the human answers
    assert both("yes", ["yes", "yes\t", " yes", "\nyes"] * 2 + ["yes"] * 2) == (1, 1)  # one string after rule 1 ...
    assert both("Yes", ["yes", "yes\t", " yes", "\nyes"] * 2 + ["yes"] * 2) == (0, 1)  # ... so compared unprocessed
    assert both("yes.", ["yes."] * 10) == (1, 0)  # 2017 turns the prediction into "yes"


def test_disagreeing_answers_are_all_normalised_under_current_rules():
    # Humans: two "two", two "2", six "dog"; prediction "2".
    # current: every answer normalised, "two" -> "2", so 4 humans match. Leaving out a matching one
    #   leaves 3 matches (min(1, 3/3) = 1), leaving out a "dog" leaves 4 (1): accuracy 1.
    # 2017: humans only punctuation-processed, so 2 match. Leaving out one of the two "2"s leaves 1
    #   (1/3), leaving out any other of the 8 leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert both("2", ["two", "two", "2", "2"] + ["dog"] * 6) == pytest.approx((1.0, 0.6))
    # Humans: five "The Dog", three "dog!", two "cat"; prediction "dog".
    # current: "The Dog" -> "dog", "dog!" -> "dog": 8 match, every subset keeps >= 7: accuracy 1.
    # 2017: "The Dog" stays (punctuation only), "dog!" -> "dog ": nothing equals "dog": 0.
    assert both("dog", ["The Dog"] * 5 + ["dog!"] * 3 + ["cat"] * 2) == pytest.approx((1.0, 0.0))
    assert both("yes.", ["yes."] * 9 + ["no"]) == (1, 1)
    assert both("1,000", ["1000"] * 3 + ["1,000"] * 3 + ["10"] * 4) == pytest.approx((1.0, 1.0))


def test_official_quirks():
    # Periods: only those before a digit survive, and the tool removes at most 32 of them.
    assert normalize_answer("a.b") == "ab" and normalize_answer("." * 40) == "." * 8
    # ... so the vocabulary's form repeats the processing until it changes nothing
    assert metrics.canonical_answer("The 10" + "." * 40) == "10" and metrics.canonical_answer("Two") == "2"
    assert normalize_answer("2.5.") == "2.5" and normalize_answer(".5") == ".5"
    # A digit,digit comma anywhere deletes every mark instead of spacing it.
    assert normalize_answer("1,000 red/white") == "1000 redwhite"
    # Identical records (same answer_id too) leave out together: 2 of 3 remain per held-out "a".
    records = [{"answer": "a"}] * 3 + [{"answer": "b", "answer_id": i} for i in range(7)]
    for rules in metrics.VQA_RULES:
        assert vqa_accuracy("b", records, rules) == pytest.approx((3 * 1 + 7 * 1) / 10)
        assert vqa_accuracy("x a", records, rules) == 0.0  # "a" is an article: the prediction becomes "x"


def test_score_per_type_and_rounding():
    annotations = [
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no", "answers": humans(["yes"] * 10)},
        {"question_id": 2, "question_type": "how many", "answer_type": "number",
         "answers": humans(["2"] * 2 + ["3"] * 8)},
        {"question_id": 3, "question_type": "how many", "answer_type": "number", "answers": humans(["4"] * 10)},
        {"question_id": 4, "question_type": "what color", "answer_type": "other",
         "answers": humans(["red"] + ["blue"] * 9)},
    ]
    predictions = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "two"},
                   {"question_id": 3, "answer": "4"}, {"question_id": 4, "answer": "the red"}]
    # Question 1 scores 0 under the current rules (unanimous "yes", prediction compared as "Yes"),
    # 1 under 2017's; questions 2-4 score 0.6, 1 and 0.3 under both.
    assert vqa_score(predictions, annotations) == {
        "overall": round(100 * (0 + 0.6 + 1 + 0.3) / 4, 2),  # 47.5
        "perAnswerType": {"yes/no": 0.0, "number": 80.0, "other": 30.0},
        "perQuestionType": {"is the": 0.0, "how many": 80.0, "what color": 30.0}}
    assert vqa_score(predictions, annotations, rules="2017") == {
        "overall": round(100 * (1 + 0.6 + 1 + 0.3) / 4, 2),  # 72.5
        "perAnswerType": {"yes/no": 100.0, "number": 80.0, "other": 30.0},
        "perQuestionType": {"is the": 100.0, "how many": 80.0, "what color": 30.0}}


@pytest.mark.parametrize("predictions, message", [
    ([{"question_id": 1, "answer": "yes"}], "1 missing"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 9, "answer": "x"}],
     "1 not in the split"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}], r"answered twice \(entries \[0, 1\]\)"),
    ([{"question_id": "1", "answer": "yes"}], "entry 0 is not"),
    ([{"question_id": 1}], "entry 0 is not"),
    ({"1": "yes"}, "expected a JSON list"),
])
def test_bad_predictions_are_clear_errors(predictions, message):
    annotations = [{"question_id": q, "question_type": "t", "answer_type": "yes/no", "answers": humans(["yes"])}
                   for q in (1, 2)]
    with pytest.raises(EvaluationError, match=message):
        vqa_score(predictions, annotations, "preds.json")


def test_unknown_rules_are_refused():
    with pytest.raises(EvaluationError, match="'2021'.*'current', '2017'"):
        vqa_accuracy("yes", humans(["yes"]), rules="2021")
    with pytest.raises(EvaluationError, match="choose one of"):
        vqa_score([], [], rules="")


def test_tables_are_the_tools():
    """The oracle's tables, written out separately, equal metrics.py's; and the 2017 tool's, where
    installed (the two versions of the tool share them)."""
    assert metrics.CONTRACTIONS == oracle.CONTRACTIONS and len(metrics.CONTRACTIONS) == 120
    assert "".join(metrics.PUNCTUATION) == oracle.PUNCTUATION
    assert metrics.NUMBER_WORDS == oracle.NUMBERS and metrics.ARTICLES == set(oracle.ARTICLES)
    tool = oracle.lavis_tool()
    if tool is not None:
        class NoAnnotations:
            def getQuesIds(self):
                return []
        official = tool[1](NoAnnotations(), None)
        assert official.contractions == metrics.CONTRACTIONS and official.punct == metrics.PUNCTUATION
        assert official.manualMap == metrics.NUMBER_WORDS and official.articles == ["a", "an", "the"]


def test_metrics_imports_only_the_standard_library():
    code = "import sys, metrics; print(sorted({'torch', 'numpy', 'PIL', 'data', 'evaluate'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -----------------------------------------------------------------------------
# Randomised adversarial files: the current rules against the oracle, 2017 against the tool


@pytest.mark.parametrize("seed", range(4))
def test_current_rules_match_the_oracle(tmp_path, seed):
    questions, annotations, predictions = oracle.adversarial_files(seed)
    for ann, pred in zip(annotations, predictions):  # question by question first: a failure names its answers
        expected = float(oracle.question_accuracy(pred["answer"], [h["answer"] for h in ann["answers"]]))
        got = vqa_accuracy(pred["answer"], ann["answers"])
        assert got == pytest.approx(expected), (pred["answer"], [h["answer"] for h in ann["answers"]])
    ours = metrics.score_files(*oracle.write_files(tmp_path, questions, annotations, predictions))
    oracle.assert_within(ours, oracle.official_score(predictions, annotations))
    assert len(ours["perAnswerType"]) == 3 and len(ours["perQuestionType"]) == 5
    assert 5 < ours["overall"] < 95  # the draw mixes right, wrong and partly right answers
    older = metrics.score_files(*oracle.write_files(tmp_path, questions, annotations, predictions), rules="2017")
    assert abs(older["overall"] - ours["overall"]) > 5  # and the two rule sets part on it


@pytest.fixture(scope="module")
def tool_2017():
    tool = oracle.lavis_tool()
    if tool is None:
        pytest.skip("salesforce-lavis not installed (pip install --no-deps salesforce-lavis): it ships the 2017 "
                    "official VQA evaluation code")
    return tool


@pytest.mark.parametrize("seed", range(3))
def test_2017_rules_match_the_2017_tool(tool_2017, tmp_path, seed):
    paths = oracle.write_files(tmp_path, *oracle.adversarial_files(seed, questions=400))
    with contextlib.redirect_stdout(io.StringIO()):  # the tool prints a progress bar
        theirs = oracle.lavis_score(tool_2017, *paths)
    assert metrics.score_files(*paths, rules="2017") == theirs  # every digit


# -----------------------------------------------------------------------------
# Training targets: an answer's soft target is what predicting its string scores


@pytest.mark.parametrize("rules", metrics.VQA_RULES)
def test_soft_targets_are_the_score_of_each_vocabulary_answer(rules):
    import data

    _, annotations, _ = oracle.adversarial_files(seed=7, questions=150)
    vocab = data.vqa_answer_vocab(annotations, min_count=1)
    answer_to_label = {a: i for i, a in enumerate(vocab)}
    positive = 0
    for ann in annotations:
        labels, scores = data.vqa_soft_targets(ann, answer_to_label, rules)
        target = dict(zip(labels, scores))
        for answer, label in answer_to_label.items():
            assert target.get(label, 0.0) == pytest.approx(vqa_accuracy(answer, ann["answers"], rules)), answer
        positive += bool(labels)
    assert positive > len(annotations) / 4  # not vacuous: many questions have a positive target
