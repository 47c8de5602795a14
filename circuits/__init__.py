"""headscope.circuits."""
