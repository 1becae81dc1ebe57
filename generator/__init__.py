"""mhc_gen's generator: specs, build profiles, rendering and the build graph.
Pure Python: no torch, no GPU."""
