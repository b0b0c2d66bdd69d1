"""What a model is: its architecture, the weights it may start from, the artifact that holds
it on disk, and which model the node analyses with. Nothing here trains or explains."""
