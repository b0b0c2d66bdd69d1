"""The one segment of the pneumothorax SEG: what it is (coded), who made it, and how it is
tracked across the result objects of one image.

The tracking identifier and UID are the ones of the SR's measurement group for the same
finding (the caller passes the UID), which is how the AIR profile ties a region in the SR to
its mask in the SEG.
"""

import highdicom as hd

from ai.results.seg.codes import ARTIFICIAL_INTELLIGENCE, CATEGORY, PNEUMOTHORAX

SEGMENT_NUMBER = 1
SEGMENT_LABEL = "Pneumothorax"
TRACKING_IDENTIFIER = "Pneumothorax region"


def algorithm_identification(name: str, version: str) -> hd.AlgorithmIdentificationSequence:
    """The model as the Segmentation Algorithm Identification names it (family: AI)."""
    return hd.AlgorithmIdentificationSequence(
        name=name, family=ARTIFICIAL_INTELLIGENCE, version=version
    )


def pneumothorax_segment(
    *, algorithm_name: str, algorithm_version: str, tracking_uid: str
) -> hd.seg.SegmentDescription:
    """Segment 1: Pneumothorax, found AUTOMATICally by the named algorithm."""
    return hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=CATEGORY,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm_name, algorithm_version),
        tracking_uid=tracking_uid,
        tracking_id=TRACKING_IDENTIFIER,
        # A viewer's own default colour differs from one viewer to the next; red is what the
        # SC's heat scale and most AI result viewers use for a finding.
        display_color=hd.color.CIELabColor.from_rgb(255, 0, 0),
    )
