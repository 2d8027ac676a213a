"""jaxq: quantization for JAX and Flax.

Fake-quant for QAT, jit-compiled calibration for PTQ, and real low-bit
``dot_general`` for serving. See ``DESIGN.md`` in the README for the layers.
"""

from jaxq import autoquant
from jaxq import calibration
from jaxq import formats
from jaxq import granularity
from jaxq import kvcache
from jaxq import learned
from jaxq import lora
from jaxq import observers
from jaxq import qat
from jaxq.autoquant import auto_quantize
from jaxq.io.checkpoint import load
from jaxq.io.checkpoint import save
from jaxq.convert import ConvertReport
from jaxq.convert import convert
from jaxq.flax import Rule
from jaxq.flax import act_ranges
from jaxq.flax import layers
from jaxq.flax import quantize_model
from jaxq.flax import unmatched_rules
from jaxq.fold import fold_batchnorm
from jaxq.granularity import MX
from jaxq.granularity import PerBlock
from jaxq.granularity import PerChannel
from jaxq.granularity import PerGroup
from jaxq.granularity import PerTensor
from jaxq.granularity import PerToken
from jaxq.inspect import inspect
from jaxq.ops import conv
from jaxq.ops import dot_general
from jaxq.ops import einsum
from jaxq.ptq.calibration_pass import CalibrationResult
from jaxq.ptq.calibration_pass import calibrate
from jaxq.ptq.algorithms import awq
from jaxq.ptq.gptq import gptq
from jaxq.ptq.algorithms import smoothquant
from jaxq.quantize import compute_range
from jaxq.quantize import dequantize
from jaxq.quantize import fake_quant
from jaxq.quantize import quantize
from jaxq.quantize import scale_from_range
from jaxq.range_checks import check_range
from jaxq.range_checks import ZeroRangeError
from jaxq.report import report
from jaxq.sensitivity import partial_quantize
from jaxq.sensitivity import sensitivity
from jaxq.spec import PackedQArray
from jaxq.spec import QArray
from jaxq.spec import QuantSpec
from jaxq.spec import check_qarray

from jaxq.version import __version__
