"""One validated experiment config.

A run is described by one :class:`ExperimentConfig` with eight sections (task, adapter,
method, federation, privacy, train, eval, output). It is read from YAML, updated with
``key.path=value`` overrides from the command line, validated by pydantic (unknown keys are
refused with a did-you-mean), and saved, resolved, beside every result.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlora.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """What is learned, from which data, with which pretrained model."""

    name: str = Field("text-classification", description="task in the task registry")
    dataset: str = Field(
        "rotten-tomatoes",
        description="offline dataset name, a local CSV/JSON/parquet file, or a Hugging Face datasets name",
    )
    dataset_config: str | None = Field(None, description="datasets config name (e.g. a GLUE task)")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    test_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when no test split exists")
    max_train_examples: int | None = Field(None, gt=0, description="cap on the training split (seeded subset)")
    max_test_examples: int | None = Field(None, gt=0, description="cap on the test split (seeded subset)")
    model: str = Field("minilm", description="'minilm' (offline default), a model name or a local path")
    num_layers: int | None = Field(None, gt=0, description="keep only the first N transformer layers")
    max_length: int = Field(48, gt=0, description="tokens per example (dynamic padding below it)")
    pooling: Literal["mean", "cls"] = "mean"
    image_column: str = Field("image", description="image column of a datasets image task (e.g. 'img')")
    image_size: int | None = Field(
        None, gt=0, description="image side in pixels (default: 32 for EfficientNet-Lite0, the model's own size otherwise)"
    )
    doc_stride: int = Field(32, gt=0, description="question answering: token overlap between context windows")
    cache_prefix: bool = Field(
        True, description="cache the frozen layers below the first adapted layer (exact, much faster)"
    )
    prefix_cache_dir: str | None = Field(
        None, description="folder (on this machine only, 0700) where that cache is also kept on disk and reused by "
        "later runs: null = $FEDLORA_CACHE_DIR/prefix if set, else the user cache folder ($XDG_CACHE_HOME or "
        "~/.cache, then fedlora/prefix); 'off' = in memory only (docs/privacy.md)"
    )
    prefix_cache_max_gb: float = Field(
        4.0, gt=0, description="bound on that folder in GB (1e9 bytes); least recently used entries are removed"
    )
    prompt_column: str = Field("prompt", description="causal-lm: the column holding each example's prompt")
    response_column: str = Field("response", description="causal-lm: the column holding each example's response")
    prompt_template: str = Field(
        "{prompt}\n", description="causal-lm: how a prompt is written before its response ('{prompt}' is replaced)"
    )


class AdapterConfig(_Section):
    """LoRA (or VeRA) adapters injected through PEFT."""

    type: Literal["lora", "vera"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0, description="scale s = alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="module names to adapt; [auto]: PEFT's default for the model's architecture (the causal-lm default)",
    )
    layers: list[int] | None = Field(None, description="adapt only these transformer layers")
    train_head: bool = Field(True, description="train the classification head")
    federate_head: bool = Field(True, description="send the head to the server (else it stays local)")


class MethodConfig(_Section):
    """A registered method by name, or its four seams named explicitly."""

    name: str = "dp-lora"
    plan: str | None = None
    schedule: str | None = None
    upload: str | None = None
    aggregate: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific knobs")


class FaultConfig(_Section):
    """Injected client failures, for tests and drills (federation/faults.py)."""

    fraction: float = Field(0.0, ge=0, lt=1, description="share of each round's clients that fail (seeded)")
    kind: Literal["exception", "timeout", "nonfinite"] = "exception"


class FederationConfig(_Section):
    num_clients: int = Field(10, gt=0)
    clients_per_round: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled per round")
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    min_client_size: int = Field(
        8, ge=1, description="fewest examples a Dirichlet or shards client holds (Dirichlet: redrawn, then topped up)"
    )
    shards_per_client: int = Field(2, gt=0, description="partition=shards: label shards per client (FedAvg's k)")
    rounds: int = Field(10, gt=0)
    local_steps: int = Field(10, gt=0)
    weighting: Literal["data-size", "uniform"] = "data-size"
    server_ema: float = Field(
        0.0, ge=0, lt=1, description="beta of an exponential moving average of the global state over rounds, kept by the "
        "server and the model it evaluates and saves (training continues from the plain aggregate); 0: off. "
        "Post-processing of what the server already holds: the DP guarantee is unchanged"
    )
    min_clients: int = Field(1, ge=1, description="fewest successful clients a round aggregates (else retry/stop)")
    retries: int = Field(0, ge=0, description="re-runs of a round's failed clients when too few succeeded")
    faults: FaultConfig = Field(default_factory=FaultConfig)
    batched_clients: int | Literal["auto"] = Field(
        0, description="clients trained together in one pass over the shared backbone: 0 (off, one after another), "
        "K (refused if the run cannot batch), or 'auto' (K from free memory; falls back to 0 when it cannot batch); "
        "see federation/clients_per_pass.py"
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "client_timeout_s" in data:
            if data["client_timeout_s"] is None:  # written by older runs' config.yaml: nothing to honour
                return {k: v for k, v in data.items() if k != "client_timeout_s"}
            raise ValueError("federation.client_timeout_s was removed: in-process clients share one model, so a hung "
                             "client cannot be abandoned safely; drop the key (on Flower, --round-timeout bounds a round)")
        return data

    @model_validator(mode="after")
    def _batched(self) -> FederationConfig:
        if self.batched_clients != "auto" and self.batched_clients < 0:
            raise ValueError(f"federation.batched_clients must be 0, a positive K or 'auto' (got {self.batched_clients})")
        return self


class UserLevelConfig(_Section):
    """User-level DP: clip each client's upload delta, add noise at the server (docs/privacy.md)."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0, description="L2 bound S on a client's upload delta, flat over its uploaded tensors")
    epsilon: float = Field(3.0, gt=0, description="target user-level epsilon over all rounds (delta: privacy.delta)")
    noise_multiplier: float | None = Field(
        None, ge=0, description="fix sigma_u instead of calibrating it; noise std on the mean is sigma_u * S / K"
    )
    server_lr: float = Field(
        1.0, gt=0, description="scale of the noisy mean delta before the method aggregates it (post-processing; "
        "1 = plain FedAvg)"
    )


