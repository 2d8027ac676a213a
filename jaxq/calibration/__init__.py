"""Calibration observers: the statistics that pick static quantization ranges.

Every observer is an ``(init, update, finalize)`` triple of pure functions
(`Observer`); see `jaxq.calibration.base` for the protocol and
`jaxq.calibration.minmax` for the max observer.

```python
obs = jaxq.observers.max()           # or jaxq.observers.observer_for(spec)
state = obs.init(x, spec)
state = jax.jit(obs.update)(state, x)
amax = obs.finalize(state)           # keepdims scale shape; (amin, amax) if affine
```
"""

from __future__ import annotations

from jaxq.calibration.base import Observer
from jaxq.calibration.base import nonfinite_count
from jaxq.calibration.histogram import HistogramState
from jaxq.calibration.minmax import MaxState
from jaxq.calibration.observers import entropy
from jaxq.calibration.observers import max  # pylint: disable=redefined-builtin
from jaxq.calibration.observers import merge
from jaxq.calibration.observers import mse
from jaxq.calibration.observers import observer_for
from jaxq.calibration.observers import percentile
