"""runtime: lowbit's own ops on onnxruntime.

- :mod:`lowbit.runtime.ops`: the op schemas (domain ``lowbit``) — the spec;
- ``runtime/native``: their C++ kernels and onnxruntime binding, built at install into
  ``liblowbit_ops.so`` (:mod:`lowbit.runtime.build`; DEVELOPERS.md);
- :mod:`lowbit.runtime.library`: where that library is and which instruction set it runs;
- :mod:`lowbit.runtime.reference`: the numpy reference of each op (the oracle);
- :mod:`lowbit.runtime.session`: onnxruntime sessions with the right implementation registered;
- :mod:`lowbit.runtime.edge`: builds for a device (x86-64, or aarch64 cross-compiled and run here
  under qemu) of the op library and the C++ host ``lowbit-run`` (``runtime/native/host``);
- :mod:`lowbit.runtime.deploy`: ``lowbit deploy``, the folder to copy to a device, checked.
"""
