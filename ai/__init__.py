"""The pneumothorax classifier, in rooms by job. Each room imports only the rooms above it
in this list (and storage/), never one below:

    data/      where labelled images come from, their shared preprocessing and cache, the
               cohort overview and the sample data
    model/     what a model is: architectures, weights to start from, the artifact on
               disk, and which model the node uses
    analysis/  a model applied to images: probabilities and heatmaps (CAM, GradCAM, the
               mask head's map), batched, and the figure of one
    results/   the DICOM objects that carry a result into the PACS, one subpackage each
    train/     the recipes, fitting, cross-validation and its reports, localisation
    cli/       the `pneumonode` subcommands; and `cli.console`, which imports nothing of
               the project, so that every room (and the node's processes) may use it

The rooms' `__init__` modules import nothing.
"""
