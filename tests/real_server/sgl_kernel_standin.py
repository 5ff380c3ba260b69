"""A stand-in for SGLang's kernel package `sgl_kernel`: tests/real_server/setup_sglang.sh copies
this file into the SGLang venv as `sgl_kernel/__init__.py`. It is not SGLang's code and
computes nothing.

Why: SGLang's CPU path (SGLANG_USE_CPU_ENGINE=1) imports CPU ops from `sgl_kernel` when its
modules load, and no package index carries the CPU build of it (the registry's sglang-kernel
holds only CUDA builds; SGLang builds its CPU kernels from a source checkout). On a CPU that
takes SGLang's plain paths, serving calls none of those ops: they only have to import.

Every attribute of this module is a function that prints `sgl_kernel stand-in called: <name>`
to stderr and raises NotImplementedError naming itself, so a SGLang that ever calls one fails
loudly in its log, never silently. It has no submodules: `import sgl_kernel.<sub>` raises
ImportError, where SGLang falls back to its own Python code (scalar types, ...). It registers
no torch op: SGLang turns its AMX paths on (weight packing, fused norms, the intel_amx
attention) only when `torch.ops.sgl_kernel.convert_weight_packed` exists
(`cpu_has_amx_support()`), so with this stand-in they stay off even on a CPU with AMX.
"""

import sys

MARKER = "sgl_kernel stand-in called:"


def _standin(qualname):
    def op(*args, **kwargs):
        message = f"{MARKER} {qualname} (nano-eval's stand-in for SGLang's CPU kernels; it has no implementation)"
        print(message, file=sys.stderr, flush=True)
        raise NotImplementedError(message)

    op.__name__ = qualname.rsplit(".", 1)[-1]
    op.__qualname__ = qualname
    op.__module__ = qualname.rsplit(".", 1)[0]
    return op


def _module_getattr(modname):
    def __getattr__(name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # __path__, __version__, __wrapped__...: not an op
        return _standin(f"{modname}.{name}")

    return __getattr__


__getattr__ = _module_getattr(__name__)
