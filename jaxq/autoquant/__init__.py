"""Mixed precision under a budget: `auto_quantize` picks a format per layer.

See `jaxq.autoquant.search` for the method, `candidates` for the formats,
`scoring` for the one-compilation scores and their proxies, `knapsack` for
the exact solve.
"""

from jaxq.autoquant import candidates
from jaxq.autoquant import knapsack
from jaxq.autoquant import losses
from jaxq.autoquant import results
from jaxq.autoquant import scoring
from jaxq.autoquant.candidates import BF16
from jaxq.autoquant.candidates import Candidate
from jaxq.autoquant.candidates import FLOAT32
from jaxq.autoquant.candidates import default_candidates
from jaxq.autoquant.candidates import w4
from jaxq.autoquant.candidates import w8
from jaxq.autoquant.candidates import w8a8
from jaxq.autoquant.losses import cosine_loss
from jaxq.autoquant.losses import kl_loss
from jaxq.autoquant.losses import mse_loss
from jaxq.autoquant.losses import nll_loss
from jaxq.autoquant.search import AutoQuantResult
from jaxq.autoquant.search import FrontPoint
from jaxq.autoquant.search import GroupChoice
from jaxq.autoquant.search import auto_quantize
