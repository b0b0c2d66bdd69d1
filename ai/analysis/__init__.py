"""A loaded model applied to images: batched probabilities and the heatmaps that show where
it looked (CAM, GradCAM, a mask head's map), and the figure of one. `methods` names the
heatmap methods without importing torch, for the CLI and the node's configuration."""
