"""One frozen dataclass per stage (its fields, defaults, docs and checks) and ``Config``, which holds them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config.checks import (PRIMARY_METRICS, SCORE_KINDS, _check_abs_dirs, _check_category_weights, _check_cron,
                                  _check_endpoint, _check_keys, _check_lora_targets, _check_map, _check_rdzv_id,
                                  _check_regex, _check_timezone, _check_url_or_empty, _check_urls, _f)

SECRET_FIELDS = {("serve", "admin_token"), ("serve", "api_keys"), ("serve", "feedback_token"), ("fleet", "token")}


@dataclass(frozen=True)
class PathsConfig:
    """Where lorad keeps its state and which folder it watches."""

    state_dir: str = _f("./lorad-state", "folder for lorad.db, runs/, adapters/ and cache/")
    inbox: str = _f("./inbox", "watched folder where new data files are dropped")


@dataclass(frozen=True)
class ModelConfig:
    """The base model every adapter is trained on and served with."""

    base_model: str = _f("embedded:SmolLM2-135M-Instruct",
                         "local HF model directory, .gguf file, hub id, or the embedded default")
    revision: str = _f("", "hub revision (branch, tag or commit) when base_model is a hub id; empty = default")
    dtype: str = _f("auto", "compute dtype; auto = bf16 on recent GPUs, fp16 on older, fp32 on CPU (training "
                            "matmuls in bf16 autocast where the CPU has bf16 units: AMX or AVX512-BF16)",
                    choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str = _f("auto", "load the base weights quantized with bitsandbytes (QLoRA); auto = 4bit on a GPU "
                           "too small for the 16-bit weights, else none (the choice is logged at startup)",
                           choices=("auto", "none", "4bit", "8bit"))
    device: str = _f("auto", "where the model runs; auto = cuda when available", choices=("auto", "cpu", "cuda"))
    trust_remote_code: bool = _f(False, "allow model code from the checkpoint (only for checkpoints you trust)")


@dataclass(frozen=True)
class DataConfig:
    """Ingestion, cleaning and training-snapshot construction."""

    max_prompt_tokens: int = _f(2048, "records whose prompt is longer (in tokens) are rejected", ge=1)
    max_response_tokens: int = _f(1024, "records whose response is longer (in tokens) are rejected", ge=1)
    max_seq_len: int = _f(4096, "training sequence length (prompt + response, after packing)", ge=16)
    min_response_chars: int = _f(1, "records with a shorter response are rejected", ge=0)
    strip_patterns: list = _f([], "regular expressions removed from every text field before validation",
                              check=_check_regex)
    near_dup_threshold: float = _f(0.9, "Jaccard similarity above which a record counts as a near-duplicate; 1 = off",
                                   gt=0.0, le=1.0)
    holdout_fraction: float = _f(0.1, "share of records kept out of training for evaluation (stable hash split)",
                                 gt=0.0, lt=0.5)
    replay_fraction: float = _f(0.35, "share of each training snapshot drawn from older records (see replay_unit)",
                                ge=0.0, lt=1.0)
    replay_unit: str = _f("chars", "what replay_fraction counts: chars (the share of the training text, so a batch "
                          "of long new documents still gets its share of replayed text) or records",
                          choices=("chars", "records"))
    category_cap_ratio: float = _f(3.0, "no category may exceed this multiple of the median category's count; 0 = no cap", ge=0.0)
    min_domain_fraction: float = _f(0.0, "floor on the share of a snapshot's training text (characters) from its new "
                                    "records; replay records are dropped until it holds; 0 = off", ge=0.0, le=1.0)
    packing: bool = _f(True, "pack several records into one sequence (no cross-record attention)")


@dataclass(frozen=True)
class IngestConfig:
    """Memory bounds for reading one data file (a small compressed file must not decode into gigabytes)."""

    max_cell_bytes: int = _f(1 << 20, "a Parquet cell larger than this when decoded is rejected (1 MiB: 16x the "
                             "largest LawBench field, far over the token limits)", ge=1024)
    max_batch_bytes: int = _f(64 << 20, "decoded bytes turned into records at a time; bounds memory per batch",
                              ge=1 << 20)
    max_file_bytes: int = _f(4 << 30, "decoded bytes per file (on disk for text, from the metadata and while "
                             "reading for Parquet); a larger file is rejected: split it", ge=1 << 20)


@dataclass(frozen=True)
class DriftConfig:
    """The statistical test deciding whether new data differs from what the champion knows."""

    alpha: float = _f(0.05, "family-wise false-alarm rate of the combined drift test", gt=0.0, lt=1.0)
    permutations: int = _f(500, "permutations for the MMD test's null distribution", ge=50)
    effect_size_floor: float = _f(0.1, "minimum effect size to call drift, so huge batches do not always drift",
                                  ge=0.0)
    min_reference: int = _f(50, "fewer reference records than this = insufficient data", ge=2)
    min_current: int = _f(50, "fewer current records than this = insufficient data", ge=2)
    reference_cap: int = _f(2000, "reservoir size of the reference window", ge=10)
    embedding_dims: int = _f(32, "PCA dimensions kept from the base-model embeddings", ge=1, le=4096)
    max_tokens: int = _f(64, "tokens of each record featurized (prompt start+end and response); 64 keeps "
                             "1,000 vs 1,000 records near a minute on 2 CPU cores with full power", ge=8, le=8192)


@dataclass(frozen=True)
class TrainConfig:
    """One incremental LoRA/QLoRA run."""

    lora_r: int = _f(16, "LoRA rank: the adapter's width (capacity vs size)", ge=1, le=1024)
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r)", ge=1)
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", ge=0.0, lt=1.0)
    lora_targets: str = _f("all-linear", "all-linear, attention, or a comma-separated list of module names",
                           check=_check_lora_targets)
    learning_rate: float = _f(2e-4, "peak learning rate (cosine decay after warm-up)", gt=0.0, lt=1.0)
    warmup_ratio: float = _f(0.03, "share of steps spent warming up the learning rate", ge=0.0, lt=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights", ge=0.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", gt=0.0)
    epochs: float = _f(1.0, "passes over the snapshot (ignored when max_steps > 0)", gt=0.0)
    max_steps: int = _f(0, "optimizer steps per run; 0 = derive from epochs", ge=0)
    micro_batch_size: int = _f(0, "sequences per forward pass (halved automatically on a GPU OOM); 0 = auto: "
                                  "what the free memory holds at data.max_seq_len, 1-4 on CPU (with gradient "
                                  "checkpointing when not even one fits), 1-16 on a GPU", ge=0)
    grad_accum_steps: int = _f(4, "micro-batches per optimizer step", ge=1)
    gradient_checkpointing: bool = _f(False, "trade compute for memory (turned on by a GPU OOM, or by the CPU "
                                             "plan when one sequence does not fit)")
    curriculum: str = _f("none", "easy_to_hard = order training from easy to hard by the champion's loss on each "
                         "example (scored once before the run)", choices=("none", "easy_to_hard"))
    curriculum_stages: int = _f(4, "difficulty stages of the curriculum (loss quantiles); batches never mix stages",
                                ge=1, le=100)
    category_weights: list = _f([], "per-category loss weights as 'category=weight' (weighted multi-objective "
                                "training); unlisted categories weigh 1, weight 0 leaves a category out",
                                check=_check_category_weights)
    continued_pretraining: str = _f("mixed", "first = train raw {text} records in a phase before the instruction "
                                    "(chat) records; mixed = one shuffled pool", choices=("mixed", "first"))
    compile: str = _f("auto", "torch.compile the decoder layers for training on a GPU (unquantized, varlen attention): "
                      "auto = only for runs long enough to repay the compilation (planned tokens x non-embedding "
                      "parameters >= 2.7e16: ~4M tokens on a 7B model; a 135M model's runs stay eager), always, "
                      "or never", choices=("auto", "always", "never"))
    checkpoint_every_steps: int = _f(50, "write a resumable checkpoint every N optimizer steps", ge=1)
    max_wall_seconds: int = _f(3 * 3600, "wall-clock budget of one run; it stops cleanly when spent", ge=10)
    seed: int = _f(1234, "random seed (data order, LoRA init, dropout)", ge=0)
    distributed: str = _f("none", "training in several processes under torchrun (GPUs, hosts, or CPU processes "
                          "over gloo): ddp = base replicated on every GPU, fsdp = base sharded across GPUs (FSDP2; "
                          "for models that do not fit one card)",
                          choices=("none", "ddp", "fsdp"))
    num_processes: int = _f(0, "processes per node when distributed is ddp or fsdp: GPUs, or CPU processes (gloo) "
                            "on a host without one; 0 = every visible GPU", ge=0)
    nnodes: int = _f(1, "hosts one distributed run spans (torchrun --nnodes); more than 1 needs rdzv_endpoint, and "
                     "every other node runs the join command (docs/multi-machine.md)", ge=1, le=1024)
    rdzv_endpoint: str = _f("", "HOST:PORT of the c10d rendezvous when nnodes > 1: this (the daemon's) node's address "
                            "as the other nodes reach it, and a free port", check=_check_endpoint)
    rdzv_id: str = _f("", "rendezvous id every node of a run passes; empty = the run's id (its folder's name)",
                      check=_check_rdzv_id)
    rdzv_timeout_seconds: int = _f(600, "how long the nodes of a run wait for each other to join before the run "
                                   "fails", ge=10, le=86400)


@dataclass(frozen=True)
class EvalConfig:
    """Comparing a candidate adapter with the champion."""

    max_examples: int = _f(200, "holdout / regression examples scored per set", ge=1)
    bootstrap_samples: int = _f(1000, "paired bootstrap resamples", ge=100)
    confidence: float = _f(0.95, "confidence that the candidate is better on the new-data holdout", gt=0.5, lt=1.0)
    regression_sets: list = _f(["chatterbot-en", "chatterbot-zh"],
                               "general sets that guard against forgetting (built-in names or JSONL paths)")
    latency_prompts: int = _f(8, "prompts used to measure time to first token", ge=0)
    task_metrics: bool = _f(True, "also score answers: accuracy (choice/label records), token F1 (extraction), "
                            "ROUGE-L (free text), each kind decided per record from its data")
    answer_examples: int = _f(32, "examples per set whose answers are scored (a sample of the loss examples); "
                              "bounds the generation time", ge=1)
    free_text_sets: str = _f("holdout", "where free-text answers are generated for ROUGE-L: holdout = the new-data "
                             "holdout only (the regression sets keep their loss and their label/extraction "
                             "scores; chat replies are the slowest answers to generate on a CPU), all, or none",
                             choices=("holdout", "all", "none"))
    score_kinds: list = _f([], "per-category kind overrides as 'category=kind' (choice, label, extraction, free); "
                           "unlisted categories are decided per record", check=_check_map(SCORE_KINDS))
    label_new_tokens: int = _f(8, "new tokens generated for a label answer (greedy)", ge=1, le=512)
    extraction_new_tokens: int = _f(48, "new tokens generated for an extraction answer (greedy)", ge=1, le=2048)
    free_new_tokens: int = _f(32, "new tokens generated for a free-text answer (greedy); ROUGE-L compares this "
                              "much with the reference", ge=1, le=4096)


@dataclass(frozen=True)
class PromoteConfig:
    """When a candidate may replace the champion, and when to roll back."""

    auto_promote: bool = _f(True, "promote automatically when the gate passes (else wait for `lorad promote`)")
    min_improvement: float = _f(0.0, "required relative loss reduction on the new-data holdout", ge=0.0, lt=1.0)
    regression_tolerance: float = _f(0.02, "allowed relative loss increase on each regression set", ge=0.0, lt=1.0)
    regression_reference: str = _f("incumbent", "what each regression set's candidate loss is compared with: "
                                   "incumbent = the serving champion (right for sets that hold earlier domains; "
                                   "with general-chat sets it ratchets once an adapter happens to improve chat), "
                                   "base = the base model (right for general-ability sets such as the built-in "
                                   "chatterbot ones: never worse than the model lorad started from)",
                                   choices=("incumbent", "base"))
    primary_metric: list = _f([], "per-category metric the gate guards as 'category=metric' (loss, accuracy, f1, "
                              "rouge_l); unlisted categories guard accuracy (choice/label records) and f1 "
                              "(extraction), loss only for free text", check=_check_map(PRIMARY_METRICS))
    max_score_drop: float = _f(0.02, "a candidate whose accuracy/F1 on the holdout or a regression set (per category) "
                               "is lower than the incumbent's by more than this (absolute) and significantly "
                               "(eval.confidence) is refused, even when its loss improved", ge=0.0, lt=1.0)
    max_refusals: int = _f(3, "a record whose candidate has been refused this many times is parked (no longer "
                           "pending; `lorad status` lists it with the reasons); before that it joins the next run",
                           ge=1)
    max_latency_ratio: float = _f(1.25, "candidate time-to-first-token may be at most this multiple of the champion "
                                        "adapter's (the first adapter is not compared with the bare base: any "
                                        "adapter adds its LoRA matmuls)", ge=1.0)
    latency_floor_ms: float = _f(500.0, "time to first token below which a slower candidate is never refused "
                                        "for latency (the seed's 500 ms first-token target); 0 = always compare",
                                 ge=0.0)
    rollback_window_seconds: int = _f(900, "how long live signals are watched after a promotion", ge=0)
    rollback_max_error_rate: float = _f(0.05, "error rate that triggers automatic rollback", gt=0.0, le=1.0)
    rollback_min_requests: int = _f(20, "requests the new champion must serve before its error rate and latency "
                                        "can trigger a rollback", ge=1)
    rollback_min_voters: int = _f(10, "distinct authenticated voters (API keys, or users named by the feedback "
                                      "token's relay) needed before feedback can trigger a rollback", ge=1)


@dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible server."""

    host: str = _f("127.0.0.1", "bind address (keep 127.0.0.1 unless a proxy guards the port)")
    port: int = _f(8000, "HTTP port of the API, /metrics and /admin", ge=1, le=65535)
    admin_token: str = _f("", "bearer token for /admin/* and the full /status; empty = admin endpoints disabled "
                              "(set via LORAD_SERVE__ADMIN_TOKEN)")
    api_keys: list = _f([], "bearer keys accepted on /v1/* (as vLLM's --api-key); empty = the API is open to anyone "
                            "who reaches the port (set via LORAD_SERVE__API_KEYS=key1,key2)", check=_check_keys)
    feedback_token: str = _f("", "bearer token of a trusted front end that posts its users' votes to /v1/feedback "
                                 "with a 'user' field; without it and without api_keys, feedback is refused")
    feedback_per_minute: int = _f(10, "votes one voter may send per minute; more get 429", ge=1)
    header_timeout_seconds: float = _f(10.0, "a connection that has not sent a complete request head by then is "
                                             "closed", gt=0.0)
    body_timeout_seconds: float = _f(30.0, "a request whose body has not fully arrived by then gets 408", gt=0.0)
    max_prompt_tokens: int = _f(2048, "longer prompts are refused with 400", ge=1)
    max_new_tokens: int = _f(512, "upper bound on max_tokens a request may ask for", ge=1)
    max_body_bytes: int = _f(1_000_000, "larger request bodies are refused with 413", ge=1024)
    request_timeout_seconds: float = _f(120.0, "a request running longer is cut off", gt=0.0)
    max_queue: int = _f(256, "waiting requests beyond this get 429 (backpressure)", ge=1)
    max_batch_size: int = _f(32, "requests decoded together in one step (KV cache slots)", ge=1, le=1024)
    drain_timeout_seconds: float = _f(30.0, "on shutdown, wait this long for in-flight requests", ge=0.0)
    batch_invariant: bool = _f(False, "decode at one fixed shape so greedy output never depends on other requests "
                                      "(bit-for-bit; slower at low load)")
    kv_cache_fraction: float = _f(0.3, "share of free GPU memory the KV cache takes (slots = max_batch_size or fewer)",
                                  gt=0.0, le=0.95)
    kv_cache_tokens: int = _f(81920, "CPU KV cache budget in positions, all requests together (the default holds "
                                     "max_batch_size requests of the default 2,560-position context)", ge=1)
    adapter_slots: int = _f(4, "adapter versions held at once in the per-row LoRA tables (champion, previous, "
                               "pinned)", ge=2, le=64)
    lora_max_rank: int = _f(64, "largest adapter rank the LoRA tables hold; higher ranks are refused", ge=1, le=1024)
    cuda_graphs: bool = _f(True, "capture the decode step as CUDA graphs on a GPU (off: eager, for debugging)")
    compile: bool = _f(True, "torch.compile the decoder layers on a GPU before capture (fewer kernels per step)")
    decode_kernel: bool = _f(True, "on a GPU, decode attention as one Triton kernel that appends the step's keys "
                                   "and reads only each request's own positions (off: the PyTorch path)")
    kv_cache_dtype: str = _f("auto", "KV cache element type: auto = the model's dtype; bfloat16 (half of a float32 "
                                     "model's cache); float8_e4m3 = one byte a value (half of bf16's memory and of "
                                     "a decode step's cache reads; keys and values rounded to 3 mantissa bits, "
                                     "saturating at +-448, no scales)",
                             choices=("auto", "bfloat16", "float8_e4m3"))
    lora_kernel: bool = _f(True, "on a GPU, each projection's per-row LoRA B product (mask, matmul, addition) as "
                                 "one Triton kernel (off: three PyTorch launches)")
    cpu_prefill_dtype: str = _f("auto", "matmul dtype of prompt prefill for float32 weights on a CPU; auto = bf16 "
                                        "autocast where the CPU has bf16 units (AMX or AVX512-BF16), else "
                                        "float32 (decode stays float32)", choices=("auto", "float32", "bfloat16"))
    cpu_weights_dtype: str = _f("auto", "weights the server loads on a CPU when model.dtype is auto; auto = bfloat16 "
                                        "where a startup probe finds this CPU's bf16 matrix-vector products at "
                                        "least 1.25x float32's (AVX512-BF16: ~1.5x; a decode step reads every "
                                        "weight once a token), else float32", choices=("auto", "float32", "bfloat16"))


