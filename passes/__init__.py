"""twistc's graph passes, one per file, and the presets (presets.py). Each pass registers itself
(twistc.pipeline.register); twistc.pipeline.registry() imports these modules and looks a pass up by name."""
