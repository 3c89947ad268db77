import os
import sys

# Tests never reach a model hub: every checkpoint is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
# GGUF side folders and imports go to a cache; the tests' own, not the user's ~/.cache.
if "TENSORSCALE_CACHE" not in os.environ:
    import tempfile

    os.environ["TENSORSCALE_CACHE"] = tempfile.mkdtemp(prefix="tensorscale-test-cache-")
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true", help="run the fuzz tests with 10,000 cases each")


def pytest_configure(config):
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "default",
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
    settings.load_profile("fuzz" if config.getoption("--fuzz") else "default")
