"""``jaxq.observers``: calibration observers by name.

```python
obs = jaxq.observers.max()
state = obs.init(x, spec)
state = jax.jit(obs.update)(state, x)
amax = obs.finalize(state)
```

See `jaxq.calibration` for the protocol and the state types.
"""

from __future__ import annotations

from jaxq.calibration.observers import Observer
from jaxq.calibration.observers import entropy
from jaxq.calibration.observers import max  # pylint: disable=redefined-builtin
from jaxq.calibration.observers import merge
from jaxq.calibration.observers import mse
from jaxq.calibration.observers import nonfinite_count
from jaxq.calibration.observers import observer_for
from jaxq.calibration.observers import percentile
