"""Request/response models of the HTTP API: they document the routes in the OpenAPI page (``/docs``)."""

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "ErrorBody",
    "LesionPrediction",
    "LesionsPrediction",
    "ModelRef",
    "RimThreshold",
    "RowPrediction",
    "ScreeningThreshold",
    "SubjectPrediction",
    "SubjectSummary",
    "ThresholdsUsed",
]


class ErrorBody(BaseModel):
    error: str
    problems: list[str] = []


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str


class LesionPrediction(BaseModel):
    index: int = Field(description="lesion instance index in the uploaded lesion map")
    centroid_mm_x: float
    centroid_mm_y: float
    centroid_mm_z: float
    volume_mm3: float
    prob: float = Field(description="ensemble mean probability of a paramagnetic rim")
    votes: int = Field(description="members at or above their own threshold")
    spread: float | None = Field(description="member standard deviation: the lesion's uncertainty")
    rim: bool = Field(description="majority vote: rim+")
    review: bool = Field(description="prob at or above the screening threshold (the rim call without one)")
    qc_cropped: bool = Field(description="the lesion extends beyond its patch: the model saw it cropped")
    qc_confluent: bool = Field(description="the lesion touches another lesion")
    label: int | None = Field(None, description="expert label from the uploaded labels TSV, when given")


class SubjectSummary(BaseModel):
    lesions: int
    rim_count: int = Field(description="predicted rim+ lesions")
    review_count: int = Field(description="lesions flagged review")
    expert_rim_count: int | None = None
    participant: str | None = Field(None, description="the request's BIDS subject label, when given")
    session: str | None = Field(None, description="the request's BIDS session label, when given")


class RimThreshold(BaseModel):
    rule: str
    members: int | None
    min_votes: int | None
    member_thresholds: list[float] | None = Field(description="each member's own threshold, in member order")
    protocol: str | None
    source: str = Field(description="always 'model': the vote and its thresholds are inside the graph")


class ScreeningThreshold(BaseModel):
    value: float | None = Field(description="review = prob >= value; null: the model has none, review = rim")
    rule: str
    source: str = Field(description="model, serve.yaml, cli, or rim-call (no threshold anywhere)")
    model_value: float | None = Field(
        description="the model's own screening threshold (CV high-sensitivity point)"
    )


class ThresholdsUsed(BaseModel):
    rim: RimThreshold
    screening: ScreeningThreshold


class SubjectPrediction(BaseModel):
    model: ModelRef
    thresholds: ThresholdsUsed
    qc: dict[str, Any] = Field(
        description="QSM input QC: policy, passed, flags and one qc_* entry per check (value, limit, flag, message)"
    )
    subject: SubjectSummary
    lesions: list[LesionPrediction]


class RowPrediction(BaseModel):
    prob: float
    votes: int
    spread: float | None
    rim: bool
    review: bool


class LesionsPrediction(BaseModel):
    model: ModelRef
    thresholds: ThresholdsUsed
    predictions: list[RowPrediction]
