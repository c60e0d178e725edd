"""Ray Serve application (DESIGN §6): FastAPI ingress -> CPU ``Preprocess`` -> batched onnxruntime ``RimEnsemble``.

Why three deployments: decoding NIfTI and computing radiomics is slow, CPU-bound Python, while the
ensemble is one onnxruntime call that gets cheaper per lesion the more lesions share it. Splitting them
lets each scale on its own (``platform/serve.yaml``) and lets ``@serve.batch`` gather lesions from many
requests into one session run, on the GPU when onnxruntime has CUDA.

Every client mistake is answered with 4xx JSON ``{"error": ..., "problems": [...]}`` before it can reach
onnxruntime: bodies over the cap get 413 before they are read (:mod:`serving.limits`), images are checked
by ``qsmrim.data`` (:mod:`serving.preprocess`), arrays by :mod:`serving.lesion_arrays` (no pickle).

``build_app(AppArgs)`` is the typed builder; ``serving.app:app_builder`` is the import path for
``serve deploy`` / ``serve run platform/serve.yaml``.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException

from qsmrim import __version__
from qsmrim.data.errors import InputError
from serving.config import AppArgs, BatchConfig, DeploymentArgs
from serving.lesion_arrays import check_lesion_arrays, parse_json_arrays, parse_npz_arrays
from serving.limits import BodySizeLimit, UploadLimits, set_upload_limits
from serving.model import RimModel
from serving.preprocess import (
    PreparedSubject,
    PrepareLimits,
    SubjectUpload,
    lesion_records,
    prepare_upload,
)
from serving.schemas import ErrorBody, LesionsPrediction, SubjectPrediction
from serving.screening import add_lesion_flags, resolve_thresholds, review_flags

__all__ = [
    "AppArgs",
    "BatchConfig",
    "DeploymentArgs",
    "Ingress",
    "Preprocess",
    "RimEnsemble",
    "app",
    "app_builder",
    "build_app",
]

log = logging.getLogger(__name__)

DECODE_SLOTS = 2
"""Lesion-array bodies decoded at once by one ingress replica (the memory budget in serving/README.md)."""

_NPZ_TYPES = ("application/x-npz", "application/octet-stream", "application/zip")


@dataclass(frozen=True)
class Rejected:
    """A client error found inside a deployment, returned (not raised) so its problems survive pickling."""

    status: int
    problems: list[str]


# -- deployments ------------------------------------------------------------------------------------------


@serve.deployment(name="RimEnsemble", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class RimEnsemble:
    """The ONNX ensemble; ``@serve.batch`` stacks lesions of concurrent requests into one session run."""

    def __init__(
        self,
        model: str,
        execution_provider: str = "auto",
        ort_threads: int = 0,
        tracking_uri: str | None = None,
        precision: str = "auto",
    ):
        self._model: RimModel | None = None
        self._batching = BatchConfig()
        self._stats = {"batches": 0, "requests": 0, "rows": 0, "largest_batch": 0}
        self._model = RimModel.load(
            model,
            providers=execution_provider,  # type: ignore[arg-type]
            threads=ort_threads,
            tracking_uri=tracking_uri,
            precision=precision,  # type: ignore[arg-type]
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching knobs (``user_config``) live; an invalid config raises, so Serve rejects it."""
        cfg = BatchConfig.model_validate(user_config or {})
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batching = cfg
        log.info("batching: %s", cfg.model_dump())

    def check_health(self) -> None:
        """Serve's health probe: unhealthy until the model is loaded."""
        if self._model is None:
            raise RuntimeError("model not loaded")

    def info(self) -> dict[str, Any]:
        """Model description plus the live batching knobs."""
        if self._model is None:
            raise RuntimeError("model not loaded")
        return {
            **self._model.info.as_dict(),
            "batching": self._batching.model_dump(),
            "batch_stats": dict(self._stats),
        }

    async def predict(self, patch: np.ndarray, radiomics: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for one request's validated rows (see :meth:`serving.model.RimModel.run`)."""
        return await self.predict_batch((patch, radiomics))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        assert self._model is not None  # check_health keeps traffic away until loaded
        sizes = [len(p) for p, _ in items]
        self._stats["batches"] += 1
        self._stats["requests"] += len(items)
        self._stats["rows"] += sum(sizes)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(items))
        patch = np.concatenate([p for p, _ in items])
        radiomics = np.concatenate([r for _, r in items])
        out = await asyncio.to_thread(self._model.run, patch, radiomics)
        bounds = np.cumsum([0, *sizes])
        return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@serve.deployment(name="Preprocess", max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Preprocess:
    """NIfTI trio -> lesion geometry, patches and raw radiomics (CPU), via :mod:`serving.preprocess`."""

    def __init__(self, limits: PrepareLimits | None = None):
        from qsmrim.radiomics import DEFAULT_SETTINGS, LesionExtractor

        self._limits = limits or PrepareLimits()
        LesionExtractor.for_settings(DEFAULT_SETTINGS)  # pay pyradiomics' import and setup before traffic

    async def prepare(
        self, upload: SubjectUpload, patch_size: tuple[int, int, int]
    ) -> PreparedSubject | Rejected:
        """Prepared inputs, or :class:`Rejected` (422) naming every problem of the upload."""
        try:
            return await asyncio.to_thread(prepare_upload, upload, tuple(patch_size), self._limits)
        except InputError as exc:
            return Rejected(422, [str(p) for p in exc.problems])


# -- HTTP ingress -----------------------------------------------------------------------------------------

app = FastAPI(
    title="qsmrim",
    version=__version__,
    description="Paramagnetic rim lesion detection on QSM (QSMRim-Net ensemble, ONNX). "
    "Bad input answers 4xx JSON {error, problems}.",
)
app.add_middleware(BodySizeLimit)


MAX_PROBLEMS = 100
"""Problems listed in one error answer (each once); the rest are counted, so a bad 1 MiB TSV gets a small answer."""

_MAX_PROBLEM_CHARS = 1000


def _error(status: int, error: str, problems: list[str] | None = None) -> JSONResponse:
    """4xx/5xx JSON ``{"error", "problems"}`` of bounded size: problems deduplicated, capped in count and length."""
    unique = [p[:_MAX_PROBLEM_CHARS] for p in dict.fromkeys(problems or [])]
    if len(unique) > MAX_PROBLEMS:
        more = len(unique) - MAX_PROBLEMS
        unique = unique[:MAX_PROBLEMS] + [f"... and {more} more problem(s)"]
    return JSONResponse({"error": error[: 4 * _MAX_PROBLEM_CHARS], "problems": unique}, status_code=status)


def _problems_error(status: int, problems: list[str]) -> JSONResponse:
    """:func:`_error` whose message joins the first three distinct problems and counts the rest."""
    unique = list(dict.fromkeys(problems))
    error = "; ".join(p[:_MAX_PROBLEM_CHARS] for p in unique[:3])
    if len(unique) > 3:
        error += f"; ... {len(unique)} problems in all"
    return _error(status, error, unique)


_BIDS_LABEL = r"^({}-)?[A-Za-z0-9]+$"
"""A BIDS label, with or without its ``sub-``/``ses-`` prefix (docs/data.md)."""
_MAX_LABEL = 64


def _refuse_non_finite(out: dict[str, np.ndarray], names: list[Any]) -> JSONResponse | None:
    """422 naming the rows whose probability is not finite (inputs far outside what the model saw), else None."""
    bad = [names[i] for i in np.flatnonzero(~np.isfinite(out["prob"]))]
    if not bad:
        return None
    problems = [
        f"{name}: the model's probability is not finite for these inputs (values far outside the training range)"
        for name in bad
    ]
    return _problems_error(422, problems)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
        for e in exc.errors()
    ]
    return _problems_error(422, problems)


