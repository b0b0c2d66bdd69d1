"""The heatmap as a Secondary Capture: the object (`sop`), its picture (`picture`: the X-ray
with the map over it) and the caption band above it (`caption`), and its codes (`codes`)."""
