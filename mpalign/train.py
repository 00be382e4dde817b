"""Train the adapter on Ray Train.

    python -m mpalign.train --config CONFIG [--set key=value ...] [--resume | --overwrite]
    ray job submit -- python -m mpalign.train --config CONFIG ...     # the same command on a cluster

A ``TorchTrainer`` runs :func:`train_loop_per_worker` on ``train.num_workers`` workers (DDP, or DeepSpeed ZeRO-2 with
``train.strategy=deepspeed``). Each worker reads its shard of the built dataset's train split through Ray Data,
steps with :func:`mpalign.training.step.train_step` (the function the benchmark times), reports metrics to Ray Train
and, on rank 0, to TensorBoard/MLflow, validates every ``train.val_every`` steps and checkpoints every
``train.checkpoint_every`` steps. A lost worker brings the group back from the last checkpoint
(``train.max_failures``); ``--resume`` continues a finished or interrupted run. The final adapter lands in
``<train.output_dir>/adapter`` (``save_pretrained`` layout, projectors in ``adapter/projectors``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml

from mpalign import methods
from mpalign.cli import UserInputError, check_writable, run_cli, start_ray, verbose_console
from mpalign.config import Config, ConfigError, add_config_args, config_from_args, config_from_dict, shipped_config
from mpalign.data.output import OutputFolder, StagedFolder
from mpalign.models.alignment import check_alignment_config
from mpalign.storage import absolute, check_storage, is_remote, remove_tree
from mpalign.training.checkpoint import (
    ADAPTER_DIR,
    EMA_ADAPTER_DIR,
    DataPosition,
    TrainingState,
    ema_weights,
    load_checkpoint,
    save_checkpoint,
)
from mpalign.training.memory import check_gpu_memory
from mpalign.training.metrics import NullLogger, check_logger, make_logger
from mpalign.training.step import (
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    check_train_config,
    make_grad_scaler,
    seed_everything,
    train_step,
    unwrap,
)
from mpalign.training.validation import (
    ValidationExample,
    ValidationGrid,
    module_generation,
    save_grid,
    validation_metrics,
)

logger = logging.getLogger("mpalign.train")

RUN_CONFIG = "config.yaml"
RUN_NAME = "run"  # Ray Train's run folder under the storage path; the same name is what makes --resume find it
FINAL_ADAPTER = "adapter"
OUTPUT_SUBDIRS = (FINAL_ADAPTER, "tensorboard", "validation")  # what --overwrite clears besides the run


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingOutcome:
    output_dir: str  # a local path or a URI (s3://...), as train.output_dir
    adapter_dir: str
    checkpoint_path: str
    metrics: dict[str, Any]


def dataset_samples_uri(cfg: Config) -> str:
    """The built dataset's samples folder: a local path or a remote URI (s3://, gs://) Ray Data reads directly."""
    from mpalign.data.schema import SAMPLES_DIR

    return f"{cfg.data.path.rstrip('/')}/{SAMPLES_DIR}"


def _resolve_paths(cfg: Config) -> Config:
    """Absolute paths before the config travels to workers (whose working directory Ray changes)."""
    cfg.train.output_dir = absolute(cfg.train.output_dir)
    cfg.train.storage_path = absolute(cfg.train.storage_path)
    cfg.data.path = absolute(cfg.data.path)
    if cfg.train.strategy == "deepspeed":
        ds_config = Path(cfg.train.deepspeed_config)
        ds_config = shipped_config(ds_config)
        if not ds_config.exists():
            raise UserInputError(f"train.deepspeed_config '{cfg.train.deepspeed_config}' does not exist "
                                 f"(the shipped one is configs/deepspeed_zero2.json)")
        cfg.train.deepspeed_config = str(ds_config.resolve())
    return cfg


