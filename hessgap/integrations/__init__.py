"""hessgap inside other training frameworks: a callback for the Hugging Face ``Trainer``
(:mod:`hessgap.integrations.transformers`) and one for Lightning (:mod:`hessgap.integrations.lightning`), both
running a :class:`hessgap.Tracker` every N optimizer steps and logging its values as ``hessgap/<measure>``.

Each module imports its framework when it is imported itself (the frameworks are optional: ``import hessgap``
never needs them).
"""