@app.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    problems = [str(p) for p in exc.problems]
    return _problems_error(422, problems)


_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (400, 413, 415, 422, 500, 503)}

_LESIONS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["patch", "radiomics"],
                    "properties": {
                        "patch": {"description": "float [N,2,16,32,32] nested lists (QSM ppm, FLAIR/median)"},
                        "radiomics": {"description": "float [N,527] raw features; null = not computable"},
                    },
                }
            },
            "application/x-npz": {"schema": {"type": "string", "format": "binary",
                                             "description": "numpy.savez(patch=..., radiomics=...)"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary", "description": ".npz archive"}}}},
        },
    }
}  # fmt: skip


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    """HTTP routes of DESIGN §6; orchestrates ``Preprocess`` and ``RimEnsemble`` through handles."""

    def __init__(
        self,
        preprocess: DeploymentHandle,
        ensemble: DeploymentHandle,
        limits: dict[str, int],
        uploads: UploadLimits,
        review: dict[str, Any] | None = None,
    ):
        set_upload_limits(uploads)
        review = review or {}
        self._screening = (review.get("screening_threshold"), review.get("screening_source", "serve.yaml"))
        self._qc = str(review.get("qc", "warn"))
        self._preprocess = preprocess
        self._ensemble = ensemble
        self._max_json_bytes = int(limits["max_json_bytes"])
        self._max_rows = int(limits["max_lesions_per_request"])
        self._info: dict[str, Any] | None = None
        self._decoding = asyncio.Semaphore(DECODE_SLOTS)

    async def _decode(self, fn: Any, *args: Any) -> Any:
        """Run a JSON/npz decode or array check in a thread, at most DECODE_SLOTS at once (each costs ~10x
        its body in memory, and the GIL gains nothing from more)."""
        async with self._decoding:
            return await asyncio.to_thread(fn, *args)

    async def _model_info(self, refresh: bool = False) -> dict[str, Any]:
        if self._info is None or refresh:
            self._info = await self._call(self._ensemble.info.remote(), "RimEnsemble")
        return self._info

    def _thresholds(self, info: dict[str, Any]) -> dict[str, Any]:
        """The thresholds answers use: the model's, the screening one overridden by serve.yaml or the CLI."""
        return resolve_thresholds(info["thresholds"], *self._screening)

    @staticmethod
    def _model_ref(info: dict[str, Any]) -> dict[str, Any]:
        return {k: info.get(k) for k in ("name", "version", "alias", "uri")}

    @staticmethod
    async def _call(response: Any, what: str) -> Any:
        """Await a handle call; a failure inside a deployment is our fault (5xx JSON), never the client's."""
        try:
            return await response
        except Exception as exc:  # noqa: BLE001 - the replica keeps serving; the caller gets a JSON 5xx
            log.exception("%s failed", what)
            raise HTTPException(
                503 if what == "RimEnsemble" else 500, f"{what} failed: {type(exc).__name__}"
            ) from exc

    async def _run_ensemble(self, patch: np.ndarray, radiomics: np.ndarray) -> dict[str, np.ndarray]:
        return await self._call(self._ensemble.predict.remote(patch, radiomics), "RimEnsemble")

    @app.post("/v1/predict", response_model=SubjectPrediction, responses=_ERRORS)
    async def predict_subject(
        self,
        qsm: Annotated[UploadFile, File(description="QSM (Chimap, ppm) NIfTI, .nii or .nii.gz")],
        flair: Annotated[UploadFile, File(description="T2-FLAIR NIfTI on the QSM grid")],
        lesions: Annotated[UploadFile, File(description="lesion instances 0..K (dseg) or a binary mask")],
        labels: Annotated[UploadFile | None, File(description="optional TSV: index, rim (1, 0, n/a)")] = None,
        lesions_kind: Annotated[Literal["dseg", "mask"], Form()] = "dseg",
        participant: Annotated[str | None, Form(pattern=_BIDS_LABEL.format("sub"), max_length=_MAX_LABEL,
                                                description="BIDS subject label, echoed in the answer")] = None,
        session: Annotated[str | None, Form(pattern=_BIDS_LABEL.format("ses"), max_length=_MAX_LABEL,
                                            description="BIDS session label, echoed in the answer")] = None,
    ) -> Any:
        """Rim prediction for every lesion of one scan (``participant`` and ``session`` name it in the answer)."""
        upload = SubjectUpload(
            qsm=await qsm.read(),
            flair=await flair.read(),
            lesions=await lesions.read(),
            labels=await labels.read() if labels is not None else None,
            lesions_kind=lesions_kind,
            names={k: f.filename or "" for k, f in (("qsm", qsm), ("flair", flair), ("lesions", lesions),
                                                    ("labels", labels)) if f is not None},
        )  # fmt: skip
        info = await self._model_info()
        prepared = await self._call(
            self._preprocess.prepare.remote(upload, tuple(info["patch_shape"][1:])), "Preprocess"
        )
        if isinstance(prepared, Rejected):
            return _problems_error(prepared.status, prepared.problems)
        outputs = await self._run_ensemble(prepared.patch, prepared.radiomics)
        refused = _refuse_non_finite(outputs, [f"lesion {les['index']}" for les in prepared.lesions])
        if refused is not None:
            return refused
        records = lesion_records(prepared, outputs)
        thresholds = self._thresholds(info)
        add_lesion_flags(records, review_flags(outputs["prob"], outputs["rim"], thresholds), prepared.qc)
        summary: dict[str, Any] = {
            "lesions": len(records),
            "rim_count": sum(r["rim"] for r in records),
            "review_count": sum(r["review"] for r in records),
        }
        if prepared.has_labels:
            summary["expert_rim_count"] = sum(r.get("label") == 1 for r in records)
        for key, prefix, label in (("participant", "sub-", participant), ("session", "ses-", session)):
            if label:
                summary[key] = label.removeprefix(prefix)
        qc = prepared.qc.as_dict(self._qc) if prepared.qc is not None else {"policy": self._qc}  # type: ignore[arg-type]
        return {"model": self._model_ref(info), "thresholds": thresholds, "qc": qc, "subject": summary,
                "lesions": records}  # fmt: skip

    @app.post(
        "/v1/predict/lesions",
        response_model=LesionsPrediction,
        responses=_ERRORS,
        openapi_extra=_LESIONS_BODY,
    )
    async def predict_lesions(self, request: Request) -> Any:
        """Predictions for ready-made lesion arrays: JSON, a raw ``.npz`` body or a multipart ``file``."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        info = await self._model_info()
        shapes = {"patch": tuple(info["patch_shape"]), "radiomics": (int(info["n_features"]),)}
        if ctype == "application/json":
            body = await request.body()
            if len(body) > self._max_json_bytes:
                return _error(
                    413, f"JSON body of {len(body)} bytes exceeds {self._max_json_bytes}; send .npz"
                )
            patch, radiomics = await self._decode(parse_json_arrays, body)
        elif ctype in _NPZ_TYPES:
            body = await request.body()
            patch, radiomics = await self._decode(parse_npz_arrays, body, shapes, self._max_rows)
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if not isinstance(upload, StarletteUploadFile):
                return _error(422, "file: missing field (the .npz archive)", ["file: missing field"])
            data = await upload.read()
            patch, radiomics = await self._decode(parse_npz_arrays, data, shapes, self._max_rows)
        else:
            return _error(
                415, f"unsupported content type {ctype!r}; send application/json or application/x-npz"
            )
        patch, radiomics = await self._decode(
            check_lesion_arrays, patch, radiomics, shapes["patch"], shapes["radiomics"][0], self._max_rows
        )
        out = await self._run_ensemble(patch, radiomics)
        refused = _refuse_non_finite(out, [f"row {i}" for i in range(len(out["prob"]))])
        if refused is not None:
            return refused
        thresholds = self._thresholds(info)
        review = review_flags(out["prob"], out["rim"], thresholds)
        rows = [
            {
                "prob": float(p),
                "votes": int(v),
                "spread": float(s) if np.isfinite(s) else None,
                "rim": bool(r),
                "review": bool(w),
            }
            for p, v, s, r, w in zip(
                out["prob"], out["votes"], out["spread"], out["rim"], review, strict=True
            )
        ]
        return {"model": self._model_ref(info), "thresholds": thresholds, "predictions": rows}

    @app.get("/healthz", responses={503: {"model": ErrorBody}})
    async def healthz(self) -> Any:
        """200 when a model replica answers with its loaded model, else 503."""
        try:
            info = await asyncio.wait_for(self._model_info(refresh=True), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach a loaded model means unhealthy
            return _error(503, f"model not available: {type(exc).__name__}: {exc}")
        return {
            "status": "ok",
            "model": self._model_ref(info),
            "execution_provider": info["execution_provider"],
        }

    @app.get("/v1/model")
    async def model(self) -> Any:
        """Model name, version, alias, execution provider, feature names, batching, thresholds in use, QC policy."""
        info = await self._model_info(refresh=True)
        return {
            **info,
            "thresholds": self._thresholds(info),
            "qc_policy": self._qc,
            "qsmrim_version": __version__,
        }


# -- builder ----------------------------------------------------------------------------------------------


def build_app(args: AppArgs) -> Application:
    """Bind the three deployments with ``args``' knobs; ``serving.app:app_builder`` for ``serve deploy``."""
    if isinstance(args, dict):  # Ray passes a dict when the annotation is not honoured
        args = AppArgs.model_validate(args)
    ensemble = RimEnsemble.options(**args.ensemble.options(user_config=args.batching.model_dump())).bind(
        args.model, args.execution_provider, args.ort_threads, args.tracking_uri, args.precision
    )
    preprocess = Preprocess.options(**args.preprocess.options()).bind(
        PrepareLimits(max_voxels=args.max_voxels, max_lesions=args.max_lesions_per_request,
                      max_bytes=args.max_image_bytes, qc=args.qc, qc_setting=args.qc_setting)  # fmt: skip
    )
    limits = {
        "max_json_bytes": args.max_json_bytes,
        "max_lesions_per_request": args.max_lesions_per_request,
    }
    review = {
        "screening_threshold": args.screening_threshold,
        "screening_source": args.screening_source,
        "qc": args.qc,
    }
    return Ingress.options(**args.ingress.options()).bind(
        preprocess, ensemble, limits, args.upload_limits(), review
    )


app_builder = build_app
