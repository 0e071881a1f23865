"""evaluate.py vqa-score on randomised adversarial files: by default it equals the current official
tool (the independent oracle of tests/vqa_official_rules.py) on every figure, and with --vqa-rules 2017
the 2017 tool that salesforce-lavis ships, to the last digit. The metric itself is tested in
tests/test_metrics.py."""

import contextlib
import io
import json

import pytest

import evaluate
import vqa_official_rules as oracle


def vqa_score_cli(paths, *options):
    predictions, questions, annotations = paths
    return evaluate.main(["vqa-score", f"--predictions={predictions}", f"--questions={questions}",
                          f"--annotations={annotations}", *options])


@pytest.mark.parametrize("seed", range(2))
def test_vqa_score_follows_the_current_tool_by_default(tmp_path, seed, capsys):
    questions, annotations, predictions = oracle.adversarial_files(100 + seed)
    paths = oracle.write_files(tmp_path, questions, annotations, predictions)
    result = vqa_score_cli(paths)
    oracle.assert_within(result, oracle.official_score(predictions, annotations))
    assert json.loads(capsys.readouterr().out) == result  # what it prints is what it returns
    assert vqa_score_cli(paths, "--vqa-rules=current") == result


@pytest.mark.parametrize("seed", range(2))
def test_vqa_score_2017_option_follows_the_2017_tool(tmp_path, seed):
    tool = oracle.lavis_tool()
    if tool is None:
        pytest.skip("salesforce-lavis not installed (pip install --no-deps salesforce-lavis): it ships the 2017 "
                    "official VQA evaluation code")
    paths = oracle.write_files(tmp_path, *oracle.adversarial_files(200 + seed, questions=400))
    with contextlib.redirect_stdout(io.StringIO()):  # both print
        theirs = oracle.lavis_score(tool, *paths)
        ours = vqa_score_cli(paths, "--vqa-rules=2017")
    assert ours == theirs
    with contextlib.redirect_stdout(io.StringIO()):
        assert vqa_score_cli(paths)["overall"] != ours["overall"]  # the default is not the 2017 tool


def test_vqa_score_refuses_unknown_rules_and_bad_files(tmp_path, capsys):
    questions, annotations, predictions = oracle.adversarial_files(0, questions=5)
    paths = oracle.write_files(tmp_path, questions, annotations, predictions[1:])
    with pytest.raises(SystemExit, match=r"--vqa-rules: invalid choice: '2021' \(choose from '?current'?, '?2017"):
        vqa_score_cli(paths, "--vqa-rules=2021")  # one line that names the flag and its choices
    with pytest.raises(SystemExit, match="1 missing"):
        vqa_score_cli(paths)
