"""Calibration observers: the statistics that pick static quantization ranges.

Every observer is an ``(init, update, finalize)`` triple of pure functions
(`Observer`, see `jaxq.calibration.base`), and ``jaxq.observers`` names them:

* ``max()``: running max |x| (or min/max when affine) per scale block, any
  granularity (`jaxq.calibration.minmax`).
* ``percentile(q)``, ``entropy(num_bins=2048, start_bin=128)``, ``mse()``:
  amax chosen from per-tensor or per-channel |x| histograms that grow their
  range inside ``jit`` without losing counts (`jaxq.calibration.histogram`,
  `jaxq.calibration.thresholds`). They share `HistogramState`, so one pass
  can be finalized by each of them (and by ``max()``).

```python
obs = jaxq.observers.observer_for(spec)    # from spec.calibration
state = obs.init(x, spec)
state = jax.jit(obs.update)(state, x)      # once per batch
state = obs.update(state, x, mask)         # mask: x's leading axes, False
                                           # at padding (counts in nothing)
amax = obs.finalize(state)                 # keepdims scale shape
```

NaN/Inf are left out of every statistic and counted: `nonfinite_count`.
Positions a ``mask`` marks False are left out and not counted at all.
A zero-size batch leaves a state unchanged.
States from different devices or runs combine with `merge`.
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
