"""Request/response models of the HTTP API: they document the routes in the OpenAPI page (``/docs``)."""

from pydantic import BaseModel, Field

__all__ = [
    "ErrorBody",
    "LesionPrediction",
    "LesionsPrediction",
    "ModelRef",
    "RowPrediction",
    "SubjectPrediction",
    "SubjectSummary",
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
    label: int | None = Field(None, description="expert label from the uploaded labels TSV, when given")


class SubjectSummary(BaseModel):
    lesions: int
    rim_count: int = Field(description="predicted rim+ lesions")
    expert_rim_count: int | None = None


class SubjectPrediction(BaseModel):
    model: ModelRef
    subject: SubjectSummary
    lesions: list[LesionPrediction]


class RowPrediction(BaseModel):
    prob: float
    votes: int
    spread: float | None
    rim: bool


class LesionsPrediction(BaseModel):
    model: ModelRef
    predictions: list[RowPrediction]
