"""Load the exported rim ensemble (one ONNX graph + ``model.json`` sidecar) and run it with onnxruntime.

Shared by the Serve ``RimEnsemble`` deployment and offline ``qsmrim predict`` so both answer alike. The
graph contract (DESIGN §5): inputs ``patch float32 [N,2,16,32,32]`` and raw ``radiomics float32 [N,527]``
(standardisation and NaN filling live in the graph); outputs ``prob float32 [N]``, ``votes int64 [N]``,
``rim bool [N]`` and ``spread float32 [N]`` (member std; optional, NaN when a graph lacks it).

The execution provider is chosen and *reported* here rather than trusted to a wrapper, because
onnxruntime (and MLflow's ONNX flavour, mlflow#13388) silently falls back to CPU when CUDA is unusable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qsmrim.onnx_runtime import (
    CPU,
    CUDA,
    PRECISIONS,
    choose_providers,
    open_session,
    precision_of,
    precision_path_for,
)
from qsmrim.radiomics.feature_names import FEATURE_NAMES, N_FEATURES
from serving.screening import model_thresholds

__all__ = [
    "INPUT_NAMES",
    "REQUIRED_OUTPUTS",
    "ModelError",
    "ModelInfo",
    "RimModel",
    "Providers",
    "select_providers",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("patch", "radiomics")
REQUIRED_OUTPUTS = ("prob", "votes", "rim")
OPTIONAL_OUTPUTS = ("spread",)
Providers = Literal["auto", "cpu", "cuda"]
#: ``auto`` serves the graph it is given; a precision picks ``<stem>.<precision>.onnx`` beside a local fp32 graph.
Precision = Literal["auto", "fp32", "fp16", "int8"]
_CUDA, _CPU = CUDA, CPU
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))?/?$")


class ModelError(ValueError):
    """The model file or URI cannot be served (missing, wrong graph interface, feature order differs)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a client or a derivatives dataset needs to know about the loaded model."""

    name: str
    version: str | None
    alias: str | None
    uri: str
    provider: str
    patch_shape: tuple[int, int, int, int]
    n_features: int
    feature_names: tuple[str, ...]
    members: int | None
    has_spread: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def thresholds(self) -> dict[str, Any]:
        """The rim vote's and the screening threshold the model carries (:func:`serving.screening.model_thresholds`)."""
        return model_thresholds(self.metadata, self.members)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Patch size (z, y, x) the graph expects, as :class:`qsmrim.data.PatchSpec` takes it."""
        return self.patch_shape[1:]  # type: ignore[return-value]

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``, as the sidecar (or the graph's metadata) declares it."""
        declared = self.metadata.get("precision")
        return precision_of({"precision": declared}) if declared is not None else "fp32"

    @property
    def parity(self) -> dict[str, Any] | None:
        """A fp16/int8 graph's parity against fp32 on the out-of-fold lesions; for fp32 the export's check
        against the torch members."""
        entry = self.metadata.get("precision")
        if isinstance(entry, dict) and isinstance(entry.get("parity"), dict):
            return {"against": "fp32", **entry["parity"]}
        parity = self.metadata.get("parity")
        return {"against": "torch members", **parity} if isinstance(parity, dict) else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (``GET /v1/model``)."""
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "uri": self.uri,
            "execution_provider": self.provider,
            "precision": self.precision,
            "parity": self.parity,
            "members": self.members,
            "patch_shape": list(self.patch_shape),
            "n_features": self.n_features,
            "feature_names": list(self.feature_names),
            "outputs": ["prob", "votes", "rim"] + (["spread"] if self.has_spread else []),
            "architecture": self.metadata.get("model")
            if isinstance(self.metadata.get("model"), str)
            else None,
            "git_commit": self.metadata.get("git_commit"),
            "thresholds": self.thresholds,
        }


def select_providers(providers: Providers = "auto") -> list[str]:
    """Execution providers to ask onnxruntime for: CUDA first when built in (``auto``), else CPU."""
    if providers not in ("auto", "cpu", "cuda"):
        raise ValueError(f"providers must be 'auto', 'cpu' or 'cuda', not {providers!r}")
    if providers == "auto":
        return choose_providers()
    if providers == "cpu":
        return [_CPU]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if _CUDA not in available:
        raise ModelError(f"providers='cuda' but this onnxruntime has no CUDA provider (has {available})")
    return [_CUDA, _CPU]


class RimModel:
    """An onnxruntime session of the ensemble plus its :class:`ModelInfo`; thread-safe to :meth:`run`."""

    def __init__(self, session: Any, info: ModelInfo):
        self.session = session
        self.info = info
        self._outputs = [
            o for o in (*REQUIRED_OUTPUTS, *OPTIONAL_OUTPUTS) if o != "spread" or info.has_spread
        ]

    @classmethod
    def load(
        cls,
        uri: str | Path,
        *,
        providers: Providers = "auto",
        threads: int = 0,
        tracking_uri: str | None = None,
        precision: Precision = "auto",
    ) -> RimModel:
        """Load a local ``.onnx`` file (sidecar ``<stem>.json`` or ``model.json`` beside it) or a ``models:/`` URI.

        ``threads`` > 0 caps onnxruntime's intra-op threads (useful when replicas share a machine).
        ``tracking_uri`` names the MLflow store for ``models:/`` URIs (default: MLflow's, i.e.
        ``MLFLOW_TRACKING_URI``); passing it explicitly does not depend on the process environment.
        ``precision`` other than ``auto`` picks ``<stem>.<precision>.onnx`` beside a local graph (as
        ``qsmrim export --precision`` writes it) and requires a registered version to be of that precision.
        Raises :class:`ModelError` naming the URI when the model cannot be served.
        """
        uri = str(uri)
        if precision != "auto" and precision not in PRECISIONS:
            raise ModelError(f"precision must be 'auto' or one of {list(PRECISIONS)}, not {precision!r}")
        wanted = select_providers(providers)
        if uri.startswith("models:/"):
            session, meta = _load_registry(uri, wanted, threads, tracking_uri)
        else:
            path = Path(uri.removeprefix("file://")).expanduser().resolve()
            if precision != "auto":
                path = _graph_of_precision(path, precision)
            uri = str(path)  # absolute, so provenance and "same model?" checks do not depend on the cwd
            session, meta = _load_local(path, wanted, threads)
        info = _describe(session, meta, uri)
        if precision != "auto" and info.precision != precision:
            raise ModelError(f"{uri}: the model is {info.precision}, not the {precision} asked for; register or "
                             f"point at a {precision} export (`qsmrim export RUN --out model.onnx --precision {precision}`)")  # fmt: skip
        if providers == "cuda" and info.provider != _CUDA:
            raise ModelError(f"{uri}: CUDA was required but onnxruntime runs on {info.provider}")
        if _CUDA in wanted and info.provider != _CUDA:
            log.warning("%s: CUDA was asked for but is unusable here; running on %s", uri, info.provider)
        log.info("loaded %s (%s version %s) on %s", uri, info.name, info.version, info.provider)
        return cls(session, info)

    def run(self, patch: np.ndarray, radiomics: np.ndarray, *, chunk: int = 256) -> dict[str, np.ndarray]:
        """Outputs for already validated inputs, in chunks of ``chunk`` rows to bound memory.

        Returns ``prob`` (float32), ``votes`` (int64), ``rim`` (bool) and ``spread`` (float32; NaN when the
        graph has no ``spread`` output), each of length N.
        """
        n = len(patch)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._outputs}
        for start in range(0, n, chunk):
            feeds = {
                "patch": np.ascontiguousarray(patch[start : start + chunk], dtype=np.float32),
                "radiomics": np.ascontiguousarray(radiomics[start : start + chunk], dtype=np.float32),
            }
            for name, value in zip(self._outputs, self.session.run(self._outputs, feeds), strict=True):
                parts[name].append(np.asarray(value).reshape(-1))
        out = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in parts.items()}
        result = {
            "prob": out["prob"].astype(np.float32, copy=False),
            "votes": out["votes"].astype(np.int64, copy=False),
            "rim": out["rim"].astype(bool, copy=False),
            "spread": out["spread"].astype(np.float32, copy=False)
            if "spread" in out
            else np.full(n, np.nan, np.float32),
        }
        for key, value in result.items():
            if len(value) != n:
                raise ModelError(f"{self.info.uri}: output {key!r} has {len(value)} rows for {n} inputs")
        return result


# -- loading -----------------------------------------------------------------------------------------------


def _session(path: Path, providers: list[str], threads: int) -> Any:
    try:
        return open_session(path, providers, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad graphs
        raise ModelError(f"{path}: onnxruntime cannot load the model ({type(exc).__name__}: {exc})") from exc


def _graph_of_precision(path: Path, precision: str) -> Path:
    """``path`` when it is of ``precision``, else its sibling ``<fp32 stem>.<precision>.onnx``."""
    side: dict[str, Any] = {}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text())
            side = loaded if isinstance(loaded, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{sidecar}: unreadable model sidecar ({exc})") from exc
    current = precision_of(side)
    if current == precision:
        return path
    entry = side.get("precision")
    base = path.with_name(entry["reference_graph"]) if current != "fp32" and isinstance(entry, dict) \
        and isinstance(entry.get("reference_graph"), str) else path  # fmt: skip
    candidate = precision_path_for(base, precision)
    if not candidate.is_file():
        raise ModelError(f"{path} is {current} and no {precision} graph lies beside it ({candidate.name}); export "
                         f"one with `qsmrim export RUN --out {base.name} --precision {precision}`")  # fmt: skip
    return candidate


def _load_local(path: Path, providers: list[str], threads: int) -> tuple[Any, dict[str, Any]]:
    if not path.is_file():
        raise ModelError(f"{path}: no such model file (expected a .onnx file or a models:/ URI)")
    session = _session(path, providers, threads)
    meta = _embedded_metadata(session)
    for sidecar in (path.with_suffix(".json"), path.parent / "model.json"):
        if sidecar.is_file():
            try:
                loaded = json.loads(sidecar.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{sidecar}: unreadable model sidecar ({exc})") from exc
            if not isinstance(loaded, dict):
                raise ModelError(f"{sidecar}: the model sidecar must be a JSON object")
            meta.update(loaded)
            break
    meta.setdefault("name", path.stem)
    return session, meta


def _load_registry(
    uri: str, providers: list[str], threads: int, tracking_uri: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load through ``qsmrim.tracking`` (MLflow) only for ``models:/`` URIs, so offline use needs no MLflow."""
    import inspect

    m = _MODELS_URI.match(uri)
    if not m:
        raise ModelError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    try:
        from qsmrim.tracking.registry import load_champion_session
    except ImportError as exc:
        raise ModelError(
            f"{uri}: the MLflow registry loader (qsmrim.tracking.registry) is unavailable: {exc}"
        ) from exc
    params = inspect.signature(load_champion_session).parameters
    kwargs: dict[str, Any] = {}
    if "providers" in params:
        kwargs["providers"] = providers
    if "threads" in params:
        kwargs["threads"] = threads
    if tracking_uri is not None:
        kwargs["tracking_uri"] = tracking_uri
    try:
        result = load_champion_session(uri, **kwargs)
    except Exception as exc:  # noqa: BLE001 - MLflow and the registry raise many kinds; say which URI failed
        raise ModelError(
            f"{uri}: cannot load from the MLflow registry ({type(exc).__name__}: {exc})"
        ) from exc
    session, meta = _coerce_registry_result(result)
    meta = {**_embedded_metadata(session), **meta}
    meta.setdefault("name", m.group("name"))
    if m.group("version"):
        meta.setdefault("version", m.group("version"))
    if m.group("alias"):
        meta.setdefault("alias", m.group("alias"))
    return session, meta


