"""
The paper's pre-training ablation (its Table 6) in miniature, on the built-in demo corpus: each
pre-training variant, then the same VQA, retrieval and NLVR2 fine-tuning of it, in one table.

    python3 tools/ablation.py --seeds 0,1       # every variant, two fine-tuning seeds: ~2 h on 2 CPU cores
    python3 tools/ablation.py --seeds 0,1,2 --variants mlm_itm,mlm_itm_ps     # a third seed for two rows

Variants, as the paper's rows:
    none        no pre-training: every fine-tuning starts from the CNN's classification
                pre-training (pretrain_cnn.py, the demo's ImageNet) and a random Transformer (the
                paper's row starts from ImageNet + BERT weights; the demo has no BERT).
    mlm         MLM only                      pretrain.py --tasks mlm
    itm         ITM only                      pretrain.py --tasks itm
    mlm_itm     MLM + ITM, every pixel token  pretrain.py --pixel-samples 0 (what `python pretrain.py`
                                              trains: its 100 samples exceed any demo image's tokens)
    mlm_itm_ps  MLM + ITM + pixel random sampling (paper 3.3), scaled to the demo: the paper keeps
                100 of the ~260 pixel tokens of an 800x1333 image (38%); --pixel-samples 9 keeps 9
                of a 128x192 demo image's 24 tokens (a 4x6 grid), or 9 of a square image's 16.

Each fine-tuning is the script's demo recipe started from that variant's checkpoint (`--init`),
except retrieval, whose demo recipe (one epoch at lr 1e-5) only keeps an ITM head that pre-training
already trained: here it gets 5 epochs at the paper's lr 1e-4, so that variants without ITM can
learn a ranking too, and still keeps its best validation checkpoint, step 0 included.

Every step is one of the scripts' own command lines, printed as it runs. Its result is stored in
<out-dir>/results.json with that command as soon as it ends, so an interrupted ablation continues
where it stopped; a stored result whose command differs (another --data-root, --smoke) is an
error rather than a silent reuse. One process: the scripts run one after the other, not under
torchrun.
"""

import argparse
import json
import os
import statistics
import sys

if __package__ in (None, ""):  # run as `python3 tools/ablation.py`: the repository's modules sit one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import evaluate
import finetune_nlvr
import finetune_retrieval
import finetune_vqa
import pretrain
from tools import pretrain_cnn, synthetic

VARIANTS = {  # name: (the paper's row, pretrain.py flags (None: no pre-training), objectives trained)
    "none": ("no pre-training", None, set()),
    "mlm": ("MLM", ["--tasks=mlm"], {"mlm"}),
    "itm": ("ITM", ["--tasks=itm"], {"itm"}),
    "mlm_itm": ("MLM + ITM", ["--pixel-samples=0"], {"mlm", "itm"}),
    "mlm_itm_ps": ("MLM + ITM + pixel sampling", ["--pixel-samples=9"], {"mlm", "itm"}),
}
FINETUNE = {  # task: (script, its main, flags beyond its demo recipe)
    "vqa": ("finetune_vqa.py", finetune_vqa.main, []),
    "retrieval": ("finetune_retrieval.py", finetune_retrieval.main, ["--epochs=5", "--lr=1e-4"]),
    "nlvr2": ("finetune_nlvr.py", finetune_nlvr.main, []),
}
# --smoke: a few steps of everything on small images, to check the pipeline (the numbers mean nothing)
SMOKE = {"pretrain": ["--max-steps=2", "--batch-size=16", "--global-batch=16", "--captions-per-image=2",
                      "--eval-pairs=16", "--cnn-pretrain-epochs=1"],
         "finetune": ["--max-steps=2", "--epochs=1"],
         "vqa": ["--batch-size=10", "--global-batch=10", "--questions-per-image=2"],
         "retrieval": ["--batch-size=2", "--global-batch=2", "--eval-images=5", "--score-batch=32"],
         "nlvr2": ["--batch-size=4", "--global-batch=4"],
         "cnn": ["--epochs=1", "--batch-size=16", "--image-size=64", "--num-workers=0", "--dtype=fp32"],
         "all": ["--image-min-size=64", "--image-max-size=96", "--num-workers=0", "--dtype=fp32"]}


