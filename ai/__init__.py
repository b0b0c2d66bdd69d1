"""The pneumothorax classifier: preprocessing, training, artifact, CAM/GradCAM, inference."""