def _coerce_registry_result(result: Any) -> tuple[Any, dict[str, Any]]:
    """Session and flat metadata from the registry loader's answer.

    ``qsmrim.tracking.registry.load_champion_session`` returns ``(session, provider, meta)`` with ``meta``
    holding ``name``, ``version``, ``alias``, version ``tags`` (JSON strings) and the ``sidecar`` dict;
    these are flattened so the sidecar's keys (feature names, members, patch spec) are checked like a
    local model's. A bare session, ``(session, meta)`` or an object with ``.session`` are accepted too.
    """
    if isinstance(result, tuple) and len(result) == 3:
        session, _provider, raw = result
        raw = _as_dict(raw)
        meta = {}
        for key, value in (raw.get("tags") or {}).items():
            try:
                meta[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError):
                meta[key] = value
        meta.update(_as_dict(raw.get("sidecar") or {}))
        meta.update({k: raw[k] for k in ("name", "version", "alias") if raw.get(k) is not None})
    elif isinstance(result, tuple) and len(result) == 2:
        session, meta = result
    elif hasattr(result, "run") and hasattr(result, "get_inputs"):
        session, meta = result, {}
    elif hasattr(result, "session"):
        session = result.session
        meta = getattr(result, "metadata", None) or getattr(result, "info", None) or {}
        for key in ("name", "version", "alias"):
            if getattr(result, key, None) is not None and key not in (meta if isinstance(meta, dict) else {}):
                meta = {**_as_dict(meta), key: str(getattr(result, key))}
    else:
        raise ModelError(f"the registry loader returned {type(result).__name__}, not an onnxruntime session")
    return session, _as_dict(meta)