def plan(variants, seeds, tasks, data_root, out_dir, smoke=False):
    """The ablation as a list of steps (result key, script, its main, argv), in the order they run."""
    extra = SMOKE if smoke else {k: [] for k in SMOKE}
    data = [f"--data-root={data_root}"] + extra["all"]
    # without --init, the fine-tuning scripts build the architecture from their flags: the demo
    # pre-training's visual embedding, so that "no pre-training" differs from the others in weights only
    demo = pretrain.PRESETS["demo"]
    scratch = ["--init=", f"--pixel-pool={demo['pixel_pool']}"] + ["--visual-position"] * demo["visual_position"]
    steps = []
    for variant in variants:
        folder, flags = os.path.join(out_dir, variant), VARIANTS[variant][1]
        init = os.path.join(folder, "pretrain", "final.pt") if flags is not None else ""
        if init:  # the demo pre-training recipe (CNN stage + 32 epochs), the variant's flags
            steps.append((f"{variant}/pretrain", "pretrain.py", pretrain.main,
                          flags + [f"--out-dir={os.path.dirname(init)}"] + data + extra["pretrain"]))
            start = [f"--init={init}"]
        else:  # the demo pre-training's first stage alone: the CNN's classification pre-training
            cnn = os.path.join(folder, "cnn", "resnet.pth")
            steps.append((f"{variant}/cnn", "tools/pretrain_cnn.py", pretrain_cnn.main,
                          [f"--data-root={data_root}", f"--out={cnn}",
                           f"--epochs={demo['cnn_pretrain_epochs']}"] + extra["cnn"]))
            start = scratch + [f"--cnn={cnn}"]
        for seed in seeds:
            for task in tasks:
                script, main_fn, more = FINETUNE[task]
                steps.append((f"{variant}/{task}/{seed}", script, main_fn,
                              start + [f"--out-dir={os.path.join(folder, f'{task}_s{seed}')}", f"--seed={seed}",
                                       *more, *data, *extra["finetune"], *extra[task]]))
            if "nlvr2" in tasks:  # NLVR2's dev split chose the best epoch; test1 is the unbiased figure
                steps.append((f"{variant}/nlvr2_test1/{seed}", "evaluate.py", evaluate.main,
                              ["nlvr2", f"--checkpoint={os.path.join(folder, f'nlvr2_s{seed}', 'best.pt')}",
                               f"--data-root={data_root}", "--split=test1", "--num-workers=0"]))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds (pre-training always uses seed 0)")
    parser.add_argument("--finetune", default=",".join(FINETUNE), help="which fine-tunings to run (a later run "
                        "with the others completes the table)")
    parser.add_argument("--data-root", default="data/demo")
    parser.add_argument("--out-dir", default="", help="default: runs/ablation (runs/ablation_smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="2 steps of everything, to check the pipeline")
    args = parser.parse_args(argv)
    variants, tasks = args.variants.split(","), args.finetune.split(",")
    for flag, given, known in (("--variants", variants, VARIANTS), ("--finetune", tasks, FINETUNE)):
        unknown = [v for v in given if v not in known]
        if unknown:
            raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = args.out_dir or ("runs/ablation_smoke" if args.smoke else "runs/ablation")
    synthetic.ensure_demo_corpus(args.data_root)  # "no pre-training" reads the corpus before any pretrain.py renders it
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)

    for key, script, main_fn, step_argv in plan(variants, seeds, tasks, args.data_root, out_dir, args.smoke):
        command = f"python {script} {' '.join(step_argv)}"
        if key in results:
            if results[key]["command"] != command:
                raise SystemExit(f"{results_path}: {key} was run as\n  {results[key]['command']}\nnot as\n  {command}"
                                 f"\nUse another --out-dir for other settings.")
            print(f"[ablation] {key}: done before")
            continue
        print(f"[ablation] {key}: {command}", flush=True)
        results[key] = {**main_fn(step_argv), "command": command}
        common.write_json(results_path, results)
    table = markdown_table(results, variants, seeds)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


COLUMNS = [  # (heading, result key, field), each in percent
    ("VQA minival", "vqa", "overall"), ("TR R@1", "retrieval", "tr_r1"), ("IR R@1", "retrieval", "ir_r1"),
    ("R-sum", "retrieval", "rsum"), ("NLVR2 dev", "nlvr2", "accuracy"), ("NLVR2 test1", "nlvr2_test1", "accuracy"),
]


def markdown_table(results, variants, seeds):
    """One row per variant: held-out MLM and ITM accuracy after pre-training (of the objectives
    it trained), then each fine-tuned figure as the mean over seeds, +- the sample standard
    deviation when there are several."""
    def cell(values):
        if None in values:
            return "not run"
        if len(values) < 2:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = ["| pre-training | MLM acc | ITM acc | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    for v in variants:
        title, _, trained = VARIANTS[v]
        pre = results.get(f"{v}/pretrain")
        pre_cells = [("not run" if pre is None else f"{100 * pre[f'{t}_acc']:.1f}") if t in trained else "–"
                     for t in ("mlm", "itm")]
        cells = [cell([results.get(f"{v}/{task}/{s}", {}).get(field) for s in seeds]) for _, task, field in COLUMNS]
        lines.append(f"| {title} | " + " | ".join(pre_cells + cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
