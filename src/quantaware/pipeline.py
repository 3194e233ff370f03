"""The whole workflow in one file: ``quantaware run PIPELINE.yaml``.

Six steps, each a section of the file:

1. ``model``: where the float model comes from (``source``: ``MODULE:FUNCTION``,
   ``file.py:FUNCTION``, a Hugging Face folder; optional ``weights``);
2. ``data``: ``train``, ``calibration`` and ``evaluation`` sources (see
   :func:`quantaware.sources.load_data`), sample limits and image options;
3. ``baseline``: train the float model (``train: {epochs, lr}``) or use it as
   loaded (``train`` absent);
4. ``quantization``: preset and calibration method (PTQ);
5. ``qat`` (optional): quantization-aware training from the PTQ model, with
   distillation from the float model;
6. ``evaluation`` and ``deploy``: for each of ``deploy.targets`` (``onnx``,
   ``tflite``) the float and INT8 files side by side in their runtime (ONNX
   Runtime, LiteRT: accuracy, agreement, size, latency), ``verify`` of each
   deployed file against its torch model there. ``quantization.target: litert``
   quantizes for LiteRT (:func:`quantaware.deploy.quantize_for_backend`).

Every step writes its result into ``out`` and records it in
``out/pipeline-state.json`` with a fingerprint of the settings it depends on;
running the file again skips the steps whose settings did not change (a killed
QAT run continues from its last epoch checkpoint). The file is validated before
anything runs: an unknown key or a bad value is reported with its path in the
file (``quantization.method``) and the allowed values. A ``fast:`` section holds
overrides applied with ``--fast`` (few samples, one epoch), so CI can run
every example.

Example:
    >>> cfg = validate({"model": {"source": "quantaware.models:DigitsCNN"},
    ...                 "data": {"train": "digits"}})
    >>> cfg["quantization"]["preset"], cfg["qat"]
    (None, None)
    >>> validate({"model": {"source": "x:y"}, "data": {"train": "digits"},
    ...           "quantization": {"method": "max"}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    quantaware.pipeline.PipelineError: quantization.method: 'max' is not one of minmax, ...
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware._batch import (
    cat_inputs,
    forward_parameters,
    input_args,
    inputs_size,
    take_inputs,
)
from quantaware.backends import MAX_THREADS

__all__ = ["PipelineError", "load_pipeline", "run_pipeline", "validate"]

Event = Callable[[str], None]


class PipelineError(ValueError):
    """A pipeline file that cannot run; the message names the key and the fix."""


# -- schema ----------------------------------------------------------------------------

_REQUIRED = object()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_float(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _preset(value: Any) -> bool:
    from quantaware import presets

    return _text(value) and value.upper().replace("-", "_") in presets.PRESETS


def _preset_names() -> str:
    from quantaware import presets

    return ", ".join(sorted(presets.PRESETS))


# A leaf is (default, check, description); a dict is a section.
_METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy")
# deploy.targets: file format -> the runtime it is evaluated and verified in.
_TARGETS = {"onnx": "onnxruntime", "tflite": "litert"}
# quantization.target: the runtime the INT8 model is quantized for (deploy.BACKENDS).
_QUANT_TARGETS = {"onnxruntime": "onnxruntime-x86", "litert": "litert"}
SCHEMA: dict[str, Any] = {
    "name": ("pipeline", _text, "a name for reports"),
    "out": ("pipeline-out", _text, "output folder, relative to the pipeline file"),
    "seed": (0, lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
             "an integer from 0 to 2**63 - 1"),
    "threads": (2, lambda v: _positive_int(v) and v <= MAX_THREADS,
                f"an integer from 1 to {MAX_THREADS}"),
    "model": {
        "source": (_REQUIRED, _text, "MODULE:FUNCTION, file.py:FUNCTION or a model folder"),
        "weights": (None, _text, "a state-dict file (.pt/.pth/.safetensors)"),
    },
    "data": {
        "train": (_REQUIRED, _text, "a data source (digits, mnist1d, image folder, ...)"),
        "calibration": (None, _text, "a data source (default: train)"),
        "evaluation": (None, _text, "a data source (default: train's test split)"),
        "labels": (None, _text, "a labels file: class names in model output order"),
        "batch_size": (None, _positive_int, "a positive integer (default 64; MODULE:FUNCTION "
                       "data keeps its own batches unless it is given)"),
        "num_train": (None, _positive_int, "a positive integer"),
        "num_calibration": (256, _positive_int, "a positive integer"),
        "num_evaluation": (None, _positive_int, "a positive integer"),
        "image_size": (224, _positive_int, "a positive integer"),
        "image_resize": (None, _positive_int, "a positive integer"),
    },
    "baseline": {
        "train": {
            "epochs": (10, _positive_int, "a positive integer"),
            "lr": (3e-3, _positive_float, "a positive number"),
        },
    },
    "quantization": {
        "preset": (None, _preset, "a preset name: " + _preset_names()),
        "method": (None, lambda v: v in _METHODS, "one of " + ", ".join(_METHODS)),
        "target": ("onnxruntime", lambda v: isinstance(v, str) and v in _QUANT_TARGETS,
                   "one of " + ", ".join(_QUANT_TARGETS) + " (the runtime quantized for)"),
        "skip": ([], lambda v: isinstance(v, list) and all(_text(p) for p in v),
                 "a list of layer names or fnmatch patterns kept in float (PTQ and QAT)"),
    },
    "qat": {
        "preset": (None, _preset, "a preset name (default: the quantization step's "
                   "config): " + _preset_names()),
        "epochs": (3, _positive_int, "a positive integer"),
        "lr": (1e-4, _positive_float, "a positive number"),
        "distill": (True, lambda v: isinstance(v, bool), "true or false"),
        "temperature": (4.0, _positive_float, "a positive number"),
    },
    "evaluation": {
        "latency_runs": (30, _positive_int, "a positive integer"),
    },
    "deploy": {
        "targets": (["onnx"], lambda v: isinstance(v, list)
                    and all(isinstance(t, str) and t in _TARGETS for t in v)
                    and len(set(v)) == len(v),
                    "a list of distinct formats from " + ", ".join(_TARGETS)
                    + " ([] to stop after training; LiteRT files are tflite)"),
        "verify": (True, lambda v: isinstance(v, bool), "true or false"),
    },
}
# Sections that may be left out (null) as a whole: the step is skipped.
_OPTIONAL_SECTIONS = {"qat", "baseline.train"}


def _check(section: dict[str, Any], value: Any, path: str) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: expected a mapping of keys {', '.join(section)}, got "
                            f"{type(value).__name__}")
    unknown = sorted(set(value) - set(section))
    if unknown:
        where = f"{path}." if path else ""
        raise PipelineError(f"{where}{unknown[0]}: unknown key; allowed here: "
                            f"{', '.join(section)}")
    out: dict[str, Any] = {}
    for key, spec in section.items():
        full = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            if full in _OPTIONAL_SECTIONS and (key not in value or value[key] is None):
                out[key] = None
            else:
                out[key] = _check(spec, value.get(key), full)
            continue
        default, check, description = spec
        if key not in value or value[key] is None:
            if default is _REQUIRED:
                raise PipelineError(f"{full}: required ({description})")
            out[key] = copy.deepcopy(default)
        elif not check(value[key]):
            shown = value[key]
            if description.startswith("one of "):
                raise PipelineError(f"{full}: {shown!r} is not {description}")
            raise PipelineError(f"{full}: got {shown!r}; expected {description}")
        else:
            out[key] = value[key]
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate(raw: dict[str, Any], fast: bool = False) -> dict[str, Any]:
    """Check a pipeline mapping against the schema and fill in defaults.

    With ``fast`` the file's ``fast:`` section (same keys) is merged in first.
    """
    if not isinstance(raw, dict):
        raise PipelineError("the pipeline file must be a mapping of sections (model, data, "
                            "baseline, quantization, qat, evaluation, deploy)")
    raw = dict(raw)
    version = raw.pop("version", 1)
    if version != 1:
        raise PipelineError(f"version: {version!r} is not supported; this quantaware reads "
                            "version 1")
    overrides = raw.pop("fast", None)
    checked = _check_litert(_check(SCHEMA, raw, ""))
    if overrides is None:
        return checked
    if not isinstance(overrides, dict):
        raise PipelineError("fast: expected a mapping with the same sections as the file")
    try:
        merged = _check_litert(_check(SCHEMA, _merge(raw, overrides), ""))
    except PipelineError as exc:
        raise PipelineError(f"fast: {exc}") from exc
    return merged if fast else checked


def _check_litert(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pipeline that deploys to LiteRT needs presets with a full-integer LiteRT form:
    refused here, before hours of training, not at the last step."""
    if "tflite" not in cfg["deploy"]["targets"] and cfg["quantization"]["target"] != "litert":
        return cfg
    from quantaware import presets
    from quantaware.export.tflite import litert_problem

    qat_preset = (cfg["qat"] or {}).get("preset")
    for key, name in (("quantization.preset", cfg["quantization"]["preset"]),
                      ("qat.preset", qat_preset)):
        problem = None if name is None else litert_problem(presets.get(name))
        if problem is not None:
            raise PipelineError(f"{key}: {problem} (deploy.targets lists tflite or "
                                "quantization.target is litert)")
    return cfg


