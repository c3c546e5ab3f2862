"""Python faces of the compiled ops ``torch.ops.hessgap.*``: wrappers, fake kernels, plain-PyTorch twins.

Each op lives in its own module (``box_ascent``, ``hvp_pointwise``) with three parts: the wrapper that
users call, the ``register_fake`` kernel that lets it run under ``torch.compile`` (registered only when
the extension loaded, so a missing build gives one clear error), and a ``*_reference`` written with
plain PyTorch ops that the tests compare the kernels against.
"""