class PrivacyConfig(_Section):
    """Sample-level DP-SGD on every client (``enabled``), and optionally user-level DP (see docs/privacy.md)."""

    enabled: bool = True
    epsilon: float = Field(3.0, description="target epsilon per client, > 0")
    delta: float = Field(1e-5, description="target delta per client, in (0, 1)")
    clip_norm: float = Field(2.0, gt=0, description="per-sample L2 clipping bound C (over all active tensors)")
    clipping: Literal["flat", "per-group"] = Field(
        "flat", description="flat: one norm over all active tensors; per-group: the head clipped to C sqrt(f) and the "
        "adapter factors to C sqrt(1-f) (f = head_clip_fraction; squares sum to C^2, same guarantee, docs/privacy.md)"
    )
    head_clip_fraction: float = Field(
        0.5, gt=0, lt=1, description="per-group clipping: the head's share f of C^2 (the adapter factors get 1 - f)"
    )
    accountant: Literal["prv", "rdp"] = "prv"
    max_sample_rate: float = Field(
        0.25, gt=0, le=1, description="cap on a client's Poisson rate q = batch/n (small clients)"
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="fix sigma instead of calibrating it from epsilon"
    )
    user_level: UserLevelConfig = Field(default_factory=UserLevelConfig)
    reproducible_noise: bool = Field(
        False, description="seed the DP noise from train.seed (bit-identical reruns); NOT private against anyone "
        "who holds the config. Default: the OS's secure randomness"
    )

    @model_validator(mode="after")
    def _ranges(self) -> PrivacyConfig:
        if not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon must be > 0 (got {self.epsilon}); use --no-dp for a non-private run")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1) (got {self.delta}); 1e-5 is the usual choice")
        return self