def check_config(cfg: Config) -> None:
    """Every user mistake that can be found before Ray starts."""
    check_train_config(cfg.train)
    check_alignment_config(cfg.model)
    methods.check_method(cfg)
    check_logger(cfg.train.logger)
    if cfg.train.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("train.strategy=deepspeed needs DeepSpeed: pip install 'mpalign[deepspeed]'") from None
    check_gpu_memory(cfg, log=logger.info)  # from the config alone: before any storage is touched
    if is_remote(cfg.train.output_dir):
        check_storage(cfg.train.output_dir, "train.output_dir")
    samples = dataset_samples_uri(cfg)
    if is_remote(samples):  # unreachable storage or missing credentials: one line now, not a hang inside Ray
        check_storage(samples, "the dataset's samples folder", must_exist=True)
    elif not Path(samples).is_dir():
        raise UserInputError(f"no built dataset at '{cfg.data.path}' (no '{Path(samples).name}' folder); build one with "
                             f"`python pipelines/build_dataset.py --output {cfg.data.path}` or set data.path")
    if "://" not in samples:  # a dataset of only rejects would otherwise fail inside the workers a minute later
        from mpalign.data.schema import split_counts

        rows, train = split_counts(samples)["train"], cfg.train
        needed = train.batch_size * train.grad_accum_steps * train.num_workers
        if rows < needed:
            raise UserInputError(f"the dataset at '{cfg.data.path}' has {rows} train samples, fewer than one step needs "
                                 f"({needed} = train.batch_size x grad_accum_steps x num_workers); see its rejects/ "
                                 f"and stats.json for why records were dropped")
    if "://" not in samples and any(Path(samples).glob("*.parquet")):
        import pyarrow.dataset as pads

        methods.check_dataset_columns(cfg, pads.dataset(samples, format="parquet").schema.names)


# Model settings a run's checkpoints are shaped by (everything but where it runs): a resume must keep them.
RESUME_FREE_MODEL_SETTINGS = ("device",)


def _check_resume_sizes(cfg: Config, output: OutputFolder) -> None:
    """Refuse ``--resume`` with model settings other than the run's, before its config.yaml is rewritten: the
    checkpoints hold the old sizes, and the saved config must keep describing them."""
    if not output.exists(RUN_CONFIG):
        return
    saved = output.uri(RUN_CONFIG)
    old = config_from_dict(yaml.safe_load(output.read_text(RUN_CONFIG))).model
    changed = [f"model.{k}: {getattr(old, k)!r} -> {v!r}" for k, v in vars(cfg.model).items()
               if k not in RESUME_FREE_MODEL_SETTINGS and getattr(old, k) != v]
    if changed:
        raise UserInputError(f"--resume with model settings other than the run's ({'; '.join(changed)}): its "
                             f"checkpoints hold the old ones; resume with the run's config ({saved}), or "
                             f"--overwrite / another train.output_dir to start a new run")


def _prepare_run_dir(cfg: Config, output: OutputFolder, resume: bool, overwrite: bool) -> None:
    storage = cfg.train.storage_path or cfg.train.output_dir
    if overwrite:
        output.remove(*OUTPUT_SUBDIRS)
    run_dir = f"{storage.rstrip('/')}/{RUN_NAME}"
    exists = check_storage(run_dir, "train.storage_path")  # remote: also fails fast when unreachable
    if exists and not is_remote(run_dir) and not any(Path(run_dir).glob("checkpoint_*")):
        logger.info("%s holds no checkpoint (a run that failed before its first one): replacing it", run_dir)
        shutil.rmtree(run_dir)
        exists = False
    if not exists:
        if resume:
            logger.info("nothing to resume in %s: starting a new run", run_dir)
        return
    if resume:
        _check_resume_sizes(cfg, output)
    if overwrite and is_remote(run_dir):
        remove_tree(run_dir)
    elif overwrite:
        shutil.rmtree(run_dir)
    elif not resume:
        raise UserInputError(f"'{run_dir}' already holds a training run: pass --resume to continue it, --overwrite "
                             f"to start over, or set train.output_dir to another folder")


VALIDATION_EXAMPLE_COLUMNS = ["caption", "phrases", "boxes", "reference_crops"]


