"""The SGLang integration: the only package that imports SGLang. Entry point: :func:`plugin.register`."""
