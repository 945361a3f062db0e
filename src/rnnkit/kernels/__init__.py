"""Fused implementations of the recurrent layers, one package per device, behind rnnkit.dispatch."""
