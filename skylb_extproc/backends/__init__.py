"""Real inference engines as replicas: how to install, start and stop them (vLLM's CPU build)."""
