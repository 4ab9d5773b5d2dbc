"""twistc's graph passes, one per file. Import a pass from its module, or look it up by name in
twistc.pipeline.REGISTRY (lazy)."""
