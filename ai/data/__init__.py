"""Images before any model: where labelled images come from (a labels.csv folder, the SIIM
layouts, the sample data), the shared preprocessing the model and the node both use, the
decoded-image cache, and the cohort overview."""
