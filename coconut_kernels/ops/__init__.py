"""One module per op: the Python entry point, fake kernel, autograd and backend choice."""
