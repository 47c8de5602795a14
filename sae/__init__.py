"""headscope.sae."""
