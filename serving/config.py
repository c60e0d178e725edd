"""Typed configuration of the Serve application: ``AppArgs`` (the ``args:`` of ``platform/serve.yaml``).

Pure pydantic, no Ray import, so ``qsmrim serve`` can validate a config before starting anything and
``serve deploy`` validates the same model through ``serving.app:app_builder``'s annotation.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.limits import DEFAULT_MAX_UPLOAD_BYTES, UploadLimits
from serving.preprocess import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_VOXELS

__all__ = ["AppArgs", "BatchConfig", "DeploymentArgs"]

_LIMITS = UploadLimits()


class BatchConfig(BaseModel):
    """``RimEnsemble`` user_config: dynamic batching knobs, changeable without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        16, ge=1, le=1024, description="requests per onnxruntime call; a power of two"
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        gt=0,
        le=1.0,
        description="how long a batch waits to fill; 0 would disable batching (ray#55126)",
    )

    @field_validator("max_batch_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"max_batch_size must be a power of two (1, 2, 4, ...), not {v}")
        return v


class DeploymentArgs(BaseModel):
    """Replica and resource knobs of one deployment (the YAML ``deployments:`` section may override them)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = Field(None, description="fixed replica count; default 1")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config")
    max_ongoing_requests: int | None = Field(None, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploymentArgs":
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    def options(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            **extra,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        if self.max_ongoing_requests is not None:
            opts["max_ongoing_requests"] = self.max_ongoing_requests
        return opts


class AppArgs(BaseModel):
    """Everything ``build_app`` needs; the ``args:`` of ``platform/serve.yaml``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("models:/qsmrim@champion", description="local .onnx path or models:/<name>@<alias>")
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, gt=0, description="request body cap; 413 above")
    max_uploads_in_flight: int = Field(
        _LIMITS.max_uploads_in_flight, ge=1, description="requests with a body an ingress replica serves at once; 503 beyond"
    )
    max_uploads_per_client: int = Field(
        _LIMITS.max_uploads_per_client, ge=1, description="of those, from one client address; 503 beyond"
    )
    max_bytes_in_flight: int = Field(
        _LIMITS.max_bytes_in_flight, gt=0, description="declared body bytes an ingress replica holds at once; 503 beyond"
    )
    upload_grace_s: float = Field(
        _LIMITS.upload_grace_s, gt=0, description="seconds a body may take beyond size/min_upload_rate; 408 beyond"
    )
    min_upload_rate: float = Field(_LIMITS.min_upload_rate, gt=0, description="bytes/s a body must average")
    request_timeout_s: float = Field(
        _LIMITS.request_timeout_s, gt=0, description="server-side deadline of a request (504); client headers cannot raise it"
    )
    max_json_bytes: int = Field(
        8 * 2**20, gt=0, description="cap for JSON lesion arrays: decoding costs ~10x and holds the GIL; send .npz"
    )
    max_lesions_per_request: int = Field(1024, ge=1)
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, gt=0, description="largest image accepted, in voxels")
    max_image_bytes: int = Field(
        DEFAULT_MAX_IMAGE_BYTES, gt=0, description="largest stored image data accepted (voxels x dtype size)"
    )
    tracking_uri: str | None = Field(
        None, description="MLflow store for models:/ URIs; default MLFLOW_TRACKING_URI"
    )
    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto",
        description="which graph to serve: auto = the model as given; fp32/fp16/int8 = <stem>.<precision>.onnx "
        "beside a local graph (qsmrim export --precision), or a registered version of that precision. int8 for "
        "CPU-only nodes, fp16 for GPUs",
    )
    ort_threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads (local .onnx; the registry loader picks its own); 0 = default",
    )
    screening_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="override the model's screening threshold (review = prob >= it); null keeps the model's",
    )
    qc: Literal["warn", "strict"] = Field(
        "warn",
        description="QSM input QC: warn answers with qc_* flags; strict refuses a flagged subject (422)",
    )
    set_on_cli: tuple[str, ...] = Field(
        (),
        description="args that qsmrim serve took from its flags, so answers name the source; empty in YAML",
    )
    batching: BatchConfig = Field(default_factory=BatchConfig)
    # The defaults reserve 1.1 CPUs in all so the app starts on a 2-core laptop (Ray never places what does
    # not fit); onnxruntime and radiomics still use every core. Production sizes live in platform/serve.yaml.
    ingress: DeploymentArgs = Field(
        default_factory=lambda: DeploymentArgs(num_cpus=0.1, max_ongoing_requests=64)
    )
    preprocess: DeploymentArgs = Field(
        default_factory=lambda: DeploymentArgs(num_cpus=0.5, max_ongoing_requests=4)
    )
    ensemble: DeploymentArgs = Field(
        default_factory=lambda: DeploymentArgs(num_cpus=0.5, max_ongoing_requests=64)
    )

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> "AppArgs":
        self.upload_limits()  # raises ValueError naming the field
        return self

    @property
    def screening_source(self) -> str:
        """Where an overriding screening threshold came from: ``cli`` or ``serve.yaml``."""
        return "cli" if "screening_threshold" in self.set_on_cli else "serve.yaml"

    @property
    def qc_setting(self) -> str:
        """How strict QC was chosen, for refusal messages: the flag or the config key."""
        return "--qc strict" if "qc" in self.set_on_cli else "qc: strict (serve config)"

    def upload_limits(self) -> UploadLimits:
        """The ingress's :class:`serving.limits.UploadLimits` from these args."""
        return UploadLimits(**{f: getattr(self, f) for f in UploadLimits.__dataclass_fields__})
