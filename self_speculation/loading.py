"""Loading a model and its tokenizer: a hub id or a local directory, dtype, device, device map."""

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .distributed import local_rank
from .errors import UsageError
from .layers import check_forward

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "layerskip-stdlib"
"""The embedded default: a small LayerSkip-trained code model shipped in the repository (see its README)."""

ORDINARY_TEXT = "The result is returned as a list of numbers, one for each line of the input file.\n"
"""What `check_forward` runs a half-precision model on: ordinary tokens, not special ones with extreme activations."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto: a GPU if there is one, else the CPU. A GPU without an index is the process's own: cuda:LOCAL_RANK
    under torchrun (one GPU per process), else cuda:0."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {device!r})") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank())
    if resolved.type != "cpu":
        try:  # the one check that covers every backend and index (mps, xpu, cuda:7 on a one-GPU machine)
            torch.empty(0, device=resolved)
        except (RuntimeError, AssertionError) as error:
            reason = str(error).splitlines()[0].split(". ")[0]  # torch's first sentence; the rest lists backends
            raise UsageError(f"--device {device}: not available on this machine ({reason})") from None
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it (else float16), float32 on the CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of auto, {', '.join(DTYPES)} (got {dtype!r})")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub, instead of the minute of retries a download makes when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answer = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # name resolution is outside the socket's timeout; a thread waited on for `timeout` bounds both
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else is meant as a directory."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def model_source(name: str, flag: str = "--model") -> str:
    """A local model directory, checked, or a hub id; errors name the flag that gave it."""
    path = Path(name).expanduser()
    if not path.exists() and _looks_like_path(name):
        raise UsageError(f"{flag} {name}: the directory does not exist")
    if path.exists() and not (path / "config.json").is_file():
        raise UsageError(f"{flag} {name}: no config.json there; expected a Hugging Face model directory")
    return str(path) if path.exists() else name


def _unreachable(model: str, flag: str) -> UsageError:
    return UsageError(f"{flag} {model}: not in the local cache and the Hugging Face hub is unreachable; "
                      f"download it where the hub is reachable and pass its local directory with {flag}")


def check_available(source: str, flag: str) -> None:
    """For a caller that loads the model later: a hub id must be in the local cache or the hub reachable."""
    if Path(source).is_dir() or hub_reachable():
        return
    try:
        AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        raise _unreachable(source, flag) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")


def load(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode on its device, and its tokenizer. Raises UsageError for anything the user can fix,
    naming `flag`."""
    source = model_source(model, flag)
    local = Path(source).is_dir()
    if local and not any((Path(source) / name).exists() for name in TOKENIZER_FILES):
        raise UsageError(f"{flag} {model}: no tokenizer there (expected one of {', '.join(TOKENIZER_FILES)})")
    target = resolve_device(device)
    kwargs = {"dtype": resolve_dtype(dtype, target), "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map

    def from_pretrained(**extra):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        loaded, report = AutoModelForCausalLM.from_pretrained(source, **kwargs, **extra, output_loading_info=True)
        return loaded, report, tokenizer

    try:
        try:
            loaded, report, tokenizer = from_pretrained(local_files_only=True)
        except OSError:
            if local:
                raise
            if not hub_reachable():
                raise _unreachable(model, flag) from None
            loaded, report, tokenizer = from_pretrained()
    except UsageError:
        raise
    except Exception as error:  # a torn weights file, a shape mismatch, broken remote code: the checkpoint's fault
        reason = " ".join(str(error).split())  # the whole reason, on one line
        if "ignore_mismatched_sizes" in reason:
            raise UsageError(f"{flag} {model}: the shapes of its weights do not match its config.json (the load "
                             "report above lists them)") from None
        kind = "" if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: "
        raise UsageError(f"{flag} {model}: cannot load it: {kind}{reason or type(error).__name__}") from error
    check_weights(loaded, report, f"{flag} {model}")
    if not device_map:
        loaded.to(target)
    loaded.eval().requires_grad_(False)  # inference only; frozen weights let the layer runner join projections
    check_forward(loaded, tokenizer(ORDINARY_TEXT, add_special_tokens=False).input_ids)
    return loaded, tokenizer


def check_weights(model: PreTrainedModel, report: dict, name: str) -> None:
    """Refuse a model whose checkpoint does not hold exactly the weights its config asks for, as transformers'
    loading report counts them (keys it ignores by design, such as old rotary `inv_freq` buffers or a tied head,
    are not in the report), or whose weights are not all finite. Either would generate garbage with exit 0: a
    missing layer is randomly initialised, and our own forward check compares against the same weights."""
    missing, unexpected = sorted(report.get("missing_keys", ())), sorted(report.get("unexpected_keys", ()))
    if missing or unexpected:
        examples = ", ".join((missing or unexpected)[:3])
        raise UsageError(f"{name}: its weights do not match its config.json ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {examples}); the config says "
                         f"{getattr(model.config, 'num_hidden_layers', '?')} layers")
    for parameter_name, parameter in model.named_parameters():
        if parameter.device.type != "meta" and not torch.isfinite(parameter).all():  # meta: offloaded by a device map
            raise UsageError(f"{name}: its weights are not finite ({parameter_name} holds nan or inf)")
