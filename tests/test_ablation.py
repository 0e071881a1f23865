"""ablation.py: every variant's pre-training and fine-tuning commands run end to end (2 steps
each), results are stored with their commands as they come, a second run reuses them, and a
stored result from other settings is refused."""

import json
import os

import pytest

from tools import ablation
import checkpoint
from tools import synthetic


@pytest.mark.slow
def test_every_variant_runs_and_an_interrupted_ablation_continues(tmp_path, capsys):
    corpus = str(synthetic.write_demo_corpus(tmp_path / "demo", seed=0, scale=0.05))
    out = str(tmp_path / "ablation")
    args = [f"--data-root={corpus}", f"--out-dir={out}", "--smoke", "--seeds=0,1"]
    results = ablation.main(args + ["--variants=none,mlm"])
    assert set(results) == {"mlm/pretrain", "none/cnn"} | {f"{v}/{t}/{s}" for v in ("none", "mlm") for s in (0, 1)
                                                           for t in ("vqa", "retrieval", "nlvr2", "nlvr2_test1")}
    assert results["mlm/pretrain"]["command"].startswith("python pretrain.py --tasks=mlm --out-dir=")
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    # no pre-training starts from the CNN's classification stage alone (the paper: ImageNet + BERT),
    # with the pre-trained models' architecture
    assert not os.path.exists(os.path.join(out, "none", "pretrain"))
    cnn = os.path.join(out, "none", "cnn", "resnet.pth")
    assert results["none/cnn"]["command"].startswith("python tools/pretrain_cnn.py") and os.path.exists(cnn)
    assert f"--cnn={cnn}" in results["none/vqa/0"]["command"]
    scratch = checkpoint.load_checkpoint(os.path.join(out, "none", "vqa_s0", "best.pt"))["model_config"]
    pretrained = checkpoint.load_checkpoint(os.path.join(out, "mlm", "pretrain", "final.pt"))["model_config"]
    differ = {k for k in scratch if scratch[k] != pretrained[k]}
    assert differ <= {"heads", "num_answers", "dropout"}, differ

    capsys.readouterr()
    everything = ablation.main(args)  # the stored steps are not run again
    printed = capsys.readouterr().out
    assert "[ablation] mlm/vqa/1: done before" in printed and "python pretrain.py --tasks=mlm" not in printed
    assert "python pretrain.py --tasks=itm" in printed and "python pretrain.py --pixel-samples=9" in printed
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert len(table) == 2 + len(ablation.VARIANTS)
    rows = {r.split(" | ")[0].strip("| "): r.strip("|").split(" | ")[1:] for r in table[2:]}
    assert rows["no pre-training"][:2] == ["–", "–"] and rows["MLM"][1] == "–" and rows["ITM"][0] == "–"
    assert "–" not in rows["ITM"][1] + rows["MLM"][0] + rows["MLM + ITM"][0] + rows["MLM + ITM"][1]
    vqa = [everything[f"mlm/vqa/{s}"]["overall"] for s in (0, 1)]
    assert rows["MLM"][2] == f"{sum(vqa) / 2:.1f} ± {abs(vqa[0] - vqa[1]) / 2 ** 0.5:.1f}"

    # the same folder with other settings: refused before anything runs
    with pytest.raises(SystemExit, match="none/cnn was run as"):
        ablation.main([f"--data-root={corpus}", f"--out-dir={out}", "--seeds=0"])


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--variants: unknown mlm_only; choose from none, mlm, itm"):
        ablation.main(["--variants=mlm_only", f"--out-dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--finetune: unknown nlvr; choose from vqa, retrieval, nlvr2"):
        ablation.main(["--finetune=nlvr", f"--out-dir={tmp_path}"])