@dataclass(frozen=True)
class FleetConfig:
    """Several `lorad serve` replicas following the champion this daemon promotes (docs/multi-machine.md)."""

    # control-plane side (the daemon that promotes)
    replicas: list = _f([], "base URLs of the `lorad serve` replicas this daemon drives (e.g. 'http://10.0.0.7:8000'); "
                        "a promotion or rollback happens only once every one has the version loaded; empty = no fleet",
                        check=_check_urls)
    token: str = _f("", "bearer token sent to the replicas' admin API and accepted on this daemon's adapter-file "
                        "route; empty = serve.admin_token (set via LORAD_FLEET__TOKEN)")
    adapter_url: str = _f("", "this daemon's base URL as replicas reach it: they fetch an adapter's files from "
                          "<adapter_url>/fleet/adapters/<version> and check their sha256; empty = send the registry "
                          "folder's path (shared storage)", check=_check_url_or_empty)
    request_timeout_seconds: float = _f(60.0, "longest wait for one replica to answer one call (a load includes "
                                        "its download)", gt=0.0, le=3600.0)
    reconcile_seconds: float = _f(2.0, "how often every replica is checked and a replica not on the champion (one "
                                  "that was down or restarted) is brought to it", gt=0.0, le=3600.0)
    # replica side (every `lorad serve`)
    control_plane: str = _f("", "base URL of the daemon that drives this replica; a lora_path URL is accepted only "
                            "under <control_plane>/fleet/adapters/; empty = URLs refused", check=_check_url_or_empty)
    local_adapter_roots: list = _f([], "folders under which a local lora_path may lie (shared storage with the "
                                   "daemon's adapters/); empty = local paths refused", check=_check_abs_dirs)
    max_adapter_bytes: int = _f(1 << 30, "an adapter larger than this (all files together) is refused before or "
                                "while it is read", ge=1024)
    download_timeout_seconds: float = _f(300.0, "a load whose files have not all arrived by then is refused",
                                         gt=0.0, le=86400.0)