def load_pipeline(path: str | os.PathLike, fast: bool = False) -> dict[str, Any]:
    """Read and validate a YAML pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline file {str(path)!r} does not exist")
    try:
        import yaml
    except ImportError as exc:
        raise ImportError("pipeline files need PyYAML: pip install pyyaml") from exc
    class _UniqueKeys(yaml.SafeLoader):
        """A key given twice in one mapping is an error (YAML keeps the last silently)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one section",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # a SafeLoader
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not a text file ({exc}); give a YAML pipeline "
                            "file") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return validate(raw, fast=fast)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from exc


# -- running ---------------------------------------------------------------------------


def _stamp(value: str | None) -> Any:
    """Size and modification time of the file a source names (for ``module:function``,
    the module's file), or of each folder below a data folder with its file count.
    ``None`` for built-in names and what cannot be found."""
    if not value:
        return None
    head = value.rpartition(":")[0] if ":" in value and not Path(value).exists() else value
    path = Path(head)
    if not path.exists() and head and not head.endswith(".py"):
        try:
            found = importlib.util.find_spec(head)
        except (ImportError, ValueError):
            return None
        if found is None or not found.origin or not Path(found.origin).is_file():
            return None
        path = Path(found.origin)
    try:
        if path.is_file():
            stat = path.stat()
            return [stat.st_size, stat.st_mtime_ns]
        if path.is_dir():
            # Per folder: its time (a file added, removed or renamed), its file count,
            # and its files' total size and newest time (a file rewritten in place).
            stamp = []
            for root, dirs, _ in os.walk(path):
                dirs.sort()
                count = size = newest = 0
                with os.scandir(root) as entries:
                    for entry in entries:
                        if entry.is_file():
                            info = entry.stat()
                            count, size = count + 1, size + info.st_size
                            newest = max(newest, info.st_mtime_ns)
                stamp.append([os.stat(root).st_mtime_ns, count, size, newest])
            return stamp
    except OSError:
        return None
    return None


