import importlib.util
import os
import sys
import zlib
from pathlib import Path

import pytest

# The shared helpers (tests/helpers) import as `helpers.*` from every test folder (tests/, tests/ops/).
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Nothing reaches a hub: diffusers and huggingface_hub read these when they are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# hkd's entry point chooses the OpenMP wait policy before torch loads (passive when other processes keep a core busy:
# hkd/openmp.py). The tests choose the same way, from that module's file: importing the hkd package here would load
# torch (and, through torch._dynamo, triton.language) before TRITON_INTERPRET is set below.
_spec = importlib.util.spec_from_file_location("_hkd_openmp", Path(__file__).resolve().parents[1] / "hkd" / "openmp.py")
_openmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_openmp)
_openmp.choose_wait_policy()
import torch  # noqa: E402

# Triton kernels run on the CPU through the interpreter here; it must be set before triton.language is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A fixed seed per test, from its name: the same inputs every run. HKD_TEST_SEED=N shifts every test's seed,
    for a deliberate sweep; the seed in use is recorded with the test's report."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("HKD_TEST_SEED", "0"))) % 2**32
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscription costs more than it gains at small sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """A fresh cache folder for the digits classifier: trained once per test module and written there."""
    from hkd import metrics

    mp = pytest.MonkeyPatch()
    mp.setenv("HKD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(metrics, "_CLASSIFIER", None)
    yield
    mp.undo()


@pytest.fixture
def tiny_diffusers_unet():
    """A factory of a tiny diffusers UNet2DModel (1 channel, 8x8); calling it skips the test without diffusers."""

    def make():
        diffusers = pytest.importorskip("diffusers")
        return diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )

    return make
