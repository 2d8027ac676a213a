"""Reading and writing quantized weights.

* `jaxq.io.checkpoint`: jaxq's own format (`jaxq.save` / `jaxq.load`), one
  safetensors file with a JSON manifest, bit-exact; its tensor encodings
  are `jaxq.io.tensors`, its manifest `jaxq.io.manifest`.
* `jaxq.io.compressed_tensors`: the compressed-tensors format that vLLM and
  transformers load (``save``: jaxq serving variables to a Hugging Face
  model directory; ``load``: back, still quantized, with the rules); its
  layout (packing, spec <-> scheme) in `jaxq.io.compressed_tensors_schemes`,
  the reader in `jaxq.io.compressed_tensors_load`.
* `jaxq.io.gguf`: llama.cpp's GGUF tensors as QArrays, still quantized
  (K-quant layouts in `jaxq.io.gguf_kquants`, the checked tensor index in
  `jaxq.io.gguf_file`).
* `jaxq.io.exported`: a served model as a serialized ``jax.export``
  program for several platforms, reloaded and run without the model code.
"""

from jaxq.io import compressed_tensors
from jaxq.io import exported
from jaxq.io import gguf

from jaxq.io.checkpoint import CheckpointError
from jaxq.io.checkpoint import CheckpointNotFoundError
from jaxq.io.checkpoint import Loaded
from jaxq.io.checkpoint import SaveReport
from jaxq.io.checkpoint import load
from jaxq.io.checkpoint import read_manifest
from jaxq.io.checkpoint import save
