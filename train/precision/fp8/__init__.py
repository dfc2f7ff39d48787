"""FP8 training (`precision=fp8`, `precision.recipe=tensorwise|rowwise|blockwise`): the build pipeline converts a
model's GEMMs (`convert.py`); emulated kernels for where torchao's need CUDA (`emulated.py`, `scaling.py`); the
routed-expert GEMM (`grouped.py`)."""
from train.precision.fp8.convert import Fp8Converter, Fp8Report, convert_to_fp8

__all__ = ["Fp8Converter", "Fp8Report", "convert_to_fp8"]
