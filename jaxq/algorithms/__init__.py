"""Array-level post-training quantization algorithms (no Flax).

Each function works on one layer: a (d_in, d_out) kernel, the layer's
captured inputs (or their `InputStats`) with an optional padding mask, and
the weight's `jaxq.QuantSpec`.

* `weight_range`: a weight's range per scale honouring ``calibration``.
* `smoothing_factors`, `search_alpha`: SmoothQuant.
* `awq`: AWQ's per-input-channel scales and clipping.
* `gptq`, `hessian_update`: GPTQ.

Layers that share one input (attention query, key and value after one
LayerNorm) must share one set of per-input-channel factors to fold them into
that op: pass their kernels concatenated along d_out
(``jnp.concatenate([wq, wk, wv], axis=1)``) to `smoothing_factors`,
`search_alpha` or `awq`.
"""

from jaxq.algorithms.awq import AWQResult
from jaxq.algorithms.awq import awq
from jaxq.algorithms.awq import awq_factors
from jaxq.algorithms.channel_scale import scale_input
from jaxq.algorithms.channel_scale import scale_kernel
from jaxq.algorithms.gptq import GPTQResult
from jaxq.algorithms.gptq import gptq
from jaxq.algorithms.gptq import hessian_update
from jaxq.algorithms.smoothquant import SmoothQuantResult
from jaxq.algorithms.smoothquant import search_alpha
from jaxq.algorithms.smoothquant import smoothing_factors
from jaxq.algorithms.stats import InputMoment
from jaxq.algorithms.stats import InputStats
from jaxq.algorithms.stats import init_input_moment
from jaxq.algorithms.stats import init_input_stats
from jaxq.algorithms.stats import update_input_moment
from jaxq.algorithms.stats import update_input_stats
from jaxq.algorithms.weight_range import weight_range
