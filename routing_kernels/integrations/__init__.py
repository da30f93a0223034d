"""Integrations with model libraries. Each module imports its library lazily, so ``import routing_kernels``
never needs them; see :mod:`routing_kernels.integrations.transformers`."""
