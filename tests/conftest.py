"""Test configuration.

Eight host CPU devices let the sharding tests run on any machine; XLA reads
the flag once, so it must be set before JAX initialises its backends.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "jaxq", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("jaxq")
