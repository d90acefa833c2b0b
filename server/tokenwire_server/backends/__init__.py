"""Model backends: one small async interface, an embedded simulator, and routing."""
