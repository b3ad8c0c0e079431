"""Wire messages, one module per family, versioned in the package path (``v1``)."""
