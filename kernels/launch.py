"""torch.library.wrap_triton for every torch hkd supports, the Triton interpreter included.

Under TRITON_INTERPRET=1, @triton.jit makes an InterpretedFunction. Newer torch's wrap_triton returns it unchanged
(there is nothing to trace: it runs eagerly on CPU tensors); torch 2.10's raises "wrap_triton only works on functions
annotated with triton.jit or triton.autotune". This does what the newer torch does, on every version.
"""

from torch.library import wrap_triton as _wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    return kernel if isinstance(kernel, InterpretedFunction) else _wrap_triton(kernel)
