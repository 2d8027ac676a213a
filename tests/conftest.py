"""Test configuration.

Eight host CPU devices let the sharding tests run on any machine; XLA reads
the flag once, so it must be set before JAX initialises its backends.

Under xdist (`-n auto`, `--dist loadgroup` in pyproject.toml), the tests of
a module that builds a module-scoped fixture run on one worker, so the
fixture (a trained model, a loaded checkpoint) is built once, not once per
worker; and the `slow` end-to-end tests are queued first, so the two
workers do not wait on one long test at the end.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the run: the workers, and the examples
# and benchmarks they start as subprocesses, compile many identical programs
# (the same test models, the same --quick paths); each is compiled once.
# A fresh clone starts with it empty; `rm -rf .jax_cache` empties it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "jaxq", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("jaxq")

_SHARED_SCOPES = ("module", "package", "session")


def _shares_a_test_fixture(item: pytest.Item) -> bool:
  """Whether the test uses a module- (or wider-) scoped fixture defined under
  tests/ (pytest's own session fixtures, e.g. tmp_path_factory, are cheap)."""
  fixture_info = getattr(item, "_fixtureinfo", None)
  if fixture_info is None:
    return False
  for name in item.fixturenames:
    for fixture_def in fixture_info.name2fixturedefs.get(name, ()):
      if fixture_def.scope in _SHARED_SCOPES and fixture_def.baseid:
        return True
  return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
  del config  # unused
  shared_modules = {item.nodeid.split("::")[0] for item in items
                    if _shares_a_test_fixture(item)}
  for item in items:
    module = item.nodeid.split("::")[0]
    if module in shared_modules:
      # Every test of the module, not only those using the fixture, so the
      # module's tests stay together.
      item.add_marker(pytest.mark.xdist_group(module))
  # Stable: the slow end-to-end tests first, the rest in collection order.
  def order(item: pytest.Item) -> int:
    return 0 if item.get_closest_marker("slow") is not None else 1

  items.sort(key=order)