def load_datasets(cfg: Config) -> dict[str, Any]:
    """The train and val splits of the built dataset as Ray Datasets (the val split may be empty).

    Train reads only the columns training uses (``training_columns``), with the Parquet files in a random order at
    read time, reseeded every epoch (Ray Data mixes ``train.seed`` with its execution index): no all-to-all step
    stands between the read and the first batch, whatever the dataset's size. Within files, rows are mixed by each
    worker's local shuffle buffer (``train.shuffle_buffer_rows``)."""
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data.expressions import col

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # deterministic epochs (checkpoint data-position semantics)
    context.enable_progress_bars = False  # every epoch of every worker would draw its own; training prints steps
    uri = dataset_samples_uri(cfg)
    filesystem, files = _parquet_files(uri)
    columns = methods.training_columns(cfg, pq.read_schema(files[0], filesystem=filesystem).names) if files else None
    size_gb = sum(info.size or 0 for info in filesystem.get_file_info(files)) / 2**30
    materialize = size_gb <= cfg.train.materialize_max_gb
    # A materialized split is read once: its file order stays that of the seed, and epochs differ by the local shuffle
    shuffle = FileShuffleConfig(seed=cfg.train.seed, reseed_after_execution=not materialize)
    train = ray.data.read_parquet(uri, columns=columns and [*columns, "split"], shuffle=shuffle)
    train = train.filter(expr=col("split") == "train")
    if materialize:
        logger.info("dataset %.3f GB <= train.materialize_max_gb: reading its train split once into the object store",
                    size_gb)
        train = train.materialize()
    val_columns = columns and sorted({*columns, *VALIDATION_EXAMPLE_COLUMNS, "split"})
    val = ray.data.read_parquet(uri, columns=val_columns).filter(expr=col("split") == "val")
    return {"train": train, "val": val}


def dataset_columns(cfg: Config) -> list[str]:
    """The columns of the built dataset's samples (from the Parquet footers): which encodings it caches."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    uri = dataset_samples_uri(cfg)
    filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    return pads.dataset(path, filesystem=filesystem, format="parquet").schema.names


def _parquet_files(uri: str) -> tuple[Any, list[str]]:
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return filesystem, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _validation_examples(val: Any, count: int) -> list[dict[str, Any]]:
    if count <= 0:
        return []
    return [ValidationExample.from_row(row).__dict__
            for row in val.select_columns(VALIDATION_EXAMPLE_COLUMNS).take(count)]


def _fidelity_spec(cfg: Config, val: Any) -> dict[str, Any]:
    """What a sweep trial's fidelity evaluation generates (mpalign.eval.fidelity): benchmark requests, or val-split
    examples whose reference crops the worker writes out itself (the driver's disk may not be the worker's)."""
    from mpalign.eval.fidelity import benchmark_requests

    if cfg.tune.eval_benchmark:
        return {"requests": benchmark_requests(cfg), "examples": []}
    examples = _validation_examples(val, cfg.tune.eval_samples)
    if not examples:
        raise UserInputError("the dataset has no val rows for the sweep's fidelity evaluation: raise "
                             "data.val_fraction, set tune.eval_benchmark, or set tune.metric=diffusion")
    return {"requests": [], "examples": examples}


def run_training(cfg: Config, *, resume: bool = False, overwrite: bool = False, callbacks: Sequence[Any] = (),
                 fidelity: bool = False) -> TrainingOutcome:
    """Train with Ray Train and export the final adapter; connects to Ray (``RAY_ADDRESS``) or starts a local one.
    ``fidelity`` (sweep trials): every validation also generates and scores the held-out set of ``tune.eval_*``
    and the reports' ``objective`` becomes ``tune.metric`` (mpalign.eval.fidelity)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    check_config(cfg)
    cfg = _resolve_paths(cfg)
    output = OutputFolder(cfg.train.output_dir)
    _prepare_run_dir(cfg, output, resume, overwrite)
    output.make_folders()
    output.write_text(RUN_CONFIG, cfg.to_yaml())
    start_ray()
    datasets = load_datasets(cfg)
    train_cfg = cfg.train
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "val_examples": _validation_examples(datasets["val"], train_cfg.val_num_images if train_cfg.val_every
                                                 else 0),
            "fidelity": _fidelity_spec(cfg, datasets["val"]) if fidelity else None,
            "dataset_columns": dataset_columns(cfg),
            "verbose": verbose_console(),  # workers of a `ray job submit` do not inherit the job driver's environment
        },
        scaling_config=ray.train.ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=train_cfg.storage_path or train_cfg.output_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (resources requested, worker group started, ...) stay in its log files
            logging_config=ray.LoggingConfig(log_level="INFO" if verbose_console() else "WARNING"),
        ),
        datasets=datasets,
        # every worker sees the whole (small) val split: validation does not depend on the number of workers
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        source = Path(checkpoint_dir) / (EMA_ADAPTER_DIR if (Path(checkpoint_dir) / EMA_ADAPTER_DIR).exists()
                                         else ADAPTER_DIR)
        output.remove(FINAL_ADAPTER)
        output.upload(source, FINAL_ADAPTER)
    adapter_dir = output.uri(FINAL_ADAPTER)
    logger.info("final adapter written to %s", adapter_dir)
    return TrainingOutcome(str(output), adapter_dir, result.checkpoint.path, dict(result.metrics or {}))


