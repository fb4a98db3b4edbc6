"""runtime: lowbit's own ops on onnxruntime.

- :mod:`lowbit.runtime.ops`: the op schemas (domain ``lowbit``) — the spec;
- ``runtime/native``: their C++ kernels and onnxruntime binding, built at install into
  ``liblowbit_ops.so`` (:mod:`lowbit.runtime.build`; DEVELOPERS.md);
- :mod:`lowbit.runtime.library`: where that library is and which instruction set it runs;
- :mod:`lowbit.runtime.reference`: the numpy reference of each op (the oracle);
- :mod:`lowbit.runtime.session`: onnxruntime sessions with the right implementation registered.
"""
