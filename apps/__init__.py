"""headscope.apps."""
