"""A quantized KV cache: a functional core any attention can call.

```python
from jaxq import kvcache

spec = kvcache.KVCacheSpec(format="int8")      # "int4", "float8_e4m3fn", None
cache = kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_kv,
                     head_dim=D, dtype=jnp.float32)
cache = kvcache.update(cache, key, value, positions)  # (B, S, H_kv, D), (B,)
out = kvcache.attend(cache, query, positions)         # (B, S, H_q, D)
key, value = kvcache.read(cache)                      # (B, T, H_kv, D)
kvcache.nbytes(cache)                                 # values + scales
cache = kvcache.with_ranges(cache, key_amax=a, value_amax=b)  # "head" specs
```

The cache is a pytree (`KVCache`) of one layer; a model keeps one per
layer and passes them through its jitted prefill and decode steps. No
Flax here: `jaxq.flax.kv_cache` fits it to Flax attention by rules.

Modules: `spec` (`KVCacheSpec`: format, key/value granularity, KIVI group
size, value channel groups, Hadamard keys and values, KIVI's float
residual), `cache` (`KVCache`, `init`, `update`, `read`, `nbytes`,
`with_ranges`, `stored_basis`), `attention` (`attend`, block-by-block
online softmax; `reference_attention`), `hadamard` (the orthonormal
rotation).
"""

from jaxq.kvcache.attention import attend
from jaxq.kvcache.attention import reference_attention
from jaxq.kvcache.cache import KVCache
from jaxq.kvcache.cache import init
from jaxq.kvcache.cache import nbytes
from jaxq.kvcache.cache import read
from jaxq.kvcache.cache import stored_basis
from jaxq.kvcache.cache import update
from jaxq.kvcache.cache import with_ranges
from jaxq.kvcache.hadamard import hadamard_matrix
from jaxq.kvcache.spec import FORMATS
from jaxq.kvcache.spec import KVCacheSpec
