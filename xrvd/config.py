"""Configuration: one YAML file, validated by pydantic. Every default is defined here, once.

Errors name the key path and the fix, e.g. `model.threshold: must be between 0 and 1, got 1.7`.
Relative paths in a file are taken relative to that file's folder, so a config behaves the same
whatever directory the service is started from.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    model_validator,
)

from .config_base import AETitle, Network, Section, TlsConfig, is_loopback  # noqa: F401
from .errors import ConfigError
from .sources import DicomwebDestination, Source, kind_of


def default_state_dir() -> Path:
    """systemd's StateDirectory= when run as a service, /var/lib/xrvd for root, otherwise the
    XDG state folder, so an unprivileged user can try xrvd without creating system folders."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/xrvd")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(xdg) / "xrvd"

# The models pipeline/registry.py describes, by name: config is a leaf and must not import the
# registry (and torch's neighbours with it) to validate a name; the registry checks at import
# that it describes exactly these.
MODEL_NAMES = (
    "densenet121-res224-all", "densenet121-res224-nih", "densenet121-res224-pc",
    "densenet121-res224-chex", "densenet121-res224-mimic_nb", "densenet121-res224-mimic_ch",
    "densenet121-res224-rsna", "resnet50-res512-all", "jfhealthcare-densenet121-res512",
)
DEFAULT_MODEL = "densenet121-res224-all"
# Every finding a supported model can report: the 18 outputs of TorchXRayVision's classifiers,
# in their output order (pipeline/registry.py builds each model's labels from it).
FINDING_NAMES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
    "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)


def _unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return value


def _known_model(name: str) -> str:
    if name not in MODEL_NAMES:
        close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}choose one of: "
                         f"{', '.join(MODEL_NAMES)}")
    return name


def _finding_thresholds(values: dict[str, float]) -> dict[str, float]:
    """Findings as the models spell them (`cardiomegaly` is taken for `Cardiomegaly`); a name
    no model reports is refused with the nearest one, so a typo cannot leave a finding at the
    default threshold without a word."""
    by_name = {name.lower(): name for name in FINDING_NAMES}
    out = {}
    for key, value in values.items():
        name = by_name.get(str(key).strip().lower())
        if name is None:
            close = difflib.get_close_matches(str(key), FINDING_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{key!r} is not a finding; {hint}the findings are: "
                             f"{', '.join(FINDING_NAMES)}")
        out[name] = value
    return out


def _process_count(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and 0 <= value <= 64):
        return value
    raise ValueError(f"must be auto or a whole number from 0 to 64, got {value!r}")


class ModelConfig(Section):
    name: Annotated[str, AfterValidator(_known_model)] = DEFAULT_MODEL
    # Default: <state_dir>/models, filled in when the whole config is validated.
    weights_dir: Path | None = None
    # 0.5 is the operating point TorchXRayVision's calibration maps every label to.
    threshold: Annotated[float, AfterValidator(_unit_interval)] = 0.5
    # Per finding, by the model's name for it (`xrvd models list`): e.g. {Cardiomegaly: 0.62},
    # as `xrvd evaluate --write-thresholds` proposes them. The rest use `threshold`.
    # Findings this model does not report are left out at load, with a warning (model.*
    # events): the same file may serve another model.
    thresholds: Annotated[dict[str, Annotated[float, AfterValidator(_unit_interval)]],
                          AfterValidator(_finding_thresholds)] = {}
    # Hospital networks are often offline or filtered: fetch only when explicitly allowed.
    allow_download: bool = False
    # Base URL of a local mirror of TorchXRayVision's release files (default: upstream).
    download_url: str | None = None
    # Images scored together. On 2 cores, 4 is as fast as 8 with ONNX Runtime and faster with
    # torch, and holds 80 (ONNX Runtime) to 250 MB (torch) less (benchmarks/inference.py).
    batch_size: int = Field(default=4, ge=1, le=256)
    # auto: ONNX Runtime when installed (on cuda only with its CUDA provider), else torch.
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    # Intra-op inference threads; 0: one per CPU this process may use (CPU affinity and the
    # cgroup's CPU quota count).
    threads: int = Field(default=0, ge=0, le=256)


class ConvertConfig(Section):
    # The defaults reproduce TorchXRayVision's own preprocessing; the rest are explicit opt-ins.
    voi_lut: bool = False
    modality_lut: bool = False
    fit: Literal["crop", "pad"] = "crop"


class PeerRule(Section):
    """A calling AE title that may send only from this address or network: a PACS that moves
    to another host does not keep its rights, and its title alone cannot be spoofed from
    elsewhere."""

    ae_title: AETitle
    address: Network


