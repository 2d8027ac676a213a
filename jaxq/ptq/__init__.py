"""Post-training quantization of a Flax model, through the model adapter.

* `calibration_pass`: `jaxq.calibrate`, the jit-compiled pass that records
  each static act layer's statistics (`CalibrationResult`).
* `algorithms`: `jaxq.smoothquant`, `jaxq.awq`, `jaxq.gptq` over a whole
  model, as new jaxq variables; `layers` (one matmul layer as they see it:
  a 2-D kernel and its input rows) and `blocks` (their inputs block by
  block, cost linear in depth) serve them.

Written once against `jaxq.flax.adapter.ModelAdapter`, with no linen/nnx
branch; the array-level algorithms they run are `jaxq.algorithms`'.
"""
