"""What a reader looks at: lesion thumbnails and the per-scan review page (DESIGN §6b).

Science side: draws from validated volumes (:class:`qsmrim.data.SubjectVolumes`) and lesion tables, imports
no Ray, Dask, MLflow or onnxruntime. The CV report (:mod:`qsmrim.evaluation.report`) and ``qsmrim predict``
(:mod:`serving.predict`) both draw lesions with :func:`render_thumbnails`.
"""

from qsmrim.review.page import (
    REVIEW_INDEX,
    index_page,
    page_path,
    read_lesion_table,
    review_order,
    review_page,
    write_index_page,
    write_review_page,
)
from qsmrim.review.thumbnails import ThumbnailConfig, panel_boxes, render_thumbnails

__all__ = [
    "REVIEW_INDEX",
    "ThumbnailConfig",
    "index_page",
    "page_path",
    "panel_boxes",
    "read_lesion_table",
    "render_thumbnails",
    "review_order",
    "review_page",
    "write_index_page",
    "write_review_page",
]
