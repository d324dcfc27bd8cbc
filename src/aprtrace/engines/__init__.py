"""Alternative engines for ``aprtrace trace`` (the NumPy forward pass is the default)."""