class InboundTlsConfig(Section):
    """DICOM over TLS (1.2 or newer) on xrvd's listener: xrvd's certificate and key, and the
    CA that client certificates must be signed by."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    # Default: required when ca_file is set.
    require_client_cert: bool | None = None

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> InboundTlsConfig:
        if self.require_client_cert is None:
            self.require_client_cert = self.ca_file is not None
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert is true but ca_file is not set: name the CA "
                             "that signs the senders' certificates")
        return self


class ScpConfig(Section):
    enabled: bool = True
    ae_title: AETitle = "XRVD"
    # Loopback by default: listening on the hospital network is a deliberate choice.
    bind: str = "127.0.0.1"
    # 0 picks a free port (the `scp.listening` event says which); for tests.
    port: int = Field(default=11112, ge=0, le=65535)
    # DICOM over TLS: on `port` itself, or, with tls_port, on a second port beside a plain one.
    tls: InboundTlsConfig | None = None
    tls_port: int | None = Field(default=None, ge=0, le=65535)
    # Calling AE titles allowed to send; ["*"] accepts any. Empty: nobody can send yet.
    allowed_calling_aets: list[AETitle | Literal["*"]] = Field(default_factory=list)
    # Peer addresses or networks (CIDR) allowed to connect; empty allows any.
    allowed_peers: list[Network] = Field(default_factory=list)
    # Calling AE titles bound to an address or network: such a title is accepted only from
    # there (and is allowed without being listed in allowed_calling_aets).
    peers: list[PeerRule] = Field(default_factory=list)
    # A listener that is not on loopback needs allowed_peers or tls, or this set to true.
    allow_any_peer: bool = False
    max_associations: int = Field(default=10, ge=1, le=1000)
    # Connections not yet associated (their A-ASSOCIATE-RQ not all in). When full, a new
    # connection closes the one that has waited longest: silent peers cannot lock out others.
    max_pending: int = Field(default=20, ge=1, le=1000)
    # The largest PDU xrvd accepts (and announces); a longer one ends the association.
    max_pdu: int = Field(default=131072, ge=4096, le=2**26)
    # Larger instances are refused with A700 as soon as they pass the limit while arriving.
    max_instance_bytes: int = Field(default=512 * 2**20, ge=1024)
    acse_timeout: float = Field(default=30, gt=0)
    dimse_timeout: float = Field(default=60, gt=0)
    # A connection must send its association request (and TLS handshake), and each PDU must
    # arrive whole, within this many seconds; an association idle this long is closed.
    network_timeout: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _policy_beyond_loopback(self) -> ScpConfig:
        if self.tls_port is not None and self.tls is None:
            raise ValueError("tls_port is set but tls is not: give the certificate and key")
        if (self.enabled and not is_loopback(self.bind) and not self.allowed_peers
                and self.tls is None and not self.allow_any_peer):
            raise ValueError(
                f"bind {self.bind} is reachable from the network, but neither allowed_peers "
                "nor tls is set: anyone who learns an allowed AE title could send. Set "
                "scp.allowed_peers (your modalities' and PACS's addresses) or scp.tls, or "
                "scp.allow_any_peer: true if a firewall already does this")
        return self


class Destination(Section):
    """A DICOM peer that receives the results (the PACS). Delivery itself comes with the
    report issue; `xrvd echo NAME` already tests the connection."""

    name: str = Field(min_length=1, max_length=64)
    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_aet: AETitle = "XRVD"
    sr_flavour: Literal["comprehensive3d", "enhanced"] = "comprehensive3d"
    tls: TlsConfig | None = None




def _keep_spool(value: Any) -> str:
    text = str(value).strip().lower()
    words = text.split()
    if text in ("none", "failed") or (len(words) == 2 and words[0] == "days"
                                      and words[1].replace(".", "", 1).isdigit()):
        return text
    raise ValueError(f"must be none, failed or 'days N', got {value!r}")


class StorageConfig(Section):
    # Free space kept on the state directory's file system: below it C-STORE answers A700
    # and the drop folder pauses until space returns. Default: 1 GB, or 2 % of a disk
    # smaller than 50 GB.
    min_free_mb: int | None = Field(default=None, ge=0)
    # Spool files of finished studies: none (delete once every report is delivered), failed
    # (keep those of failed studies only), or "days N" (keep every file N days after its
    # study finished).
    keep_spool: Annotated[str, PlainValidator(_keep_spool)] = "failed"

    @property
    def keep_days(self) -> float | None:
        words = self.keep_spool.split()
        return float(words[1]) if words[0] == "days" else None


class WatchConfig(Section):
    enabled: bool = False
    folder: Path | None = None
    # Default: a "rejected" folder beside the drop folder.
    rejected_folder: Path | None = None
    # A file is taken once it is closed after writing, or unchanged for this long.
    stable_seconds: float = Field(default=5.0, gt=0)
    # How often the folder is also walked, in case a file-system event was missed.
    poll_seconds: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _folder_when_enabled(self) -> WatchConfig:
        if self.enabled and self.folder is None:
            raise ValueError("watch.enabled is true but watch.folder is not set")
        if self.folder is not None and self.rejected_folder is None:
            self.rejected_folder = self.folder.parent / "rejected"
        return self


class DeliveryConfig(Section):
    # A failed send is retried after retry_seconds, doubling up to max_retry_seconds, until
    # max_attempts or max_age_hours; then it is marked failed and shown by `xrvd status`.
    max_attempts: int = Field(default=10, ge=1)
    retry_seconds: float = Field(default=10.0, ge=0)
    max_retry_seconds: float = Field(default=900.0, ge=0)
    max_age_hours: float = Field(default=72.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


class StudyConfig(Section):
    # A study is ready when no instance arrived for this long and no sender is still open.
    settle_seconds: float = Field(default=10.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_seconds: float = Field(default=30.0, ge=0)


class SelectConfig(Section):
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    # Many real files lack ViewPosition or BodyPartExamined: classified by default.
    classify_missing_view: bool = True
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST"])
    classify_missing_body_part: bool = True
    min_size: int = Field(default=256, ge=1)


class OutputConfig(Section):
    # Structured Reports by study; default <state_dir>/results.
    folder: Path | None = None
    sr_flavour: Literal["comprehensive3d", "enhanced"] = "comprehensive3d"
    series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    # Says clearly that this is an AI result, not a read.
    series_description: str = Field(default="AI RESULT (xrvd) - not a radiologist read",
                                    min_length=1, max_length=64)
    # A JSON file with the scores next to each report, for research pipelines.
    json_sidecar: bool = False
    # For each positive finding, a class activation map blended over the image, written as a
    # Secondary Capture in the report's series ("AI RESULT - heatmap - not for diagnosis"),
    # referenced from the finding in the SR and delivered with it.
    heatmaps: bool = False
    # At most this many per image, its strongest positive findings: each is an RGB image of up
    # to 1024 px (about 3 MB), so an image with many positive findings cannot make the output
    # many times larger than what was received.
    max_heatmaps_per_image: int = Field(default=3, ge=1, le=18)


class MetricsConfig(Section):
    # Prometheus metrics at /metrics and a health check at /healthz.
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


class ServiceConfig(Section):
    # A worker busy on one batch for longer than this counts as stuck: systemd's watchdog
    # pings stop (and systemd restarts the service), /healthz fails.
    worker_stall_seconds: float = Field(default=300.0, gt=0)
    # How often STATUS= (queue depth, counts) is refreshed for `systemctl status`.
    status_seconds: float = Field(default=5.0, gt=0)
    # How long SIGTERM waits for associations and the batch in hand before leaving them.
    drain_seconds: float = Field(default=20.0, ge=0)
    # Processes that decode, convert and write reports beside the model (0: all in the
    # worker thread; auto: one per CPU the service may use, at most 4, none on one CPU).
    # They share one copy of pydicom, highdicom and torch (TorchXRayVision's resize), about
    # 370 MB with PyPI's torch build, and take about 150 MB each beyond it.
    worker_processes: Annotated[int | str, PlainValidator(_process_count)] = "auto"
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)


def _ray_address(value: str) -> str:
    text = value.strip()
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if text in ("auto", "local") or (host and port.isdigit() and 0 < int(port) < 65536):
        return text
    raise ValueError(f"must be auto, local, HOST:PORT (the head's GCS) or ray://HOST:PORT (Ray "
                     f"Client), got {value!r}")


class BackfillConfig(Section):
    """`xrvd backfill` on folders: on this machine, or across a Ray cluster (the `ray` extra,
    `uv sync --extra ray`); the command line's --engine, --address, --actors and
    --gpus-per-actor override these."""

    # local: worker processes beside the model on this machine. ray: the driver (this
    # process) crawls and keeps the journal; Ray tasks read and convert, model actors score.
    engine: Literal["local", "ray"] = "local"
    # auto: the cluster RAY_ADDRESS names, else the one `ray start` started on this machine;
    # local: a Ray instance of its own for this run; HOST:PORT or ray://HOST:PORT (Ray Client).
    ray_address: Annotated[str, AfterValidator(_ray_address)] = "auto"
    # Model actors; 0: one per node (with gpus_per_actor: as many as the cluster's GPUs hold).
    actors: int = Field(default=0, ge=0, le=4096)
    # GPUs each actor holds (a fraction shares one); above 0 the model runs on cuda there.
    gpus_per_actor: float = Field(default=0.0, ge=0, le=64)
    # CPUs Ray sets aside for each actor. 0: as on one machine, the model's threads
    # (model.threads) take the cores when they need them, and the tasks (at a lower priority)
    # the rest: 0.88x the local engine's rate on one 2-core node, against 0.81x with 1.
    cpus_per_actor: float = Field(default=0.0, ge=0, le=256)


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    include_patient_identifiers: bool = False


class Config(Section):
    state_dir: Path = Field(default_factory=default_state_dir)
    model: ModelConfig = Field(default_factory=ModelConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    scp: ScpConfig = Field(default_factory=ScpConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    destinations: list[Annotated[Annotated[Destination, Tag("dimse")] | Annotated[
        DicomwebDestination, Tag("dicomweb")], Discriminator(kind_of)]] = Field(
        default_factory=list)
    # PACS a back-fill can query and retrieve from (`xrvd backfill --source NAME`).
    sources: list[Source] = Field(default_factory=list)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    backfill: BackfillConfig = Field(default_factory=BackfillConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> Config:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _unique_source_names(self) -> Config:
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")
        return self

    def source(self, name: str) -> Source:
        for candidate in self.sources:
            if candidate.name == name:
                return candidate
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise ConfigError("<config>", [f"sources: no source named {name!r} (known: {known}); "
                                       "add it under sources: in the config"])

    def destination(self, name: str) -> Destination:
        for candidate in self.destinations:
            if candidate.name == name:
                return candidate
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError("<config>", [f"destinations: no destination named {name!r} "
                                       f"(known: {known})"])

    @model_validator(mode="after")
    def _fill_derived_paths(self) -> Config:
        if self.model.weights_dir is None:
            self.model.weights_dir = self.state_dir / "models"
        if self.output.folder is None:
            self.output.folder = self.state_dir / "results"
        return self

    @property
    def weights_dir(self) -> Path:
        assert self.model.weights_dir is not None  # filled in by _fill_derived_paths
        return self.model.weights_dir

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading and error messages --------------------------------------------------------


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load and validate a config file; None gives the embedded defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}not valid YAML: {problem}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections, got {_kind(raw)}"])
    _resolve_relative_paths(raw, Path(path).resolve().parent)
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None


_PATH_KEYS = {("state_dir",), ("model", "weights_dir"), ("watch", "folder"),
              ("watch", "rejected_folder"), ("output", "folder")}


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    scp = raw.get("scp")
    tls_sections = [scp.get("tls")] if isinstance(scp, dict) else []
    tls_sections += [destination.get("tls") for destination in raw.get("destinations") or []
                     if isinstance(destination, dict)]
    for tls in tls_sections:
        if isinstance(tls, dict):
            for key in ("ca_file", "cert_file", "key_file"):
                if isinstance(tls.get(key), str):
                    value = Path(tls[key]).expanduser()
                    tls[key] = str(value if value.is_absolute() else base / value)
    for keys in _PATH_KEYS:
        parent: Any = raw
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(keys[-1]), str):
            value = Path(parent[keys[-1]]).expanduser()
            parent[keys[-1]] = str(value if value.is_absolute() else base / value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Config
    for key in loc:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        model = field.annotation
        # unwrap Optional[Section] and similar
        for arg in getattr(model, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any]) -> str:
    # An entry of sources: or destinations: is validated as its `type:`, which pydantic puts
    # in the path (destinations.0.dimse.port); the config has no such key.
    loc = tuple(part for n, part in enumerate(err["loc"])
                if not (n and isinstance(err["loc"][n - 1], int) and part in ("dimse",
                                                                              "dicomweb")))
    path = ".".join(str(part) for part in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx", {})
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
        return f"{path}: unknown key; {hint}"
    if kind == "missing":
        return f"{path}: required, but missing"
    if kind == "value_error":
        return f"{path}: {ctx.get('error', err['msg'])}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')}, got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
                 "less_than": "<"}[kind]
        limit = next(iter(ctx.values()))
        return f"{path}: must be {bound} {limit}, got {value!r}"
    if kind.startswith("int_"):
        return f"{path}: must be a whole number, got {_kind(value)} {value!r}"
    if kind.startswith("float_"):
        return f"{path}: must be a number, got {_kind(value)} {value!r}"
    if kind.startswith("bool_"):
        return f"{path}: must be true or false, got {value!r}"
    if kind.startswith("string_"):
        return f"{path}: must be text, got {_kind(value)} {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: must be a mapping of keys, got {_kind(value)}"
    return f"{path}: {err['msg']}"