def _cached(path: Path, load: Callable[[Path], Any], say: Callable[[str], None]) -> Any:
    """A finished step's saved result, or ``None`` when the file is missing or cannot
    be read (the step then runs again: these files are the pipeline's own)."""
    from quantaware.checkpoint import CheckpointError
    from quantaware.sources import SourceError

    if not path.is_file():
        return None
    try:
        return load(path)
    except (CheckpointError, SourceError) as exc:
        say(f"      {path.name} cannot be read ({exc}); running the step again")
        return None


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """``pipeline-state.json``: finished steps and their fingerprints."""

    def __init__(self, out: Path) -> None:
        self.path = out / "pipeline-state.json"
        self.steps: dict[str, Any] = {}
        if self.path.is_file():
            try:
                steps = json.loads(self.path.read_text())["steps"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                steps = {}
            # a damaged or foreign file: its steps are run again, not trusted
            if isinstance(steps, dict):
                self.steps = {k: v for k, v in steps.items() if isinstance(v, dict)
                              and isinstance(v.get("fingerprint"), str)}

    def done(self, step: str, fingerprint: str) -> dict[str, Any] | None:
        entry = self.steps.get(step)
        if entry and entry.get("fingerprint") == fingerprint and isinstance(
                entry.get("result"), dict):
            return entry["result"]
        return None

    def record(self, step: str, fingerprint: str, result: dict[str, Any]) -> None:
        from quantaware.deploy_bench import write_json

        self.steps[step] = {"fingerprint": fingerprint, "result": result}
        write_json({"steps": self.steps}, self.path)  # type: ignore[arg-type]


def _loader_batches(data: Any, seed: int, epoch: int) -> list[Any]:
    """The training batches in a shuffled order that depends on seed and epoch only."""
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    xs = cat_inputs([b[0] for b in data.batches])
    ys = torch.cat([b[1] for b in data.batches])
    order = torch.randperm(inputs_size(xs), generator=gen)
    size = inputs_size(data.batches[0][0])
    return [(take_inputs(xs, order[i:i + size]), ys[order[i:i + size]])
            for i in range(0, len(order), size)]


def _accuracy(model: nn.Module, data: Any) -> float | None:
    if not data.labeled:
        return None
    from quantaware.train import evaluate_accuracy

    return evaluate_accuracy(model, data.batches)


def _train_baseline(model: nn.Module, train: Any, settings: dict[str, Any], seed: int,
                    say: Event) -> None:
    from quantaware.train import fit

    if not train.labeled:
        raise PipelineError(f"baseline.train needs labelled data; {train.name} has no labels")
    epochs = settings["epochs"]

    def progress(epoch: int, loss: float) -> None:
        say(f"  baseline epoch {epoch}/{epochs}: loss {loss:.4f}")

    fit(model, _Shuffled(train, seed), epochs=epochs, lr=settings["lr"], seed=seed,
        progress=progress)
    model.eval()


class _Shuffled:
    """Training batches reshuffled on every pass, reproducibly (seed and pass number)."""

    def __init__(self, data: Any, seed: int) -> None:
        self.data, self.seed, self.epoch = data, seed, 0

    def __len__(self) -> int:
        return len(self.data.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.epoch += 1
        return iter(_loader_batches(self.data, self.seed, self.epoch))


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on a batch's inputs: a tensor, a tuple of positional inputs or a dict
    of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*input_args(inputs))


def _qat_config(cfg: dict[str, Any], ptq_config: Any) -> Any:
    """The config QAT trains: without ``qat.preset``, the PTQ config itself (its
    preset, calibration method, layers kept float, integer-output rules for LiteRT);
    with it, that preset with the calibration method, the layers kept float and the
    integer-output rules of the PTQ config (:func:`quantaware.deploy.quantize_for_backend`)."""
    from quantaware import presets
    from quantaware.workflow import skip_rules, with_method

    if cfg["qat"]["preset"] is None:
        return ptq_config
    config = with_method(presets.get(cfg["qat"]["preset"]), cfg["quantization"]["method"])
    kept = [rule for rule in ptq_config.overrides if rule.output_only]
    kept += skip_rules(cfg["quantization"]["skip"])
    return config.with_overrides(*kept) if kept else config


def _run_qat(float_model: nn.Module, calib: Any, train: Any, cfg: dict[str, Any],
             out: Path, say: Event, ptq_config: Any) -> nn.Module:
    from quantaware.calibrate import calibrate
    from quantaware.checkpoint import (
        RESUME_FIX,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from quantaware.qat import distillation_loss, prepare_qat

    q = cfg["qat"]
    config = _qat_config(cfg, ptq_config)
    if not train.labeled:
        raise PipelineError(f"qat needs labelled training data; {train.name} has no labels")
    model = prepare_qat(float_model, config, input_args(calib.example))
    ckpt_dir = out / "qat"
    latest = latest_checkpoint(ckpt_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=q["lr"], weight_decay=0.0)
    start = 0
    if latest is not None:
        state = load_checkpoint(latest, fix=RESUME_FIX)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        say(f"  resuming QAT after epoch {start}")
    else:
        calibrate(model, calib.unlabeled)
    teacher = float_model.eval()
    for epoch in range(start + 1, q["epochs"] + 1):
        model.train()
        total = loss_sum = 0.0
        for x, y in _loader_batches(train, cfg["seed"], 10_000 + epoch):
            logits = _call(model, x)
            if q["distill"]:
                with torch.no_grad():
                    soft = _call(teacher, x)
                loss = distillation_loss(logits, soft, y, q["temperature"])
            else:
                loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise PipelineError(f"qat.lr: the loss became {value} in epoch {epoch}; "
                                    f"lower the learning rate (now {q['lr']})")
            loss_sum += value * len(y)
            total += len(y)
        save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pt",
                        {"epoch": epoch, "model": model.state_dict(),
                         "optimizer": opt.state_dict()})
        say(f"  QAT epoch {epoch}/{q['epochs']}: loss {loss_sum / max(total, 1):.4f}")
    return model.eval()


def run_pipeline(path: str | os.PathLike, fast: bool = False, out: str | None = None,
                 say: Event | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline in ``path``; returns the results also written to
    ``out/results.json``.

    Example:
        >>> run_pipeline("examples/digits.yaml", fast=True)  # doctest: +SKIP
    """
    from quantaware.checkpoint import load_checkpoint, save_checkpoint
    from quantaware.deploy_bench import write_json
    from quantaware.sources import is_function_spec, load_data, load_model, read_labels
    from quantaware.workflow import (
        _check_runs,
        check_skip_patterns,
        load_quantized,
        quantize_model,
        save_quantized,
    )

    say = say or (lambda _msg: None)
    path = Path(path)
    cfg = load_pipeline(path, fast=fast)
    base = path.resolve().parent

    def resolve(value: str | None) -> str | None:
        """Paths in the file are relative to it; specs and built-in names stay as given."""
        if value is None:
            return None
        head = value.split(":")[0] if value.count(":") == 1 else value
        candidate = base / head
        if not Path(head).is_absolute() and candidate.exists():
            return str(candidate) + value[len(head):]
        return value

    out_dir = Path(out) if out is not None else base / cfg["out"]
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"out: {str(out_dir)!r} is a file; give a folder for the results")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _State(out_dir)
    # results.json is written last: a run that fails part way leaves none, rather
    # than an earlier run's that no longer describes the files beside it
    (out_dir / "results.json").unlink(missing_ok=True)
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    started = time.perf_counter()
    results: dict[str, Any] = {"name": cfg["name"], "fast": fast, "steps": {}}

    # 1. model
    say("[1/6] model: " + cfg["model"]["source"])
    source = resolve(cfg["model"]["source"])
    model = load_model(source, resolve(cfg["model"]["weights"]))
    module = model.require_torch("a pipeline")

    # 2. data
    d = cfg["data"]
    say("[2/6] data: " + d["train"])
    labels = read_labels(resolve(d["labels"])) if d["labels"] else None
    common = {"size": d["image_size"], "resize": d["image_resize"], "class_names": labels}

    def batch_size(spec: str) -> int | None:
        given = d["batch_size"]
        return given if given is not None or is_function_spec(spec) else 64

    train_spec = resolve(d["train"])
    calib_spec = resolve(d["calibration"]) or train_spec
    eval_spec = resolve(d["evaluation"]) or train_spec
    train = load_data(train_spec, model, split="train", limit=d["num_train"],
                      batch_size=batch_size(train_spec), **common)
    calib = load_data(calib_spec, model, split="train", limit=d["num_calibration"],
                      batch_size=batch_size(calib_spec), **common)
    evaluation = load_data(eval_spec, model, split="test", limit=d["num_evaluation"],
                           batch_size=batch_size(eval_spec), **common)
    _check_runs(module, train, "data.image_size")  # before anything is trained or saved
    check_skip_patterns(module, cfg["quantization"]["skip"], "quantization.skip")
    # The files behind the model and data take part too: a weights file or an image
    # folder changed under the same name must not be taken for the finished steps'.
    sources = [resolve(cfg["model"]["source"]), resolve(cfg["model"]["weights"]), train_spec,
               calib_spec, eval_spec, resolve(d["labels"])]
    stamps = {v: _stamp(v) for v in dict.fromkeys(sources)}  # each folder read once
    data_fp = _fingerprint(cfg["model"], d, cfg["seed"], [stamps[v] for v in sources])

    # 3. baseline
    baseline_fp = _fingerprint(data_fp, cfg["baseline"])
    float_path = out_dir / "float.pt"
    done = state.done("baseline", baseline_fp)
    saved = _cached(float_path, load_checkpoint, say) if done is not None else None
    if done is not None and saved is not None:
        say("[3/6] baseline: done before, loading " + float_path.name)
        module.load_state_dict(saved["model"])
        baseline = done
    else:
        if cfg["baseline"]["train"] is not None:
            say(f"[3/6] baseline: training {cfg['baseline']['train']['epochs']} epoch(s)")
            _train_baseline(module, train, cfg["baseline"]["train"], cfg["seed"], say)
        else:
            say("[3/6] baseline: using the model as loaded")
        save_checkpoint(float_path, {"model": module.state_dict()})
        baseline = {"trained": cfg["baseline"]["train"] is not None,
                    "float_accuracy": _accuracy(module, evaluation)}
        state.record("baseline", baseline_fp, baseline)
    module.eval()
    results["steps"]["baseline"] = baseline

    # 4. quantization (PTQ)
    ptq_fp = _fingerprint(baseline_fp, cfg["quantization"])
    ptq_ckpt = out_dir / "ptq-int8.pt"
    done = state.done("quantization", ptq_fp)
    ptq = (_cached(ptq_ckpt, lambda p: load_quantized(p, model, calib.example), say)
           if done is not None else None)
    if done is not None and ptq is not None:
        say("[4/6] quantization: done before")
        quant = done
    else:
        say(f"[4/6] quantization: calibrating on {calib.num_samples} samples")
        ptq, config = quantize_model(model, calib, cfg["quantization"]["preset"],
                                     cfg["quantization"]["method"],
                                     _QUANT_TARGETS[cfg["quantization"]["target"]],
                                     cfg["quantization"]["skip"])
        save_quantized(ptq_ckpt, ptq, config, model.name)
        quant = {"config": config.name, "ptq_accuracy": _accuracy(ptq, evaluation)}
        state.record("quantization", ptq_fp, quant)
    results["steps"]["quantization"] = quant

    # 5. QAT (optional)
    qat_model = None
    if cfg["qat"] is not None:
        # the resolved config takes part: how it is derived may change between versions
        qat_fp = _fingerprint(ptq_fp, cfg["qat"],
                              _qat_config(cfg, ptq.quantaware_config).to_dict())
        qat_path = out_dir / "qat-final.pt"
        done = state.done("qat", qat_fp)
        saved = _cached(qat_path, load_checkpoint, say) if done is not None else None
        if done is not None and saved is not None:
            say("[5/6] QAT: done before")
            from quantaware.qat import prepare_qat

            qat_model = prepare_qat(module, _qat_config(cfg, ptq.quantaware_config),
                                    input_args(calib.example))
            qat_model.load_state_dict(saved["model"])
            qat_model.eval()
            qat_result = done
        else:
            if (out_dir / "qat").exists() and state.steps.get("qat", {}).get(
                    "fingerprint") != qat_fp:
                import shutil

                shutil.rmtree(out_dir / "qat")  # epoch checkpoints of other settings
            state.record("qat", qat_fp, None)  # checkpoints from now on belong to these
            say(f"[5/6] QAT: {cfg['qat']['epochs']} epoch(s)")
            qat_model = _run_qat(module, calib, train, cfg, out_dir, say, ptq.quantaware_config)
            save_checkpoint(qat_path, {"model": qat_model.state_dict()})
            qat_result = {"qat_accuracy": _accuracy(qat_model, evaluation)}
            state.record("qat", qat_fp, qat_result)
        results["steps"]["qat"] = qat_result
    else:
        say("[5/6] QAT: not configured")

    # 6. evaluation and deployment
    results["files"] = {}
    if not cfg["deploy"]["targets"]:
        say("[6/6] deploy: no targets")
        results["evaluation"] = {}
        results["seconds"] = time.perf_counter() - started
        results["files"]["results"] = str(write_json(results, out_dir / "results.json"))  # type: ignore[arg-type]
        return results
    say("[6/6] deploy and evaluate")
    from quantaware.export.onnx import ExportError
    from quantaware.sources import SourceError

    files, evaluations, failed = {}, {}, {}
    models = {"float": module, "ptq": ptq}
    if qat_model is not None:
        models["qat"] = qat_model
    for suffix in cfg["deploy"]["targets"]:
        backend = _TARGETS[suffix]
        try:
            _deploy_target(suffix, backend, models, files, evaluations, cfg, quant,
                           calib, evaluation, out_dir, model.tokenizer is not None,
                           forward_parameters(module), say)
        except (PipelineError, SourceError, ExportError, ImportError, RuntimeError) as exc:
            # The other targets' results still get written.
            failed[suffix] = f"{type(exc).__name__}: {exc}"
            say(f"  {suffix}: failed: {failed[suffix]}")
    results["evaluation"] = evaluations
    results["files"] = {k: str(v) for k, v in files.items()}
    if failed:
        results["failed_targets"] = failed
    results["seconds"] = time.perf_counter() - started
    results["files"]["results"] = str(write_json(results, out_dir / "results.json"))  # type: ignore[arg-type]
    if failed:
        suffix, message = next(iter(failed.items()))
        raise PipelineError(f"deploy.targets: {suffix} failed ({message}); the results of the "
                            f"other steps are in {results['files']['results']}")
    return results


def _deploy_target(suffix: str, backend: str, models: dict[str, nn.Module],
                   files: dict[str, Any], evaluations: dict[str, Any], cfg: dict[str, Any],
                   quant: dict[str, Any], calib: Any, evaluation: Any, out_dir: Path,
                   text: bool, parameters: list[str], say: Event) -> None:
    """Export the float, PTQ and QAT models in ``suffix``'s format, compare each
    quantized one with the float one in ``backend`` and verify it there."""
    from quantaware.backends import RUNTIME_NAMES
    from quantaware.workflow import compare_files, export_model

    paths = {name: export_model(m, out_dir / (f"model-{name}-int8.{suffix}" if name != "float"
                                              else f"model-fp32.{suffix}"),
                                calib.example, suffix)
             for name, m in models.items()}
    files.update({f"{name}_{suffix}": path for name, path in paths.items()})
    for name, torch_model in models.items():
        if name == "float":
            continue
        key = name if suffix == "onnx" else f"{name}_{suffix}"
        config_name = (quant["config"] if name == "ptq" else
                       cfg["qat"]["preset"] or cfg["quantization"]["preset"] or "INT8")
        say(f"  evaluating {name.upper()} {config_name} against float in "
            f"{RUNTIME_NAMES[backend]}")
        evaluations[key] = compare_files(
            paths["float"], paths[name], evaluation, backend, threads=cfg["threads"],
            latency_runs=cfg["evaluation"]["latency_runs"],
            names=("FP32", f"{name.upper()} {config_name}"), parameters=parameters)
        if cfg["deploy"]["verify"]:
            import quantaware

            report = quantaware.verify(paths[name], torch_model, evaluation.unlabeled,
                                       num_batches=4, threads=cfg["threads"], backend=backend)
            passed = report.cosine >= 0.99 if text else report.passed()
            evaluations[key]["verify"] = report.to_dict() | {"passed": bool(passed)}