def _as_dict(meta: Any) -> dict[str, Any]:
    if isinstance(meta, Mapping):
        return dict(meta)
    if hasattr(meta, "model_dump"):
        return dict(meta.model_dump())
    if hasattr(meta, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(meta)
    return dict(vars(meta)) if hasattr(meta, "__dict__") else {}


def _embedded_metadata(session: Any) -> dict[str, Any]:
    """ONNX ``metadata_props`` (values parsed as JSON when they are JSON) as a fallback for a missing sidecar."""
    try:
        raw = session.get_modelmeta().custom_metadata_map
    except Exception:  # noqa: BLE001 - a session without model metadata is fine
        return {}
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        # the exporter prefixes its keys with "qsmrim."; its "qsmrim.version" is the package's, not the model's
        key = "qsmrim_version" if key == "qsmrim.version" else key.removeprefix("qsmrim.")
        try:
            meta[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            meta[key] = value
    return meta


def _first(meta: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if meta.get(key) is not None:
            return meta[key]
    return None


def _describe(session: Any, meta: dict[str, Any], uri: str) -> ModelInfo:
    """Check the graph's interface against DESIGN §5 and the sidecar; build the :class:`ModelInfo`."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in INPUT_NAMES if n not in inputs] + [n for n in REQUIRED_OUTPUTS if n not in outputs]
    if missing:
        raise ModelError(
            f"{uri}: graph lacks {missing}; expected inputs {list(INPUT_NAMES)} and outputs "
            f"{[*REQUIRED_OUTPUTS, *OPTIONAL_OUTPUTS]}, found inputs {sorted(inputs)} outputs {sorted(outputs)}"
        )
    for name in INPUT_NAMES:
        if inputs[name].type != "tensor(float)":
            raise ModelError(f"{uri}: input {name!r} is {inputs[name].type}, expected tensor(float)")
    p_shape, r_shape = list(inputs["patch"].shape), list(inputs["radiomics"].shape)
    if len(p_shape) != 5 or not all(isinstance(d, int) for d in p_shape[1:]) or p_shape[1] != 2:
        raise ModelError(
            f"{uri}: input 'patch' has shape {p_shape}, expected [N, 2, Z, Y, X] with fixed Z, Y, X"
        )
    if len(r_shape) != 2 or r_shape[1] != N_FEATURES:
        raise ModelError(f"{uri}: input 'radiomics' has shape {r_shape}, expected [N, {N_FEATURES}]")
    patch_shape = tuple(int(d) for d in p_shape[1:])

    names = _first(meta, "feature_names", "features")
    digest = meta.get("feature_names_sha256")
    digest = digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None
    if (names is not None and tuple(names) != FEATURE_NAMES) or (
        digest is not None and digest != hashlib.sha256("\n".join(FEATURE_NAMES).encode()).hexdigest()
    ):
        raise ModelError(f"{uri}: the model's feature_names differ from qsmrim.radiomics.FEATURE_NAMES")
    spec = _first(meta, "patch_spec", "patch")
    size = spec.get("size") if isinstance(spec, Mapping) else spec
    if isinstance(size, list | tuple) and tuple(int(s) for s in size[-3:]) != patch_shape[1:]:
        raise ModelError(
            f"{uri}: sidecar patch size {list(size)} differs from the graph's {list(patch_shape[1:])}"
        )
    members = _first(meta, "members", "n_members")
    n_members = (
        len(members) if isinstance(members, list | tuple) else (int(members) if members is not None else None)
    )
    version = _first(meta, "version", "model_version")
    return ModelInfo(
        name=str(_first(meta, "name", "model_name", "registered_model") or "qsmrim"),
        version=str(version) if version is not None else None,
        alias=_first(meta, "alias"),
        uri=uri,
        provider=session.get_providers()[0],
        patch_shape=patch_shape,  # type: ignore[arg-type]
        n_features=N_FEATURES,
        feature_names=FEATURE_NAMES,
        members=n_members,
        has_spread="spread" in outputs,
        metadata=json.loads(json.dumps(meta, default=str)),
    )