class TrainConfig(_Section):
    batch_size: int = Field(64, gt=0, description="expected (Poisson) batch size per local step")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the head (default: lr, as the factors)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rates across rounds: constant, or cosine from lr in round 1 down to "
        "lr x lr_final_fraction in the last round; the same factor scales head_lr and the user-level server_lr "
        "(post-processing: no privacy cost)")
    lr_final_fraction: float = Field(0.1, ge=0, le=1, description="cosine schedule: the last round's rate / lr")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="forward passes in fp32, or under bf16 autocast (LoRA factors, gradients, noise stay fp32)"
    )
    compile: bool = Field(
        False, description="torch.compile the pure tensor math of the fused DP step: the per-example gradient einsums "
        "(linear layers, VeRA) and the clip + weighted sum per clipping group, with dynamic shapes; not the model's "
        "forward/backward, not the noise draw (unchanged, so is the privacy guarantee). A function that fails to "
        "compile runs eagerly with a warning (privacy/compiled.py)"
    )


class EvalConfig(_Section):
    every: int = Field(1, gt=0, description="evaluate the global model every k rounds (and at the end)")
    subset: int | None = Field(
        None, gt=0, description="evaluate intermediate rounds on N test examples (a fixed seeded subset); the final "
        "round always on the full test split. Unset: always the full split"
    )
    batch_size: int = Field(256, gt=0)
    diagnostics: bool = Field(True, description="log the aggregation error per round and module (float64 replay)")
    signal_diagnostics: Literal["off", "private", "exact"] = Field(
        "off", description="per round, each trained group's (A, B, head, per layer) signal norm against its noise norm: "
        "'private' estimates it from the noisy gradient (post-processing, covered by DP); 'exact' uses the noiseless "
        "clipped sum: research only, the signal norm is a non-private statistic, the run is then marked NOT covered"
    )
    sharpness_every: int | None = Field(None, gt=0, description="top Hessian eigenvalue of the global model every k rounds (and at the end); off when unset")
    sharpness_examples: int = Field(256, gt=0, description="first test examples used for the sharpness (server-side data)")


class OutputConfig(_Section):
    root: str = Field("runs", description="folder that holds run directories")
    name: str | None = Field(None, description="run directory name (default: method-timestamp)")
    checkpoint_every: int = Field(1, gt=0)
    keep_checkpoints: int = Field(2, ge=1, description="keep the last N round checkpoints")
    keep_every: int | None = Field(None, gt=0, description="also keep every M-th round's checkpoint (M = keep_every)")


HEADLESS_TASKS = ("causal-lm",)  # tasks whose model has no head to train (adapter.train_head is false)


class ExperimentConfig(_Section):
    task: TaskConfig = Field(default_factory=TaskConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentConfig:
        if self.task.name in HEADLESS_TASKS:  # a decoder LM: no classification head, per-architecture targets
            if "target_modules" not in self.adapter.model_fields_set:
                self.adapter.target_modules = ["auto"]
            if self.adapter.train_head and "train_head" in self.adapter.model_fields_set:
                raise ValueError(f"task {self.task.name} has no classification head; set adapter.train_head=false")
            self.adapter.train_head = False
        if self.adapter.federate_head and not self.adapter.train_head:
            # A frozen head is identical everywhere; nothing to federate.
            self.adapter.federate_head = False
        if self.federation.num_clients * self.federation.clients_per_round < 1:
            raise ValueError("federation.clients_per_round samples no client; raise it or add clients")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(path: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return list(model.model_fields)


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        hint = _did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))
        return f"unknown config key '{where}'{hint}; see configs/demo.yaml for the known keys"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return msg
    return f"config key '{where}': {msg} (got {first.get('input')!r})"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. federation.rounds=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(tree: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate a config tree plus dotted overrides; raise :class:`ConfigError` in one line."""
    tree = dict(tree or {})
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or none: all defaults) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{p}' is not valid YAML{at}; fix the syntax there") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{p}' is not UTF-8 text; save it as UTF-8") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (task:, method:, ...)")
        tree = loaded
    return build_config(tree, overrides)


def with_current_defaults(saved: Any) -> Any:
    """A saved config tree (a checkpoint's, a compare grid's base) with every field added to the
    schema since it was written at its default, so that a newer fedlora resumes it; a field it set
    differently still differs. A tree this version cannot read is returned as it is."""
    try:
        return ExperimentConfig.model_validate(saved).model_dump(mode="json")
    except (ValueError, TypeError):
        return saved
