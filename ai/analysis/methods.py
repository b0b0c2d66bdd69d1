"""The heatmap methods by name, and how the result objects title each one's map.

Defined once here, free of torch, so that the CLI's `--method` choices and the node's
`analysis.heatmap` check read them without loading a model; `ai.analysis.cam.METHODS` holds
the function of each name.
"""

from __future__ import annotations

# How the SC and the SR name each method's map, in the order the CLI offers them.
METHOD_TITLES = {"gradcam": "GradCAM", "cam": "CAM", "segmentation": "segmentation mask"}
METHOD_NAMES = tuple(METHOD_TITLES)