@dataclass(frozen=True)
class ScheduleConfig:
    """When drift checks and training runs happen. All times in the configured time zone (UTC default)."""

    timezone: str = _f("UTC", "IANA time zone of the cron expressions", check=_check_timezone)
    monthly_refresh_cron: str = _f("0 3 1 * *", "cron for the refresh that trains on everything new, drift or not",
                                   check=_check_cron)
    drift_check_minutes: int = _f(60, "interval of the periodic drift check", ge=1)
    train_on_drift: bool = _f(True, "start a training run as soon as drift is detected")
    cooldown_minutes: int = _f(60, "minimum time between two training runs", ge=0)
    min_new_records: int = _f(50, "fewer pending records than this never start a run", ge=1)
    misfire_grace_seconds: int = _f(3600, "a job missed by less than this still runs once after downtime", ge=1)
    job_nice: int = _f(10, "nice increment of the drift, training and evaluation processes (0 = the daemon's "
                           "priority): on a shared CPU, serving computes first", ge=0, le=19)
    inbox_settle_seconds: float = _f(2.0, "a file counts as complete after its size and mtime are stable this long",
                                     ge=0.0)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics and logging."""

    enabled: bool = _f(True, "expose Prometheus metrics on /metrics")
    log_level: str = _f("INFO", "lowest level of log lines written to stderr", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _f("json", "json = one JSON object per line; text = human-readable", choices=("json", "text"))


@dataclass(frozen=True)
class Config:
    """The whole lorad configuration: one section per stage."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    def to_dict(self, *, mask_secrets: bool = True) -> dict:
        out = dataclasses.asdict(self)
        if mask_secrets:
            for section, name in SECRET_FIELDS:
                value = out[section][name]
                if value:
                    out[section][name] = ["***"] * len(value) if isinstance(value, list) else "***"
        return out


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def fleet_token(cfg: Config) -> str:
    """The bearer token of fleet traffic (control plane -> replicas, replicas -> adapter files)."""
    return cfg.fleet.token or cfg.serve.admin_token
