"""The DICOM objects that carry the classifier's result back into the PACS, one kind each.

One subpackage per kind, the highdicom way (`sr/`, `seg/`, `sc/`: the object in `sop.py`,
its parts in `content.py`, its codes in `codes.py`, and in `kind.py` what the node's result
writer calls); what they share is here: the interface of a kind and the inputs it is built
from (`kind`), the finding's regions (`regions`), the attributes copied from the source
(`attributes`), the argument checks (`validation`) and the one error a caller handles
(`errors`). Imports nothing, so that naming a kind (the config check) stays cheap.
"""