# --------------------------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------------------------


def _deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The JSON config with its "auto" entries filled from the ``train`` section."""
    ds_config = json.loads(Path(cfg.train.deepspeed_config).read_text())
    train = cfg.train
    autos = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum_steps,
             "gradient_clipping": train.max_grad_norm}
    for key, value in autos.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    ds_config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    params = ds_config.get("optimizer", {}).get("params", {})
    for key, value in (("lr", train.lr), ("weight_decay", train.weight_decay)):
        if params.get(key) == "auto":
            params[key] = value
    return ds_config


def _build_engine(module: torch.nn.Module, cfg: Config, device: torch.device, world_size: int):
    """(model to step, optimizer or None, lr scheduler or None): DDP via Ray, or a DeepSpeed engine."""
    import ray.train.torch

    if cfg.train.strategy == "deepspeed":
        import deepspeed

        if device.type == "cpu":
            # On CPU, DeepSpeed's first init JIT-compiles a shared-memory all-reduce kernel (a minute of g++ on every
            # fresh machine, and a build killed half-way leaves a lock that hangs every later run); gloo needs none.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_config = _deepspeed_config(cfg, world_size)
        optimizer = None if "optimizer" in ds_config else build_optimizer(module, cfg.train)
        engine, optimizer, _, lr_scheduler = deepspeed.initialize(
            model=module, model_parameters=module.trainable_parameters(), optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.train))
        return engine, None, lr_scheduler
    model = ray.train.torch.prepare_model(module, move_to_device=device,
                                          parallel_strategy_kwargs={"find_unused_parameters": True})
    # alpha = 0 during warm-up leaves the projectors out of the graph: DDP must tolerate unused parameters
    optimizer = build_optimizer(module, cfg.train)
    return model, optimizer, build_lr_scheduler(optimizer, cfg.train)


def _mean_across_workers(metrics: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    if world_size == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world_size).tolist()))


class RayInfoOffConsole(logging.Filter):
    """Drops Ray's own INFO records. Ray Train's log level (``RunConfig.logging_config``) reaches its ``ray.train``
    loggers only; a worker's "Reporting training result ..." line per report (the whole metrics dict) is logged
    under a file-path name and reaches the console through the root logger."""

    def __init__(self):
        import ray

        super().__init__()
        self.ray_dir = str(Path(ray.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_dir)


def _quiet_worker_console() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(RayInfoOffConsole())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: build the model, restore the last checkpoint, step until ``max_steps``."""
    import ray.train
    import ray.train.torch

    if not loop_config["verbose"]:
        _quiet_worker_console()
    started = time.perf_counter()  # the share of the worker's time spent on fidelity evaluations is measured from here
    cfg = config_from_dict(loop_config["config"])
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    seed_everything(train.seed + rank)

    # Frozen encoders whose outputs the dataset caches are not kept; the validation grid needs the VAE, text and
    # image encoders. Every rank loads the same set: DDP broadcasts rank 0's module state to the others.
    module = methods.training_module(cfg, device=device, cached_keys=loop_config["dataset_columns"],
                                     generation=bool(loop_config["val_examples"] or loop_config["fidelity"]))
    if train.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    module.train()
    model, optimizer, lr_scheduler = _build_engine(module, cfg, device, world_size)
    state = TrainingState(optimizer=optimizer, lr_scheduler=lr_scheduler,
                          generator=torch.Generator().manual_seed(train.seed + 7919 * rank),
                          ema=build_ema(module, train), grad_scaler=make_grad_scaler(train, device))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(directory, model, state, rank, train.seed)

    # rank 0's side outputs (TensorBoard, validation grids, fidelity images) go to train.output_dir, through a local
    # staging folder when that is on object storage
    outputs = StagedFolder(train.output_dir) if rank == 0 else None
    metrics_logger = (make_logger(train.logger, outputs.path, RUN_NAME, loop_config["config"])
                      if outputs is not None else NullLogger())

    collate = methods.collate_fn(cfg)
    rows_per_step = train.batch_size * train.grad_accum_steps
    val_batches: list[dict[str, torch.Tensor]] = []
    if rank == 0 and train.val_every > 0:
        val_iter = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=train.batch_size,
                                                                        collate_fn=collate)
        val_batches = list(islice(val_iter, train.val_batches))
        if not val_batches:
            logger.warning("the dataset has no val rows: validation is skipped")
    val_examples = [ValidationExample(**e) for e in loop_config["val_examples"]]
    grid = ValidationGrid(cfg, val_examples) if rank == 0 and val_examples else None
    fidelity = None if outputs is None else _fidelity_evaluation(cfg, loop_config["fidelity"], outputs.path, device)
    train_shard = ray.train.get_dataset_shard("train")
    reporter = StepReporter(cfg, model, state, rank, world_size, device, metrics_logger, val_batches, grid, fidelity,
                            started, outputs)

    images_per_step = rows_per_step * world_size
    last_time = time.perf_counter()
    while state.step < train.max_steps:
        position = state.position
        rows = train_shard.iter_batches(
            batch_size=rows_per_step, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=max(train.shuffle_buffer_rows, rows_per_step),
            local_shuffle_seed=train.seed + position.epoch)
        yielded = 0
        for index, batch in collate_after_skip(rows, collate, position.batches_in_epoch):
            yielded += 1
            if batch is None:
                continue  # already consumed before the checkpoint this run resumed from
            step_metrics = train_step(model, optimizer, batch, state.step, device=device,
                                      grad_accum_steps=train.grad_accum_steps, mixed_precision=train.mixed_precision,
                                      max_grad_norm=train.max_grad_norm, lr_scheduler=lr_scheduler,
                                      grad_scaler=state.grad_scaler, ema=state.ema, generator=state.generator)
            state.step += 1
            state.position = DataPosition(position.epoch, index + 1)
            if step_metrics.get("skipped"):
                state.skipped_steps += 1
                logger.warning("worker %d: step %d had a non-finite loss or gradient norm (loss %s, grad_norm %s): "
                               "update skipped (%d so far)", rank, state.step, step_metrics.get("loss"),
                               step_metrics.get("grad_norm"), state.skipped_steps)
            now = time.perf_counter()
            step_metrics["img_per_s"] = images_per_step / max(now - last_time, 1e-9)
            last_time = now
            if device.type == "cuda":
                step_metrics["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            reporter.end_of_step(step_metrics)
            last_time = time.perf_counter()  # reporting, validation and checkpoints are not step time
            if state.step >= train.max_steps:
                break
        else:
            if yielded == 0:
                raise RuntimeError(f"worker {rank}'s shard of the train split holds fewer than {rows_per_step} rows "
                                   f"(train.batch_size x train.grad_accum_steps): lower them or use fewer workers")
            state.position = DataPosition(position.epoch + 1, 0)
    metrics_logger.close()
    if outputs is not None:
        outputs.close()


def _fidelity_evaluation(cfg: Config, spec: dict[str, Any] | None, output_dir: Path,
                         device: torch.device) -> Any:
    """The trial's fidelity evaluation (rank 0), its held-out requests written under ``<output_dir>/fidelity``."""
    if spec is None:
        return None
    from mpalign.eval.fidelity import FIDELITY_DIR, FidelityEvaluation, example_requests

    out_dir = output_dir / FIDELITY_DIR
    requests = spec["requests"] or example_requests([ValidationExample(**e) for e in spec["examples"]],
                                                    out_dir / "references", cfg.tune.eval_seed)
    return FidelityEvaluation(cfg, requests, out_dir, device)


def collate_after_skip(batches: Iterable[Any], collate: Callable[[Any], Any], skip: int
                       ) -> Iterator[tuple[int, Any]]:
    """``(index, collated batch)`` for each batch of an epoch, except that the first ``skip`` (the batches consumed
    before the checkpoint a run resumes from) come as ``(index, None)`` without being collated. The next batch is
    collated in a background thread while the caller steps on the current one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[int, Future] | None = None
        for index, batch in enumerate(batches):
            if index < skip:
                yield index, None
                continue
            job = (index, pool.submit(collate, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


class StepReporter:
    """What happens after each step on one worker: TensorBoard/MLflow (rank 0, every step), and on the report
    schedule of ``cfg.train``: validation (rank 0), a checkpoint, and one Ray Train report carrying the mean of every
    step metric since the previous report, averaged over workers."""

    def __init__(self, cfg: Config, model: torch.nn.Module, state: TrainingState, rank: int, world_size: int,
                 device: torch.device, metrics_logger: Any, val_batches: list[dict[str, torch.Tensor]],
                 grid: ValidationGrid | None, fidelity: Any = None, started: float | None = None,
                 outputs: StagedFolder | None = None):
        self.cfg, self.model, self.state, self.outputs = cfg, model, state, outputs
        self.rank, self.world_size, self.device = rank, world_size, device
        self.metrics_logger, self.val_batches, self.grid = metrics_logger, val_batches, grid
        self.fidelity, self.started = fidelity, time.perf_counter() if started is None else started
        self.eval_seconds = 0.0
        self.resumed_from = state.step
        self.window: dict[str, list[float]] = {}

    def end_of_step(self, step_metrics: dict[str, float]) -> None:
        import ray
        import ray.train

        train, step = self.cfg.train, self.state.step
        self.metrics_logger.log_scalars(step_metrics, step)
        for key, value in step_metrics.items():
            self.window.setdefault(key, []).append(value)
        last = step >= train.max_steps
        checkpoint_now = step % train.checkpoint_every == 0 or last
        validate_now = train.val_every > 0 and (step % train.val_every == 0 or last)
        if not (step % train.log_every == 0 or checkpoint_now or validate_now):
            return
        window_mean = {key: sum(values) / len(values) for key, values in self.window.items()}
        self.window = {}
        metrics: dict[str, Any] = _mean_across_workers(window_mean, self.world_size, self.device)
        metrics.update(step=step, epoch=self.state.position.epoch, resumed_from_step=self.resumed_from,
                       skipped_steps=self.state.skipped_steps,  # the same on every worker (the flag is all-reduced)
                       placement_group_id=ray.get_runtime_context().get_placement_group_id())  # see sweep.TrialEnds
        if validate_now and self.rank == 0:
            metrics.update(self._validate())
        if self.rank == 0 and self.fidelity is None:  # a sweep trial (fidelity): the sweep prints a line per trial
            logger.info(progress_line(metrics, train.max_steps))  # Ray Train routes worker logs to the driver
        if not checkpoint_now:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mpalign-ckpt-") as directory:
            save_checkpoint(directory, self.model, self.state, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def _validate(self) -> dict[str, float]:
        module, step = unwrap(self.model), self.state.step
        metrics = validation_metrics(module, self.val_batches, step, seed=self.cfg.train.seed, device=self.device)
        if self.grid is not None or self.fidelity is not None:
            # generation with the training module's own models and adapter (EMA weights swapped in when on)
            with ema_weights(module, self.state.ema), module_generation(module) as pipeline:
                if self.grid is not None:
                    image = self.grid.render(pipeline)
                    save_grid(image, self.outputs.path / "validation", step)
                    self.metrics_logger.log_image("val/generations", image, step)
                if self.fidelity is not None:
                    metrics.update(self.fidelity(pipeline, step))
        if self.fidelity is not None:
            from mpalign.eval.fidelity import objective

            self.eval_seconds += metrics["eval_seconds"]
            metrics["eval_seconds"] = self.eval_seconds  # so far in this run, and its share of the worker's time
            metrics["eval_share"] = self.eval_seconds / (time.perf_counter() - self.started)
            metrics["objective"] = objective(metrics, self.cfg.tune.metric, self.cfg.tune.min_clip_t)
        self.metrics_logger.log_scalars(metrics, step)
        if self.outputs is not None:
            self.outputs.sync()
        return metrics


def progress_line(metrics: dict[str, Any], max_steps: int) -> str:
    """One line per report on the driver's console: the main loss terms, then validation when it ran."""
    parts = [f"step {metrics['step']}/{max_steps}"]
    parts += [f"{key} {metrics[key]:.4g}" for key in ("loss", "diffusion", "cross", "self", "scal", "mdl", "alpha", "lr")
              if key in metrics]
    parts.append(f"{metrics['img_per_s']:.1f} img/s")
    if metrics.get("skipped_steps"):
        parts.append(f"non-finite steps skipped {metrics['skipped_steps']}")
    if "objective" in metrics:
        parts.append(f"| val objective {metrics['objective']:.4g}")
        parts += [f"{key[4:]} {metrics[key]:.3f}" for key in ("val_cos_cross", "val_scal") if key in metrics]
    if "eval_share" in metrics:
        parts.append(f"fidelity eval {metrics['eval_share']:.0%} of the time")
    return "  ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpalign.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in train.output_dir from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="delete the run in train.output_dir and start over")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    check_writable(cfg.train.output_dir, "train.output_dir", folder=True, remote_ok=True)
    outcome = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in outcome.metrics.items()}
    print(f"trained to step {summary.get('step')}: adapter in {outcome.adapter_dir}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
